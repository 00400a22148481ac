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
// out has `rows` entries. Dot products sum 256-element blocks in float SIMD lanes and the blocks
// in double, the sum of unit rows is kept in double; the order is fixed, so the result does not
// depend on the number of threads.
void similarity_degree_cpu(const MatrixParams& items, float eps, float* out, int num_threads);

// Inputs of the per-class extreme cosine (method.md section 2). x is (batch, dim) fp32 with
// contiguous columns; labels (batch,) and counts (num_classes,) are int64 with element strides;
// items is (num_classes, slots, dim) fp32 with contiguous columns. Class c holds
// items[c, :counts[c]] (counts are clamped to [0, slots]).
struct ClassExtremesParams {
  const float* x;
  int64_t batch;
  int64_t dim;
  int64_t x_row_stride;
  const int64_t* labels;
  int64_t labels_stride;
  const float* items;
  int64_t num_classes;
  int64_t slots;
  int64_t items_class_stride;
  int64_t items_slot_stride;
  const int64_t* counts;
  int64_t counts_stride;
  float eps;
  bool largest;
};

// For every class c, the min (max when largest) over (samples i with label c) x (slots j <
// counts[c]) of cos(x_i, items[c, j]) = x_i . m / (max(|x_i|, eps) * max(|m|, eps)), summed
// in float over 256-element blocks and in double across blocks, rounded to float, and the pair attaining it: the first in row-major (sample, slot)
// order on ties. Classes without any pair get +inf (-inf when largest) and index -1. Each output
// has num_classes entries. Threaded over samples; the result does not depend on num_threads.
void class_extremes_cpu(const ClassExtremesParams& params, float* values, int64_t* arg_sample,
                        int64_t* arg_slot, int num_threads);

// Inputs of a memory insertion (method.md section 3). items is (num_classes, slots, dim) fp32
// with contiguous columns and counts (num_classes,) int64, both updated in place; new_items is
// (batch, dim) fp32 with contiguous columns; labels (batch,) int64 in [0, num_classes).
struct InsertMemoryParams {
  float* items;
  int64_t num_classes;
  int64_t slots;
  int64_t dim;
  int64_t items_class_stride;
  int64_t items_slot_stride;
  int64_t* counts;
  int64_t counts_stride;
  const float* new_items;
  int64_t batch;
  int64_t new_row_stride;
  const int64_t* labels;
  int64_t labels_stride;
  bool adaptive;
  float eps;
};

// Appends each class's batch items (in batch order) after its items[c, :counts[c]], then
// shrinks the class to `slots` items: fifo drops the oldest; adaptive evicts, one at a time, the
// alive item of largest similarity degree u_i . sum_j u_j (first index on ties; with exactly two
// nonzero items alive, the first of them), O(K dim) per eviction. Survivors are compacted
// to the front in order, later slots zeroed, counts updated. Reproduces ddfast.ref's
// insert_fifo_ref / insert_adaptive_ref. Threaded over classes; independent of num_threads.
void insert_memory_cpu(const InsertMemoryParams& params, int num_threads);

// Adaptive pruning of the (rows, cols) set x to `capacity` rows (ddfast.ref.prune_adaptive_ref):
// the running sum of alive unit rows is recomputed exactly every `refresh_every` evictions (0:
// never). Writes the kept row indices, ascending, to `kept` (room for min(rows, capacity)) and
// returns how many.
int64_t prune_adaptive_cpu(const MatrixParams& x, int64_t capacity, int64_t refresh_every,
                           float eps, int64_t* kept, int num_threads);

// Pools of candidate items for adaptive eviction on the GPU: buf is (rows, slots, dim) fp32 with
// contiguous columns; alive (rows, slots) int8, 1 for a live slot, updated in place; excess
// (rows,) int64, the evictions each row needs (at most its live slots).
struct EvictParams {
  const float* buf;
  int64_t rows;
  int64_t slots;
  int64_t dim;
  int64_t row_stride;
  int64_t slot_stride;
  int8_t* alive;
  const int64_t* excess;
};

#ifdef DDFAST_WITH_CUDA
// Every function below is enqueued on `stream` (a cudaStream_t passed as an integer) and never
// waits for the device; all pointers are device memory.

// Same computation as similarity_degree_cpu. `workspace` must hold rows + cols floats.
void similarity_degree_cuda(const MatrixParams& items, float eps, float* out, float* workspace,
                            std::uintptr_t stream);

// Same result as class_extremes_cpu, computed in float32 (ties between equal items stay exact:
// every cosine is reduced in one fixed order). `workspace` must hold
// class_extremes_cuda_workspace_bytes(batch, num_classes, slots) bytes, 8-byte aligned.
void class_extremes_cuda(const ClassExtremesParams& params, float* values, int64_t* arg_sample,
                         int64_t* arg_slot, float* workspace, std::uintptr_t stream);
int64_t class_extremes_cuda_workspace_bytes(int64_t batch, int64_t num_classes, int64_t slots);

// Runs `steps` rounds of adaptive eviction (ddfast.ref.evict_adaptive_ref) over every row; a row
// evicts in round t only while t < excess[row]. The running sum of alive unit rows is recomputed
// exactly every `refresh_every` rounds (0: never). `workspace` must hold
// evict_rows_cuda_workspace_floats(rows, slots, dim) floats.
void evict_rows_cuda(const EvictParams& params, int64_t steps, int64_t refresh_every, float eps,
                     float* workspace, std::uintptr_t stream);
int64_t evict_rows_cuda_workspace_floats(int64_t rows, int64_t slots, int64_t dim);
#endif

}  // namespace ddfast
