// feature.cu — feature distillation losses and their gradients (docs/DESIGN.md §1
// "Feature losses"; the math is in feature_math.cuh).
//
// One CTA per row (a sample), grid-stride over rows, one launch for the batch.
// Inputs f32/bf16/f16, fp32 math, Kahan sums per thread and a block tree;
// gradients for the student and, optionally, the teacher, in the input dtype
// or f32. Row losses r_i land in `row_loss`; kd_reduce_loss (kd_fused.cu)
// turns them into the reduced loss.
//
//   mse        one sweep: Σ (s − t)² and both gradients.
//              Bytes per element: 2·in + out per gradient written.
//   cosine     sweep 1: Σs², Σt², Σst (block sum) → norms and cos;
//              sweep 2: Σ(a − b)² for the loss (no cancellation), and the
//              gradients. Bytes: 4·in + out per gradient (2·in + 2·in re-read).
//   attention  a sample is [C, S], channel c at c·S; a thread owns positions
//              j (the same j in every sweep, so the workspace needs no barrier).
//              sweep 1: Q_s,j, Q_t,j over channels (stored in the f32
//              workspace, 2·S floats per block), Σ Q_s², Σ Q_t², Σ Q_s Q_t
//              (block sum) → norms and ⟨Q̂_s, Q̂_t⟩;
//              sweep 2: u_j from the workspace, Σu² for the loss, and each
//              gradient re-reads its input and writes (2/C) x_{c,j} ∂r/∂Q_j.
//              Bytes per position: (C_s + C_t)·in, plus C·(in + out) per
//              gradient, plus 16 of workspace.
//              Loads are coalesced across the threads of a warp (consecutive
//              j); small S leaves threads idle (one CTA per sample).
// mse and cosine use 16-byte loads where the two rows share their alignment.
// Issue slots per element (sm_90 SASS, counted as scripts/sass-report counts
// the loss kernels, which it alone reports; bf16 in and out): mse ≈ 29 (one
// sweep, Kahan sums; the compiler keeps two copies of it), cosine ≈ 16 + 55
// (two sweeps); attention's channel loops are scalar (strided loads).
// Launch contract: KdFeatArgs (feature_args.h), one struct by value.
#include "feature/feature_args.h"

// 256 threads, at least 4 blocks per SM (64 registers): without the minimum,
// ptxas 13.0 aimed at 40 registers and spilled the attention kernels.
#define KD_FEAT_THREADS 256

struct KdSum3 {
  float a, b, c;
};

// Three sums at once; every thread gets the block's totals.
__device__ __forceinline__ KdSum3 kd_feat_block_sum3(KdSum3 v, KdSum3* smem) {
  return kd_block_reduce(
      v, smem, KdSum3{0.0f, 0.0f, 0.0f},
      [](const KdSum3& x, int off) {
        return KdSum3{kd_shfl(x.a, off), kd_shfl(x.b, off), kd_shfl(x.c, off)};
      },
      [](KdSum3& x, const KdSum3& y) {
        x.a += y.a;
        x.b += y.b;
        x.c += y.c;
      });
}

// ------------------------------------------------------------------ mse --

template <typename Tin, typename Tout>
__device__ void kd_feat_mse_body(const Tin* s, const Tin* t, Tout* gs, Tout* gt, float* row_loss,
                                 KdFeatParams P) {
  __shared__ KdSum3 red[KD_FEAT_THREADS / 32];
  for (long long row = blockIdx.x; row < P.n_rows; row += gridDim.x) {
    Tout* gsr = gs ? gs + row * P.gs_stride : nullptr;
    Tout* gtr = gt ? gt + row * P.gt_stride : nullptr;
    KdKahan acc = kd_kahan_init();
    kd_sweep(s + row * P.s_stride, t + row * P.t_stride, P.cols, [&](int j, float sv, float tv) {
      const float d = sv - tv;
      kd_kahan_add(acc, d * d);
      const float g = kd_mse_grad(d, P.w);
      if (gsr) gsr[j] = kd_from_f32<Tout>(g);
      if (gtr) gtr[j] = kd_from_f32<Tout>(-g);
    });
    const KdSum3 tot = kd_feat_block_sum3(KdSum3{acc.sum, 0.0f, 0.0f}, red);
    if (threadIdx.x == 0) row_loss[row] = tot.a;
  }
}

// --------------------------------------------------------------- cosine --

template <typename Tin, typename Tout>
__device__ void kd_feat_cos_body(const Tin* s, const Tin* t, Tout* gs, Tout* gt, float* row_loss,
                                 KdFeatParams P) {
  __shared__ KdSum3 red[KD_FEAT_THREADS / 32];
  for (long long row = blockIdx.x; row < P.n_rows; row += gridDim.x) {
    const Tin* sr = s + row * P.s_stride;
    const Tin* tr = t + row * P.t_stride;
    Tout* gsr = gs ? gs + row * P.gs_stride : nullptr;
    Tout* gtr = gt ? gt + row * P.gt_stride : nullptr;
    KdKahan ss = kd_kahan_init(), tt = kd_kahan_init(), st = kd_kahan_init();
    kd_sweep(sr, tr, P.cols, [&](int, float sv, float tv) {
      kd_kahan_add(ss, sv * sv);
      kd_kahan_add(tt, tv * tv);
      kd_kahan_add(st, sv * tv);
    });
    const KdSum3 sums = kd_feat_block_sum3(KdSum3{ss.sum, tt.sum, st.sum}, red);
    const KdCosRow r = kd_cos_row(sums.a, sums.b, sums.c, P.eps);
    KdKahan diff2 = kd_kahan_init();
    kd_sweep(sr, tr, P.cols, [&](int j, float sv, float tv) {
      kd_kahan_add(diff2, kd_cos_diff2(sv, tv, r));
      if (gsr) gsr[j] = kd_from_f32<Tout>(kd_cos_grad_s(sv, tv, r, P.w));
      if (gtr) gtr[j] = kd_from_f32<Tout>(kd_cos_grad_t(sv, tv, r, P.w));
    });
    const KdSum3 d2 = kd_feat_block_sum3(KdSum3{diff2.sum, 0.0f, 0.0f}, red);
    if (threadIdx.x == 0) row_loss[row] = kd_cos_loss(r, d2.a);
  }
}

// ------------------------------------------------------------ attention --

template <typename Tin, typename Tout>
__device__ void kd_feat_at_body(const Tin* s, const Tin* t, Tout* gs, Tout* gt, float* row_loss,
                                float* work, KdFeatParams P) {
  __shared__ KdSum3 red[KD_FEAT_THREADS / 32];
  const int S = P.cols, cs = P.s_channels, ct = P.t_channels;
  // This block's workspace: Q_s then Q_t, S floats each.
  float* qs_buf = work + (long long)blockIdx.x * 2 * S;
  float* qt_buf = qs_buf + S;
  for (long long row = blockIdx.x; row < P.n_rows; row += gridDim.x) {
    const Tin* sr = s + row * P.s_stride;
    const Tin* tr = t + row * P.t_stride;
    Tout* gsr = gs ? gs + row * P.gs_stride : nullptr;
    Tout* gtr = gt ? gt + row * P.gt_stride : nullptr;
    KdKahan qss = kd_kahan_init(), qtt = kd_kahan_init(), qst = kd_kahan_init();
    for (int j = threadIdx.x; j < S; j += blockDim.x) {
      const float qs = kd_at_q(sr, cs, S, j), qt = kd_at_q(tr, ct, S, j);
      qs_buf[j] = qs;
      qt_buf[j] = qt;
      kd_kahan_add(qss, qs * qs);
      kd_kahan_add(qtt, qt * qt);
      kd_kahan_add(qst, qs * qt);
    }
    const KdSum3 sums = kd_feat_block_sum3(KdSum3{qss.sum, qtt.sum, qst.sum}, red);
    const KdAtRow r = kd_at_row(sums.a, sums.b, sums.c, P.eps);
    KdKahan uu = kd_kahan_init();
    for (int j = threadIdx.x; j < S; j += blockDim.x) {
      const float qs = qs_buf[j], qt = qt_buf[j];
      const float u = kd_at_u(qs, qt, r);
      kd_kahan_add(uu, u * u);
      if (gsr) {
        const float k = kd_at_coef_s(qs, qt, r, P.w, cs);
        for (int c = 0; c < cs; ++c) {
          const long long i = (long long)c * S + j;
          gsr[i] = kd_from_f32<Tout>(k * kd_to_f32(sr[i]));
        }
      }
      if (gtr) {
        const float k = kd_at_coef_t(qs, qt, r, P.w, ct);
        for (int c = 0; c < ct; ++c) {
          const long long i = (long long)c * S + j;
          gtr[i] = kd_from_f32<Tout>(k * kd_to_f32(tr[i]));
        }
      }
    }
    const KdSum3 loss = kd_feat_block_sum3(KdSum3{uu.sum, 0.0f, 0.0f}, red);
    if (threadIdx.x == 0) row_loss[row] = loss.a;
  }
}

// ------------------------------------------------------------- kernels --

#define KD_FEAT_ARGS(TIN, TOUT)                                                         \
  static_cast<const TIN*>(a.student), static_cast<const TIN*>(a.teacher),             \
      static_cast<TOUT*>(a.grad_student), static_cast<TOUT*>(a.grad_teacher), a.row_loss

#define KD_FEAT_KERNELS(IN, OUT, TIN, TOUT)                                             \
  extern "C" __global__ void __launch_bounds__(KD_FEAT_THREADS, 4)                      \
      kd_feat_mse_##IN##_##OUT(const KdFeatArgs a) {                                    \
    kd_feat_mse_body<TIN, TOUT>(KD_FEAT_ARGS(TIN, TOUT), a.params);                     \
  }                                                                                     \
  extern "C" __global__ void __launch_bounds__(KD_FEAT_THREADS, 4)                      \
      kd_feat_cos_##IN##_##OUT(const KdFeatArgs a) {                                    \
    kd_feat_cos_body<TIN, TOUT>(KD_FEAT_ARGS(TIN, TOUT), a.params);                     \
  }                                                                                     \
  extern "C" __global__ void __launch_bounds__(KD_FEAT_THREADS, 4)                      \
      kd_feat_at_##IN##_##OUT(const KdFeatArgs a) {                                     \
    kd_feat_at_body<TIN, TOUT>(KD_FEAT_ARGS(TIN, TOUT), a.workspace, a.params);         \
  }

KD_FEAT_KERNELS(f32, f32, float, float)
KD_FEAT_KERNELS(bf16, bf16, kd_bf16, kd_bf16)
KD_FEAT_KERNELS(bf16, f32, kd_bf16, float)
KD_FEAT_KERNELS(f16, f16, kd_f16, kd_f16)
KD_FEAT_KERNELS(f16, f32, kd_f16, float)
