// kd_emu.cpp — kernels/kd_fused.cu compiled for the CPU under cuda_emu.h, so
// that `cargo test` runs the kernels' own parallel code (not only their row
// arithmetic) on machines without a GPU. Test-only entry point: kd_emu_run,
// the same three launches as the CUDA backend (count, fused, reduce).
#include "cuda_emu.h"

#include "../kd_fused.cu"

namespace {

template <typename Tin, typename Tout>
void fused(int div, const void* s, long long ss, const void* t, long long ts, const long long* labels,
           void* grad, long long gs, float* row_loss, const int* valid, long long n, const KdParams& P,
           unsigned grid, unsigned block) {
  const Tin* sp = static_cast<const Tin*>(s);
  const Tin* tp = static_cast<const Tin*>(t);
  Tout* gp = static_cast<Tout*>(grad);
  kd_emu_launch(grid, block, [&] {
    if (div == KD_DIV_FKL)
      kd_fused_body<Tin, Tout, KD_DIV_FKL>(sp, ss, tp, ts, labels, gp, gs, row_loss, valid, n, P);
    else if (div == KD_DIV_RKL)
      kd_fused_body<Tin, Tout, KD_DIV_RKL>(sp, ss, tp, ts, labels, gp, gs, row_loss, valid, n, P);
    else if (div == KD_DIV_JSD)
      kd_fused_body<Tin, Tout, KD_DIV_JSD>(sp, ss, tp, ts, labels, gp, gs, row_loss, valid, n, P);
    else if (div == KD_DIV_TVD)
      kd_fused_body<Tin, Tout, KD_DIV_TVD>(sp, ss, tp, ts, labels, gp, gs, row_loss, valid, n, P);
    else
      kd_fused_body<Tin, Tout, KD_DIV_SCE>(sp, ss, tp, ts, labels, gp, gs, row_loss, valid, n, P);
  });
}

}  // namespace

extern "C" void kd_emu_count_valid(const long long* labels, long long n, long long ignore_index,
                                   int* valid) {
  kd_emu_launch(1, 64, [&] { kd_count_valid(labels, n, ignore_index, valid); });
}

extern "C" void kd_emu_reduce_loss(const float* row_loss, long long n, const int* valid,
                                   const KdParams* P, float* loss) {
  kd_emu_launch(1, 64, [&] { kd_reduce_loss(row_loss, n, valid, *P, loss); });
}

// dtype codes: 0 f32, 1 bf16, 2 f16. Returns 0, or −1 for an unsupported pair.
extern "C" int kd_emu_run(int div, int in_dtype, int out_dtype, const void* s, long long ss,
                          const void* t, long long ts, const long long* labels, long long ignore_index,
                          void* grad, long long gs, float* row_loss, int* valid, float* loss,
                          long long n, const KdParams* P, unsigned grid, unsigned block) {
  std::lock_guard<std::mutex> lock(kd_emu_mutex);
  if (labels) kd_emu_count_valid(labels, n, ignore_index, valid);
  const int* vp = labels ? valid : nullptr;
  if (n > 0) {
    if (in_dtype == 0 && out_dtype == 0)
      fused<float, float>(div, s, ss, t, ts, labels, grad, gs, row_loss, vp, n, *P, grid, block);
    else if (in_dtype == 1 && out_dtype == 1)
      fused<kd_bf16, kd_bf16>(div, s, ss, t, ts, labels, grad, gs, row_loss, vp, n, *P, grid, block);
    else if (in_dtype == 1 && out_dtype == 0)
      fused<kd_bf16, float>(div, s, ss, t, ts, labels, grad, gs, row_loss, vp, n, *P, grid, block);
    else if (in_dtype == 2 && out_dtype == 2)
      fused<kd_f16, kd_f16>(div, s, ss, t, ts, labels, grad, gs, row_loss, vp, n, *P, grid, block);
    else if (in_dtype == 2 && out_dtype == 0)
      fused<kd_f16, float>(div, s, ss, t, ts, labels, grad, gs, row_loss, vp, n, *P, grid, block);
    else
      return -1;
  }
  kd_emu_reduce_loss(row_loss, n, vp, P, loss);
  return 0;
}
