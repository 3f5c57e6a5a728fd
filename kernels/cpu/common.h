// Shared by the CPU kernels: bfloat16 conversion, 16-float vectors, and a parallel loop on
// XLA's intra-op thread pool.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace tessera_cpu {

namespace ffi = xla::ffi;

inline float Bf16ToF32(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t F32ToBf16(float f) {  // round to nearest even, NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// 16 floats, one AVX-512 register (two AVX2 ones where that is all the CPU has): GCC's
// vector extension keeps the register blocking below explicit and portable.
typedef float Vec __attribute__((vector_size(64)));
constexpr int kLanes = 16;

inline Vec LoadVec(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void StoreVec(const Vec& v, float* p) { std::memcpy(p, &v, sizeof(v)); }

// Runs fn(0..n-1) on the calling thread and the pool's threads. The caller waits only for
// items that some thread has claimed, never for a helper task to start, so a busy pool
// cannot deadlock it; helpers that start late find nothing left and return.
template <typename Fn>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const Fn& fn) {
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n - 1);
  if (helpers <= 0) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  struct Shared {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto shared = std::make_shared<Shared>();
  auto drain = [shared, n, &fn] {
    for (;;) {
      const int64_t i = shared->next.fetch_add(1);
      if (i >= n) return;
      fn(i);
      if (shared->done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(shared->mu);
        shared->cv.notify_all();
      }
    }
  };
  for (int64_t t = 0; t < helpers; ++t) {
    auto task = drain;  // Schedule takes ownership of a copy
    pool.Schedule(std::move(task));
  }
  drain();
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->cv.wait(lock, [&] { return shared->done.load() == n; });
}

inline bool IsFloat(ffi::DataType t) { return t == ffi::DataType::F32 || t == ffi::DataType::BF16; }

}  // namespace tessera_cpu
