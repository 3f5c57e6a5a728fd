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

// 16 floats: the register blocking below is written in vectors of 16 lanes. With AVX-512
// that is one register, a GCC vector. Without it, a 64-byte GCC vector is not a register
// type: GCC keeps it on the stack, writes it in 16-byte pieces and reads it back whole, and
// every read stalls on store forwarding (the AVX2 attention ran 20x slower than its
// AVX-512 build). There it is a struct of native vectors (8 lanes with AVX, 4 below), whose
// parts GCC keeps in registers like any scalar.
constexpr int kLanes = 16;

// How many Vecs of sums a register-blocked kernel may keep: 16 of AVX-512's 32 registers; 6
// (12 of 16 registers) with AVX2; 3 (12 of 16) below. Kernels size their row and column
// blocks from it, so the sums never spill to the stack.
#if defined(__AVX512F__)
constexpr int kSumVecs = 16;
#elif defined(__AVX__)
constexpr int kSumVecs = 6;
#else
constexpr int kSumVecs = 3;
#endif

#if defined(__AVX512F__)
typedef float Vec __attribute__((vector_size(64)));

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

inline float SumLanes(const Vec& v) {
  float total = 0.0f;
  for (int i = 0; i < kLanes; ++i) total += v[i];
  return total;
}
#else
#if defined(__AVX__)
constexpr int kPartLanes = 8;
#else
constexpr int kPartLanes = 4;
#endif
constexpr int kParts = kLanes / kPartLanes;
typedef float Part __attribute__((vector_size(kPartLanes * 4)));
typedef uint16_t HalfPart __attribute__((vector_size(kPartLanes * 2)));
typedef uint32_t WordPart __attribute__((vector_size(kPartLanes * 4)));

struct Vec {
  Part part[kParts];

  float operator[](int i) const { return part[i / kPartLanes][i % kPartLanes]; }
  Vec& operator+=(const Vec& o) {
    for (int i = 0; i < kParts; ++i) part[i] += o.part[i];
    return *this;
  }
};
inline Vec operator+(Vec a, const Vec& b) { return a += b; }
inline Vec operator*(const Vec& a, const Vec& b) {
  Vec v;
  for (int i = 0; i < kParts; ++i) v.part[i] = a.part[i] * b.part[i];
  return v;
}
inline Vec operator*(float s, const Vec& b) {
  Vec v;
  for (int i = 0; i < kParts; ++i) v.part[i] = s * b.part[i];
  return v;
}
inline Vec operator*(const Vec& b, float s) { return s * b; }

inline Vec LoadVec(const float* p) {
  Vec v;
  for (int i = 0; i < kParts; ++i) std::memcpy(&v.part[i], p + i * kPartLanes, sizeof(Part));
  return v;
}
inline void StoreVec(const Vec& v, float* p) {
  for (int i = 0; i < kParts; ++i) std::memcpy(p + i * kPartLanes, &v.part[i], sizeof(Part));
}

inline Vec LoadAsFloat(const float* p) { return LoadVec(p); }
inline Vec LoadAsFloat(const uint16_t* p) {
  Vec v;
  for (int i = 0; i < kParts; ++i) {
    HalfPart h;
    std::memcpy(&h, p + i * kPartLanes, sizeof(h));
    const WordPart w = __builtin_convertvector(h, WordPart) << 16;
    std::memcpy(&v.part[i], &w, sizeof(Part));
  }
  return v;
}

// The parts added as vectors first: one register's lanes to add instead of 16.
inline float SumLanes(const Vec& v) {
  Part t = v.part[0];
  for (int i = 1; i < kParts; ++i) t += v.part[i];
  float total = 0.0f;
  for (int i = 0; i < kPartLanes; ++i) total += t[i];
  return total;
}
#endif

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
