// CPU implementation of the per-class extreme cosine behind the minimax memory terms
// (method.md section 2).
#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "memory_ops.h"
#include "parallel.h"
#include "simd.h"

namespace ddfast {
namespace {

using simd::dot_and_norm;

inline double squared_norm(const float* a, int64_t d) {
  double dot = 0.0, sq = 0.0;
  dot_and_norm(a, a, d, &dot, &sq);
  return sq;
}

}  // namespace

void class_extremes_cpu(const ClassExtremesParams& p, float* values, int64_t* arg_sample,
                        int64_t* arg_slot, int num_threads) {
  if (p.batch < 0 || p.num_classes < 0 || p.slots < 0 || p.dim < 0 || p.x_row_stride < p.dim ||
      p.items_slot_stride < p.dim || p.items_class_stride < 0) {
    throw std::invalid_argument("class_extremes_cpu: bad shape or stride");
  }
  const int64_t b = p.batch, c = p.num_classes, n = p.slots, d = p.dim;
  for (int64_t i = 0; i < b; ++i) {
    const int64_t label = p.labels[i * p.labels_stride];
    if (label < 0 || label >= c) {
      throw std::out_of_range("class_extremes_cpu: label " + std::to_string(label) +
                              " of sample " + std::to_string(i) + " is outside [0, " +
                              std::to_string(c) + ")");
    }
  }
  const float fill = p.largest ? -std::numeric_limits<float>::infinity()
                               : std::numeric_limits<float>::infinity();
  // Per sample: its extreme cosine over its class's valid slots and the first slot attaining it.
  std::vector<float> best(b, fill);
  std::vector<int64_t> best_slot(b, -1);
  parallel_for(b, num_threads, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* x = p.x + i * p.x_row_stride;
      const int64_t label = p.labels[i * p.labels_stride];
      const int64_t count = std::clamp<int64_t>(p.counts[label * p.counts_stride], 0, n);
      const double x_norm = std::max(std::sqrt(squared_norm(x, d)), static_cast<double>(p.eps));
      const float* mem = p.items + label * p.items_class_stride;
      float value = fill;
      int64_t slot = -1;
      for (int64_t j = 0; j < count; ++j) {
        double dot = 0.0, sq = 0.0;
        dot_and_norm(x, mem + j * p.items_slot_stride, d, &dot, &sq);
        const double m_norm = std::max(std::sqrt(sq), static_cast<double>(p.eps));
        const float cos = static_cast<float>(dot / (x_norm * m_norm));
        // Strict comparison: the first slot keeps a tie.
        if (slot < 0 || (p.largest ? cos > value : cos < value)) {
          value = cos;
          slot = j;
        }
      }
      best[i] = value;
      best_slot[i] = slot;
    }
  });
  // Per class, in sample order, so the first sample keeps a tie: row-major (sample, slot) order.
  for (int64_t k = 0; k < c; ++k) {
    values[k] = fill;
    arg_sample[k] = -1;
    arg_slot[k] = -1;
  }
  for (int64_t i = 0; i < b; ++i) {
    if (best_slot[i] < 0) continue;
    const int64_t label = p.labels[i * p.labels_stride];
    const float v = best[i];
    if (arg_sample[label] < 0 || (p.largest ? v > values[label] : v < values[label])) {
      values[label] = v;
      arg_sample[label] = i;
      arg_slot[label] = best_slot[i];
    }
  }
}

}  // namespace ddfast
