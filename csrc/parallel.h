// A fixed-chunk parallel loop shared by the CPU kernels.
#pragma once

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace ddfast {

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

}  // namespace ddfast
