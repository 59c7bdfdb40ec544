// select_emu.cpp — kernels/topk_select/select.cu compiled for the CPU under
// cuda_emu.h, so that `cargo test` runs the selection kernel's own parallel
// code (the radix passes, the block scan of the compaction, the bitonic
// sort, grid-stride rows) against the sort oracle without a GPU. The
// test-only entry point kd_emu_select is the launch of
// src/topk_select/cuda.rs.
#include "cuda_emu.h"

#include "topk_select/select.cu"

// The kernel of `in_dtype` (0 f32, 1 bf16, 2 f16) on `a`, as a grid of
// `grid` blocks of `block` threads (a multiple of 32, at most
// KD_SEL_THREADS). Returns 0, or −1 for a bad dtype or block.
extern "C" int kd_emu_select(int in_dtype, const KdSelectArgs* a, unsigned grid,
                             unsigned block) {
  std::lock_guard<std::mutex> lock(kd_emu_mutex);
  if (in_dtype < 0 || in_dtype > 2 || block == 0 || block % 32 || block > KD_SEL_THREADS)
    return -1;
  if (a->n_rows == 0) return 0;
  kd_emu_launch(grid, block, [&] {
    if (in_dtype == 0)
      kd_select_body<float>(*a);
    else if (in_dtype == 1)
      kd_select_body<kd_bf16>(*a);
    else
      kd_select_body<kd_f16>(*a);
  });
  return 0;
}
