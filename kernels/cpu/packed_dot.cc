// The packed bfloat16 product for a decode step's few rows on AVX-512 BF16 (packed_linear.h):
// vdpbf16ps multiplies 16 pairs of the weight by a broadcast pair of x and adds both products
// to 16 float32 sums, so neither operand is widened.
//
// Shape of the work: one item per 32-column block (16 for a tail block), the rows' 32-column
// sums in AVX-512 registers while the block's pairs stream past once. Two sets of sums (even
// and odd k2) keep the dependent vdpbf16ps chains short at one row.

#include <cstdint>

#include "common.h"
#include "packed_linear.h"

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define TESSERA_HAVE_DOT_BF16 1
#else
#define TESSERA_HAVE_DOT_BF16 0
#endif

namespace tessera_cpu {

#if TESSERA_HAVE_DOT_BF16

namespace {

constexpr int kLanes512 = 16;
constexpr int64_t kPrefetchPairs = 32;  // pairs prefetched ahead of the walk

// sums [R, V * 16] of R rows of xa (kp apart) against a block of V * 16 columns.
template <int R, int V>
void DotBlock(const uint16_t* xa, int64_t kp, const uint32_t* block, float* out) {
  __m512 acc[2][R][V];
  for (int p = 0; p < 2; ++p)
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) acc[p][r][v] = _mm512_setzero_ps();
  const int64_t pairs = kp / 2;  // even: Kp is a multiple of 32
  const auto* x_pairs = reinterpret_cast<const uint32_t*>(xa);
  constexpr int64_t kRowPairs = V * kLanes512;
  for (int64_t k2 = 0; k2 < pairs; k2 += 2) {
    for (int l = 0; l < V; ++l) {
      __builtin_prefetch(block + (k2 + kPrefetchPairs) * kRowPairs + l * kLanes512);
      __builtin_prefetch(block + (k2 + kPrefetchPairs + 1) * kRowPairs + l * kLanes512);
    }
    for (int p = 0; p < 2; ++p) {
      const uint32_t* row = block + (k2 + p) * kRowPairs;
      __m512i w[V];
      for (int v = 0; v < V; ++v) w[v] = _mm512_loadu_si512(row + v * kLanes512);
      for (int r = 0; r < R; ++r) {
        const __m512bh xr = (__m512bh)_mm512_set1_epi32(static_cast<int>(x_pairs[r * pairs + k2 + p]));
        for (int v = 0; v < V; ++v) acc[p][r][v] = _mm512_dpbf16_ps(acc[p][r][v], xr, (__m512bh)w[v]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(out + (r * V + v) * kLanes512, _mm512_add_ps(acc[0][r][v], acc[1][r][v]));
}

template <int R>
void DotItem(const uint16_t* xa, int64_t kp, const PackedWeight& w, int64_t b, const Output& y) {
  float out[R * kBlockN];
  if (w.Width(b) == kBlockN) {
    DotBlock<R, 2>(xa, kp, w.Block(b), out);
    y.Store(out, kBlockN, 0, R, kBlockN, b * kBlockN);
  } else {
    DotBlock<R, 1>(xa, kp, w.Block(b), out);
    y.Store(out, kLanes512, 0, R, kLanes512, b * kBlockN);
  }
}

}  // namespace

bool DotReady() { return true; }

void DotProduct(const uint16_t* xa, int64_t rows, const PackedWeight& w, const Output& y) {
  const int64_t items = w.Blocks();
  switch (rows) {
    case 1: ParallelFor(items, [&](int64_t b) { DotItem<1>(xa, w.kp, w, b, y); }); break;
    case 2: ParallelFor(items, [&](int64_t b) { DotItem<2>(xa, w.kp, w, b, y); }); break;
    case 3: ParallelFor(items, [&](int64_t b) { DotItem<3>(xa, w.kp, w, b, y); }); break;
    default: ParallelFor(items, [&](int64_t b) { DotItem<4>(xa, w.kp, w, b, y); }); break;
  }
}

#else  // no AVX512_BF16 in this build: packed_widen.cc serves decode rows

bool DotReady() { return false; }
void DotProduct(const uint16_t*, int64_t, const PackedWeight&, const Output&) {}

#endif

}  // namespace tessera_cpu
