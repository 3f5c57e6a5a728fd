// The epilogue of a fused q/k/v projection: rotary position embeddings on q and k
// (Hugging Face's rotate-half layout), and the row split into q, k and v. Used by the product
// kernels' "qkv_rope" handlers (amx_linear.cc, linear.cc), so a decode step's projection
// leaves them ready for the KV write and attention without XLA fusions in between (each a
// dispatch to XLA's intra-op threads: ~100 us apiece on the 2-core machine at 16 rows).
#pragma once

#include <cstdint>
#include <cstring>

#include "common.h"
#include "ffi_handler.h"

namespace tessera_cpu {

struct QkvShape {
  int64_t tokens, heads, kv_heads, dim;
};

inline void StoreAs(float x, float* p) { *p = x; }
inline void StoreAs(float x, uint16_t* p) { *p = F32ToBf16(x); }

// y [T, (H + 2 KV) D] float32 -> q [T, H, D], k [T, KV, D] rotated by cos/sin [T, D / 2]
// (float32), and v [T, KV, D]; outputs in OT.
template <typename OT>
void RotateAndSplit(const float* y, const QkvShape& s, const float* cos, const float* sin, OT* q, OT* k, OT* v) {
  const int64_t half = s.dim / 2, width = (s.heads + 2 * s.kv_heads) * s.dim;
  auto token = [&](int64_t t) {
    const float* c = cos + t * half;
    const float* sn = sin + t * half;
    for (int64_t h = 0; h < s.heads + s.kv_heads; ++h) {
      const float* src = y + t * width + h * s.dim;
      OT* dst = h < s.heads ? q + (t * s.heads + h) * s.dim : k + (t * s.kv_heads + h - s.heads) * s.dim;
      for (int64_t i = 0; i < half; ++i) {
        const float a = src[i], b = src[i + half];
        StoreAs(a * c[i] - b * sn[i], dst + i);
        StoreAs(b * c[i] + a * sn[i], dst + i + half);
      }
    }
    const float* src = y + t * width + (s.heads + s.kv_heads) * s.dim;
    OT* dst = v + t * s.kv_heads * s.dim;
    for (int64_t i = 0; i < s.kv_heads * s.dim; ++i) StoreAs(src[i], dst + i);
  };
  if (s.tokens <= 16) {
    for (int64_t t = 0; t < s.tokens; ++t) token(t);
  } else {
    ParallelFor(s.tokens, token);
  }
}

// Checks the epilogue's outputs (x's element type) and cos/sin against the projection's
// tokens and width; nullptr when they fit, with their shape in *shape.
inline const char* CheckQkvRope(int64_t tokens, int64_t width, ffi::DataType type, ffi::Buffer<ffi::F32>& cos,
                                ffi::Buffer<ffi::F32>& sin, ffi::Result<ffi::AnyBuffer>& q,
                                ffi::Result<ffi::AnyBuffer>& k, ffi::Result<ffi::AnyBuffer>& v, QkvShape* shape) {
  if (q->element_type() != type || k->element_type() != type || v->element_type() != type) {
    return "q, k and v take x's type";
  }
  const auto qd = q->dimensions(), kd = k->dimensions(), vd = v->dimensions();
  if (qd.size() != 3 || kd.size() != 3 || vd.size() != 3) return "q, k and v must be [tokens, heads, head_dim]";
  *shape = {tokens, qd[1], kd[1], qd[2]};
  if (qd[0] != tokens || kd[0] != tokens || vd[0] != tokens || kd[2] != shape->dim || vd[1] != kd[1] ||
      vd[2] != shape->dim || shape->dim % 2 != 0 || (shape->heads + 2 * shape->kv_heads) * shape->dim != width) {
    return "q, k and v do not split the projection's rows";
  }
  const auto cd = cos.dimensions(), sd = sin.dimensions();
  if (cd.size() != 2 || cd[0] != tokens || cd[1] != shape->dim / 2 || sd.size() != 2 || sd[0] != cd[0] ||
      sd[1] != cd[1]) {
    return "cos and sin must be [tokens, head_dim / 2]";
  }
  return nullptr;
}

// RotateAndSplit into the checked outputs, in their element type (float32 or bfloat16).
inline void WriteQkv(const float* y, const QkvShape& shape, ffi::Buffer<ffi::F32>& cos, ffi::Buffer<ffi::F32>& sin,
                     ffi::Result<ffi::AnyBuffer>& q, ffi::Result<ffi::AnyBuffer>& k, ffi::Result<ffi::AnyBuffer>& v) {
  if (q->element_type() == ffi::DataType::F32) {
    RotateAndSplit(y, shape, cos.typed_data(), sin.typed_data(), static_cast<float*>(q->untyped_data()),
                   static_cast<float*>(k->untyped_data()), static_cast<float*>(v->untyped_data()));
  } else {
    RotateAndSplit(y, shape, cos.typed_data(), sin.typed_data(), static_cast<uint16_t*>(q->untyped_data()),
                   static_cast<uint16_t*>(k->untyped_data()), static_cast<uint16_t*>(v->untyped_data()));
  }
}

}  // namespace tessera_cpu
