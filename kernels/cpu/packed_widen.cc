// The packed bfloat16 product on any x86-64 (packed_linear.h): each 32-bit pair of the
// packed weight becomes two float32 vectors, W[2 k2, :] by a shift left of 16 and
// W[2 k2 + 1, :] by a mask of the high half, and everything after is float32 FMAs. Built
// with the machine's vector width: 16 floats a register with AVX-512, 8 with AVX2, 4 below.
//
// Why it exists: without AMX or AVX512_BF16, XLA CPU emulates bfloat16 products (a few GB/s
// of weights), so a bfloat16 model decoded no faster than a float32 one (issue 14); widened
// in registers, the weights stream at the memory's speed and half the bytes of float32.
//
// Shape of the work:
// - up to kDecodeRows rows (a decode step): one item per 32-column block, walking its pairs
//   once; rows come in groups whose sums fit in registers (2 with AVX2, 4 with AVX-512),
//   several groups taking turns over 64-pair chunks that stay in L1.
// - more rows: one item per (block, kItemRows rows). The block is widened kPanelK rows of K
//   at a time into a float32 panel [kPanelK, 32], which a register-blocked kernel of M rows
//   x 32 columns (M x V sums) then reads once per M rows of x.

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common.h"
#include "packed_linear.h"

namespace tessera_cpu {
namespace {

#if defined(__AVX512F__)
constexpr int kLanesN = 16;
constexpr int kSumRegs = 24;  // of 32 registers: the rest hold weights and a broadcast of x
#elif defined(__AVX__)
constexpr int kLanesN = 8;
constexpr int kSumRegs = 12;  // of 16
#else
constexpr int kLanesN = 4;
constexpr int kSumRegs = 12;
#endif

typedef float NVec __attribute__((vector_size(kLanesN * 4)));
typedef uint32_t NWord __attribute__((vector_size(kLanesN * 4)));

constexpr int kGroupRows = kLanesN >= 16 ? 4 : 2;  // decode rows whose sums fit in registers at once
constexpr int64_t kChunkPairs = 64;      // pairs per turn when several row groups share a block (8 KB)
constexpr int64_t kPrefetchPairs = 32;   // decode: pairs prefetched ahead of the walk
constexpr int64_t kPanelK = 128;         // rows of K widened at a time (16 KB of float32 for 32 columns)
constexpr int64_t kItemRows = 128;       // rows of x per work item beyond a decode step
constexpr int kMaxKernelRows = 12;

inline NVec LoadN(const float* p) {
  NVec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void StoreN(const NVec& v, float* p) { std::memcpy(p, &v, sizeof(v)); }

struct Halves {
  NVec even, odd;  // W[2 k2, c..] and W[2 k2 + 1, c..] as float32
};

inline Halves Widen(const uint32_t* pairs) {
  NWord w;
  std::memcpy(&w, pairs, sizeof(w));
  const NWord even = w << 16, odd = w & 0xffff0000u;
  Halves h;
  std::memcpy(&h.even, &even, sizeof(even));
  std::memcpy(&h.odd, &odd, sizeof(odd));
  return h;
}

// -- decode: up to kDecodeRows rows ----------------------------------------------------------

// sums [R, V * lanes] += R rows of x (kp apart) against the block's pairs [k2b, k2e). One row
// keeps even and odd k in separate sums: twice the independent FMA chains, none waiting.
template <int R, int V>
void StreamGroup(const float* x, int64_t kp, const uint32_t* block, int64_t k2b, int64_t k2e, float* sums) {
  constexpr int P = R == 1 ? 2 : 1;
  constexpr int W = V * kLanesN;
  NVec acc[P][R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) {
      acc[0][r][v] = LoadN(sums + r * W + v * kLanesN);
      if constexpr (P == 2) acc[1][r][v] = NVec{};
    }
  for (int64_t k2 = k2b; k2 < k2e; ++k2) {
    const uint32_t* row = block + k2 * W;
    for (int l = 0; l < W; l += 16) __builtin_prefetch(row + kPrefetchPairs * W + l);
    for (int v = 0; v < V; ++v) {
      const Halves h = Widen(row + v * kLanesN);
      for (int r = 0; r < R; ++r) {
        acc[0][r][v] += x[r * kp + 2 * k2] * h.even;
        acc[P - 1][r][v] += x[r * kp + 2 * k2 + 1] * h.odd;
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) {
      NVec total = acc[0][r][v];
      if constexpr (P == 2) total += acc[1][r][v];
      StoreN(total, sums + r * W + v * kLanesN);
    }
}

template <int V, int G = kGroupRows>
void StreamAny(int rows, const float* x, int64_t kp, const uint32_t* block, int64_t k2b, int64_t k2e, float* sums) {
  if constexpr (G >= 1) {
    if (rows == G) return StreamGroup<G, V>(x, kp, block, k2b, k2e, sums);
    StreamAny<V, G - 1>(rows, x, kp, block, k2b, k2e, sums);
  }
}

template <int V>
void StreamItem(const float* xf, int64_t rows, const PackedWeight& w, int64_t b, const Output& y) {
  constexpr int W = V * kLanesN;
  float sums[kDecodeRows * W] = {};
  const uint32_t* block = w.Block(b);
  const int64_t pairs = w.kp / 2, chunk = rows <= kGroupRows ? pairs : kChunkPairs;
  for (int64_t k2b = 0; k2b < pairs; k2b += chunk) {
    const int64_t k2e = std::min(pairs, k2b + chunk);
    for (int64_t r0 = 0; r0 < rows; r0 += kGroupRows) {
      const int g = static_cast<int>(std::min<int64_t>(kGroupRows, rows - r0));
      StreamAny<V>(g, xf + r0 * w.kp, w.kp, block, k2b, k2e, sums + r0 * W);
    }
  }
  y.Store(sums, W, 0, rows, W, b * kBlockN);
}

// -- more rows: panels of widened weights ----------------------------------------------------

// c [M, V * lanes] (rows V * lanes apart) += M rows of x (kp apart) @ panel [kc, V * lanes].
template <int M, int V>
void PanelKernel(const float* x, int64_t kp, const float* panel, int64_t kc, float* c) {
  constexpr int W = V * kLanesN;
  NVec acc[M][V];
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < V; ++v) acc[m][v] = LoadN(c + m * W + v * kLanesN);
  for (int64_t k = 0; k < kc; ++k) {
    NVec wv[V];
    for (int v = 0; v < V; ++v) wv[v] = LoadN(panel + k * W + v * kLanesN);
    for (int m = 0; m < M; ++m) {
      const float a = x[m * kp + k];
      for (int v = 0; v < V; ++v) acc[m][v] += a * wv[v];
    }
  }
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < V; ++v) StoreN(acc[m][v], c + m * W + v * kLanesN);
}

template <int V>
constexpr int KernelRows() {
  return std::min(kMaxKernelRows, kSumRegs / V);
}

template <int V, int M = KernelRows<V>()>
void PanelAny(int rows, const float* x, int64_t kp, const float* panel, int64_t kc, float* c) {
  if constexpr (M >= 1) {
    if (rows == M) return PanelKernel<M, V>(x, kp, panel, kc, c);
    PanelAny<V, M - 1>(rows, x, kp, panel, kc, c);
  }
}

template <int V>
void PanelItem(const float* xf, int64_t r_begin, int64_t r_end, const PackedWeight& w, int64_t b, const Output& y) {
  constexpr int W = V * kLanesN;
  constexpr int M = KernelRows<V>();
  const int64_t rows = r_end - r_begin;
  float* c = ThreadBuffer<float, 1>(rows * W);
  float* panel = ThreadBuffer<float, 2>(kPanelK * W);
  std::fill(c, c + rows * W, 0.0f);
  const uint32_t* block = w.Block(b);
  for (int64_t k0 = 0; k0 < w.kp; k0 += kPanelK) {
    const int64_t kc = std::min(kPanelK, w.kp - k0);  // even: Kp is a multiple of 32
    for (int64_t j = 0; j < kc / 2; ++j) {
      const uint32_t* row = block + (k0 / 2 + j) * W;
      for (int v = 0; v < V; ++v) {
        const Halves h = Widen(row + v * kLanesN);
        StoreN(h.even, panel + 2 * j * W + v * kLanesN);
        StoreN(h.odd, panel + (2 * j + 1) * W + v * kLanesN);
      }
    }
    const float* x = xf + r_begin * w.kp + k0;
    int64_t r = 0;
    for (; r + M <= rows; r += M) PanelKernel<M, V>(x + r * w.kp, w.kp, panel, kc, c + r * W);
    if (r < rows) PanelAny<V>(static_cast<int>(rows - r), x + r * w.kp, w.kp, panel, kc, c + r * W);
  }
  y.Store(c, W, r_begin, rows, W, b * kBlockN);
}

// A block's width in registers: 32 columns, or the 16 of a tail block.
constexpr int kFullVecs = kBlockN / kLanesN;
constexpr int kTailVecs = kBlockN / 2 / kLanesN;

}  // namespace

int WidenLanes() { return kLanesN; }

void WidenProduct(const float* xf, int64_t rows, const PackedWeight& w, const Output& y) {
  const int64_t blocks = w.Blocks();
  if (rows <= kDecodeRows) {
    ParallelFor(blocks, [&](int64_t b) {
      if (w.Width(b) == kBlockN) return StreamItem<kFullVecs>(xf, rows, w, b, y);
      StreamItem<kTailVecs>(xf, rows, w, b, y);
    });
    return;
  }
  const int64_t ranges = (rows + kItemRows - 1) / kItemRows;
  ParallelFor(blocks * ranges, [&](int64_t i) {
    const int64_t b = i % blocks, r_begin = i / blocks * kItemRows, r_end = std::min(rows, r_begin + kItemRows);
    if (w.Width(b) == kBlockN) return PanelItem<kFullVecs>(xf, r_begin, r_end, w, b, y);
    PanelItem<kTailVecs>(xf, r_begin, r_end, w, b, y);
  });
}

}  // namespace tessera_cpu
