// Python module definitions only; the operations live in memory_ops_*.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "memory_ops.h"

namespace py = pybind11;

namespace {

ddfast::MatrixParams matrix(std::uintptr_t ptr, int64_t rows, int64_t cols, int64_t row_stride) {
  return {reinterpret_cast<const float*>(ptr), rows, cols, row_stride};
}

ddfast::ClassExtremesParams extremes_params(std::uintptr_t x, int64_t batch, int64_t dim,
                                            int64_t x_row_stride, std::uintptr_t labels,
                                            int64_t labels_stride, std::uintptr_t items,
                                            int64_t num_classes, int64_t slots,
                                            int64_t items_class_stride, int64_t items_slot_stride,
                                            std::uintptr_t counts, int64_t counts_stride,
                                            float eps, bool largest) {
  return {reinterpret_cast<const float*>(x), batch, dim, x_row_stride,
          reinterpret_cast<const int64_t*>(labels), labels_stride,
          reinterpret_cast<const float*>(items), num_classes, slots, items_class_stride,
          items_slot_stride, reinterpret_cast<const int64_t*>(counts), counts_stride, eps,
          largest};
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ddfast compiled memory-bank operations (raw pointers in, no torch needed to build)";
#ifdef DDFAST_WITH_CUDA
  m.attr("has_cuda") = true;
  m.attr("cuda_archs") = DDFAST_CUDA_ARCHS;  // CMAKE_CUDA_ARCHITECTURES, comma-separated
#else
  m.attr("has_cuda") = false;
  m.attr("cuda_archs") = "";
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

  m.def(
      "class_extremes_cpu",
      [](std::uintptr_t x, int64_t batch, int64_t dim, int64_t x_row_stride,
         std::uintptr_t labels, int64_t labels_stride, std::uintptr_t items, int64_t num_classes,
         int64_t slots, int64_t items_class_stride, int64_t items_slot_stride,
         std::uintptr_t counts, int64_t counts_stride, float eps, bool largest,
         std::uintptr_t values, std::uintptr_t arg_sample, std::uintptr_t arg_slot,
         int num_threads) {
        const auto params = extremes_params(x, batch, dim, x_row_stride, labels, labels_stride,
                                            items, num_classes, slots, items_class_stride,
                                            items_slot_stride, counts, counts_stride, eps,
                                            largest);
        py::gil_scoped_release release;
        ddfast::class_extremes_cpu(params, reinterpret_cast<float*>(values),
                                   reinterpret_cast<int64_t*>(arg_sample),
                                   reinterpret_cast<int64_t*>(arg_slot), num_threads);
      },
      py::arg("x"), py::arg("batch"), py::arg("dim"), py::arg("x_row_stride"), py::arg("labels"),
      py::arg("labels_stride"), py::arg("items"), py::arg("num_classes"), py::arg("slots"),
      py::arg("items_class_stride"), py::arg("items_slot_stride"), py::arg("counts"),
      py::arg("counts_stride"), py::arg("eps"), py::arg("largest"), py::arg("values"),
      py::arg("arg_sample"), py::arg("arg_slot"), py::arg("num_threads"),
      "Per-class min (max when largest) cosine between fp32 samples and their class's memory "
      "items, with the first (sample, slot) pair attaining it; writes num_classes entries each.");

  m.def(
      "insert_memory_cpu",
      [](std::uintptr_t items, int64_t num_classes, int64_t slots, int64_t dim,
         int64_t items_class_stride, int64_t items_slot_stride, std::uintptr_t counts,
         int64_t counts_stride, std::uintptr_t new_items, int64_t batch, int64_t new_row_stride,
         std::uintptr_t labels, int64_t labels_stride, bool adaptive, float eps,
         int num_threads) {
        const ddfast::InsertMemoryParams params{
            reinterpret_cast<float*>(items), num_classes, slots, dim, items_class_stride,
            items_slot_stride, reinterpret_cast<int64_t*>(counts), counts_stride,
            reinterpret_cast<const float*>(new_items), batch, new_row_stride,
            reinterpret_cast<const int64_t*>(labels), labels_stride, adaptive, eps};
        py::gil_scoped_release release;
        ddfast::insert_memory_cpu(params, num_threads);
      },
      py::arg("items"), py::arg("num_classes"), py::arg("slots"), py::arg("dim"),
      py::arg("items_class_stride"), py::arg("items_slot_stride"), py::arg("counts"),
      py::arg("counts_stride"), py::arg("new_items"), py::arg("batch"),
      py::arg("new_row_stride"), py::arg("labels"), py::arg("labels_stride"),
      py::arg("adaptive"), py::arg("eps"), py::arg("num_threads"),
      "Append a batch to fp32 per-class memories and shrink each to capacity (fifo or "
      "adaptive), updating items and counts in place.");

  m.def(
      "prune_adaptive_cpu",
      [](std::uintptr_t x, int64_t rows, int64_t cols, int64_t row_stride, int64_t capacity,
         int64_t refresh_every, float eps, std::uintptr_t kept, int num_threads) {
        py::gil_scoped_release release;
        return ddfast::prune_adaptive_cpu(matrix(x, rows, cols, row_stride), capacity,
                                          refresh_every, eps, reinterpret_cast<int64_t*>(kept),
                                          num_threads);
      },
      py::arg("x"), py::arg("rows"), py::arg("cols"), py::arg("row_stride"), py::arg("capacity"),
      py::arg("refresh_every"), py::arg("eps"), py::arg("kept"), py::arg("num_threads"),
      "Adaptive pruning of an fp32 (rows, cols) set to capacity; writes the kept row indices "
      "(ascending) and returns how many.");

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

  m.def(
      "class_extremes_cuda",
      [](std::uintptr_t x, int64_t batch, int64_t dim, int64_t x_row_stride,
         std::uintptr_t labels, int64_t labels_stride, std::uintptr_t items, int64_t num_classes,
         int64_t slots, int64_t items_class_stride, int64_t items_slot_stride,
         std::uintptr_t counts, int64_t counts_stride, float eps, bool largest,
         std::uintptr_t values, std::uintptr_t arg_sample, std::uintptr_t arg_slot,
         std::uintptr_t workspace, std::uintptr_t stream) {
        const auto params = extremes_params(x, batch, dim, x_row_stride, labels, labels_stride,
                                            items, num_classes, slots, items_class_stride,
                                            items_slot_stride, counts, counts_stride, eps,
                                            largest);
        ddfast::class_extremes_cuda(params, reinterpret_cast<float*>(values),
                                    reinterpret_cast<int64_t*>(arg_sample),
                                    reinterpret_cast<int64_t*>(arg_slot),
                                    reinterpret_cast<float*>(workspace), stream);
      },
      py::arg("x"), py::arg("batch"), py::arg("dim"), py::arg("x_row_stride"), py::arg("labels"),
      py::arg("labels_stride"), py::arg("items"), py::arg("num_classes"), py::arg("slots"),
      py::arg("items_class_stride"), py::arg("items_slot_stride"), py::arg("counts"),
      py::arg("counts_stride"), py::arg("eps"), py::arg("largest"), py::arg("values"),
      py::arg("arg_sample"), py::arg("arg_slot"), py::arg("workspace"), py::arg("stream"),
      "CUDA per-class extreme cosine (as class_extremes_cpu); enqueued on `stream`.");
  m.def("class_extremes_cuda_workspace_bytes", &ddfast::class_extremes_cuda_workspace_bytes,
        py::arg("batch"), py::arg("num_classes"), py::arg("slots"));

  m.def(
      "evict_rows_cuda",
      [](std::uintptr_t buf, int64_t rows, int64_t slots, int64_t dim, int64_t row_stride,
         int64_t slot_stride, std::uintptr_t alive, std::uintptr_t excess, int64_t steps,
         int64_t refresh_every, float eps, std::uintptr_t workspace, std::uintptr_t stream) {
        const ddfast::EvictParams params{reinterpret_cast<const float*>(buf), rows, slots, dim,
                                         row_stride, slot_stride,
                                         reinterpret_cast<int8_t*>(alive),
                                         reinterpret_cast<const int64_t*>(excess)};
        ddfast::evict_rows_cuda(params, steps, refresh_every, eps,
                                reinterpret_cast<float*>(workspace), stream);
      },
      py::arg("buf"), py::arg("rows"), py::arg("slots"), py::arg("dim"), py::arg("row_stride"),
      py::arg("slot_stride"), py::arg("alive"), py::arg("excess"), py::arg("steps"),
      py::arg("refresh_every"), py::arg("eps"), py::arg("workspace"), py::arg("stream"),
      "CUDA adaptive eviction rounds over pools of candidate items; alive updated in place.");
  m.def("evict_rows_cuda_workspace_floats", &ddfast::evict_rows_cuda_workspace_floats,
        py::arg("rows"), py::arg("slots"), py::arg("dim"));
#endif
}
