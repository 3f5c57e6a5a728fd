// The packed bfloat16 product on Intel AMX tiles (packed_linear.h), for more rows than a
// decode step has: prompt chunks and large batches.
//
// Why it exists: XLA CPU computes bfloat16 products without AMX (~250 GFLOP/s on the 2-core
// Sapphire Rapids machine for a prompt chunk); tiles reach 530-820 GFLOP/s on the same
// products (BUILD_NOTES.md).
//
// Shape of the work: one item per 64 columns (4 accumulator tiles), walking every 16-row
// block of x, and for each 32-wide step of K one A tile of x and four B tiles of W. Tiles:
// 0-3 accumulators (16 x 16 float32), 4 x (16 x 32 bfloat16), 5-6 W. A decode-sized narrow
// product (N = 576) takes 2-tile items instead, so both threads get near-equal shares.

#include <algorithm>
#include <cstdint>

#include "amx.h"
#include "common.h"
#include "packed_linear.h"

namespace tessera_cpu {

#if TESSERA_HAVE_AMX

namespace {

constexpr int kTileRows = 16;   // rows of x per A tile, and K pairs per B tile
constexpr int kTileK = 32;      // bfloat16 elements of K per A tile row
constexpr int kTileN = 16;      // float32 columns per accumulator tile
constexpr int kBlockTiles = 4;  // accumulator tiles per work item
constexpr int kNarrowRows = 64; // up to this many rows, narrow products take 2-tile items
constexpr int64_t kPrefetchPairs = 32;

// Columns [col, col + 16) of the packed weight: their k2 = 0 row, and pairs per k2 row.
struct Panel {
  const uint32_t* base;
  int64_t row_pairs;
};

inline Panel ColumnPanel(const PackedWeight& w, int64_t col) {
  const int64_t b = col / kBlockN;
  return {w.Block(b) + (col - b * kBlockN), w.Width(b)};
}

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
    if (prefetch) {
      for (int t = 0; t < NT; ++t)
        for (int l = 0; l < kTileRows; ++l)
          __builtin_prefetch(panel[t].base + (k2 + kPrefetchPairs + l) * panel[t].row_pairs);
    }
    _tile_loadd(4, xa + r0 * kp + k, kp * 2);
    _tile_loadd(5, panel[0].base + k2 * panel[0].row_pairs, panel[0].row_pairs * 4);
    _tile_dpbf16ps(0, 4, 5);
    if constexpr (NT > 1) {
      _tile_loadd(6, panel[1].base + k2 * panel[1].row_pairs, panel[1].row_pairs * 4);
      _tile_dpbf16ps(1, 4, 6);
    }
    if constexpr (NT > 2) {
      _tile_loadd(5, panel[2].base + k2 * panel[2].row_pairs, panel[2].row_pairs * 4);
      _tile_dpbf16ps(2, 4, 5);
    }
    if constexpr (NT > 3) {
      _tile_loadd(6, panel[3].base + k2 * panel[3].row_pairs, panel[3].row_pairs * 4);
      _tile_dpbf16ps(3, 4, 6);
    }
  }
  const int64_t stride = NT * kTileN * 4;
  _tile_stored(0, out, stride);
  if constexpr (NT > 1) _tile_stored(1, out + kTileN, stride);
  if constexpr (NT > 2) _tile_stored(2, out + 2 * kTileN, stride);
  if constexpr (NT > 3) _tile_stored(3, out + 3 * kTileN, stride);
}

void TileItem(const uint16_t* xa, int64_t rows, const PackedWeight& w, int64_t i, int item_tiles, const Output& y) {
  ConfigureTiles();
  const int64_t n0 = i * item_tiles * kTileN;
  const int tiles = static_cast<int>(std::min<int64_t>(item_tiles, (w.n - n0) / kTileN));
  Panel panel[kBlockTiles];
  for (int t = 0; t < tiles; ++t) panel[t] = ColumnPanel(w, n0 + t * kTileN);
  float block[kTileRows * kBlockTiles * kTileN];
  const bool prefetch = rows <= kNarrowRows;
  for (int64_t r0 = 0; r0 < rows; r0 += kTileRows) {
    switch (tiles) {
      case 4: TileBlock<4>(xa, w.kp, panel, r0, prefetch, block); break;
      case 3: TileBlock<3>(xa, w.kp, panel, r0, prefetch, block); break;
      case 2: TileBlock<2>(xa, w.kp, panel, r0, prefetch, block); break;
      default: TileBlock<1>(xa, w.kp, panel, r0, prefetch, block); break;
    }
    y.Store(block, tiles * kTileN, r0, std::min<int64_t>(kTileRows, rows - r0), tiles * kTileN, n0);
  }
}

}  // namespace

bool TilesReady() { return AmxPermitted(); }

void TileProduct(const uint16_t* xa, int64_t rows, const PackedWeight& w, const Output& y) {
  // Items of 4 tiles (64 columns) share each A tile four ways, which prompt chunks need; a
  // decode step's narrow product (N = 576: 9 such items) is bound by the weights' streaming
  // instead and takes 2-tile items (~20% faster at 16 rows; ~15% slower at 512).
  const bool narrow = rows <= kNarrowRows && w.n / (kBlockTiles * kTileN) < 4 * ParallelThreads();
  const int item_tiles = narrow ? 2 : kBlockTiles;
  const int64_t items = (w.n + item_tiles * kTileN - 1) / (item_tiles * kTileN);
  ParallelFor(items, [&](int64_t i) { TileItem(xa, rows, w, i, item_tiles, y); });
}

#else  // no AMX in this build: packed_widen.cc serves every row count

bool TilesReady() { return false; }
void TileProduct(const uint16_t*, int64_t, const PackedWeight&, const Output&) {}

#endif  // TESSERA_HAVE_AMX

}  // namespace tessera_cpu
