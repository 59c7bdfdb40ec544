// eager_emu.cpp — kernels/app/eager.cu compiled for the CPU under cuda_emu.h, so
// that `cargo test` checks the eager baseline against the f64 oracle: a
// baseline that computed something else would make every speed-up a lie.
// Test-only entry point: kd_emu_eager_run, the launch sequence of
// src/cuda/eager.rs.
#include "cuda_emu.h"

#include "app/eager.cu"

// kd_count_valid and kd_reduce_loss, emulated in kd_emu.cpp (kd_fused.cu's unit).
extern "C" void kd_emu_count_valid(const long long* labels, long long n, long long ignore_index,
                                   int* valid);
extern "C" void kd_emu_reduce_loss(const float* row_loss, long long n, const int* valid,
                                   const KdParams* P, float* loss);

namespace {

const unsigned kGrid = 3, kBlock = 64;

template <typename Tin>
void log_softmax(const void* x, long long stride, float* out, long long n, int V, float inv_tau) {
  const Tin* xp = static_cast<const Tin*>(x);
  kd_emu_launch(kGrid, kBlock, [&] { kd_eager_log_softmax_body<Tin>(xp, stride, out, n, V, inv_tau); });
}

template <typename Tout>
void backward(const float* g, const float* ls, const float* ls1, const long long* labels,
              const int* valid, long long n, const KdParams& P, void* grad, long long gs) {
  Tout* gp = static_cast<Tout*>(grad);
  kd_emu_launch(kGrid, kBlock, [&] { kd_eager_lsm_back_body<Tout>(g, ls, labels, valid, n, P, gp, gs); });
  if (P.alpha > 0.0f)
    kd_emu_launch(kGrid, kBlock, [&] { kd_eager_ce_back_body<Tout>(ls1, labels, valid, n, P, gp, gs); });
}

}  // namespace

// dtype codes: 0 f32, 1 bf16, 2 f16. Scratch: ls, lt, e (N·V floats each), lm
// (JSD), ls1 (α > 0). Returns 0, or −1 for an unsupported dtype pair.
extern "C" int kd_emu_eager_run(int div, int in_dtype, int out_dtype, const void* s, long long ss,
                                const void* t, long long ts, const long long* labels, void* grad,
                                long long gs, float* row_loss, int* valid, float* loss, long long n,
                                const KdParams* P, float* ls, float* lt, float* e, float* lm,
                                float* ls1) {
  if (out_dtype != 0 && out_dtype != in_dtype) return -1;
  std::lock_guard<std::mutex> lock(kd_emu_mutex);
  const int V = P->vocab;
  const long long count = n * (long long)V;
  if (labels) kd_emu_count_valid(labels, n, P->ignore_index, valid);
  const int* vp = labels ? valid : nullptr;
  auto lsm = [&](const void* x, long long stride, float* out, float inv_tau) {
    if (in_dtype == 0) log_softmax<float>(x, stride, out, n, V, inv_tau);
    if (in_dtype == 1) log_softmax<kd_bf16>(x, stride, out, n, V, inv_tau);
    if (in_dtype == 2) log_softmax<kd_f16>(x, stride, out, n, V, inv_tau);
  };
  lsm(s, ss, ls, P->inv_tau);
  lsm(t, ts, lt, P->inv_tau);
  if (P->alpha > 0.0f) lsm(s, ss, ls1, 1.0f);
  if (div == KD_DIV_FKL) {
    kd_emu_launch(kGrid, kBlock, [&] { kd_eager_fkl_terms(ls, lt, e, count); });
  } else if (div == KD_DIV_RKL) {
    kd_emu_launch(kGrid, kBlock, [&] { kd_eager_rkl_terms(ls, lt, e, count); });
  } else if (div == KD_DIV_TVD) {
    kd_emu_launch(kGrid, kBlock, [&] { kd_eager_tvd_terms(ls, lt, e, count); });
  } else if (div == KD_DIV_SCE) {
    kd_emu_launch(kGrid, kBlock, [&] { kd_eager_sce_terms(ls, lt, e, count); });
  } else {
    kd_emu_launch(kGrid, kBlock, [&] { kd_eager_log_mix(ls, lt, lm, count, P->beta); });
    kd_emu_launch(kGrid, kBlock, [&] { kd_eager_jsd_terms(ls, lt, lm, e, count, P->beta); });
  }
  kd_emu_launch(kGrid, kBlock, [&] { kd_eager_row_loss(e, ls1, labels, n, *P, row_loss); });
  kd_emu_reduce_loss(row_loss, n, vp, P, loss);
  if (!grad) return 0;
  if (div == KD_DIV_FKL || div == KD_DIV_SCE) {
    kd_emu_launch(kGrid, kBlock, [&] { kd_eager_fkl_back(lt, e, count); });
  } else if (div == KD_DIV_RKL) {
    kd_emu_launch(kGrid, kBlock, [&] { kd_eager_rkl_back(ls, lt, e, count); });
  } else if (div == KD_DIV_TVD) {
    kd_emu_launch(kGrid, kBlock, [&] { kd_eager_tvd_back(ls, lt, e, count); });
  } else {
    kd_emu_launch(kGrid, kBlock, [&] { kd_eager_jsd_back(ls, lm, e, count, P->beta); });
  }
  if (out_dtype == 0) backward<float>(e, ls, ls1, labels, vp, n, *P, grad, gs);
  if (out_dtype == 1) backward<kd_bf16>(e, ls, ls1, labels, vp, n, *P, grad, gs);
  if (out_dtype == 2) backward<kd_f16>(e, ls, ls1, labels, vp, n, *P, grad, gs);
  return 0;
}
