// The ragged paged attention's problem and work items, shared by its vector path
// (ragged_paged_attention.cc) and its AMX tile path for bfloat16 prompt chunks
// (ragged_paged_attention_amx.cc).
#pragma once

#include <cstdint>
#include <vector>

namespace tessera_cpu {

constexpr int kKeyTile = 64;    // keys per step of the online softmax
constexpr int kQueryTile = 32;  // query tokens per work item
constexpr float kMasked = -1e30f;

struct Problem {
  const void *q, *k, *v;
  void* out;
  const int32_t* tables;
  const int32_t* context_lens;
  const int32_t* qsl;  // query_start_loc, clamped to [0, tokens] and non-decreasing
  int64_t tokens, heads, kv_heads, group, dim, page_size, num_pages, seqs, max_blocks;
  float sm_scale, soft_cap;
  int32_t window;
};

struct WorkItem {
  int32_t seq, kv_head, first, count;  // query tokens [first, first + count) of seq
};

// The span of keys an item's queries can see, and where its first query sits.
struct ItemSpan {
  int64_t first_pos;  // position of the item's first query token
  int64_t key_begin, key_end;
};

inline ItemSpan SpanOf(const Problem& pb, const WorkItem& item) {
  const int32_t q_start = pb.qsl[item.seq], q_len = pb.qsl[item.seq + 1] - q_start;
  const int64_t max_keys = pb.max_blocks * pb.page_size;
  int64_t kv_len = pb.context_lens[item.seq];
  kv_len = kv_len < 0 ? 0 : (kv_len > max_keys ? max_keys : kv_len);
  // Query i of the sequence sits at position kv_len - q_len + i.
  const int64_t first_pos = kv_len - q_len + (item.first - q_start);
  const int64_t last_pos = first_pos + item.count - 1;
  const int64_t key_end = kv_len < last_pos + 1 ? kv_len : last_pos + 1;
  int64_t key_begin = 0;
  if (pb.window > 0 && first_pos - pb.window + 1 > 0) key_begin = first_pos - pb.window + 1;
  return {first_pos, key_begin, key_end};
}

// Element offset of key `key`'s row for `kv_head` in the pages (out-of-range pages clamped).
inline int64_t KeyRowOffset(const Problem& pb, const int32_t* table, int64_t key, int64_t kv_head) {
  int64_t page = table[key / pb.page_size];
  page = page < 0 ? 0 : (page >= pb.num_pages ? pb.num_pages - 1 : page);
  return ((page * pb.page_size + key % pb.page_size) * pb.kv_heads + kv_head) * pb.dim;
}

// True when the AMX path takes bfloat16 prompt-chunk items of this problem (the CPU has
// tiles and Linux grants them; head_dim a multiple of 32 up to 256).
bool AmxAttentionReady(const Problem& pb);

// One sequence's keys and values for one KV head, laid out for the AMX path's tiles. Built
// once per call and shared by the sequence's items (each run of 32 queries gathered them
// anew before: ~15-20% of the path's time).
struct AmxKeys {
  int64_t stride = 0;        // keys per kt row: the context rounded up to 64, plus a tile
  std::vector<uint32_t> kt;  // [D / 2, stride] bfloat16 key pairs, transposed (q @ k^T's B)
  std::vector<uint32_t> vv;  // [stride / 2, D] two consecutive keys' values (p @ v's B)
};

// Fills `all` with the AmxKeys of each (sequence, KV head) at [seq * kv_heads + head], for the
// sequences marked in `uses_amx` (the others left empty), over the threads. `all` is the
// caller's to keep between calls: its vectors' storage is reused.
void PrepareAmxKeys(const Problem& pb, const std::vector<bool>& uses_amx, std::vector<AmxKeys>& all);

// One item on AMX tiles: q and pages bfloat16, out bfloat16; `keys` its sequence's and head's.
void RunItemAmx(const Problem& pb, const WorkItem& item, const AmxKeys& keys);

}  // namespace tessera_cpu
