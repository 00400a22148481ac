// Memory-bank operations of ddfast: parameter structs and declarations.
//
// The extension never sees a torch tensor: Python passes raw data pointers, sizes, strides (in
// elements) and, for CUDA, the stream handle. One build therefore works with any installed torch.
#pragma once

#include <cstdint>

namespace ddfast {

// A (rows, cols) fp32 matrix with a row stride; columns are contiguous.
struct MatrixParams {
  const float* data;
  int64_t rows;
  int64_t cols;
  int64_t row_stride;
};

// Similarity degree of every item of a memory (method.md section 3):
//   s_i = sum_j cos(m_i, m_j) = m_hat_i . (sum_j m_hat_j),  m_hat = m / max(|m|, eps).
// out has `rows` entries. Accumulation is in double so the result does not depend on the
// number of threads.
void similarity_degree_cpu(const MatrixParams& items, float eps, float* out, int num_threads);

#ifdef DDFAST_WITH_CUDA
// Same computation on the GPU, enqueued on `stream` (a cudaStream_t passed as an integer).
// `workspace` must hold rows + cols floats of device memory.
void similarity_degree_cuda(const MatrixParams& items, float eps, float* out, float* workspace,
                            std::uintptr_t stream);
#endif

}  // namespace ddfast
