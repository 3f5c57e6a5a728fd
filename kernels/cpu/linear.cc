// y = x @ W for the few rows of a decode step, as an XLA FFI custom call.
//
// x [T, K] and y [T, N] are float32 or bfloat16 (y takes x's type); W is float32 or bfloat16,
// laid out [K, N] ("kn", a projection) or [N, K] ("nk", a tied embedding used as the output
// head). Accumulation is in float32.
//
// Why it exists: a decode step is a chain of matrix-vector products that should stream the
// weights at the memory's speed. XLA CPU runs them on one thread (float32, ~20 GB/s here) or
// emulates bfloat16 (~2-5 GB/s); this streams every weight once per four rows of x, split
// over XLA's intra-op threads, and widens bfloat16 weights in registers.
//
// Shape of the work: "kn" splits N into blocks of 64 columns; a block keeps 4 rows x 64
// columns of y in 16 vector registers while it walks down K. "nk" splits N into blocks of 16
// weight rows; each output is a dot product over K.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string_view>
#include <type_traits>
#include <vector>

#include "common.h"
#include "qkv_rope.h"
#include "ffi_handler.h"

namespace {

using namespace tessera_cpu;  // NOLINT: the kernels' shared helpers

// "nk": rows of x per pass over a weight row (4 outputs x kRowBlock sums within kSumVecs).
constexpr int kRowBlock = kSumVecs >= 16 ? 4 : 1;
constexpr int kOutputBlock = 16;   // "nk": outputs per work item
constexpr int kRowsByK = 4;        // "kn": up to this many rows, split K; beyond, split N
constexpr int kPrefetchRows = 16;  // "kn" by columns: how far down K to prefetch

inline float LoadScalar(const float* p) { return *p; }
inline float LoadScalar(const uint16_t* p) { return Bf16ToF32(*p); }
inline void StoreScalar(float x, float* p) { *p = x; }
inline void StoreScalar(float x, uint16_t* p) { *p = F32ToBf16(x); }

struct Shapes {
  int64_t rows, k, n;
};

// Partial product of a [K, N] weight's rows [k0, k1) into part [rows, N]: the rows are
// walked in order, four at a time, so every thread reads the weight as a few contiguous
// streams (which the hardware prefetcher follows), and each four-row step updates part once.
template <typename WT>
void RowsKN(const float* x, const WT* w, const Shapes& s, int64_t k0, int64_t k1, float* part) {
  std::fill(part, part + s.rows * s.n, 0.0f);
  const int64_t n_vec = s.n / kLanes * kLanes;
  int64_t k = k0;
  for (; k + 4 <= k1; k += 4) {
    const WT* w0 = w + k * s.n;
    for (int64_t r = 0; r < s.rows; ++r) {
      const float* xr = x + r * s.k + k;
      const float x0 = xr[0], x1 = xr[1], x2 = xr[2], x3 = xr[3];
      float* pr = part + r * s.n;
      for (int64_t n = 0; n < n_vec; n += kLanes) {
        Vec acc = LoadVec(pr + n);
        acc += x0 * LoadAsFloat(w0 + n) + x1 * LoadAsFloat(w0 + s.n + n) + x2 * LoadAsFloat(w0 + 2 * s.n + n) +
               x3 * LoadAsFloat(w0 + 3 * s.n + n);
        StoreVec(acc, pr + n);
      }
    }
  }
  for (; k < k1; ++k) {
    for (int64_t r = 0; r < s.rows; ++r) {
      const float xk = x[r * s.k + k];
      float* pr = part + r * s.n;
      for (int64_t n = 0; n < n_vec; n += kLanes) StoreVec(LoadVec(pr + n) + xk * LoadAsFloat(w + k * s.n + n), pr + n);
    }
  }
  for (int64_t n = n_vec; n < s.n; ++n) {  // N not a multiple of 16
    for (int64_t r = 0; r < s.rows; ++r) {
      float total = 0.0f;
      for (int64_t kk = k0; kk < k1; ++kk) total += x[r * s.k + kk] * LoadScalar(w + kk * s.n + n);
      part[r * s.n + n] = total;
    }
  }
}

// For more rows, y[r0 : r0 + R, n0 : n0 + NV * 16] of a [K, N] weight in R x NV registers,
// walking down a block of columns. Rows of W are N apart, so the hardware prefetcher, which
// stops at page edges, cannot follow the walk: it is prefetched kPrefetchRows rows ahead.
template <int R, int NV, typename WT>
inline void BlockKN(const float* x, const WT* w, const Shapes& s, int64_t r0, int64_t n0, float* y) {
  constexpr int kLineElems = 64 / sizeof(WT);
  Vec acc[R][NV] = {};
  for (int64_t k = 0; k < s.k; ++k) {
    if (k + kPrefetchRows < s.k) {
      for (int j = 0; j < NV * kLanes; j += kLineElems) __builtin_prefetch(w + (k + kPrefetchRows) * s.n + n0 + j);
    }
    Vec wv[NV];
    for (int j = 0; j < NV; ++j) wv[j] = LoadAsFloat(w + k * s.n + n0 + j * kLanes);
    for (int r = 0; r < R; ++r) {
      const float xv = x[(r0 + r) * s.k + k];
      for (int j = 0; j < NV; ++j) acc[r][j] += xv * wv[j];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) StoreVec(acc[r][j], y + (r0 + r) * s.n + n0 + j * kLanes);
}

// Columns [n0, n0 + 32) (NV = 2) or [n0, n0 + 16) (NV = 1) for every row, as many rows a
// pass as kSumVecs holds (8 with AVX-512; 3 or 6 with AVX2), then half that, then one.
template <int NV, typename WT>
inline void ColumnsKN(const float* x, const WT* w, const Shapes& s, int64_t n0, float* y) {
  constexpr int kRows = std::min(8, kSumVecs / NV), kHalf = std::max(1, kRows / 2);
  int64_t r = 0;
  for (; r + kRows <= s.rows; r += kRows) BlockKN<kRows, NV>(x, w, s, r, n0, y);
  if constexpr (kHalf > 1) {
    for (; r + kHalf <= s.rows; r += kHalf) BlockKN<kHalf, NV>(x, w, s, r, n0, y);
  }
  for (; r < s.rows; ++r) BlockKN<1, NV>(x, w, s, r, n0, y);
}

// Work item i of a [K, N] product by columns: 32 of them, or the tail.
template <typename WT>
void ItemKN(const float* x, const WT* w, const Shapes& s, int64_t i, float* y) {
  const int64_t n0 = i * 2 * kLanes, end = std::min<int64_t>(n0 + 2 * kLanes, s.n);
  if (end - n0 == 2 * kLanes) return ColumnsKN<2>(x, w, s, n0, y);
  int64_t n = n0;
  for (; n + kLanes <= end; n += kLanes) ColumnsKN<1>(x, w, s, n, y);
  for (; n < end; ++n) {  // N not a multiple of 16
    for (int64_t r = 0; r < s.rows; ++r) {
      float total = 0.0f;
      for (int64_t k = 0; k < s.k; ++k) total += x[r * s.k + k] * LoadScalar(w + k * s.n + n);
      y[r * s.n + n] = total;
    }
  }
}

// Sums of the 16 lanes of each of R vectors.
template <int R>
inline void Reduce(const Vec* acc, float* out) {
  for (int r = 0; r < R; ++r) {
    out[r] = SumLanes(acc[r]);
  }
}

// y[r0 : r0 + R, n : n + 4] of an [N, K] weight: four weight rows against R rows of x, 4 R
// independent accumulators (one output's single chain of FMAs stalled on their latency).
template <int R, typename WT>
inline void FourOutputsNK(const float* x, const WT* w, const Shapes& s, int64_t r0, int64_t n, float* y) {
  const int64_t k_vec = s.k / kLanes * kLanes;
  Vec acc[4][R] = {};
  const WT* rows[4] = {w + n * s.k, w + (n + 1) * s.k, w + (n + 2) * s.k, w + (n + 3) * s.k};
  for (int64_t k = 0; k < k_vec; k += kLanes) {
    Vec xv[R];
    for (int r = 0; r < R; ++r) xv[r] = LoadVec(x + (r0 + r) * s.k + k);
    for (int j = 0; j < 4; ++j) {
      const Vec wv = LoadAsFloat(rows[j] + k);
      for (int r = 0; r < R; ++r) acc[j][r] += xv[r] * wv;
    }
  }
  for (int j = 0; j < 4; ++j) {
    float sums[R];
    Reduce<R>(acc[j], sums);
    for (int r = 0; r < R; ++r) {
      for (int64_t k = k_vec; k < s.k; ++k) sums[r] += x[(r0 + r) * s.k + k] * LoadScalar(rows[j] + k);
      y[(r0 + r) * s.n + n + j] = sums[r];
    }
  }
}

// Work item i of an [N, K] product: outputs [16 i, 16 i + 16), four at a time for up to four
// rows of x at a time; each output a dot product over K.
template <typename WT>
void ItemNK(const float* x, const WT* w, const Shapes& s, int64_t i, float* y) {
  const int64_t end = std::min<int64_t>((i + 1) * kOutputBlock, s.n);
  int64_t n = i * kOutputBlock;
  for (; n + 4 <= end; n += 4) {
    int64_t r0 = 0;
    for (; r0 + kRowBlock <= s.rows; r0 += kRowBlock) FourOutputsNK<kRowBlock>(x, w, s, r0, n, y);
    switch (s.rows - r0) {
      case 3: FourOutputsNK<3>(x, w, s, r0, n, y); break;
      case 2: FourOutputsNK<2>(x, w, s, r0, n, y); break;
      case 1: FourOutputsNK<1>(x, w, s, r0, n, y); break;
      default: break;
    }
  }
  for (; n < end; ++n) {  // N not a multiple of 4
    const WT* row = w + n * s.k;
    for (int64_t r = 0; r < s.rows; ++r) {
      float total = 0.0f;
      for (int64_t k = 0; k < s.k; ++k) total += x[r * s.k + k] * LoadScalar(row + k);
      y[r * s.n + n] = total;
    }
  }
}

template <typename WT>
void Multiply(const float* x, const WT* w, const Shapes& s, bool nk, float* y) {
  if (nk) {
    ParallelFor((s.n + kOutputBlock - 1) / kOutputBlock, [&](int64_t i) { ItemNK(x, w, s, i, y); });
    return;
  }
  if (s.rows > kRowsByK) {
    ParallelFor((s.n + 2 * kLanes - 1) / (2 * kLanes), [&](int64_t i) { ItemKN(x, w, s, i, y); });
    return;
  }
  // Up to kRowsByK rows: K split into one run of rows per thread, partial products summed.
  const int64_t parts = std::clamp<int64_t>(ParallelThreads(), 1, std::max<int64_t>(1, s.k / 64));
  if (parts == 1) return RowsKN(x, w, s, 0, s.k, y);
  std::vector<float> partial(parts * s.rows * s.n);
  const int64_t step = (s.k / parts + 3) / 4 * 4;
  ParallelFor(parts, [&](int64_t i) {
    RowsKN(x, w, s, std::min(s.k, i * step), i + 1 == parts ? s.k : std::min(s.k, (i + 1) * step),
           &partial[i * s.rows * s.n]);
  });
  const int64_t size = s.rows * s.n;
  std::copy(partial.begin(), partial.begin() + size, y);
  for (int64_t i = 1; i < parts; ++i) {
    const float* p = &partial[i * size];
    for (int64_t e = 0; e < size; ++e) y[e] += p[e];
  }
}

// Checks x [T, K] and w ([K, N], or [N, K] for "nk"); their shapes into s. nullptr when fine.
const char* CheckOperands(ffi::AnyBuffer& x, ffi::AnyBuffer& w, bool nk, Shapes* s) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2) return "linear: x and w must be matrices";
  *s = {xd[0], xd[1], nk ? wd[0] : wd[1]};
  if ((nk ? wd[1] : wd[0]) != s->k) return "linear: x and w disagree on K";
  if (!IsFloat(x.element_type()) || !IsFloat(w.element_type())) return "linear: float32 or bfloat16 only";
  return nullptr;
}

// x @ w into y [T, N] float32, x and w either float32 or bfloat16.
void ProductToFloat(ffi::AnyBuffer& x, ffi::AnyBuffer& w, bool nk, const Shapes& s, float* y) {
  std::vector<float> x_f32;
  const float* xf = static_cast<const float*>(x.untyped_data());
  if (x.element_type() == ffi::DataType::BF16) {
    const auto* xb = static_cast<const uint16_t*>(x.untyped_data());
    x_f32.resize(s.rows * s.k);
    for (int64_t i = 0; i < s.rows * s.k; ++i) x_f32[i] = Bf16ToF32(xb[i]);
    xf = x_f32.data();
  }
  if (w.element_type() == ffi::DataType::BF16) {
    Multiply(xf, static_cast<const uint16_t*>(w.untyped_data()), s, nk, y);
  } else {
    Multiply(xf, static_cast<const float*>(w.untyped_data()), s, nk, y);
  }
}

ffi::Error Linear(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y,
                  std::string_view layout) {
  const bool nk = layout == "nk";
  if (!nk && layout != "kn") return ffi::Error::InvalidArgument("linear: layout must be 'kn' or 'nk'");
  Shapes s;
  if (const char* bad = CheckOperands(x, w, nk, &s)) return ffi::Error::InvalidArgument(bad);
  if (y->element_type() != x.element_type()) return ffi::Error::InvalidArgument("linear: y takes x's type");
  if (x.element_type() == ffi::DataType::F32) {
    ProductToFloat(x, w, nk, s, static_cast<float*>(y->untyped_data()));
    return ffi::Error::Success();
  }
  // bfloat16 x: y computed in float32, then narrowed.
  std::vector<float> y_f32(s.rows * s.n);
  ProductToFloat(x, w, nk, s, y_f32.data());
  auto* yb = static_cast<uint16_t*>(y->untyped_data());
  for (int64_t i = 0; i < s.rows * s.n; ++i) yb[i] = F32ToBf16(y_f32[i]);
  return ffi::Error::Success();
}

// A fused q/k/v projection ([K, N] weight) with rotary embeddings on q and k (qkv_rope.h).
ffi::Error LinearQkvRope(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                         ffi::Result<ffi::AnyBuffer> q, ffi::Result<ffi::AnyBuffer> k, ffi::Result<ffi::AnyBuffer> v) {
  Shapes s;
  if (const char* bad = CheckOperands(x, w, false, &s)) return ffi::Error::InvalidArgument(bad);
  QkvShape shape;
  if (const char* bad = CheckQkvRope(s.rows, s.n, x.element_type(), cos, sin, q, k, v, &shape)) {
    return ffi::Error::InvalidArgument(bad);
  }
  float* y = ThreadBuffer<float>(s.rows * s.n);  // every element written by the product
  ProductToFloat(x, w, false, s, y);
  WriteQkv(y, shape, cos, sin, q, k, v);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TesseraLinear, Linear,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // w
                                  .Ret<ffi::AnyBuffer>()  // y
                                  .Attr<std::string_view>("layout"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(TesseraLinearQkvRope, LinearQkvRope,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()          // x [T, K]
                                  .Arg<ffi::AnyBuffer>()          // w [K, (H + 2 KV) D]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // cos [T, D / 2]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // sin [T, D / 2]
                                  .Ret<ffi::AnyBuffer>()          // q [T, H, D]
                                  .Ret<ffi::AnyBuffer>()          // k [T, KV, D]
                                  .Ret<ffi::AnyBuffer>());        // v [T, KV, D]
