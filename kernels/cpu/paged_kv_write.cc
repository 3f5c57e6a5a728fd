// Writing a step's new keys and values into their cache pages, in place, as an XLA FFI call.
//
// k_pages / v_pages [pages, page_size, kv_heads, D] are aliased to the outputs, so with the
// cache donated XLA hands the same buffers back: the call copies only the new tokens' rows.
// Why it exists: XLA CPU has no bfloat16 scatter, and widened each layer's whole cache to
// float32 and back around a one-token write. Slot s = page * page_size + offset; a negative
// or out-of-range slot (a padding token) writes nothing.

#include <cstdint>
#include <cstring>

#include "common.h"
#include "ffi_handler.h"

namespace {

using namespace tessera_cpu;  // NOLINT: the kernels' shared helpers

ffi::Error WriteKVPages(ffi::AnyBuffer k_pages, ffi::AnyBuffer v_pages, ffi::AnyBuffer k_new,
                        ffi::AnyBuffer v_new, ffi::Buffer<ffi::S32> slots, ffi::Result<ffi::AnyBuffer> k_out,
                        ffi::Result<ffi::AnyBuffer> v_out) {
  const auto pd = k_pages.dimensions(), nd = k_new.dimensions();
  if (pd.size() != 4 || nd.size() != 3 || v_pages.dimensions().size() != 4 || v_new.dimensions().size() != 3) {
    return ffi::Error::InvalidArgument("paged_kv_write: pages must be rank 4 and new rows rank 3");
  }
  const int64_t num_slots = pd[0] * pd[1], row = pd[2] * pd[3], tokens = nd[0];
  if (nd[1] * nd[2] != row || static_cast<int64_t>(slots.element_count()) != tokens || v_pages.element_count() != k_pages.element_count() ||
      v_new.element_count() != k_new.element_count()) {
    return ffi::Error::InvalidArgument("paged_kv_write: inconsistent shapes");
  }
  if (k_new.element_type() != k_pages.element_type() || v_new.element_type() != v_pages.element_type()) {
    return ffi::Error::InvalidArgument("paged_kv_write: new rows must have the pages' dtype");
  }
  const size_t bytes = row * ffi::ByteWidth(k_pages.element_type());
  struct Pair {
    const ffi::AnyBuffer& in;
    const ffi::AnyBuffer& fresh;
    ffi::AnyBuffer out;
  };
  for (const Pair& p : {Pair{k_pages, k_new, *k_out}, Pair{v_pages, v_new, *v_out}}) {
    auto* dst = static_cast<char*>(p.out.untyped_data());
    // XLA aliases the output to the input; should it ever not, start from the input.
    if (dst != p.in.untyped_data()) std::memcpy(dst, p.in.untyped_data(), p.in.size_bytes());
    const auto* src = static_cast<const char*>(p.fresh.untyped_data());
    for (int64_t t = 0; t < tokens; ++t) {
      const int64_t slot = slots.typed_data()[t];
      if (slot >= 0 && slot < num_slots) std::memcpy(dst + slot * bytes, src + t * bytes, bytes);
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TesseraPagedKVWrite, WriteKVPages,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()         // k_pages
                                  .Arg<ffi::AnyBuffer>()         // v_pages
                                  .Arg<ffi::AnyBuffer>()         // k_new
                                  .Arg<ffi::AnyBuffer>()         // v_new
                                  .Arg<ffi::Buffer<ffi::S32>>()  // slot_mapping
                                  .Ret<ffi::AnyBuffer>()         // k_pages, written
                                  .Ret<ffi::AnyBuffer>());       // v_pages, written
