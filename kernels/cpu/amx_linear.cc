// y = x @ W with Intel AMX bfloat16 tiles, as an XLA FFI custom call.
//
// W is packed once at load time (kernels/amx_linear.py): [K, N] bfloat16 becomes [Kp / 2, N, 2]
// (Kp = K rounded up to 32, zero rows added), the "VNNI" pairs a tile product reads: row k2
// holds (W[2 k2, n], W[2 k2 + 1, n]) for every n. x [T, K] (float32 or bfloat16) is rounded to
// bfloat16 into a zero-padded [Tp, Kp] scratch (Tp = T rounded up to 16); y [T, N] takes x's
// dtype; products accumulate in float32.
//
// Why it exists: XLA CPU computes bfloat16 products without AMX (~250 GFLOP/s on this 2-core
// machine for a prompt chunk, ~1.5 GB/s of weights for a decode step); torch's oneDNN reaches
// ~2,100 GFLOP/s with AMX on the same products.
//
// Shape of the work: one item per block of 64 output columns (4 accumulator tiles); it walks
// every 16-row block of x, and for each 32-wide step of K loads one A tile of x and four B
// tiles of W. Tiles: 0-3 accumulators (16 x 16 float32), 4 x (16 x 32 bfloat16), 5-6 W.

#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"
#include "xla/ffi/api/ffi.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <immintrin.h>
#define TESSERA_HAVE_AMX 1
#else
#define TESSERA_HAVE_AMX 0
#endif

namespace {

using namespace tessera_cpu;  // NOLINT: the kernels' shared helpers

constexpr int kTileRows = 16;  // rows of x per A tile, and K pairs per B tile
constexpr int kTileK = 32;     // bfloat16 elements of K per A tile row
constexpr int kTileN = 16;     // float32 columns per accumulator tile
constexpr int kBlockTiles = 4; // accumulator tiles per work item

#if TESSERA_HAVE_AMX

// Linux hands out the tile registers per process on request; without it the first tile
// instruction is an illegal instruction. Asked once.
bool AmxPermitted() {
  static const bool permitted = [] {
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return permitted;
}

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Loaded at every item, not once per thread: other code on XLA's threads (its own kernel
// libraries) may configure the tiles differently between our calls.
void ConfigureTiles() {
  TileConfig cfg;
  for (int t = 0; t <= 6; ++t) {
    cfg.rows[t] = kTileRows;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// C tiles [0, NT) += x rows [r0, r0 + 16) x W columns [n0, n0 + 16 NT), over all of Kp.
template <int NT>
void TileBlock(const uint16_t* xa, int64_t kp, const uint16_t* wp, int64_t n, int64_t r0, int64_t n0,
               float* out /* [16, NT * 16] */) {
  _tile_zero(0);
  if constexpr (NT > 1) _tile_zero(1);
  if constexpr (NT > 2) _tile_zero(2);
  if constexpr (NT > 3) _tile_zero(3);
  const int64_t w_stride = 4 * n;  // bytes per packed row: N pairs of bfloat16
  for (int64_t k = 0; k < kp; k += kTileK) {
    _tile_loadd(4, xa + r0 * kp + k, kp * 2);
    const uint16_t* wrow = wp + (k / 2) * 2 * n + 2 * n0;
    _tile_loadd(5, wrow, w_stride);
    _tile_dpbf16ps(0, 4, 5);
    if constexpr (NT > 1) {
      _tile_loadd(6, wrow + 2 * kTileN, w_stride);
      _tile_dpbf16ps(1, 4, 6);
    }
    if constexpr (NT > 2) {
      _tile_loadd(5, wrow + 4 * kTileN, w_stride);
      _tile_dpbf16ps(2, 4, 5);
    }
    if constexpr (NT > 3) {
      _tile_loadd(6, wrow + 6 * kTileN, w_stride);
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
void Item(const uint16_t* xa, int64_t rows, int64_t kp, const uint16_t* wp, int64_t n, int64_t i, YT* y) {
  ConfigureTiles();
  const int64_t n0 = i * kBlockTiles * kTileN;
  const int tiles = static_cast<int>(std::min<int64_t>(kBlockTiles, (n - n0) / kTileN));
  float block[kTileRows * kBlockTiles * kTileN];
  for (int64_t r0 = 0; r0 < rows; r0 += kTileRows) {
    switch (tiles) {
      case 4: TileBlock<4>(xa, kp, wp, n, r0, n0, block); break;
      case 3: TileBlock<3>(xa, kp, wp, n, r0, n0, block); break;
      case 2: TileBlock<2>(xa, kp, wp, n, r0, n0, block); break;
      default: TileBlock<1>(xa, kp, wp, n, r0, n0, block); break;
    }
    const int width = tiles * kTileN;
    for (int64_t r = r0; r < std::min<int64_t>(r0 + kTileRows, rows); ++r) {
      const float* src = block + (r - r0) * width;
      YT* dst = y + r * n + n0;
      for (int c = 0; c < width; ++c) {
        if constexpr (sizeof(YT) == 4) {
          dst[c] = src[c];
        } else {
          dst[c] = F32ToBf16(src[c]);
        }
      }
    }
  }
}

#endif  // TESSERA_HAVE_AMX

ffi::Error AmxLinear(ffi::AnyBuffer x, ffi::Buffer<ffi::BF16> wp, ffi::Result<ffi::AnyBuffer> y) {
#if TESSERA_HAVE_AMX
  if (!AmxPermitted()) return ffi::Error::Internal("amx_linear: Linux refused this process the AMX tile state");
  const auto xd = x.dimensions(), wd = wp.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || wd[1] % (2 * kTileN) != 0) {
    return ffi::Error::InvalidArgument("amx_linear: x [T, K] and a packed weight [Kp / 2, 2 N] with N % 16 == 0");
  }
  const int64_t rows = xd[0], k = xd[1], kp = wd[0] * 2, n = wd[1] / 2;
  if (kp % kTileK != 0 || k > kp || kp - k >= kTileK) {
    return ffi::Error::InvalidArgument("amx_linear: the packed weight's K does not fit x");
  }
  if (!IsFloat(x.element_type()) || y->element_type() != x.element_type()) {
    return ffi::Error::InvalidArgument("amx_linear: x float32 or bfloat16; y takes x's type");
  }
  const int64_t padded_rows = (rows + kTileRows - 1) / kTileRows * kTileRows;
  std::vector<uint16_t> xa(padded_rows * kp, 0);
  if (x.element_type() == ffi::DataType::BF16) {
    const auto* src = static_cast<const uint16_t*>(x.untyped_data());
    for (int64_t r = 0; r < rows; ++r) std::memcpy(&xa[r * kp], src + r * k, k * 2);
  } else {
    const auto* src = static_cast<const float*>(x.untyped_data());
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < k; ++c) xa[r * kp + c] = F32ToBf16(src[r * k + c]);
  }
  const auto* w = reinterpret_cast<const uint16_t*>(wp.typed_data());
  const int64_t items = (n + kBlockTiles * kTileN - 1) / (kBlockTiles * kTileN);
  if (y->element_type() == ffi::DataType::BF16) {
    auto* out = static_cast<uint16_t*>(y->untyped_data());
    ParallelFor(items, [&](int64_t i) { Item(xa.data(), rows, kp, w, n, i, out); });
  } else {
    auto* out = static_cast<float*>(y->untyped_data());
    ParallelFor(items, [&](int64_t i) { Item(xa.data(), rows, kp, w, n, i, out); });
  }
  return ffi::Error::Success();
#else
  return ffi::Error::Unimplemented("amx_linear: built for a CPU without AMX");
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
                                  .Ret<ffi::AnyBuffer>());          // y
