// CUDA implementation of the adaptive evictions behind memory insertion and epoch pruning
// (method.md section 3). The specification is ddfast/ref.py evict_adaptive_ref, used by
// insert_adaptive_ref and prune_adaptive_ref; the CPU version is memory_insert_cpu.cpp.
//
// A pool row r holds `slots` candidate items (a class's memory then its batch items, or the
// whole set being pruned) and needs excess[r] evictions. The host enqueues `steps` rounds of two
// launches, never waiting on the device:
//   degree: one warp per (row, slot), s = u . total with u = x / max(|x|, eps) formed on the fly;
//   select: one block per row, the first alive slot of largest degree (the first alive nonzero
//           slot when exactly two nonzero ones are alive), cleared from `alive` and its unit row
//           subtracted from the running sum `total`.
// So each eviction reads the row's items once, O(K D), never a K x K matrix. With refresh_every
// > 0, `total` is recomputed from the alive rows every refresh_every rounds, as the reference's
// pruning does. Arithmetic is float32.
#include <cuda_runtime.h>

#include <cmath>
#include <stdexcept>

#include "cuda_common.cuh"
#include "memory_ops.h"

namespace ddfast {
namespace {

using cuda::block_sum;
using cuda::blocks_for;
using cuda::check;
using cuda::kThreads;
using cuda::kWarpsPerBlock;
using cuda::warp_sum;

struct Workspace {
  float* norm;         // (R, K) max(|x|, eps)
  float* nonzero;      // (R, K) 1 where the unit row's self-dot exceeds 1/2, else 0
  float* degree;       // (R, K) degree of the current round, -inf for evicted slots
  float* total;        // (R, D) sum of the alive unit rows
  float* num_nonzero;  // (R,) alive nonzero slots (small integers, exact in float)
};

__device__ __forceinline__ const float* item(const EvictParams& p, int64_t r, int64_t k) {
  return p.buf + r * p.row_stride + k * p.slot_stride;
}

__global__ void prepare_kernel(EvictParams p, float eps, Workspace w) {
  const int64_t r = blockIdx.y;
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (k >= p.slots) return;
  const float* x = item(p, r, k);
  float sq = 0.0f;
  for (int64_t d = lane; d < p.dim; d += 32) sq += x[d] * x[d];
  const float norm = fmaxf(sqrtf(warp_sum(sq)), eps);
  float self = 0.0f;
  for (int64_t d = lane; d < p.dim; d += 32) {
    const float u = x[d] / norm;
    self += u * u;
  }
  self = warp_sum(self);
  if (lane == 0) {
    w.norm[r * p.slots + k] = norm;
    w.nonzero[r * p.slots + k] = self > 0.5f ? 1.0f : 0.0f;
  }
}

// total[r, d] = sum over alive slots k, in slot order, of x[r, k, d] / norm[r, k].
__global__ void total_kernel(EvictParams p, Workspace w) {
  const int64_t r = blockIdx.y;
  const int64_t d = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (d >= p.dim) return;
  float acc = 0.0f;
  for (int64_t k = 0; k < p.slots; ++k) {
    if (p.alive[r * p.slots + k]) acc += item(p, r, k)[d] / w.norm[r * p.slots + k];
  }
  w.total[r * p.dim + d] = acc;
}

__global__ void count_nonzero_kernel(EvictParams p, Workspace w) {
  __shared__ float shared[32];
  const int64_t r = blockIdx.x;
  float n = 0.0f;
  for (int64_t k = threadIdx.x; k < p.slots; k += blockDim.x) {
    if (p.alive[r * p.slots + k]) n += w.nonzero[r * p.slots + k];
  }
  n = block_sum(n, shared);
  if (threadIdx.x == 0) w.num_nonzero[r] = n;
}

__global__ void degree_kernel(EvictParams p, int64_t step, Workspace w) {
  const int64_t r = blockIdx.y;
  if (step >= p.excess[r]) return;  // this row is done
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (k >= p.slots) return;
  if (!p.alive[r * p.slots + k]) {
    if (lane == 0) w.degree[r * p.slots + k] = -INFINITY;
    return;
  }
  const float* x = item(p, r, k);
  const float* total = w.total + r * p.dim;
  const float norm = w.norm[r * p.slots + k];
  float dot = 0.0f;
  for (int64_t d = lane; d < p.dim; d += 32) dot += (x[d] / norm) * total[d];
  dot = warp_sum(dot);
  if (lane == 0) w.degree[r * p.slots + k] = dot;
}

__global__ void select_kernel(EvictParams p, int64_t step, Workspace w) {
  __shared__ float s_value[kThreads];
  __shared__ int64_t s_slot[kThreads];
  __shared__ int64_t s_nonzero[kThreads];
  __shared__ int64_t s_victim;
  const int64_t r = blockIdx.x;
  if (step >= p.excess[r]) return;
  // Per thread: the first alive slot of largest degree (NaN degrees never win, but some alive
  // slot is always chosen) and the first alive nonzero slot, over a strided range.
  float best = -INFINITY;
  int64_t best_slot = -1, first_nonzero = p.slots;
  for (int64_t k = threadIdx.x; k < p.slots; k += blockDim.x) {
    if (!p.alive[r * p.slots + k]) continue;
    const float v = w.degree[r * p.slots + k];
    if (best_slot < 0 || v > best) {
      best = v;
      best_slot = k;
    }
    if (w.nonzero[r * p.slots + k] > 0.5f && k < first_nonzero) first_nonzero = k;
  }
  s_value[threadIdx.x] = best;
  s_slot[threadIdx.x] = best_slot;
  s_nonzero[threadIdx.x] = first_nonzero;
  __syncthreads();
  for (int half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) {
      const int o = threadIdx.x + half;
      const int64_t os = s_slot[o], ms = s_slot[threadIdx.x];
      const float ov = s_value[o], mv = s_value[threadIdx.x];
      if (os >= 0 && (ms < 0 || ov > mv || (ov == mv && os < ms))) {
        s_value[threadIdx.x] = ov;
        s_slot[threadIdx.x] = os;
      }
      if (s_nonzero[o] < s_nonzero[threadIdx.x]) s_nonzero[threadIdx.x] = s_nonzero[o];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    // Exactly two nonzero slots alive: both degrees are 1 + cos(m_1, m_2) in exact arithmetic
    // and every zero slot's is 0, so the first nonzero slot goes, whatever the rounding.
    int64_t victim = w.num_nonzero[r] == 2.0f ? s_nonzero[0] : s_slot[0];
    if (victim < 0 || victim >= p.slots) victim = 0;  // unreachable while excess is honest
    p.alive[r * p.slots + victim] = 0;
    w.num_nonzero[r] -= w.nonzero[r * p.slots + victim];
    s_victim = victim;
  }
  __syncthreads();
  const int64_t victim = s_victim;
  const float* x = item(p, r, victim);
  const float norm = w.norm[r * p.slots + victim];
  float* total = w.total + r * p.dim;
  for (int64_t d = threadIdx.x; d < p.dim; d += blockDim.x) total[d] -= x[d] / norm;
}

}  // namespace

int64_t evict_rows_cuda_workspace_floats(int64_t rows, int64_t slots, int64_t dim) {
  return rows * (3 * slots + dim + 1);
}

void evict_rows_cuda(const EvictParams& p, int64_t steps, int64_t refresh_every, float eps,
                     float* workspace, std::uintptr_t stream_handle) {
  if (p.rows < 0 || p.slots < 0 || p.dim < 0 || p.slot_stride < p.dim ||
      p.row_stride < 0 || steps < 0 || refresh_every < 0) {
    throw std::invalid_argument("evict_rows_cuda: bad shape, stride, steps or refresh_every");
  }
  if (p.rows == 0 || p.slots == 0 || steps == 0) return;
  if (p.rows > 65535) throw std::invalid_argument("evict_rows_cuda: at most 65535 rows");
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const int64_t rk = p.rows * p.slots;
  const Workspace w{workspace, workspace + rk, workspace + 2 * rk, workspace + 3 * rk,
                    workspace + 3 * rk + p.rows * p.dim};
  const unsigned rows = static_cast<unsigned>(p.rows);
  const dim3 slot_grid(blocks_for(p.slots, kWarpsPerBlock), rows);
  const dim3 dim_grid(blocks_for(p.dim > 0 ? p.dim : 1, kThreads), rows);
  prepare_kernel<<<slot_grid, kThreads, 0, stream>>>(p, eps, w);
  total_kernel<<<dim_grid, kThreads, 0, stream>>>(p, w);
  count_nonzero_kernel<<<rows, kThreads, 0, stream>>>(p, w);
  for (int64_t step = 0; step < steps; ++step) {
    if (refresh_every > 0 && step > 0 && step % refresh_every == 0) {
      total_kernel<<<dim_grid, kThreads, 0, stream>>>(p, w);
    }
    degree_kernel<<<slot_grid, kThreads, 0, stream>>>(p, step, w);
    select_kernel<<<rows, kThreads, 0, stream>>>(p, step, w);
  }
  check(cudaGetLastError(), "evict_rows_cuda launch");
}

}  // namespace ddfast
