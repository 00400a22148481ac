// CUDA implementation of the per-class extreme cosine (method.md section 2). The specification
// is ddfast/ref.py class_extremes_ref; the CPU version is minimax_cpu.cpp.
//
// Three launches, no host synchronisation and no (B, N) matrix in memory:
//   1. one warp per sample: 1 / max(|x_i|, eps);
//   2. one warp per memory slot (c, j): its norm, then cos(x_i, m_cj) for every sample i of
//      class c in batch order, keeping the extreme and the first sample attaining it. Each slot
//      is read from global memory once and then from cache, so the memories are streamed once;
//   3. one block per class: the extreme over its slots and the first (sample, slot) pair in
//      row-major order attaining it.
// Arithmetic is float32 (products and warp sums); every cosine is reduced by the same fixed warp
// tree, so duplicated items give bitwise-equal cosines and tie exactly.
#include <cuda_runtime.h>

#include <cmath>
#include <stdexcept>

#include "cuda_common.cuh"
#include "memory_ops.h"

namespace ddfast {
namespace {

using cuda::blocks_for;
using cuda::check;
using cuda::kThreads;
using cuda::kWarpsPerBlock;
using cuda::warp_sum;

__global__ void sample_inv_norm_kernel(ClassExtremesParams p, float* inv_x) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= p.batch) return;
  const float* x = p.x + i * p.x_row_stride;
  float sq = 0.0f;
  for (int64_t j = lane; j < p.dim; j += 32) sq += x[j] * x[j];
  sq = warp_sum(sq);
  if (lane == 0) inv_x[i] = 1.0f / fmaxf(sqrtf(sq), p.eps);
}

// ws_value / ws_sample: (num_classes, slots), the extreme over the class's samples per slot and
// the first sample attaining it (-1: no sample or an unused slot).
__global__ void slot_extremes_kernel(ClassExtremesParams p, const float* inv_x, float* ws_value,
                                     int64_t* ws_sample) {
  const int64_t c = blockIdx.y;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (j >= p.slots) return;
  const float fill = p.largest ? -INFINITY : INFINITY;
  float best = fill;
  int64_t best_sample = -1;
  int64_t count = p.counts[c * p.counts_stride];
  if (j < count) {
    const float* m = p.items + c * p.items_class_stride + j * p.items_slot_stride;
    float sq = 0.0f;
    for (int64_t d = lane; d < p.dim; d += 32) sq += m[d] * m[d];
    const float inv_m = 1.0f / fmaxf(sqrtf(warp_sum(sq)), p.eps);
    for (int64_t i = 0; i < p.batch; ++i) {
      if (p.labels[i * p.labels_stride] != c) continue;
      const float* x = p.x + i * p.x_row_stride;
      float dot = 0.0f;
      for (int64_t d = lane; d < p.dim; d += 32) dot += x[d] * m[d];
      const float cosine = warp_sum(dot) * inv_x[i] * inv_m;
      // Strict comparison: the first sample keeps a tie.
      const bool better = p.largest ? cosine > best : cosine < best;
      if (best_sample < 0 || better) {
        best = cosine;
        best_sample = i;
      }
    }
  }
  if (lane == 0) {
    ws_value[c * p.slots + j] = best;
    ws_sample[c * p.slots + j] = best_sample;
  }
}

// True when candidate (v, s, j) beats (bv, bs, bj): a pair beats no pair; a more extreme value
// wins; on equal values the earlier pair in row-major (sample, slot) order wins.
__device__ __forceinline__ bool beats(float v, int64_t s, int64_t j, float bv, int64_t bs,
                                      int64_t bj, bool largest) {
  if (s < 0) return false;
  if (bs < 0) return true;
  if (largest ? v > bv : v < bv) return true;
  if (v != bv) return false;
  return s < bs || (s == bs && j < bj);
}

__global__ void class_reduce_kernel(ClassExtremesParams p, const float* ws_value,
                                    const int64_t* ws_sample, float* values, int64_t* arg_sample,
                                    int64_t* arg_slot) {
  __shared__ float s_value[kThreads];
  __shared__ int64_t s_sample[kThreads];
  __shared__ int64_t s_slot[kThreads];
  const int64_t c = blockIdx.x;
  float best = p.largest ? -INFINITY : INFINITY;
  int64_t best_sample = -1, best_slot = -1;
  for (int64_t j = threadIdx.x; j < p.slots; j += blockDim.x) {
    const float v = ws_value[c * p.slots + j];
    const int64_t s = ws_sample[c * p.slots + j];
    if (beats(v, s, j, best, best_sample, best_slot, p.largest)) {
      best = v;
      best_sample = s;
      best_slot = j;
    }
  }
  s_value[threadIdx.x] = best;
  s_sample[threadIdx.x] = best_sample;
  s_slot[threadIdx.x] = best_slot;
  __syncthreads();
  for (int half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) {
      const int other = threadIdx.x + half;
      if (beats(s_value[other], s_sample[other], s_slot[other], s_value[threadIdx.x],
                s_sample[threadIdx.x], s_slot[threadIdx.x], p.largest)) {
        s_value[threadIdx.x] = s_value[other];
        s_sample[threadIdx.x] = s_sample[other];
        s_slot[threadIdx.x] = s_slot[other];
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const bool found = s_sample[0] >= 0;
    values[c] = found ? s_value[0] : (p.largest ? -INFINITY : INFINITY);
    arg_sample[c] = found ? s_sample[0] : -1;
    arg_slot[c] = found ? s_slot[0] : -1;
  }
}

}  // namespace

void class_extremes_cuda(const ClassExtremesParams& p, float* values, int64_t* arg_sample,
                         int64_t* arg_slot, float* workspace, std::uintptr_t stream_handle) {
  if (p.batch < 0 || p.dim < 0 || p.num_classes < 0 || p.slots < 0 || p.x_row_stride < p.dim ||
      p.items_slot_stride < p.dim || p.items_class_stride < 0) {
    throw std::invalid_argument("class_extremes_cuda: bad shape or stride");
  }
  if (p.num_classes == 0) return;
  if (p.num_classes > 65535) {
    throw std::invalid_argument("class_extremes_cuda: at most 65535 classes");
  }
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  // Workspace layout: inv_x (batch floats), ws_sample (C * N int64, 8-byte aligned), ws_value.
  float* inv_x = workspace;
  const int64_t inv_x_words = (p.batch + 1) / 2 * 2;  // round up to an even float count
  int64_t* ws_sample = reinterpret_cast<int64_t*>(workspace + inv_x_words);
  float* ws_value = reinterpret_cast<float*>(ws_sample + p.num_classes * p.slots);
  if (p.batch > 0) {
    sample_inv_norm_kernel<<<blocks_for(p.batch, kWarpsPerBlock), kThreads, 0, stream>>>(p, inv_x);
  }
  if (p.slots > 0) {
    const dim3 grid(blocks_for(p.slots, kWarpsPerBlock), static_cast<unsigned>(p.num_classes));
    slot_extremes_kernel<<<grid, kThreads, 0, stream>>>(p, inv_x, ws_value, ws_sample);
  }
  class_reduce_kernel<<<static_cast<unsigned>(p.num_classes), kThreads, 0, stream>>>(
      p, ws_value, ws_sample, values, arg_sample, arg_slot);
  check(cudaGetLastError(), "class_extremes_cuda launch");
}

int64_t class_extremes_cuda_workspace_bytes(int64_t batch, int64_t num_classes, int64_t slots) {
  const int64_t inv_x_words = (batch + 1) / 2 * 2;
  return inv_x_words * 4 + num_classes * slots * (8 + 4);
}

}  // namespace ddfast
