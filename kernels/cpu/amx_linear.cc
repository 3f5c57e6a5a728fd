// y = x @ W on bfloat16 weights packed for Intel AMX tiles and AVX-512 BF16, as an XLA FFI
// custom call.
//
// W is packed once at load time (kernels/amx_linear.py): [K, N] bfloat16, K padded with zero
// rows to Kp (a multiple of 32), is cut into column blocks of 32 (the last one 16 wide when
// N % 32 == 16). Block b, at element b * 32 * Kp, is [Kp / 2, width, 2]: row k2 holds the
// "VNNI" pairs (W[2 k2, n], W[2 k2 + 1, n]) of its columns, the operand a tile product and
// vdpbf16ps read. x [T, K] (float32 or bfloat16) is rounded to bfloat16 into a zero-padded
// [Tp, Kp] scratch; with the `gated` attribute x is [T, 2 K] = [gate | up] and the operand is
// silu(gate) * up (an MLP's down projection). y [T, N] takes x's dtype; products accumulate
// in float32.
//
// Why blocks: a work item then reads its columns as one contiguous stream, which the hardware
// prefetchers follow. With the pairs row-major ([Kp / 2, 2 N]) every tile load gathered
// 64-byte pieces 4 N bytes apart, and a decode step streamed weights at ~10 GB/s.
//
// Why it exists: XLA CPU computes bfloat16 products without AMX (~250 GFLOP/s on this 2-core
// machine for a prompt chunk, ~1.5 GB/s of weights for a decode step); torch's oneDNN reaches
// ~2,100 GFLOP/s with AMX on the same products.
//
// Shape of the work: up to kVectorRows rows (decode steps), one item per column block, with
// the rows' 32-column sums in AVX-512 registers (vdpbf16ps against a broadcast pair of x); a
// tile would waste 15 of its 16 rows there. More rows: one item per 64 columns (4
// accumulator tiles), walking every 16-row block of x, and for each 32-wide step of K one A
// tile of x and four B tiles of W. Tiles: 0-3 accumulators (16 x 16 float32),
// 4 x (16 x 32 bfloat16), 5-6 W.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "amx.h"
#include "common.h"
#include "qkv_rope.h"
#include "xla/ffi/api/ffi.h"

namespace {

using namespace tessera_cpu;  // NOLINT: the kernels' shared helpers

constexpr int kTileRows = 16;   // rows of x per A tile, and K pairs per B tile
constexpr int kTileK = 32;      // bfloat16 elements of K per A tile row
constexpr int kTileN = 16;      // float32 columns per accumulator tile (and per AVX-512 register)
constexpr int kBlockTiles = 4;  // accumulator tiles per tile work item
constexpr int kBlockN = 32;     // columns per packed block
constexpr int kVectorRows = 4;  // up to this many rows of x: AVX-512 BF16, not tiles
constexpr int kNarrowRows = 64; // up to this many rows, narrow products take 2-tile items
constexpr int64_t kPrefetchPairs = 32;  // decode-sized products: k2 rows of weights prefetched ahead

// Columns [col, col + 16) of the packed weight: their k2 = 0 row, and elements per k2 row.
struct Panel {
  const uint16_t* base;
  int64_t row_elems;
};

inline Panel ColumnPanel(const uint16_t* wp, int64_t kp, int64_t n, int64_t col) {
  const int64_t block = col / kBlockN, width = std::min<int64_t>(kBlockN, n - block * kBlockN);
  return {wp + block * kBlockN * kp + 2 * (col - block * kBlockN), 2 * width};
}

// y rows [r0, r0 + rows) and columns [n0, n0 + width) from a float32 block of that width.
template <typename YT>
void StoreRows(const float* block, int64_t r0, int64_t rows, int width, int64_t n, int64_t n0, YT* y) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* src = block + r * width;
    YT* dst = y + (r0 + r) * n + n0;
    for (int c = 0; c < width; ++c) {
      if constexpr (sizeof(YT) == 4) {
        dst[c] = src[c];
      } else {
        dst[c] = F32ToBf16(src[c]);
      }
    }
  }
}

#if TESSERA_HAVE_VECTOR_BF16

// R rows x (V x 16) columns of one packed block, over all of Kp. Two accumulator sets (even
// and odd k2) keep the dependent vdpbf16ps chains short at one row.
template <int R, int V>
void VectorBlock(const uint16_t* xa, int64_t kp, const uint16_t* block, float* out /* [R, V * 16] */) {
  __m512 acc[2][R][V];
  for (int p = 0; p < 2; ++p)
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) acc[p][r][v] = _mm512_setzero_ps();
  const int64_t pairs = kp / 2;  // even: Kp is a multiple of 32
  const auto* x_pairs = reinterpret_cast<const uint32_t*>(xa);
  constexpr int64_t kRowElems = V * 2 * kTileN;
  for (int64_t k2 = 0; k2 < pairs; k2 += 2) {
    for (int l = 0; l < 2 * V; ++l) __builtin_prefetch(block + (k2 + kPrefetchPairs) * kRowElems + l * 32);
    for (int p = 0; p < 2; ++p) {
      const uint16_t* row = block + (k2 + p) * kRowElems;
      __m512i w[V];
      for (int v = 0; v < V; ++v) w[v] = _mm512_loadu_si512(row + v * 2 * kTileN);
      for (int r = 0; r < R; ++r) {
        const __m512bh xr = (__m512bh)_mm512_set1_epi32(static_cast<int>(x_pairs[r * pairs + k2 + p]));
        for (int v = 0; v < V; ++v) acc[p][r][v] = _mm512_dpbf16_ps(acc[p][r][v], xr, (__m512bh)w[v]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(out + (r * V + v) * kTileN, _mm512_add_ps(acc[0][r][v], acc[1][r][v]));
}

template <int R, typename YT>
void VectorItem(const uint16_t* xa, int64_t kp, const uint16_t* wp, int64_t n, int64_t i, YT* y) {
  const int64_t n0 = i * kBlockN;
  const uint16_t* block = wp + i * kBlockN * kp;
  float out[R * kBlockN];
  if (n - n0 >= kBlockN) {
    VectorBlock<R, 2>(xa, kp, block, out);
    StoreRows(out, 0, R, kBlockN, n, n0, y);
  } else {
    VectorBlock<R, 1>(xa, kp, block, out);
    StoreRows(out, 0, R, kTileN, n, n0, y);
  }
}

template <typename YT>
void VectorProduct(const uint16_t* xa, int64_t rows, int64_t kp, const uint16_t* wp, int64_t n, YT* y) {
  const int64_t items = (n + kBlockN - 1) / kBlockN;
  switch (rows) {
    case 1: ParallelFor(items, [&](int64_t i) { VectorItem<1>(xa, kp, wp, n, i, y); }); break;
    case 2: ParallelFor(items, [&](int64_t i) { VectorItem<2>(xa, kp, wp, n, i, y); }); break;
    case 3: ParallelFor(items, [&](int64_t i) { VectorItem<3>(xa, kp, wp, n, i, y); }); break;
    default: ParallelFor(items, [&](int64_t i) { VectorItem<4>(xa, kp, wp, n, i, y); }); break;
  }
}

#endif  // TESSERA_HAVE_VECTOR_BF16

#if TESSERA_HAVE_AMX

// C tiles [0, NT) += x rows [r0, r0 + 16) x the NT column panels, over all of Kp; with
// `prefetch`, the panels' rows kPrefetchPairs ahead are prefetched (decode-sized products,
// bound by the weights' streaming: 16 rows x [576, 3072] ~15-30% faster in interleaved runs).
template <int NT>
void TileBlock(const uint16_t* xa, int64_t kp, const Panel* panel, int64_t r0, bool prefetch,
               float* out /* [16, NT * 16] */) {
  _tile_zero(0);
  if constexpr (NT > 1) _tile_zero(1);
  if constexpr (NT > 2) _tile_zero(2);
  if constexpr (NT > 3) _tile_zero(3);
  for (int64_t k = 0; k < kp; k += kTileK) {
    const int64_t k2 = k / 2;
    if (prefetch) {  // decode-sized rows: the weights' streaming bounds the product
      for (int t = 0; t < NT; ++t)
        for (int l = 0; l < kTileRows; ++l)
          __builtin_prefetch(panel[t].base + (k2 + kPrefetchPairs + l) * panel[t].row_elems);
    }
    _tile_loadd(4, xa + r0 * kp + k, kp * 2);
    _tile_loadd(5, panel[0].base + k2 * panel[0].row_elems, panel[0].row_elems * 2);
    _tile_dpbf16ps(0, 4, 5);
    if constexpr (NT > 1) {
      _tile_loadd(6, panel[1].base + k2 * panel[1].row_elems, panel[1].row_elems * 2);
      _tile_dpbf16ps(1, 4, 6);
    }
    if constexpr (NT > 2) {
      _tile_loadd(5, panel[2].base + k2 * panel[2].row_elems, panel[2].row_elems * 2);
      _tile_dpbf16ps(2, 4, 5);
    }
    if constexpr (NT > 3) {
      _tile_loadd(6, panel[3].base + k2 * panel[3].row_elems, panel[3].row_elems * 2);
      _tile_dpbf16ps(3, 4, 6);
    }
  }
  const int64_t stride = NT * kTileN * 4;
  _tile_stored(0, out, stride);
  if constexpr (NT > 1) _tile_stored(1, out + kTileN, stride);
  if constexpr (NT > 2) _tile_stored(2, out + 2 * kTileN, stride);
  if constexpr (NT > 3) _tile_stored(3, out + 3 * kTileN, stride);
}

template <typename YT>
void TileItem(const uint16_t* xa, int64_t rows, int64_t kp, const uint16_t* wp, int64_t n, int64_t i, int item_tiles,
              YT* y) {
  ConfigureTiles();
  const int64_t n0 = i * item_tiles * kTileN;
  const int tiles = static_cast<int>(std::min<int64_t>(item_tiles, (n - n0) / kTileN));
  Panel panel[kBlockTiles];
  for (int t = 0; t < tiles; ++t) panel[t] = ColumnPanel(wp, kp, n, n0 + t * kTileN);
  float block[kTileRows * kBlockTiles * kTileN];
  for (int64_t r0 = 0; r0 < rows; r0 += kTileRows) {
    switch (tiles) {
      case 4: TileBlock<4>(xa, kp, panel, r0, rows <= kNarrowRows, block); break;
      case 3: TileBlock<3>(xa, kp, panel, r0, rows <= kNarrowRows, block); break;
      case 2: TileBlock<2>(xa, kp, panel, r0, rows <= kNarrowRows, block); break;
      default: TileBlock<1>(xa, kp, panel, r0, rows <= kNarrowRows, block); break;
    }
    StoreRows(block, r0, std::min<int64_t>(kTileRows, rows - r0), tiles * kTileN, n, n0, y);
  }
}

template <typename YT>
void Product(const uint16_t* xa, int64_t rows, int64_t kp, const uint16_t* wp, int64_t n, YT* y) {
#if TESSERA_HAVE_VECTOR_BF16
  if (rows <= kVectorRows) return VectorProduct(xa, rows, kp, wp, n, y);
#endif
  // Items of 4 tiles (64 columns) share each A tile four ways, which prompt chunks need; a
  // decode step's narrow product (N = 576: 9 such items) is bound by the weights' streaming
  // instead and takes 2-tile items, so both threads get near-equal shares (~20% faster at 16
  // rows; ~15% slower at 512, hence the row limit).
  const bool narrow = rows <= kNarrowRows && n / (kBlockTiles * kTileN) < 4 * ParallelThreads();
  const int item_tiles = narrow ? 2 : kBlockTiles;
  const int64_t items = (n + item_tiles * kTileN - 1) / (item_tiles * kTileN);
  ParallelFor(items, [&](int64_t i) { TileItem(xa, rows, kp, wp, n, i, item_tiles, y); });
}

#endif  // TESSERA_HAVE_AMX

inline float AsFloat(float v) { return v; }
inline float AsFloat(uint16_t v) { return Bf16ToF32(v); }

// x's rows as the bfloat16 operand xa [rows, Kp]: x itself, or with `gated` x = [gate | up]
// (2 K columns) and the operand silu(gate) * up, computed in float32 and rounded once (the
// MLP's activation, fused here rather than left to XLA, which spent ~2 ms per layer on it
// for a 512-token chunk in rounded bfloat16 steps). Rows in blocks of 16 over the threads.
template <typename XT>
void PrepareRows(const XT* x, int64_t rows, int64_t k, int64_t kp, bool gated, uint16_t* xa) {
  const int64_t width = gated ? 2 * k : k;
  auto block = [&](int64_t b) {
    for (int64_t r = b * kTileRows; r < std::min<int64_t>((b + 1) * kTileRows, rows); ++r) {
      const XT* src = x + r * width;
      uint16_t* dst = xa + r * kp;
      if (!gated) {
        for (int64_t c = 0; c < k; ++c) dst[c] = F32ToBf16(AsFloat(src[c]));
        continue;
      }
      float h[kTileK];
      for (int64_t c0 = 0; c0 < k; c0 += kTileK) {
        const int64_t n = std::min<int64_t>(kTileK, k - c0);
        for (int64_t c = 0; c < n; ++c) {
          const float g = AsFloat(src[c0 + c]), u = AsFloat(src[k + c0 + c]);
          h[c] = g / (1.0f + std::exp(-g)) * u;
        }
        for (int64_t c = 0; c < n; ++c) dst[c0 + c] = F32ToBf16(h[c]);
      }
    }
  };
  const int64_t blocks = (rows + kTileRows - 1) / kTileRows;
  if (blocks == 1) return block(0);
  ParallelFor(blocks, block);
}

#if TESSERA_HAVE_AMX

// x checked against the packed weight and prepared as the bfloat16 operand; the product's
// rows and N. An error message instead when they do not fit.
struct Operand {
  uint16_t* xa = nullptr;  // [padded rows, Kp], a per-thread buffer
  int64_t rows = 0, kp = 0, n = 0;
  const char* error = nullptr;
};

Operand Prepare(ffi::AnyBuffer& x, ffi::Buffer<ffi::BF16>& wp, bool gated) {
  Operand op;
  if (!AmxPermitted()) {
    op.error = "amx_linear: Linux refused this process the AMX tile state";
    return op;
  }
  const auto xd = x.dimensions(), wd = wp.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || wd[1] % (2 * kTileN) != 0) {
    op.error = "amx_linear: x [T, K] and a packed weight [Kp / 2, 2 N] with N % 16 == 0";
    return op;
  }
  op.rows = xd[0], op.kp = wd[0] * 2, op.n = wd[1] / 2;
  if (gated && xd[1] % 2 != 0) {
    op.error = "amx_linear: a gated x is [T, 2 K] (gate, then up)";
    return op;
  }
  const int64_t k = gated ? xd[1] / 2 : xd[1];
  if (op.kp % kTileK != 0 || k > op.kp || op.kp - k >= kTileK) {
    op.error = "amx_linear: the packed weight's K does not fit x";
    return op;
  }
  if (!IsFloat(x.element_type())) {
    op.error = "amx_linear: x must be float32 or bfloat16";
    return op;
  }
  // x as bfloat16 rows of Kp (zeros past K), in whole 16-row tiles when tiles will read it.
  const bool tiles = !TESSERA_HAVE_VECTOR_BF16 || op.rows > kVectorRows;
  const int64_t padded_rows = tiles ? (op.rows + kTileRows - 1) / kTileRows * kTileRows : op.rows;
  op.xa = ThreadBuffer<uint16_t>(padded_rows * op.kp);
  std::fill(op.xa, op.xa + padded_rows * op.kp, 0);
  if (x.element_type() == ffi::DataType::BF16) {
    PrepareRows(static_cast<const uint16_t*>(x.untyped_data()), op.rows, k, op.kp, gated, op.xa);
  } else {
    PrepareRows(static_cast<const float*>(x.untyped_data()), op.rows, k, op.kp, gated, op.xa);
  }
  return op;
}

#endif  // TESSERA_HAVE_AMX

ffi::Error AmxLinear(ffi::AnyBuffer x, ffi::Buffer<ffi::BF16> wp, ffi::Result<ffi::AnyBuffer> y, bool gated) {
#if TESSERA_HAVE_AMX
  if (y->element_type() != x.element_type()) return ffi::Error::InvalidArgument("amx_linear: y takes x's type");
  Operand op = Prepare(x, wp, gated);
  if (op.error != nullptr) return ffi::Error::InvalidArgument(op.error);
  if (op.rows == 0) return ffi::Error::Success();
  const auto* w = reinterpret_cast<const uint16_t*>(wp.typed_data());
  if (y->element_type() == ffi::DataType::BF16) {
    Product(op.xa, op.rows, op.kp, w, op.n, static_cast<uint16_t*>(y->untyped_data()));
  } else {
    Product(op.xa, op.rows, op.kp, w, op.n, static_cast<float*>(y->untyped_data()));
  }
  return ffi::Error::Success();
#else
  return ffi::Error::Unimplemented("amx_linear: built for a CPU without AMX");
#endif
}

// A fused q/k/v projection with rotary embeddings on q and k (qkv_rope.h).
ffi::Error AmxQkvRope(ffi::AnyBuffer x, ffi::Buffer<ffi::BF16> wp, ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                      ffi::Result<ffi::AnyBuffer> q, ffi::Result<ffi::AnyBuffer> k, ffi::Result<ffi::AnyBuffer> v) {
#if TESSERA_HAVE_AMX
  Operand op = Prepare(x, wp, false);
  if (op.error != nullptr) return ffi::Error::InvalidArgument(op.error);
  QkvShape shape;
  if (const char* bad = CheckQkvRope(op.rows, op.n, x.element_type(), cos, sin, q, k, v, &shape)) {
    return ffi::Error::InvalidArgument(bad);
  }
  if (op.rows == 0) return ffi::Error::Success();
  float* y = ThreadBuffer<float>(op.rows * op.n);  // every element written by the product
  Product(op.xa, op.rows, op.kp, reinterpret_cast<const uint16_t*>(wp.typed_data()), op.n, y);
  WriteQkv(y, shape, cos, sin, q, k, v);
  return ffi::Error::Success();
#else
  return ffi::Error::Unimplemented("amx_qkv_rope: built for a CPU without AMX");
#endif
}

}  // namespace

// 1 when this CPU has AMX bfloat16 tiles and Linux lets the process use them, else 0.
extern "C" int TesseraAmxReady() {
#if TESSERA_HAVE_AMX
  return AmxPermitted() ? 1 : 0;
#else
  return 0;
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(TesseraAmxLinear, AmxLinear,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()            // x
                                  .Arg<ffi::Buffer<ffi::BF16>>()    // packed weight
                                  .Ret<ffi::AnyBuffer>()            // y
                                  .Attr<bool>("gated"));            // x = [gate | up]: silu(gate) * up

XLA_FFI_DEFINE_HANDLER_SYMBOL(TesseraAmxQkvRope, AmxQkvRope,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()          // x [T, K]
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // packed weight, N = (H + 2 KV) D
                                  .Arg<ffi::Buffer<ffi::F32>>()   // cos [T, D / 2]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // sin [T, D / 2]
                                  .Ret<ffi::AnyBuffer>()          // q [T, H, D]
                                  .Ret<ffi::AnyBuffer>()          // k [T, KV, D]
                                  .Ret<ffi::AnyBuffer>());        // v [T, KV, D]
