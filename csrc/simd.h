// Portable SIMD dot products for the CPU kernels (GCC/Clang vector extensions: SSE on x86-64,
// NEON on ARM; no -march flag needed).
#pragma once

#include <cstdint>
#include <cstring>

namespace ddfast {
namespace simd {

typedef float float4 __attribute__((vector_size(16)));

inline float4 load4(const float* p) {
  float4 v;
  std::memcpy(&v, p, sizeof(v));  // unaligned load
  return v;
}

inline float lane_sum(float4 v) { return (v[0] + v[1]) + (v[2] + v[3]); }

constexpr int64_t kBlock = 256;  // elements summed in float before a double accumulation

// a . b: blocks of 256 elements summed in float over 16 SIMD lanes (each lane adds 16 products
// per block), block sums and the tail added in double. A fixed order, so equal rows give
// bitwise-equal results whatever the thread count.
inline double dot(const float* a, const float* b, int64_t d) {
  double acc = 0.0;
  int64_t j = 0;
  for (; j + kBlock <= d; j += kBlock) {
    float4 p0 = {}, p1 = {}, p2 = {}, p3 = {};
    for (int64_t t = j; t < j + kBlock; t += 16) {
      p0 += load4(a + t) * load4(b + t);
      p1 += load4(a + t + 4) * load4(b + t + 4);
      p2 += load4(a + t + 8) * load4(b + t + 8);
      p3 += load4(a + t + 12) * load4(b + t + 12);
    }
    acc += lane_sum((p0 + p1) + (p2 + p3));
  }
  for (; j < d; ++j) acc += static_cast<double>(a[j]) * b[j];
  return acc;
}

// a . b and b . b in one pass, summed as dot() does.
inline void dot_and_norm(const float* a, const float* b, int64_t d, double* ab, double* bb) {
  double dot_acc = 0.0, sq_acc = 0.0;
  int64_t j = 0;
  for (; j + kBlock <= d; j += kBlock) {
    float4 p0 = {}, p1 = {}, p2 = {}, p3 = {}, q0 = {}, q1 = {}, q2 = {}, q3 = {};
    for (int64_t t = j; t < j + kBlock; t += 16) {
      const float4 b0 = load4(b + t), b1 = load4(b + t + 4), b2 = load4(b + t + 8),
                   b3 = load4(b + t + 12);
      p0 += load4(a + t) * b0;
      p1 += load4(a + t + 4) * b1;
      p2 += load4(a + t + 8) * b2;
      p3 += load4(a + t + 12) * b3;
      q0 += b0 * b0;
      q1 += b1 * b1;
      q2 += b2 * b2;
      q3 += b3 * b3;
    }
    dot_acc += lane_sum((p0 + p1) + (p2 + p3));
    sq_acc += lane_sum((q0 + q1) + (q2 + q3));
  }
  for (; j < d; ++j) {
    const double bv = b[j];
    dot_acc += static_cast<double>(a[j]) * bv;
    sq_acc += bv * bv;
  }
  *ab = dot_acc;
  *bb = sq_acc;
}

}  // namespace simd
}  // namespace ddfast
