// Ragged paged attention for CPUs, as an XLA FFI custom call.
//
// Same contract as kernels/ragged_paged_attention_ref.py: q [tokens, heads, D]; pages
// [pages, page_size, kv_heads, D]; sequence s owns query tokens [qsl[s], qsl[s+1]), which
// are the last q_len of its context_lens[s] cached tokens; tokens past qsl[seqs] are padding
// and get zeros. Sliding window (0 = none) and soft-cap (0 = none) as in the reference.
//
// Why it exists: in the jnp reference a decode step is a loop of a dozen small XLA ops per
// layer (gathers, einsums, masks), each a few microseconds of runtime overhead that dwarfs
// the arithmetic; here one call does a layer, split over XLA's intra-op threads.
//
// Shape of the work: one item per (sequence, KV head, run of up to kQueryTile query tokens).
// An item holds its query rows (token x head-in-group) and streams the sequence's keys in
// tiles of kKeyTile: the tile's keys are gathered from their pages transposed to
// [D, kKeyTile], so a score row is D broadcast-multiply-adds over a contiguous vector, and
// values are gathered [kKeyTile, D] for the same reason. Keys a causal query cannot see are
// never visited (tiles stop at the item's last query position). bfloat16 items with more
// query rows than a decode step go to AMX tiles instead (ragged_paged_attention_amx.cc).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"
#include "ragged_paged_attention.h"
#include "ffi_handler.h"

namespace {

using namespace tessera_cpu;  // NOLINT: the kernels' shared helpers

constexpr int kTileVecs = kKeyTile / kLanes;  // vectors per tile row
constexpr int kDirectRows = 8;  // up to this many query rows (decode items): dot products against the pages
// The transposed-tile path's register blocks: rows x vectors of sums within kSumVecs (4 x 4
// with AVX-512; 2 x 2 with AVX2, each Vec two registers there).
constexpr int kSliceVecs = kSumVecs >= 16 ? 4 : 2;
constexpr int kBlockRows = kSumVecs >= 16 ? 4 : kSumVecs >= 4 ? 2 : 1;

// Element types as stored: float32 as float, bfloat16 as its 16 bits.
inline float ToFloat(float x) { return x; }
inline float ToFloat(uint16_t x) { return Bf16ToF32(x); }
inline void Store(float x, float* p) { *p = x; }
inline void Store(float x, uint16_t* p) { *p = F32ToBf16(x); }

// Per-thread scratch, reused across items and calls.
struct Scratch {
  std::vector<float> q, kt, v, scores, acc, row_max, row_sum;
  void Fit(int64_t rows, int64_t dim) {
    q.resize(rows * dim);
    kt.resize(dim * kKeyTile);
    v.resize(kKeyTile * dim);
    scores.resize(rows * kKeyTile);
    acc.resize(rows * dim);
    row_max.resize(rows);
    row_sum.resize(rows);
  }
};

// scores[r, :] = sum_d q[r, d] * kt[d, :] for R rows, kSliceVecs vectors of the tile at a
// time: R x kSliceVecs sums stay in registers while that slice's key lanes stream past.
template <int R>
inline void ScoreRows(const float* q, const float* kt, int64_t dim, float* scores) {
  for (int j0 = 0; j0 < kTileVecs; j0 += kSliceVecs) {
    Vec acc[R][kSliceVecs] = {};
    for (int64_t d = 0; d < dim; ++d) {
      Vec k[kSliceVecs];
      for (int j = 0; j < kSliceVecs; ++j) k[j] = LoadVec(kt + d * kKeyTile + (j0 + j) * kLanes);
      for (int r = 0; r < R; ++r) {
        const float qd = q[r * dim + d];
        for (int j = 0; j < kSliceVecs; ++j) acc[r][j] += qd * k[j];
      }
    }
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < kSliceVecs; ++j) StoreVec(acc[r][j], scores + r * kKeyTile + (j0 + j) * kLanes);
  }
}

// acc[r, d0 : d0 + NV * 16] += sum_c p[r, c] * v[c, d0 : ...] for R rows, the slice of the
// accumulator held in registers over all the tile's keys.
template <int R, int NV>
inline void AccumulateSlice(const float* p, const float* v, int64_t dim, int keys, int64_t d0, float* acc) {
  Vec a[R][NV];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) a[r][j] = LoadVec(acc + r * dim + d0 + j * kLanes);
  for (int c = 0; c < keys; ++c) {
    Vec vv[NV];
    for (int j = 0; j < NV; ++j) vv[j] = LoadVec(v + c * dim + d0 + j * kLanes);
    for (int r = 0; r < R; ++r) {
      const float pc = p[r * kKeyTile + c];
      for (int j = 0; j < NV; ++j) a[r][j] += pc * vv[j];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) StoreVec(a[r][j], acc + r * dim + d0 + j * kLanes);
}

template <int R>
inline void AccumulateRows(const float* p, const float* v, int64_t dim, int keys, float* acc) {
  int64_t d0 = 0;
  for (; d0 + kSliceVecs * kLanes <= dim; d0 += kSliceVecs * kLanes) AccumulateSlice<R, kSliceVecs>(p, v, dim, keys, d0, acc);
  for (; d0 + kLanes <= dim; d0 += kLanes) AccumulateSlice<R, 1>(p, v, dim, keys, d0, acc);
  for (; d0 < dim; ++d0) {  // head_dim not a multiple of 16
    for (int c = 0; c < keys; ++c)
      for (int r = 0; r < R; ++r) acc[r * dim + d0] += p[r * kKeyTile + c] * v[c * dim + d0];
  }
}

// Decode items have only `group` query rows, too few to repay transposing a key tile: their
// scores are dot products straight against the key rows in the pages (head_dim a multiple
// of 16; bfloat16 rows widened in registers), and values are read from the pages in place.

template <int R, typename KT>
inline void ScoreRowsDirect(const float* q, const KT* const* key_rows, int keys, int64_t dim, float* scores) {
  for (int c = 0; c < keys; ++c) {
    Vec acc[R] = {};
    for (int64_t d = 0; d < dim; d += kLanes) {
      const Vec k = LoadAsFloat(key_rows[c] + d);
      for (int r = 0; r < R; ++r) acc[r] += LoadVec(q + r * dim + d) * k;
    }
    for (int r = 0; r < R; ++r) scores[r * kKeyTile + c] = SumLanes(acc[r]);
  }
}

template <int R, typename KT>
inline void AccumulateRowsDirect(const float* p, const KT* const* value_rows, int64_t dim, int keys, float* acc) {
  for (int64_t d0 = 0; d0 < dim; d0 += kLanes) {
    Vec a[R];
    for (int r = 0; r < R; ++r) a[r] = LoadVec(acc + r * dim + d0);
    for (int c = 0; c < keys; ++c) {
      const Vec v = LoadAsFloat(value_rows[c] + d0);
      for (int r = 0; r < R; ++r) a[r] += p[r * kKeyTile + c] * v;
    }
    for (int r = 0; r < R; ++r) StoreVec(a[r], acc + r * dim + d0);
  }
}

// Runs Kernel<R>(row offset) over `rows` rows, Block at a time (4 or fewer), then the rest.
template <template <int> class Kernel, int Block, typename... Args>
inline void OverRows(int64_t rows, Args... args) {
  int64_t r = 0;
  for (; r + Block <= rows; r += Block) Kernel<Block>::Run(r, args...);
  switch (rows - r) {
    case 3: Kernel<3>::Run(r, args...); break;
    case 2: Kernel<2>::Run(r, args...); break;
    case 1: Kernel<1>::Run(r, args...); break;
    default: break;
  }
}

template <int R>
struct ScoreDirect {
  template <typename KT>
  static void Run(int64_t r, const float* q, const KT* const* key_rows, int keys, int64_t dim, float* scores) {
    ScoreRowsDirect<R>(q + r * dim, key_rows, keys, dim, scores + r * kKeyTile);
  }
};

template <int R>
struct AccumulateDirect {
  template <typename KT>
  static void Run(int64_t r, const float* p, const KT* const* value_rows, int64_t dim, int keys, float* acc) {
    AccumulateRowsDirect<R>(p + r * kKeyTile, value_rows, dim, keys, acc + r * dim);
  }
};

// The transposed-tile path's row kernels, for OverRows.
template <int R>
struct ScoreTile {
  static void Run(int64_t r, const float* q, const float* kt, int64_t dim, float* scores) {
    ScoreRows<R>(q + r * dim, kt, dim, scores + r * kKeyTile);
  }
};

template <int R>
struct AccumulateTile {
  static void Run(int64_t r, const float* p, const float* v, int64_t dim, int keys, float* acc) {
    AccumulateRows<R>(p + r * kKeyTile, v, dim, keys, acc + r * dim);
  }
};

template <typename QT, typename KT>
void RunItem(const Problem& pb, const WorkItem& item, Scratch& s) {
  const QT* qin = static_cast<const QT*>(pb.q);
  const KT* kin = static_cast<const KT*>(pb.k);
  const KT* vin = static_cast<const KT*>(pb.v);
  QT* out = static_cast<QT*>(pb.out);
  const int64_t D = pb.dim, G = pb.group, rows = static_cast<int64_t>(item.count) * G;
  const auto [first_pos, key_begin, key_end] = SpanOf(pb, item);
  s.Fit(rows, D);

  for (int64_t r = 0; r < rows; ++r) {
    const int64_t token = item.first + r / G, head = item.kv_head * G + r % G;
    const int64_t base = (token * pb.heads + head) * D;
    for (int64_t d = 0; d < D; ++d) s.q[r * D + d] = ToFloat(qin[base + d]) * pb.sm_scale;
  }
  std::fill(s.acc.begin(), s.acc.begin() + rows * D, 0.0f);
  std::fill(s.row_max.begin(), s.row_max.begin() + rows, kMasked);
  std::fill(s.row_sum.begin(), s.row_sum.begin() + rows, 0.0f);

  const int32_t* table = pb.tables + static_cast<int64_t>(item.seq) * pb.max_blocks;
  const bool direct = rows <= kDirectRows && D % kLanes == 0;
  const KT* key_rows[kKeyTile];
  const KT* value_rows[kKeyTile];

  for (int64_t k0 = key_begin; k0 < key_end; k0 += kKeyTile) {
    const int keys = static_cast<int>(std::min<int64_t>(kKeyTile, key_end - k0));
    if (direct) {
      for (int c = 0; c < keys; ++c) {
        const int64_t at = KeyRowOffset(pb, table, k0 + c, item.kv_head);
        key_rows[c] = kin + at;
        value_rows[c] = vin + at;
      }
      OverRows<ScoreDirect, 4>(rows, static_cast<const float*>(s.q.data()), static_cast<const KT* const*>(key_rows),
                            keys, D, s.scores.data());
    } else {
      for (int c = 0; c < kKeyTile; ++c) {
        if (c >= keys) {
          for (int64_t d = 0; d < D; ++d) s.kt[d * kKeyTile + c] = 0.0f;
          continue;
        }
        const int64_t at = KeyRowOffset(pb, table, k0 + c, item.kv_head);
        for (int64_t d = 0; d < D; ++d) s.kt[d * kKeyTile + c] = ToFloat(kin[at + d]);
        if constexpr (std::is_same_v<KT, float>) {
          std::memcpy(&s.v[c * D], vin + at, D * sizeof(float));
        } else {
          for (int64_t d = 0; d < D; ++d) s.v[c * D + d] = ToFloat(vin[at + d]);
        }
      }
      OverRows<ScoreTile, kBlockRows>(rows, static_cast<const float*>(s.q.data()), static_cast<const float*>(s.kt.data()), D,
                          s.scores.data());
    }

    for (int64_t r = 0; r < rows; ++r) {
      // This row sees tile columns [lo, hi): keys at or before its position, inside the window.
      const int64_t pos = first_pos + r / G;
      const int lo = pb.window > 0 ? static_cast<int>(std::clamp<int64_t>(pos - pb.window + 1 - k0, 0, keys)) : 0;
      const int hi = static_cast<int>(std::clamp<int64_t>(pos + 1 - k0, 0, keys));
      float* row = &s.scores[r * kKeyTile];
      if (hi <= lo) {
        std::fill(row, row + kKeyTile, 0.0f);
        continue;
      }
      // Plain loops over contiguous lanes, so that GCC vectorises them (tanh and exp included).
      if (pb.soft_cap > 0.0f) {
        const float cap = pb.soft_cap, inv_cap = 1.0f / pb.soft_cap;
        for (int c = lo; c < hi; ++c) row[c] = cap * std::tanh(row[c] * inv_cap);
      }
      float tile_max = kMasked;
      for (int c = lo; c < hi; ++c) tile_max = std::max(tile_max, row[c]);
      const float new_max = std::max(s.row_max[r], tile_max);
      float total = 0.0f;
      for (int c = lo; c < hi; ++c) {
        row[c] = std::exp(row[c] - new_max);
        total += row[c];
      }
      std::fill(row, row + lo, 0.0f);
      std::fill(row + hi, row + kKeyTile, 0.0f);
      const float rescale = std::exp(s.row_max[r] - new_max);
      if (rescale != 1.0f) {
        for (int64_t d = 0; d < D; ++d) s.acc[r * D + d] *= rescale;
      }
      s.row_sum[r] = s.row_sum[r] * rescale + total;
      s.row_max[r] = new_max;
    }
    if (direct) {
      OverRows<AccumulateDirect, 4>(rows, static_cast<const float*>(s.scores.data()),
                                 static_cast<const KT* const*>(value_rows), D, keys, s.acc.data());
    } else {
      OverRows<AccumulateTile, kBlockRows>(rows, static_cast<const float*>(s.scores.data()), static_cast<const float*>(s.v.data()),
                               D, keys, s.acc.data());
    }
  }

  for (int64_t r = 0; r < rows; ++r) {
    const int64_t token = item.first + r / G, head = item.kv_head * G + r % G;
    const int64_t base = (token * pb.heads + head) * D;
    const float inv = s.row_sum[r] > 0.0f ? 1.0f / s.row_sum[r] : 0.0f;
    for (int64_t d = 0; d < D; ++d) Store(s.acc[r * D + d] * inv, out + base + d);
  }
}

ffi::Error RaggedPagedAttention(ffi::AnyBuffer q, ffi::AnyBuffer k_pages,
                                ffi::AnyBuffer v_pages, ffi::Buffer<ffi::S32> block_tables,
                                ffi::Buffer<ffi::S32> context_lens, ffi::Buffer<ffi::S32> query_start_loc,
                                ffi::Result<ffi::AnyBuffer> out, float sm_scale, int32_t sliding_window,
                                float soft_cap) {
  const auto qd = q.dimensions(), kd = k_pages.dimensions(), td = block_tables.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || td.size() != 2) {
    return ffi::Error::InvalidArgument("ragged_paged_attention: q must be rank 3, pages rank 4, tables rank 2");
  }
  if (!IsFloat(q.element_type()) || !IsFloat(k_pages.element_type()) ||
      k_pages.element_type() != v_pages.element_type() || out->element_type() != q.element_type()) {
    return ffi::Error::InvalidArgument("ragged_paged_attention: float32 or bfloat16 only; k and v alike");
  }
  Problem pb;
  pb.tokens = qd[0];
  pb.heads = qd[1];
  pb.dim = qd[2];
  pb.num_pages = kd[0];
  pb.page_size = kd[1];
  pb.kv_heads = kd[2];
  pb.seqs = td[0];
  pb.max_blocks = td[1];
  if (kd[3] != pb.dim || pb.kv_heads <= 0 || pb.heads % pb.kv_heads != 0 || pb.page_size <= 0 ||
      static_cast<int64_t>(context_lens.element_count()) != pb.seqs ||
      static_cast<int64_t>(query_start_loc.element_count()) != pb.seqs + 1) {
    return ffi::Error::InvalidArgument("ragged_paged_attention: inconsistent shapes");
  }
  pb.group = pb.heads / pb.kv_heads;
  pb.q = q.untyped_data();
  pb.k = k_pages.untyped_data();
  pb.v = v_pages.untyped_data();
  pb.out = out->untyped_data();
  const bool q_bf16 = q.element_type() == ffi::DataType::BF16, kv_bf16 = k_pages.element_type() == ffi::DataType::BF16;
  auto* run = q_bf16 ? (kv_bf16 ? &RunItem<uint16_t, uint16_t> : &RunItem<uint16_t, float>)
                     : (kv_bf16 ? &RunItem<float, uint16_t> : &RunItem<float, float>);
  pb.tables = block_tables.typed_data();
  pb.context_lens = context_lens.typed_data();
  pb.sm_scale = sm_scale;
  pb.soft_cap = soft_cap;
  pb.window = sliding_window;
  std::memset(pb.out, 0, out->size_bytes());
  if (pb.num_pages == 0) return ffi::Error::Success();

  // Clamp the starts so a malformed batch cannot index past the query array.
  std::vector<int32_t> qsl(pb.seqs + 1);
  int32_t prev = 0;
  for (int64_t i = 0; i <= pb.seqs; ++i) {
    prev = std::clamp<int32_t>(query_start_loc.typed_data()[i], prev, static_cast<int32_t>(pb.tokens));
    qsl[i] = prev;
  }
  pb.qsl = qsl.data();

  std::vector<WorkItem> items;
  for (int32_t s = 0; s < pb.seqs; ++s) {
    for (int32_t first = qsl[s]; first < qsl[s + 1]; first += kQueryTile) {
      const int32_t count = std::min(kQueryTile, qsl[s + 1] - first);
      for (int32_t h = 0; h < pb.kv_heads; ++h) items.push_back({s, h, first, count});
    }
  }
  // Longest items first (later query runs see more keys), so the last to finish are short.
  std::stable_sort(items.begin(), items.end(), [&](const WorkItem& a, const WorkItem& b) {
    return pb.context_lens[a.seq] - (qsl[a.seq + 1] - a.first) > pb.context_lens[b.seq] - (qsl[b.seq + 1] - b.first);
  });
  // bfloat16 items with more query rows than a decode step's go to the AMX tiles.
  const bool amx = q_bf16 && kv_bf16 && AmxAttentionReady(pb);
  // Storage reused from call to call. Named through a plain reference: inside the lambda a
  // thread_local would be each worker's own, empty, instance.
  thread_local std::vector<AmxKeys> amx_keys_storage;
  std::vector<AmxKeys>& amx_keys = amx_keys_storage;
  if (amx) {
    std::vector<bool> uses_amx(pb.seqs, false);
    for (const WorkItem& item : items) uses_amx[item.seq] = uses_amx[item.seq] || item.count * pb.group > kDirectRows;
    PrepareAmxKeys(pb, uses_amx, amx_keys);
  }
  ParallelFor(static_cast<int64_t>(items.size()), [&](int64_t i) {
    const WorkItem& item = items[i];
    if (amx && item.count * pb.group > kDirectRows) {
      return RunItemAmx(pb, item, amx_keys[item.seq * pb.kv_heads + item.kv_head]);
    }
    thread_local Scratch scratch;
    run(pb, item, scratch);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TesseraRaggedPagedAttention, RaggedPagedAttention,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()       // q
                                  .Arg<ffi::AnyBuffer>()       // k_pages
                                  .Arg<ffi::AnyBuffer>()       // v_pages
                                  .Arg<ffi::Buffer<ffi::S32>>()  // block_tables
                                  .Arg<ffi::Buffer<ffi::S32>>()  // context_lens
                                  .Arg<ffi::Buffer<ffi::S32>>()  // query_start_loc
                                  .Ret<ffi::AnyBuffer>()       // out
                                  .Attr<float>("sm_scale")
                                  .Attr<int32_t>("sliding_window")
                                  .Attr<float>("soft_cap"));
