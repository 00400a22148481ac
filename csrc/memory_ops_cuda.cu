// CUDA implementations of the memory-bank operations.
#include <cuda_runtime.h>

#include <stdexcept>

#include "cuda_common.cuh"
#include "memory_ops.h"

namespace ddfast {
namespace {

using cuda::block_sum;
using cuda::check;
using cuda::kThreads;

// One block per row: inv_norm[i] = 1 / max(|m_i|, eps).
__global__ void inv_norm_kernel(const float* items, int64_t d, int64_t stride, float eps,
                                float* inv_norm) {
  __shared__ float shared[32];
  const float* row = items + blockIdx.x * stride;
  float sq = 0.0f;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) sq += row[j] * row[j];
  sq = block_sum(sq, shared);
  if (threadIdx.x == 0) inv_norm[blockIdx.x] = 1.0f / fmaxf(sqrtf(sq), eps);
}

// One thread per column: unit_sum[j] = sum_i m_ij * inv_norm[i], in row order.
__global__ void unit_sum_kernel(const float* items, int64_t k, int64_t d, int64_t stride,
                                const float* inv_norm, float* unit_sum) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= d) return;
  float acc = 0.0f;
  for (int64_t i = 0; i < k; ++i) acc += items[i * stride + j] * inv_norm[i];
  unit_sum[j] = acc;
}

// One block per row: out[i] = inv_norm[i] * (m_i . unit_sum).
__global__ void degree_kernel(const float* items, int64_t d, int64_t stride, const float* inv_norm,
                              const float* unit_sum, float* out) {
  __shared__ float shared[32];
  const float* row = items + blockIdx.x * stride;
  float dot = 0.0f;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) dot += row[j] * unit_sum[j];
  dot = block_sum(dot, shared);
  if (threadIdx.x == 0) out[blockIdx.x] = dot * inv_norm[blockIdx.x];
}

}  // namespace

void similarity_degree_cuda(const MatrixParams& items, float eps, float* out, float* workspace,
                            std::uintptr_t stream_handle) {
  if (items.rows < 0 || items.cols < 0 || items.row_stride < items.cols) {
    throw std::invalid_argument("similarity_degree_cuda: bad shape or stride");
  }
  if (items.rows == 0) return;
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  float* inv_norm = workspace;
  float* unit_sum = workspace + items.rows;
  const unsigned rows = static_cast<unsigned>(items.rows);
  inv_norm_kernel<<<rows, kThreads, 0, stream>>>(items.data, items.cols, items.row_stride, eps,
                                                  inv_norm);
  const unsigned col_blocks = static_cast<unsigned>((items.cols + kThreads - 1) / kThreads);
  unit_sum_kernel<<<col_blocks, kThreads, 0, stream>>>(items.data, items.rows, items.cols,
                                                       items.row_stride, inv_norm, unit_sum);
  degree_kernel<<<rows, kThreads, 0, stream>>>(items.data, items.cols, items.row_stride, inv_norm,
                                               unit_sum, out);
  check(cudaGetLastError(), "similarity_degree_cuda launch");
}

}  // namespace ddfast
