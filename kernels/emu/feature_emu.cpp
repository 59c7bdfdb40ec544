// feature_emu.cpp — kernels/feature/feature.cu compiled for the CPU under cuda_emu.h,
// so that `cargo test` runs the feature kernels' own parallel code (sweeps
// with vector heads and tails, block sums, the attention workspace,
// grid-stride rows) against the f64 oracle without a GPU. Test-only entry
// point: kd_emu_feature_run, the launch sequence of src/feature/cuda.rs (the
// kernel, then kd_reduce_loss).
#include "cuda_emu.h"

#include "feature/feature.cu"
#include "kd/kd_args.h"

// kd_reduce_loss, emulated in kd_emu.cpp (kd_fused.cu's unit).
extern "C" void kd_emu_reduce_loss(const KdReduceArgs* a);

namespace {

template <typename Tin, typename Tout>
void launch(const KdFeatArgs& a, unsigned grid, unsigned block) {
  kd_emu_launch(grid, block, [&] {
    if (a.params.kind == KD_FEAT_MSE)
      kd_feat_mse_body<Tin, Tout>(KD_FEAT_ARGS(Tin, Tout), a.params);
    else if (a.params.kind == KD_FEAT_COS)
      kd_feat_cos_body<Tin, Tout>(KD_FEAT_ARGS(Tin, Tout), a.params);
    else
      kd_feat_at_body<Tin, Tout>(KD_FEAT_ARGS(Tin, Tout), a.workspace, a.params);
  });
}

}  // namespace

// The launch contract `a` (feature_args.h; its workspace: grid·2·S floats
// for attention), then kd_reduce_loss with the reduction's parameters `RP`.
// dtype codes: 0 f32, 1 bf16, 2 f16. Returns 0, or −1 for an unsupported
// dtype pair.
extern "C" int kd_emu_feature_run(int in_dtype, int out_dtype, const KdFeatArgs* a, float* loss,
                                  const KdParams* RP, unsigned grid, unsigned block) {
  std::lock_guard<std::mutex> lock(kd_emu_mutex);
  if (a->params.n_rows > 0) {
    if (in_dtype == 0 && out_dtype == 0)
      launch<float, float>(*a, grid, block);
    else if (in_dtype == 1 && out_dtype == 1)
      launch<kd_bf16, kd_bf16>(*a, grid, block);
    else if (in_dtype == 1 && out_dtype == 0)
      launch<kd_bf16, float>(*a, grid, block);
    else if (in_dtype == 2 && out_dtype == 2)
      launch<kd_f16, kd_f16>(*a, grid, block);
    else if (in_dtype == 2 && out_dtype == 0)
      launch<kd_f16, float>(*a, grid, block);
    else
      return -1;
  }
  const KdReduceArgs red{a->row_loss, a->params.n_rows, nullptr, loss, *RP};
  kd_emu_reduce_loss(&red);
  return 0;
}
