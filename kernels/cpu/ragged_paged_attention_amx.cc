// The ragged paged attention's AMX path: bfloat16 prompt-chunk items (more query rows than a
// decode step has) with both of their products on tiles.
//
// Why it exists: the vector path (ragged_paged_attention.cc) computes scores and weighted
// values with float32 FMAs, ~100 GFLOP/s over both cores of the 2-core machine, and was over
// half of a 2,048-token bfloat16 prompt's time; tiles do the products several times faster,
// leaving the online softmax's exponentials as the main cost.
//
// Shape of the work: first, per call, each (sequence, KV head) with prompt items gets its keys
// laid out once for the tiles (AmxKeys, ragged_paged_attention.h):
//     kt [D / 2, L]   the keys' bfloat16 pairs transposed: the B operand of q @ k^T
//     vv [L / 2, D]   two consecutive keys' values interleaved: the B operand of p @ v
// Then an item (rows = its query tokens x the heads of its KV group, padded to 16) walks its
// keys in tiles of 64:
//     scores [rows, 64] = q [rows, D] @ kt[:, k0 : k0 + 64]   (tiles 0-3 sums, 4 q, 5-6 keys)
//     online softmax in float32 -> p [rows, 64] as bfloat16, acc rescaled per row
//     acc [rows, D] += p @ vv[k0 / 2 : ...], 64 columns of D a pass (tiles 0-3 from acc, back)

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "amx.h"
#include "common.h"
#include "ragged_paged_attention.h"

namespace tessera_cpu {

#if TESSERA_HAVE_AMX

namespace {

constexpr int kTileRows = 16;
constexpr int kTileCols = 16;  // float32 (or bfloat16 pair) columns of a tile
constexpr int kMaxDim = 256;
constexpr float kLog2E = 1.4426950408889634f;

// Per-thread scratch, reused across items and calls.
struct AmxScratch {
  std::vector<uint16_t> q, p;  // [rows_p, D] and [rows_p, kKeyTile], bfloat16
  std::vector<float> scores;   // [rows_p, kKeyTile]
  std::vector<float> acc;      // [rows_p, D]
  std::vector<float> row_max, row_sum;

  void Fit(int64_t rows_p, int64_t dim) {
    q.assign(rows_p * dim, 0);
    p.assign(rows_p * kKeyTile, 0);
    scores.resize(rows_p * kKeyTile);
    acc.assign(rows_p * dim, 0.0f);
    row_max.assign(rows_p, kMasked);
    row_sum.assign(rows_p, 0.0f);
  }
};

// scores [rows_p, 64] = q [rows_p, D] @ the key tile at kt (rows `stride` keys apart), 16
// rows at a time.
void Scores(AmxScratch& s, int64_t rows_p, int64_t dim, const uint32_t* kt, int64_t stride) {
  constexpr int64_t scores_stride = kKeyTile * 4;
  const int64_t kt_stride = stride * 4;
  for (int64_t r0 = 0; r0 < rows_p; r0 += kTileRows) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t d0 = 0; d0 < dim; d0 += 2 * kTileCols) {
      _tile_loadd(4, s.q.data() + r0 * dim + d0, dim * 2);
      const uint32_t* k = kt + d0 / 2 * stride;
      _tile_loadd(5, k, kt_stride);
      _tile_dpbf16ps(0, 4, 5);
      _tile_loadd(6, k + kTileCols, kt_stride);
      _tile_dpbf16ps(1, 4, 6);
      _tile_loadd(5, k + 2 * kTileCols, kt_stride);
      _tile_dpbf16ps(2, 4, 5);
      _tile_loadd(6, k + 3 * kTileCols, kt_stride);
      _tile_dpbf16ps(3, 4, 6);
    }
    float* out = s.scores.data() + r0 * kKeyTile;
    _tile_stored(0, out, scores_stride);
    _tile_stored(1, out + kTileCols, scores_stride);
    _tile_stored(2, out + 2 * kTileCols, scores_stride);
    _tile_stored(3, out + 3 * kTileCols, scores_stride);
  }
}

// acc [rows_p, D] += p [rows_p, 64] @ the tile's value pairs at vv; D % 32 == 0, so a pass
// over 64 columns of D has 4 tiles, or 2 at the end.
void AccumulateValues(AmxScratch& s, int64_t rows_p, int64_t dim, const uint32_t* vv) {
  const int64_t acc_stride = dim * 4, vv_stride = dim * 4;
  for (int64_t r0 = 0; r0 < rows_p; r0 += kTileRows) {
    for (int64_t d0 = 0; d0 < dim; d0 += 4 * kTileCols) {
      const bool four = dim - d0 >= 4 * kTileCols;
      float* acc = s.acc.data() + r0 * dim + d0;
      _tile_loadd(0, acc, acc_stride);
      _tile_loadd(1, acc + kTileCols, acc_stride);
      if (four) {
        _tile_loadd(2, acc + 2 * kTileCols, acc_stride);
        _tile_loadd(3, acc + 3 * kTileCols, acc_stride);
      }
      for (int64_t k0 = 0; k0 < kKeyTile; k0 += 2 * kTileCols) {
        _tile_loadd(4, s.p.data() + r0 * kKeyTile + k0, kKeyTile * 2);
        const uint32_t* v = vv + k0 / 2 * dim + d0;
        _tile_loadd(5, v, vv_stride);
        _tile_dpbf16ps(0, 4, 5);
        _tile_loadd(6, v + kTileCols, vv_stride);
        _tile_dpbf16ps(1, 4, 6);
        if (four) {
          _tile_loadd(5, v + 2 * kTileCols, vv_stride);
          _tile_dpbf16ps(2, 4, 5);
          _tile_loadd(6, v + 3 * kTileCols, vv_stride);
          _tile_dpbf16ps(3, 4, 6);
        }
      }
      _tile_stored(0, acc, acc_stride);
      _tile_stored(1, acc + kTileCols, acc_stride);
      if (four) {
        _tile_stored(2, acc + 2 * kTileCols, acc_stride);
        _tile_stored(3, acc + 3 * kTileCols, acc_stride);
      }
    }
  }
}

// 2^x: x = n + f with n the nearest integer, 2^f from a degree-5 fit on [-1/2, 1/2]
// (relative error 2e-7), scaled by 2^n. Inline, where the vectorised libm exp was a call
// per 16 lanes and the largest single cost of an item.
inline __m512 Exp2(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-150.0f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.3260915e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6701806e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5507122e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24022224f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.69314700f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000000f));
  return _mm512_scalef_ps(p, n);
}

// One query row's step of the online softmax over the tile's 64 scores, of which columns
// [lo, hi) are visible (lo < hi): scores are scaled into base 2 (`scale` includes log2 e),
// the row's running max and sum move on, its probabilities go out as bfloat16 (zeros outside
// [lo, hi)), and the factor its earlier sums must be rescaled by comes back.
inline float SoftmaxRow(const float* row, int lo, int hi, float scale, float& row_max, float& row_sum,
                        uint16_t* prob) {
  static_assert(kKeyTile == 64, "one 64-bit mask per row");
  const uint64_t visible = (hi >= 64 ? ~0ull : (1ull << hi) - 1) & ~((1ull << lo) - 1);
  __m512 x[4];
  __mmask16 mask[4];
  __m512 top = _mm512_set1_ps(kMasked);
  for (int j = 0; j < 4; ++j) {
    mask[j] = static_cast<__mmask16>(visible >> (16 * j));
    x[j] = _mm512_mul_ps(_mm512_loadu_ps(row + 16 * j), _mm512_set1_ps(scale));
    top = _mm512_mask_max_ps(top, mask[j], top, x[j]);
  }
  const float new_max = std::max(row_max, _mm512_reduce_max_ps(top));
  __m512 sum = _mm512_setzero_ps();
  for (int j = 0; j < 4; ++j) {
    x[j] = _mm512_maskz_mov_ps(mask[j], Exp2(_mm512_sub_ps(x[j], _mm512_set1_ps(new_max))));
    sum = _mm512_add_ps(sum, x[j]);
  }
  _mm512_storeu_si512(prob, (__m512i)_mm512_cvtne2ps_pbh(x[1], x[0]));
  _mm512_storeu_si512(prob + 32, (__m512i)_mm512_cvtne2ps_pbh(x[3], x[2]));
  const float rescale = std::exp2(row_max - new_max);
  row_sum = row_sum * rescale + _mm512_reduce_add_ps(sum);
  row_max = new_max;
  return rescale;
}

// Keys [k0, k0 + 64) of one sequence's KV head into its AmxKeys (those before kv_len).
void FillKeyBlock(const Problem& pb, int64_t seq, int64_t kv_head, int64_t k0, int64_t kv_len, AmxKeys& keys) {
  const auto* kin = static_cast<const uint16_t*>(pb.k);
  const auto* vin = static_cast<const uint16_t*>(pb.v);
  const int64_t D = pb.dim, pairs = D / 2;
  const int32_t* table = pb.tables + seq * pb.max_blocks;
  auto* vv16 = reinterpret_cast<uint16_t*>(keys.vv.data());
  for (int64_t key = k0; key < std::min(k0 + kKeyTile, kv_len); ++key) {
    const int64_t at = KeyRowOffset(pb, table, key, kv_head);
    uint32_t key_pairs[kMaxDim / 2];
    std::memcpy(key_pairs, kin + at, D * 2);
    for (int64_t d2 = 0; d2 < pairs; ++d2) keys.kt[d2 * keys.stride + key] = key_pairs[d2];
    // Value pairs interleave keys 2 c2 (low half) and 2 c2 + 1 (high half).
    uint16_t* dst = vv16 + (key / 2) * D * 2 + (key & 1);
    for (int64_t d = 0; d < D; ++d) dst[2 * d] = vin[at + d];
  }
}

}  // namespace

void PrepareAmxKeys(const Problem& pb, const std::vector<bool>& uses_amx, std::vector<AmxKeys>& all) {
  all.resize(pb.seqs * pb.kv_heads);
  struct Block {
    int64_t seq, head, k0, kv_len;
  };
  std::vector<Block> blocks;
  const int64_t max_keys = pb.max_blocks * pb.page_size;
  for (int64_t s = 0; s < pb.seqs; ++s) {
    if (!uses_amx[s]) {
      for (int64_t h = 0; h < pb.kv_heads; ++h) all[s * pb.kv_heads + h].stride = 0;
      continue;
    }
    const int64_t kv_len = std::clamp<int64_t>(pb.context_lens[s], 0, max_keys);
    for (int64_t h = 0; h < pb.kv_heads; ++h) {
      AmxKeys& keys = all[s * pb.kv_heads + h];
      // Zeros past kv_len: a tile reading beyond the context sees keys that score 0 and
      // values that add nothing (their probabilities are 0).
      keys.stride = (kv_len + kKeyTile - 1) / kKeyTile * kKeyTile + kKeyTile;
      keys.kt.assign(pb.dim / 2 * keys.stride, 0);
      keys.vv.assign(keys.stride / 2 * pb.dim, 0);
      for (int64_t k0 = 0; k0 < kv_len; k0 += kKeyTile) blocks.push_back({s, h, k0, kv_len});
    }
  }
  ParallelFor(static_cast<int64_t>(blocks.size()), [&](int64_t i) {
    const Block& b = blocks[i];
    FillKeyBlock(pb, b.seq, b.head, b.k0, b.kv_len, all[b.seq * pb.kv_heads + b.head]);
  });
}

bool AmxAttentionReady(const Problem& pb) { return pb.dim % 32 == 0 && pb.dim <= kMaxDim && AmxPermitted(); }

void RunItemAmx(const Problem& pb, const WorkItem& item, const AmxKeys& keys) {
  thread_local AmxScratch s;
  ConfigureTiles();
  const int64_t D = pb.dim, G = pb.group, rows = static_cast<int64_t>(item.count) * G;
  const int64_t rows_p = (rows + kTileRows - 1) / kTileRows * kTileRows;
  const auto [first_pos, key_begin, key_end] = SpanOf(pb, item);
  s.Fit(rows_p, D);
  const auto* qin = static_cast<const uint16_t*>(pb.q);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t token = item.first + r / G, head = item.kv_head * G + r % G;
    std::memcpy(&s.q[r * D], qin + (token * pb.heads + head) * D, D * 2);
  }

  // Tiles start at even keys: value pairs are (2 c2, 2 c2 + 1). A window's first key may then
  // follow one key that every row masks.
  for (int64_t k0 = key_begin & ~int64_t{1}; k0 < key_end; k0 += kKeyTile) {
    const int tile_keys = static_cast<int>(std::min<int64_t>(kKeyTile, key_end - k0));
    Scores(s, rows_p, D, keys.kt.data() + k0, keys.stride);
    for (int64_t r = 0; r < rows; ++r) {
      // This row sees tile columns [lo, hi): keys at or before its position, inside the window.
      const int64_t pos = first_pos + r / G;
      const int lo =
          pb.window > 0 ? static_cast<int>(std::clamp<int64_t>(pos - pb.window + 1 - k0, 0, tile_keys)) : 0;
      const int hi = static_cast<int>(std::clamp<int64_t>(pos + 1 - k0, 0, tile_keys));
      float* row = &s.scores[r * kKeyTile];
      uint16_t* prob = &s.p[r * kKeyTile];
      if (hi <= lo) {
        std::fill(prob, prob + kKeyTile, 0);
        continue;
      }
      if (pb.soft_cap > 0.0f) {  // capped in natural units, then into base 2
        const float scale = pb.sm_scale / pb.soft_cap;
        for (int c = lo; c < hi; ++c) row[c] = pb.soft_cap * std::tanh(row[c] * scale);
      }
      const float rescale = SoftmaxRow(row, lo, hi, pb.soft_cap > 0.0f ? kLog2E : pb.sm_scale * kLog2E,
                                       s.row_max[r], s.row_sum[r], prob);
      if (rescale != 1.0f) {
        for (int64_t d = 0; d < D; ++d) s.acc[r * D + d] *= rescale;
      }
    }
    AccumulateValues(s, rows_p, D, keys.vv.data() + k0 / 2 * D);
  }

  auto* out = static_cast<uint16_t*>(pb.out);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t token = item.first + r / G, head = item.kv_head * G + r % G;
    uint16_t* dst = out + (token * pb.heads + head) * D;
    const float inv = s.row_sum[r] > 0.0f ? 1.0f / s.row_sum[r] : 0.0f;
    for (int64_t d = 0; d < D; ++d) dst[d] = F32ToBf16(s.acc[r * D + d] * inv);
  }
}

#else  // no AMX in this build

bool AmxAttentionReady(const Problem&) { return false; }
void PrepareAmxKeys(const Problem& pb, const std::vector<bool>&, std::vector<AmxKeys>& all) {
  all.resize(pb.seqs * pb.kv_heads);
}
void RunItemAmx(const Problem&, const WorkItem&, const AmxKeys&) {}

#endif  // TESSERA_HAVE_AMX

}  // namespace tessera_cpu
