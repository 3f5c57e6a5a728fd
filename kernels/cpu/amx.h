// Intel AMX tiles, shared by the kernels that use them (amx_linear.cc, and the attention's
// prompt-chunk path in ragged_paged_attention_amx.cc): whether the build has them, the
// per-process permission Linux wants first, and the one tile shape every kernel here uses.
#pragma once

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#define TESSERA_HAVE_AMX 1
#else
#define TESSERA_HAVE_AMX 0
#endif

// Every CPU with AMX has AVX-512 BF16 too; the check keeps the build honest where a compiler
// says otherwise.
#if TESSERA_HAVE_AMX && defined(__AVX512BF16__)
#define TESSERA_HAVE_VECTOR_BF16 1
#else
#define TESSERA_HAVE_VECTOR_BF16 0
#endif

#if TESSERA_HAVE_AMX
namespace tessera_cpu {

// Linux hands out the tile registers per process on request; without it the first tile
// instruction is an illegal instruction. Asked once.
inline bool AmxPermitted() {
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

// All eight tiles 16 rows x 64 bytes (16 float32 or 32 bfloat16 per row). Loaded at every
// work item, not once per thread: other code on XLA's threads (its own kernel libraries) may
// configure the tiles differently between our calls.
inline void ConfigureTiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

}  // namespace tessera_cpu
#endif  // TESSERA_HAVE_AMX
