// vp_emu.cpp — kernels/vocab_parallel/vp.cu compiled for the CPU under
// cuda_emu.h, so that `cargo test` runs the vocab-parallel kernels' own
// parallel code (sweeps, block reductions, the per-row merge, the top-k bit
// map, grid-stride rows) against the host protocol and the unsharded f64
// oracle without a GPU. Test-only entry points, the launch sequences of
// src/vocab_parallel/cuda.rs: kd_emu_vp_stats (round 1 or 2) and
// kd_emu_vp_finish (kd_count_valid, the finish, kd_vp_reduce_loss).
#include "cuda_emu.h"

#include "kd/kd_args.h"
#include "vocab_parallel/vp.cu"

// kd_count_valid, emulated in kd_emu.cpp (kd_fused.cu's unit).
extern "C" void kd_emu_count_valid(const KdCountArgs* a);

namespace {

// The bit map of the top-k kernels' dynamic shared memory: one per launch
// (blocks run one after another).
std::vector<uint32_t> bitmap(const KdVpParams& P) {
  return std::vector<uint32_t>(((size_t)P.real_cols + 31) / 32 + 1);
}

}  // namespace

// Round `round` (1 or 2) of the launch contract `a`. dtype codes: 0 f32,
// 1 bf16, 2 f16. Returns 0, or −1 for an unsupported dtype or round.
extern "C" int kd_emu_vp_stats(int round, int in_dtype, const KdVpStatsArgs* a, unsigned grid,
                               unsigned block) {
  std::lock_guard<std::mutex> lock(kd_emu_mutex);
  if (in_dtype < 0 || in_dtype > 2 || round < 1 || round > 2) return -1;
  if (a->params.n_rows == 0) return 0;
  std::vector<uint32_t> bits = bitmap(a->params);
  kd_emu_launch(grid, block, [&] {
    if (round == 1) {
      if (in_dtype == 0)
        kd_vp_round1_body<float>(*a, bits.data());
      else if (in_dtype == 1)
        kd_vp_round1_body<kd_bf16>(*a, bits.data());
      else
        kd_vp_round1_body<kd_f16>(*a, bits.data());
    } else {
      if (in_dtype == 0)
        kd_vp_round2_body<float>(*a);
      else if (in_dtype == 1)
        kd_vp_round2_body<kd_bf16>(*a);
      else
        kd_vp_round2_body<kd_f16>(*a);
    }
  });
  return 0;
}

// kd_count_valid (with labels, into *valid), the finish of `a` (whose
// valid_count must be `valid` or null), then kd_vp_reduce_loss into *loss.
extern "C" int kd_emu_vp_finish(int in_dtype, int out_dtype, const KdVpFinishArgs* a, int* valid,
                                double* loss, unsigned grid, unsigned block) {
  std::lock_guard<std::mutex> lock(kd_emu_mutex);
  const KdVpParams& P = a->params;
  if (a->labels) {
    const KdCountArgs c{a->labels, P.n_rows, P.ignore_index, valid};
    kd_emu_count_valid(&c);
  }
  std::vector<uint32_t> bits = bitmap(P);
  auto run = [&](auto tin, auto tout) {
    using Tin = decltype(tin);
    using Tout = decltype(tout);
    kd_emu_launch(grid, block, [&] { kd_vp_finish_body<Tin, Tout>(*a, bits.data()); });
  };
  if (P.n_rows > 0) {
    if (in_dtype == 0 && out_dtype == 0)
      run(float{}, float{});
    else if (in_dtype == 1 && out_dtype == 1)
      run(kd_bf16{}, kd_bf16{});
    else if (in_dtype == 1 && out_dtype == 0)
      run(kd_bf16{}, float{});
    else if (in_dtype == 2 && out_dtype == 2)
      run(kd_f16{}, kd_f16{});
    else if (in_dtype == 2 && out_dtype == 0)
      run(kd_f16{}, float{});
    else
      return -1;
  }
  const KdVpReduceArgs red{a->row_loss, P.n_rows, a->valid_count, loss, P.reduction, P.vocab_size};
  kd_emu_launch(1, 64, [&] { kd_vp_reduce_body(red); });
  return 0;
}
