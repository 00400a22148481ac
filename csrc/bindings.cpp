// Python module definitions only; the operations live in memory_ops_*.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "memory_ops.h"

namespace py = pybind11;

namespace {

ddfast::MatrixParams matrix(std::uintptr_t ptr, int64_t rows, int64_t cols, int64_t row_stride) {
  return {reinterpret_cast<const float*>(ptr), rows, cols, row_stride};
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ddfast compiled memory-bank operations (raw pointers in, no torch needed to build)";
#ifdef DDFAST_WITH_CUDA
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif

  m.def(
      "similarity_degree_cpu",
      [](std::uintptr_t items, int64_t rows, int64_t cols, int64_t row_stride, float eps,
         std::uintptr_t out, int num_threads) {
        py::gil_scoped_release release;
        ddfast::similarity_degree_cpu(matrix(items, rows, cols, row_stride), eps,
                                      reinterpret_cast<float*>(out), num_threads);
      },
      py::arg("items"), py::arg("rows"), py::arg("cols"), py::arg("row_stride"), py::arg("eps"),
      py::arg("out"), py::arg("num_threads"),
      "s_i = sum_j cos(m_i, m_j) for an fp32 (rows, cols) matrix at `items`; writes rows floats.");

#ifdef DDFAST_WITH_CUDA
  m.def(
      "similarity_degree_cuda",
      [](std::uintptr_t items, int64_t rows, int64_t cols, int64_t row_stride, float eps,
         std::uintptr_t out, std::uintptr_t workspace, std::uintptr_t stream) {
        ddfast::similarity_degree_cuda(matrix(items, rows, cols, row_stride), eps,
                                       reinterpret_cast<float*>(out),
                                       reinterpret_cast<float*>(workspace), stream);
      },
      py::arg("items"), py::arg("rows"), py::arg("cols"), py::arg("row_stride"), py::arg("eps"),
      py::arg("out"), py::arg("workspace"), py::arg("stream"),
      "CUDA similarity degree; workspace holds rows + cols floats; enqueued on `stream`.");
#endif
}
