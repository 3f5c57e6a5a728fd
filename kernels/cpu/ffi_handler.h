// What the XLA FFI handlers share: the FFI header and the element types the kernels take.
#pragma once

#include "xla/ffi/api/ffi.h"

namespace tessera_cpu {

namespace ffi = xla::ffi;

inline bool IsFloat(ffi::DataType t) { return t == ffi::DataType::F32 || t == ffi::DataType::BF16; }

}  // namespace tessera_cpu
