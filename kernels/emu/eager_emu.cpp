// eager_emu.cpp — kernels/app/eager.cu compiled for the CPU under cuda_emu.h, so
// that `cargo test` checks the eager baseline against the f64 oracle: a
// baseline that computed something else would make every speed-up a lie.
// Test-only entry point: kd_emu_eager_run, the launch sequence of
// src/cuda/eager.rs.
#include "cuda_emu.h"

#include "app/eager.cu"
#include "kd/kd_args.h"

// kd_count_valid and kd_reduce_loss, emulated in kd_emu.cpp (kd_fused.cu's unit).
extern "C" void kd_emu_count_valid(const KdCountArgs* a);
extern "C" void kd_emu_reduce_loss(const KdReduceArgs* a);

namespace {

const unsigned kGrid = 3, kBlock = 64;

void launch(void (*kernel)(KdEagerEwArgs), const KdEagerEwArgs& a) {
  kd_emu_launch(kGrid, kBlock, [&] { kernel(a); });
}

}  // namespace

// dtype codes: 0 f32, 1 bf16, 2 f16. Scratch: ls, lt, e (N·V floats each), lm
// (JSD), ls1 (α > 0). Returns 0, or −1 for an unsupported dtype pair. Each
// kernel gets its launch contract (app/app_args.h), as from src/cuda/eager.rs.
extern "C" int kd_emu_eager_run(int div, int in_dtype, int out_dtype, const void* s, long long ss,
                                const void* t, long long ts, const long long* labels, void* grad,
                                long long gs, float* row_loss, int* valid, float* loss, long long n,
                                const KdParams* P, float* ls, float* lt, float* e, float* lm,
                                float* ls1) {
  if (out_dtype != 0 && out_dtype != in_dtype) return -1;
  std::lock_guard<std::mutex> lock(kd_emu_mutex);
  const int V = P->vocab;
  const long long count = n * (long long)V;
  if (labels) {
    const KdCountArgs c{labels, n, P->ignore_index, valid};
    kd_emu_count_valid(&c);
  }
  const int* vp = labels ? valid : nullptr;
  auto lsm = [&](const void* x, long long stride, float* out, float inv_tau) {
    const KdEagerLsmArgs a{x, stride, out, n, V, inv_tau};
    kd_emu_launch(kGrid, kBlock, [&] {
      if (in_dtype == 0) kd_eager_log_softmax_f32(a);
      if (in_dtype == 1) kd_eager_log_softmax_bf16(a);
      if (in_dtype == 2) kd_eager_log_softmax_f16(a);
    });
  };
  lsm(s, ss, ls, P->inv_tau);
  lsm(t, ts, lt, P->inv_tau);
  if (P->alpha > 0.0f) lsm(s, ss, ls1, 1.0f);
  const KdEagerEwArgs terms{ls, lt, lm, e, count, P->beta};
  if (div == KD_DIV_FKL) {
    launch(kd_eager_fkl_terms, terms);
  } else if (div == KD_DIV_RKL) {
    launch(kd_eager_rkl_terms, terms);
  } else if (div == KD_DIV_TVD) {
    launch(kd_eager_tvd_terms, terms);
  } else if (div == KD_DIV_SCE) {
    launch(kd_eager_sce_terms, terms);
  } else {
    launch(kd_eager_log_mix, KdEagerEwArgs{ls, lt, nullptr, lm, count, P->beta});
    launch(kd_eager_jsd_terms, terms);
  }
  const KdEagerRowLossArgs rl{e, ls1, labels, n, row_loss, *P};
  kd_emu_launch(kGrid, kBlock, [&] { kd_eager_row_loss(rl); });
  const KdReduceArgs red{row_loss, n, vp, loss, *P};
  kd_emu_reduce_loss(&red);
  if (!grad) return 0;
  if (div == KD_DIV_FKL || div == KD_DIV_SCE) {
    launch(kd_eager_fkl_back, terms);
  } else if (div == KD_DIV_RKL) {
    launch(kd_eager_rkl_back, terms);
  } else if (div == KD_DIV_TVD) {
    launch(kd_eager_tvd_back, terms);
  } else {
    launch(kd_eager_jsd_back, terms);
  }
  const KdEagerBackArgs back{e, ls, labels, vp, n, grad, gs, *P};
  kd_emu_launch(kGrid, kBlock, [&] {
    if (out_dtype == 0) kd_eager_lsm_back_f32(back);
    if (out_dtype == 1) kd_eager_lsm_back_bf16(back);
    if (out_dtype == 2) kd_eager_lsm_back_f16(back);
  });
  if (P->alpha > 0.0f) {
    const KdEagerBackArgs ce{nullptr, ls1, labels, vp, n, grad, gs, *P};
    kd_emu_launch(kGrid, kBlock, [&] {
      if (out_dtype == 0) kd_eager_ce_back_f32(ce);
      if (out_dtype == 1) kd_eager_ce_back_bf16(ce);
      if (out_dtype == 2) kd_eager_ce_back_f16(ce);
    });
  }
  return 0;
}
