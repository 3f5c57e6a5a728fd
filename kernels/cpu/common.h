// Shared by the CPU kernels: bfloat16 conversion, 16-float vectors, and a parallel loop on
// the kernels' own worker threads (spin_pool.cc). No XLA header here: the handlers include
// ffi_handler.h, and the compute-only files compile without parsing it.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

namespace tessera_cpu {

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

// 16 consecutive elements as floats: float32 loaded, bfloat16 widened into the high halves.
typedef uint16_t Half16 __attribute__((vector_size(32)));
typedef uint32_t Word16 __attribute__((vector_size(64)));
inline Vec LoadAsFloat(const float* p) { return LoadVec(p); }
inline Vec LoadAsFloat(const uint16_t* p) {
  Half16 h;
  std::memcpy(&h, p, sizeof(h));
  const Word16 w = __builtin_convertvector(h, Word16) << 16;
  Vec v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
}

// Runs call(ctx, 0..n-1) on the calling thread and the kernels' own worker threads
// (spin_pool.cc), returning when every item is done.
void RunParallel(int64_t n, void (*call)(const void*, int64_t), const void* ctx);

// Threads a RunParallel job can use: the caller and the workers.
int ParallelThreads();

template <typename Fn>
void ParallelFor(int64_t n, const Fn& fn) {
  RunParallel(n, [](const void* f, int64_t i) { (*static_cast<const Fn*>(f))(i); }, &fn);
}

// A per-thread buffer of at least n elements, reused across calls: a fresh vector of a
// prompt chunk's size (MBs) cost an mmap, page faults and a munmap on every call. Contents
// are whatever the last call left; callers write (or zero) what they read.
template <typename T, int Slot = 0>
T* ThreadBuffer(size_t n) {
  thread_local std::vector<T> buffer;
  if (buffer.size() < n) buffer.resize(n);
  return buffer.data();
}

}  // namespace tessera_cpu
