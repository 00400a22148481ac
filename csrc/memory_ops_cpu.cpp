// CPU implementations of the memory-bank operations.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <thread>
#include <vector>

#include "memory_ops.h"

namespace ddfast {
namespace {

// Runs fn(begin, end) over [0, n) split into contiguous chunks, one per thread. Chunks are
// fixed by n and the thread count only, and every output element is written by exactly one
// chunk, so results are identical for any thread count.
template <typename Fn>
void parallel_for(int64_t n, int num_threads, Fn fn) {
  int threads = std::max(1, std::min<int>(num_threads, static_cast<int>(std::max<int64_t>(n, 1))));
  if (threads == 1) {
    fn(int64_t{0}, n);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(threads);
  const int64_t chunk = (n + threads - 1) / threads;
  for (int t = 0; t < threads; ++t) {
    const int64_t begin = t * chunk;
    const int64_t end = std::min(n, begin + chunk);
    if (begin >= end) break;
    pool.emplace_back(fn, begin, end);
  }
  for (auto& th : pool) th.join();
}

}  // namespace

void similarity_degree_cpu(const MatrixParams& items, float eps, float* out, int num_threads) {
  if (items.rows < 0 || items.cols < 0 || items.row_stride < items.cols) {
    throw std::invalid_argument("similarity_degree_cpu: bad shape or stride");
  }
  const int64_t k = items.rows, d = items.cols;
  if (k == 0) return;
  // Inverse norms, one per row.
  std::vector<double> inv_norm(k);
  parallel_for(k, num_threads, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* row = items.data + i * items.row_stride;
      double sq = 0.0;
      for (int64_t j = 0; j < d; ++j) sq += static_cast<double>(row[j]) * row[j];
      inv_norm[i] = 1.0 / std::max(std::sqrt(sq), static_cast<double>(eps));
    }
  });
  // Sum of unit vectors, reduced in row order (deterministic), split over columns.
  std::vector<double> unit_sum(d, 0.0);
  parallel_for(d, num_threads, [&](int64_t begin, int64_t end) {
    for (int64_t i = 0; i < k; ++i) {
      const float* row = items.data + i * items.row_stride;
      const double s = inv_norm[i];
      for (int64_t j = begin; j < end; ++j) unit_sum[j] += row[j] * s;
    }
  });
  parallel_for(k, num_threads, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* row = items.data + i * items.row_stride;
      double dot = 0.0;
      for (int64_t j = 0; j < d; ++j) dot += row[j] * unit_sum[j];
      out[i] = static_cast<float>(dot * inv_norm[i]);
    }
  });
}

}  // namespace ddfast
