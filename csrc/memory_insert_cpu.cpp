// CPU implementation of memory insertion (fifo and adaptive) and of the epoch pruning
// (method.md section 3). The specification is ddfast/ref.py: insert_fifo_ref,
// insert_adaptive_ref (with evict_adaptive_ref) and prune_adaptive_ref.
//
// Unit rows are formed exactly as the reference does in float32 (u = x / max(|x|, eps), the
// division in float). The running sum of alive unit rows is kept in double; the degrees read a
// float copy of it and sum 256-element blocks in float SIMD lanes, the block sums in double.
// Equal rows give bitwise-equal degrees (one fixed summation order), so
// duplicates tie exactly and the first index wins, as in the reference.
#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "memory_ops.h"
#include "parallel.h"
#include "simd.h"

namespace ddfast {
namespace {

inline double self_dot(const float* a, int64_t d) {
  double p[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t j = 0;
  for (; j + 4 <= d; j += 4) {
    for (int k = 0; k < 4; ++k) p[k] += static_cast<double>(a[j + k]) * a[j + k];
  }
  for (; j < d; ++j) p[0] += static_cast<double>(a[j]) * a[j];
  return (p[0] + p[1]) + (p[2] + p[3]);
}

// The unit row of x into u (float32, as unit_rows_ref): x / max(|x|, eps).
inline void unit_row(const float* x, int64_t d, float eps, float* u) {
  const float norm = std::max(static_cast<float>(std::sqrt(self_dot(x, d))), eps);
  for (int64_t j = 0; j < d; ++j) u[j] = x[j] / norm;
}

// Adaptive evictions over a pool of k unit rows (k x d, row-major in `units`) until `target`
// remain; alive[i] is cleared for each evicted row. The running sum of the alive unit rows is
// recomputed from scratch every `refresh_every` evictions (0: never), as prune_adaptive_ref does.
// `threads` > 1 splits the degree computation over rows (each degree is computed by one thread,
// so the result does not depend on it).
void evict_adaptive(const float* units, int64_t k, int64_t d, int64_t target,
                    int64_t refresh_every, int threads, std::vector<char>& alive) {
  int64_t num_alive = 0;
  for (int64_t i = 0; i < k; ++i) num_alive += alive[i] ? 1 : 0;
  if (num_alive <= target) return;
  std::vector<double> total(d, 0.0);
  auto recompute_total = [&]() {
    std::fill(total.begin(), total.end(), 0.0);
    for (int64_t i = 0; i < k; ++i) {
      if (!alive[i]) continue;
      const float* u = units + i * d;
      for (int64_t j = 0; j < d; ++j) total[j] += u[j];
    }
  };
  // The degrees read a float copy of the double running sum, refreshed after every change, so
  // that they run at float SIMD speed while the sum itself does not drift in float.
  std::vector<float> total_f(d, 0.0f);
  auto refresh_float = [&]() {
    for (int64_t j = 0; j < d; ++j) total_f[j] = static_cast<float>(total[j]);
  };
  recompute_total();
  refresh_float();
  // Self-cosine 1 (a nonzero row) rather than 0 (a zero row), for the two-nonzero-items rule.
  std::vector<char> nonzero(k, 0);
  int64_t num_nonzero = 0;  // alive nonzero rows
  for (int64_t i = 0; i < k; ++i) {
    nonzero[i] = self_dot(units + i * d, d) > 0.5 ? 1 : 0;
    if (alive[i] && nonzero[i]) ++num_nonzero;
  }
  std::vector<double> degree(k, 0.0);
  const bool split = threads > 1 && k * d >= (int64_t{1} << 16);
  for (int64_t step = 0; num_alive > target; ++step) {
    if (refresh_every > 0 && step > 0 && step % refresh_every == 0) {
      recompute_total();
      refresh_float();
    }
    int64_t victim = -1;
    if (num_nonzero == 2) {
      // Both nonzero degrees are 1 + cos(m_1, m_2) in exact arithmetic and every zero row's is
      // 0: the first nonzero row goes, whatever the rounding.
      for (int64_t i = 0; i < k && victim < 0; ++i) {
        if (alive[i] && nonzero[i]) victim = i;
      }
    } else {
      auto degrees = [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          if (alive[i]) degree[i] = simd::dot(units + i * d, total_f.data(), d);
        }
      };
      if (split) {
        parallel_for(k, threads, degrees);
      } else {
        degrees(0, k);
      }
      double best = -std::numeric_limits<double>::infinity();
      for (int64_t i = 0; i < k; ++i) {
        // Strict comparison: the first index keeps a tie. NaN degrees never win, but some
        // alive row is always chosen.
        if (alive[i] && (victim < 0 || degree[i] > best)) {
          best = degree[i];
          victim = i;
        }
      }
    }
    alive[victim] = 0;
    --num_alive;
    if (nonzero[victim]) --num_nonzero;
    const float* gone = units + victim * d;
    for (int64_t j = 0; j < d; ++j) total[j] -= gone[j];
    refresh_float();
  }
}

}  // namespace

void insert_memory_cpu(const InsertMemoryParams& p, int num_threads) {
  if (p.num_classes < 0 || p.slots < 0 || p.dim < 0 || p.batch < 0 || p.items_slot_stride < p.dim ||
      p.items_class_stride < 0 || p.new_row_stride < p.dim) {
    throw std::invalid_argument("insert_memory_cpu: bad shape or stride");
  }
  const int64_t c_num = p.num_classes, n = p.slots, d = p.dim, b = p.batch;
  // Batch members of each class, in batch order.
  std::vector<std::vector<int64_t>> members(c_num);
  for (int64_t i = 0; i < b; ++i) {
    const int64_t label = p.labels[i * p.labels_stride];
    if (label < 0 || label >= c_num) {
      throw std::out_of_range("insert_memory_cpu: label " + std::to_string(label) +
                              " of sample " + std::to_string(i) + " is outside [0, " +
                              std::to_string(c_num) + ")");
    }
    members[label].push_back(i);
  }
  // One class per task: classes own disjoint memory rows, so any thread count gives the same
  // result. Inner loops stay single-threaded.
  parallel_for(c_num, num_threads, [&](int64_t begin, int64_t end) {
    std::vector<float> pool;
    std::vector<float> units;
    std::vector<char> alive;
    for (int64_t c = begin; c < end; ++c) {
      const std::vector<int64_t>& mine = members[c];
      if (mine.empty()) continue;
      float* mem = p.items + c * p.items_class_stride;
      const int64_t old = std::clamp<int64_t>(p.counts[c * p.counts_stride], 0, n);
      const int64_t k = old + static_cast<int64_t>(mine.size());
      // The pool in logical order: the memory's items, then the batch's items of class c.
      pool.assign(static_cast<size_t>(k * d), 0.0f);
      for (int64_t i = 0; i < old; ++i) {
        std::copy(mem + i * p.items_slot_stride, mem + i * p.items_slot_stride + d,
                  pool.begin() + i * d);
      }
      for (size_t t = 0; t < mine.size(); ++t) {
        const float* src = p.new_items + mine[t] * p.new_row_stride;
        std::copy(src, src + d, pool.begin() + (old + static_cast<int64_t>(t)) * d);
      }
      alive.assign(static_cast<size_t>(k), 1);
      if (k > n) {
        if (p.adaptive) {
          units.resize(static_cast<size_t>(k * d));
          for (int64_t i = 0; i < k; ++i) unit_row(&pool[i * d], d, p.eps, &units[i * d]);
          evict_adaptive(units.data(), k, d, n, 0, 1, alive);
        } else {
          for (int64_t i = 0; i < k - n; ++i) alive[i] = 0;  // fifo: the oldest go
        }
      }
      // Survivors compacted to the front in order; the slots after them back to zero.
      int64_t kept = 0;
      for (int64_t i = 0; i < k; ++i) {
        if (!alive[i]) continue;
        std::copy(&pool[i * d], &pool[i * d] + d, mem + kept * p.items_slot_stride);
        ++kept;
      }
      for (int64_t s = kept; s < n; ++s) {
        std::fill(mem + s * p.items_slot_stride, mem + s * p.items_slot_stride + d, 0.0f);
      }
      p.counts[c * p.counts_stride] = kept;
    }
  });
}

int64_t prune_adaptive_cpu(const MatrixParams& x, int64_t capacity, int64_t refresh_every,
                           float eps, int64_t* kept, int num_threads) {
  if (x.rows < 0 || x.cols < 0 || x.row_stride < x.cols || capacity < 0) {
    throw std::invalid_argument("prune_adaptive_cpu: bad shape, stride or capacity");
  }
  const int64_t k = x.rows, d = x.cols;
  std::vector<char> alive(static_cast<size_t>(k), 1);
  if (k > capacity) {
    std::vector<float> units(static_cast<size_t>(k * d));
    parallel_for(k, num_threads, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        unit_row(x.data + i * x.row_stride, d, eps, &units[i * d]);
      }
    });
    evict_adaptive(units.data(), k, d, capacity, refresh_every, num_threads, alive);
  }
  int64_t m = 0;
  for (int64_t i = 0; i < k; ++i) {
    if (alive[i]) kept[m++] = i;
  }
  return m;
}

}  // namespace ddfast
