// y = x @ W on a packed bfloat16 weight (packed_linear.h), as XLA FFI custom calls: the
// product, and the fused q/k/v projection with rotary embeddings (qkv_rope.h).
//
// x [T, K] (float32 or bfloat16) is rounded to bfloat16, so every path multiplies the same
// operands and sums them in float32; y [T, N] takes x's dtype. With the `gated` attribute x
// is [T, 2 K] = [gate | up] and the operand is silu(gate) * up (an MLP's down projection),
// computed in float32 and rounded once (XLA spent ~2 ms per layer on it for a 512-token chunk
// in rounded bfloat16 steps).
//
// Which path runs: rows <= kDecodeRows go to AVX-512 BF16 dot products where the build has
// them, more rows to AMX tiles where the CPU grants them; everything else to the widening
// path, which any x86-64 runs.

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common.h"
#include "packed_linear.h"
#include "qkv_rope.h"
#include "ffi_handler.h"

namespace {

using namespace tessera_cpu;  // NOLINT: the kernels' shared helpers

constexpr int kTileRows = 16;  // the tile path reads x in whole blocks of 16 rows
constexpr int kRowBlock = 16;  // rows prepared per work item
constexpr int kGateChunk = 32;

inline float AsFloat(float v) { return v; }
inline float AsFloat(uint16_t v) { return Bf16ToF32(v); }
inline void Put(float v, uint16_t* p) { *p = F32ToBf16(v); }
inline void Put(float v, float* p) { *p = Bf16ToF32(F32ToBf16(v)); }  // bfloat16's value, in float32

// x's rows as the operand [rows, Kp] in OT (bfloat16 bits, or float32 holding bfloat16
// values): x itself, or with `gated` x = [gate | up] and the operand silu(gate) * up.
template <typename XT, typename OT>
void PrepareRows(const XT* x, int64_t rows, int64_t k, int64_t kp, bool gated, OT* out) {
  const int64_t width = gated ? 2 * k : k;
  auto block = [&](int64_t b) {
    for (int64_t r = b * kRowBlock; r < std::min<int64_t>((b + 1) * kRowBlock, rows); ++r) {
      const XT* src = x + r * width;
      OT* dst = out + r * kp;
      if (!gated) {
        for (int64_t c = 0; c < k; ++c) Put(AsFloat(src[c]), dst + c);
        continue;
      }
      float h[kGateChunk];
      for (int64_t c0 = 0; c0 < k; c0 += kGateChunk) {
        const int64_t n = std::min<int64_t>(kGateChunk, k - c0);
        for (int64_t c = 0; c < n; ++c) {
          const float g = AsFloat(src[c0 + c]), u = AsFloat(src[k + c0 + c]);
          h[c] = g / (1.0f + std::exp(-g)) * u;
        }
        for (int64_t c = 0; c < n; ++c) Put(h[c], dst + c0 + c);
      }
    }
  };
  const int64_t blocks = (rows + kRowBlock - 1) / kRowBlock;
  if (blocks == 1) return block(0);
  ParallelFor(blocks, block);
}

template <typename OT>
OT* Operand(ffi::AnyBuffer& x, int64_t rows, int64_t padded_rows, int64_t k, int64_t kp, bool gated) {
  OT* out = ThreadBuffer<OT>(padded_rows * kp);
  std::fill(out, out + padded_rows * kp, OT{});  // K's padding (and the tile path's rows) read as zeros
  if (x.element_type() == ffi::DataType::BF16) {
    PrepareRows(static_cast<const uint16_t*>(x.untyped_data()), rows, k, kp, gated, out);
  } else {
    PrepareRows(static_cast<const float*>(x.untyped_data()), rows, k, kp, gated, out);
  }
  return out;
}

// x checked against the packed weight; its rows and the weight's shape. An error message
// instead when they do not fit.
const char* Check(ffi::AnyBuffer& x, ffi::Buffer<ffi::BF16>& wp, bool gated, int64_t* rows, int64_t* k,
                  PackedWeight* w) {
  const auto xd = x.dimensions(), wd = wp.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || wd[1] % (kBlockN) != 0) {
    return "packed_linear: x [T, K] and a packed weight [Kp / 2, 2 N] with N % 16 == 0";
  }
  if (gated && xd[1] % 2 != 0) return "packed_linear: a gated x is [T, 2 K] (gate, then up)";
  if (!IsFloat(x.element_type())) return "packed_linear: x must be float32 or bfloat16";
  *rows = xd[0];
  *k = gated ? xd[1] / 2 : xd[1];
  *w = {reinterpret_cast<const uint32_t*>(wp.typed_data()), wd[0] * 2, wd[1] / 2};
  if (w->kp % kPackK != 0 || *k > w->kp || w->kp - *k >= kPackK) return "packed_linear: the packed weight's K does not fit x";
  return nullptr;
}

// The product into y, on the path that fits this CPU and row count.
void Multiply(ffi::AnyBuffer& x, int64_t rows, int64_t k, bool gated, const PackedWeight& w, const Output& y) {
  if (rows == 0) return;
  if (rows <= kDecodeRows ? DotReady() : TilesReady()) {
    const int64_t padded = rows <= kDecodeRows ? rows : (rows + kTileRows - 1) / kTileRows * kTileRows;
    const uint16_t* xa = Operand<uint16_t>(x, rows, padded, k, w.kp, gated);
    if (rows <= kDecodeRows) return DotProduct(xa, rows, w, y);
    return TileProduct(xa, rows, w, y);
  }
  WidenProduct(Operand<float>(x, rows, rows, k, w.kp, gated), rows, w, y);
}

ffi::Error PackedLinear(ffi::AnyBuffer x, ffi::Buffer<ffi::BF16> wp, ffi::Result<ffi::AnyBuffer> y, bool gated) {
  if (y->element_type() != x.element_type()) return ffi::Error::InvalidArgument("packed_linear: y takes x's type");
  int64_t rows, k;
  PackedWeight w;
  if (const char* bad = Check(x, wp, gated, &rows, &k, &w)) return ffi::Error::InvalidArgument(bad);
  Multiply(x, rows, k, gated, w, {y->untyped_data(), y->element_type() == ffi::DataType::BF16, w.n});
  return ffi::Error::Success();
}

// A fused q/k/v projection with rotary embeddings on q and k (qkv_rope.h).
ffi::Error PackedQkvRope(ffi::AnyBuffer x, ffi::Buffer<ffi::BF16> wp, ffi::Buffer<ffi::F32> cos,
                         ffi::Buffer<ffi::F32> sin, ffi::Result<ffi::AnyBuffer> q, ffi::Result<ffi::AnyBuffer> k,
                         ffi::Result<ffi::AnyBuffer> v) {
  int64_t rows, depth;
  PackedWeight w;
  if (const char* bad = Check(x, wp, false, &rows, &depth, &w)) return ffi::Error::InvalidArgument(bad);
  QkvShape shape;
  if (const char* bad = CheckQkvRope(rows, w.n, x.element_type(), cos, sin, q, k, v, &shape)) {
    return ffi::Error::InvalidArgument(bad);
  }
  if (rows == 0) return ffi::Error::Success();
  float* y = ThreadBuffer<float, 3>(rows * w.n);  // every element written by the product
  Multiply(x, rows, depth, false, w, {y, false, w.n});
  WriteQkv(y, shape, cos, sin, q, k, v);
  return ffi::Error::Success();
}

}  // namespace

// Which paths this library takes on this CPU, as bits: 1 AMX tiles, 2 AVX-512 BF16 dot
// products; the widening path's floats per register shifted left by 8.
extern "C" int TesseraPackedPaths() { return (TilesReady() ? 1 : 0) | (DotReady() ? 2 : 0) | (WidenLanes() << 8); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(TesseraPackedLinear, PackedLinear,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()            // x
                                  .Arg<ffi::Buffer<ffi::BF16>>()    // packed weight
                                  .Ret<ffi::AnyBuffer>()            // y
                                  .Attr<bool>("gated"));            // x = [gate | up]: silu(gate) * up

XLA_FFI_DEFINE_HANDLER_SYMBOL(TesseraPackedQkvRope, PackedQkvRope,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()          // x [T, K]
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // packed weight, N = (H + 2 KV) D
                                  .Arg<ffi::Buffer<ffi::F32>>()   // cos [T, D / 2]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // sin [T, D / 2]
                                  .Ret<ffi::AnyBuffer>()          // q [T, H, D]
                                  .Ret<ffi::AnyBuffer>()          // k [T, KV, D]
                                  .Ret<ffi::AnyBuffer>());        // v [T, KV, D]
