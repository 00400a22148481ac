// CPU implementations of the memory-bank operations.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <thread>
#include <vector>

#include "memory_ops.h"
#include "parallel.h"
#include "simd.h"

namespace ddfast {

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
      const double sq = simd::dot(row, row, d);
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
  // The degrees read a float copy of the sum, so they run at float SIMD speed.
  std::vector<float> unit_sum_f(unit_sum.begin(), unit_sum.end());
  parallel_for(k, num_threads, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* row = items.data + i * items.row_stride;
      const double dot = simd::dot(row, unit_sum_f.data(), d);
      out[i] = static_cast<float>(dot * inv_norm[i]);
    }
  });
}

}  // namespace ddfast
