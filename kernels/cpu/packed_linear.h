// y = x @ W on a bfloat16 weight packed once at load (kernels/packed_linear.py), shared by the
// product's handlers (packed_linear.cc) and its three ways to run, one file each:
//
//   packed_tiles.cc   Intel AMX tiles, for more rows than a decode step (prompt chunks,
//                     large batches), where the CPU has AMX and Linux grants it;
//   packed_dot.cc     AVX-512 BF16 dot products (vdpbf16ps), for a decode step's few rows,
//                     where the build has AVX512_BF16 (Zen 4/5, Cooper Lake, Sapphire Rapids);
//   packed_widen.cc   any x86-64 (AVX2 or AVX-512 registers, or narrower): the bfloat16
//                     weights widened to float32 in registers, every row count.
//
// The packed layout, which all three read: [K, N] bfloat16, K padded with zero rows to Kp (a
// multiple of 32), cut into column blocks of 32 (the last one 16 wide when N % 32 == 16).
// Block b, at pair b * 16 * Kp, is [Kp / 2, width] 32-bit pairs: pair (k2, c) holds
// W[2 k2, c] in its low half and W[2 k2 + 1, c] in its high half, the operand a tile product
// and vdpbf16ps read, and two float32 values after a shift and a mask. A block's rows are
// one contiguous stream, which the hardware prefetchers follow.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common.h"

namespace tessera_cpu {

constexpr int kBlockN = 32;     // columns per packed block
constexpr int kPackK = 32;      // Kp is a multiple of this
constexpr int kDecodeRows = 4;  // up to this many rows: the weights' streaming bounds the product

struct PackedWeight {
  const uint32_t* pairs;  // [Kp / 2, 2 N] bfloat16 as the blocks above
  int64_t kp, n;

  int64_t Blocks() const { return (n + kBlockN - 1) / kBlockN; }
  int Width(int64_t b) const { return static_cast<int>(std::min<int64_t>(kBlockN, n - b * kBlockN)); }
  const uint32_t* Block(int64_t b) const { return pairs + b * kBlockN * (kp / 2); }
};

// y [rows, n], float32 or bfloat16, written a block of float32 sums at a time.
struct Output {
  void* data;
  bool bf16;
  int64_t n;

  // Rows [r0, r0 + rows) and columns [n0, n0 + width) from `block`, rows `stride` apart.
  void Store(const float* block, int64_t stride, int64_t r0, int64_t rows, int width, int64_t n0) const {
    for (int64_t r = 0; r < rows; ++r) {
      const float* src = block + r * stride;
      if (bf16) {
        uint16_t* dst = static_cast<uint16_t*>(data) + (r0 + r) * n + n0;
        for (int c = 0; c < width; ++c) dst[c] = F32ToBf16(src[c]);
      } else {
        std::copy(src, src + width, static_cast<float*>(data) + (r0 + r) * n + n0);
      }
    }
  }
};

// packed_tiles.cc: whether tiles may run here, and the product on them (x as bfloat16
// [rows rounded up to 16, Kp], zero-padded).
bool TilesReady();
void TileProduct(const uint16_t* xa, int64_t rows, const PackedWeight& w, const Output& y);

// packed_dot.cc: whether the build has AVX512_BF16, and the product for rows <= kDecodeRows
// (x as bfloat16 [rows, Kp]).
bool DotReady();
void DotProduct(const uint16_t* xa, int64_t rows, const PackedWeight& w, const Output& y);

// packed_widen.cc: the product for any row count (x as float32 [rows, Kp] holding bfloat16
// values), and the vector width it was built for (floats per register).
void WidenProduct(const float* xf, int64_t rows, const PackedWeight& w, const Output& y);
int WidenLanes();

}  // namespace tessera_cpu
