// kd_fused.cu — v1 fused distillation loss + gradient (docs/DESIGN.md §5).
//
// One CTA per row (grid-stride over rows), one launch for the whole batch.
//   pass 1: every thread sweeps its share of the row once, keeping the online
//           (max, Σ2^x) of the teacher, of the student and, when α > 0, of the
//           student at τ = 1, plus the divergence's accumulators (KdPass1 in
//           kd_math.cuh); a block reduction merges them (kd_pass1_merge).
//   pass 2: JSD and TVD only: a second sweep sums the divergence and ⟨q, g⟩
//           (TVD: the student masses above and below the teacher).
//   last:   re-read the row and write ∂L/∂s and, for mutual learning, ∂L/∂t
//           (skipped when no gradient is asked for).
// Bytes per element (in = input size, out = gradient size), when re-reads
// miss L2: forward/reverse KL 4·in + out (10 B in bf16, 20 B in f32);
// JSD, TVD 6·in + out; + out with the teacher gradient. Loss only: 2·in
// (JSD, TVD 4·in). Soft CE is forward KL's kernel with the teacher entropy
// accumulated in pass 1.
// Options cost no bytes: soft-capping is applied to each logit as it is
// loaded (its derivative multiplies the gradients), a row weight scales
// the row's loss and gradients (weight 0: the row is skipped, as ignored).
// Loads are 16-byte vectors when the student and teacher rows share their
// alignment (scalar head and tail), scalar otherwise. Indexing is 64-bit.
// Issue slots per element (sm_90 SASS, scripts/sass-report: every branch
// side of the vector hot loops counted; bf16 in and out; the committed
// report is bench/results/sass-sm_90.md): forward KL ≈ 630 (pass 1 ≈ 360,
// gradient ≈ 270), reverse KL ≈ 630, soft CE ≈ 650, TVD ≈ 805, JSD ≈ 1215
// (365 + 350 + 500); MUFU 38–53 per element. The exact numerics' price:
// issue 12's fast kernels are to bring it under 40–70.
// The launch contract (one struct by value) is KdFusedArgs in kd_args.h.
//
// Also here: kd_count_valid (rows whose label is not ignore_index, for the
// batchmean/mean weights without a host round trip) and kd_reduce_loss (a
// deterministic one-block sum of the per-row losses).
#include "kd/kd_args.h"

// 256 threads, at least 4 blocks per SM: caps registers at 64 (without the
// minimum, ptxas 13.0 spilled kd_fused_rkl_f32_f32 on sm_80 at 32 registers).
#define KD_MAX_THREADS 256
// TVD's pass 2 and soft CE's entropy, with their teacher gradients, carry the
// most state: 3 blocks per SM (80 registers; at 64, ptxas 13.0 spilled
// kd_fused_tvd_f32_f32 and kd_fused_sce_* on sm_120). So does reverse KL in
// f32 since the pass-1 state holds `cref` (20 bytes spilled on sm_80–sm_89).
#define KD_MIN_BLOCKS(DIV, TIN)                                   \
  ((DIV) == KD_DIV_TVD || (DIV) == KD_DIV_SCE ||                  \
           ((DIV) == KD_DIV_RKL && sizeof(TIN) == 4)              \
       ? 3                                                        \
       : 4)

// ------------------------------------------------------------- kernels --

template <typename Tin, typename Tout, int DIV>
__device__ void kd_fused_body(const KdFusedArgs& a) {
  const Tin* s = static_cast<const Tin*>(a.student);
  const Tin* t = static_cast<const Tin*>(a.teacher);
  const long long s_stride = a.student_stride, t_stride = a.teacher_stride;
  const long long* labels = a.labels;
  const float* row_weights = a.row_weights;
  Tout* grad = static_cast<Tout*>(a.grad);
  Tout* grad_t = static_cast<Tout*>(a.grad_teacher);
  const long long g_stride = a.grad_stride, gt_stride = a.grad_teacher_stride;
  float* row_loss = a.row_loss;
  const int* valid_count = a.valid_count;
  const long long n_rows = a.n_rows;
  const KdParams& P = a.params;
  __shared__ KdPass1 red[KD_MAX_THREADS / 32];
  __shared__ float2 red2[KD_MAX_THREADS / 32];
  const int V = P.vocab;
  const long long valid = valid_count ? (long long)*valid_count : n_rows;
  const float w = kd_row_weight(P, valid);
  const bool with_ce = P.alpha > 0.0f;

  for (long long row = blockIdx.x; row < n_rows; row += gridDim.x) {
    const Tin* srow = s + row * s_stride;
    const Tin* trow = t + row * t_stride;
    Tout* grow = grad ? grad + row * g_stride : nullptr;
    Tout* gtrow = grad_t ? grad_t + row * gt_stride : nullptr;
    const long long y = labels ? labels[row] : -1;
    const float wrow = row_weights ? row_weights[row] : 1.0f;
    if ((labels && y == P.ignore_index) || wrow == 0.0f) {
      for (int j = threadIdx.x; j < V; j += blockDim.x) {
        if (grow) grow[j] = kd_from_f32<Tout>(0.0f);
        if (gtrow) gtrow[j] = kd_from_f32<Tout>(0.0f);
      }
      if (threadIdx.x == 0) row_loss[row] = 0.0f;
      continue;
    }
    // A label out of range (only possible when the caller skipped validation)
    // makes the row NaN instead of reading outside it.
    const bool bad_label = labels && (y < 0 || y >= V);

    KdPass1 st = kd_pass1_init();
    kd_sweep(srow, trow, V, [&](int, float sv, float tv) {
      kd_pass1_push<DIV>(st, kd_softcap(sv, P), kd_softcap(tv, P), P, with_ce);
    });
    // Read before the merge's barriers: an in-place gradient sweep may
    // overwrite srow[y] right after them.
    const float s_y =
        (threadIdx.x == 0 && with_ce && !bad_label) ? kd_softcap(kd_to_f32(srow[y]), P) : 0.0f;
    st = kd_block_merge<DIV>(st, red, P);
    KdRow r = kd_row_finish<DIV>(st, P);

    if (DIV == KD_DIV_JSD) {
      KdKahan dsum = kd_kahan_init(), qgsum = kd_kahan_init(), phsum = kd_kahan_init();
      kd_sweep(srow, trow, V, [&](int, float sv, float tv) {
        const KdJsdTerm term = kd_jsd_term(kd_softcap(sv, P), kd_softcap(tv, P), r, P);
        kd_kahan_add(dsum, term.d);
        kd_kahan_add(qgsum, term.qg);
        if (gtrow) kd_kahan_add(phsum, term.ph);
      });
      const float2 acc = kd_block_sum2(make_float2(dsum.sum, qgsum.sum), red2);
      const float ph = gtrow ? kd_block_sum2(make_float2(phsum.sum, 0.0f), red2).x : 0.0f;
      kd_jsd_finish(r, acc.x, acc.y, ph);
    }
    if (DIV == KD_DIV_TVD) {
      KdKahan adsum = kd_kahan_init(), upsum = kd_kahan_init(), dnsum = kd_kahan_init();
      // The teacher masses only scale the teacher gradient: plain sums.
      float pusum = 0.0f, pdsum = 0.0f;
      kd_sweep(srow, trow, V, [&](int, float sv, float tv) {
        const KdTvdTerm term = kd_tvd_term(kd_softcap(sv, P), kd_softcap(tv, P), r, P);
        kd_kahan_add(adsum, term.ad);
        kd_kahan_add(upsum, term.up);
        kd_kahan_add(dnsum, term.dn);
        if (gtrow) {
          pusum += term.pu;
          pdsum += term.pd;
        }
      });
      const float2 a = kd_block_sum2(make_float2(adsum.sum, upsum.sum), red2);
      const float2 b = kd_block_sum2(make_float2(dnsum.sum, 0.0f), red2);
      const float2 c = gtrow ? kd_block_sum2(make_float2(pusum, pdsum), red2)
                             : make_float2(0.0f, 0.0f);
      kd_tvd_finish(r, a.x, a.y, b.x, c.x, c.y);
    }

    if (threadIdx.x == 0) {
      row_loss[row] = bad_label ? __int_as_float(0x7fc00000) : wrow * kd_row_loss(r, s_y, P);
    }
    if (grow || gtrow) {
      // Each element is read before it is written, by the same thread, so
      // the gradients may overwrite the student and the teacher (in place).
      // A poisoned row (a NaN or +inf in a used input, kd_row_poison) has a
      // NaN weight: every gradient element of the row is NaN.
      const float wr = bad_label ? __int_as_float(0x7fc00000) : kd_row_grad_weight(r, w * wrow);
      kd_sweep(srow, trow, V, [&](int j, float sv, float tv) {
        const float sc = kd_softcap(sv, P), tc = kd_softcap(tv, P);
        if (grow)
          grow[j] = kd_from_f32<Tout>(kd_grad_elem<DIV>(sc, tc, j == y, r, P, wr) *
                                      kd_softcap_grad(sv, P));
        if (gtrow)
          gtrow[j] = kd_from_f32<Tout>(kd_grad_teacher_elem<DIV>(sc, tc, r, P, wr) *
                                       kd_softcap_grad(tv, P));
      });
    }
    __syncthreads();
  }
}

#define KD_FUSED(NAME, TIN, TOUT, DIV)                                              \
  extern "C" __global__ void __launch_bounds__(KD_MAX_THREADS, KD_MIN_BLOCKS(DIV, TIN)) \
      NAME(const KdFusedArgs a) {                                                  \
    kd_fused_body<TIN, TOUT, DIV>(a);                                              \
  }

#define KD_FUSED_DIV(DIVNAME, DIV)                                   \
  KD_FUSED(kd_fused_##DIVNAME##_f32_f32, float, float, DIV)          \
  KD_FUSED(kd_fused_##DIVNAME##_bf16_bf16, kd_bf16, kd_bf16, DIV)    \
  KD_FUSED(kd_fused_##DIVNAME##_bf16_f32, kd_bf16, float, DIV)       \
  KD_FUSED(kd_fused_##DIVNAME##_f16_f16, kd_f16, kd_f16, DIV)        \
  KD_FUSED(kd_fused_##DIVNAME##_f16_f32, kd_f16, float, DIV)

KD_FUSED_DIV(fkl, KD_DIV_FKL)
KD_FUSED_DIV(rkl, KD_DIV_RKL)
KD_FUSED_DIV(jsd, KD_DIV_JSD)
KD_FUSED_DIV(tvd, KD_DIV_TVD)
KD_FUSED_DIV(sce, KD_DIV_SCE)

// Number of rows whose label is not ignore_index; one block.
extern "C" __global__ void __launch_bounds__(1024)
    kd_count_valid(const KdCountArgs a) {
  const long long* labels = a.labels;
  const long long n_rows = a.n_rows, ignore_index = a.ignore_index;
  __shared__ int warp_counts[32];
  int c = 0;
  for (long long i = threadIdx.x; i < n_rows; i += blockDim.x) c += labels[i] != ignore_index;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) c += kd_shfl(c, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_counts[warp] = c;
  __syncthreads();
  if (threadIdx.x == 0) {
    int total = 0;
    for (int i = 0; i < (int)((blockDim.x + 31) >> 5); ++i) total += warp_counts[i];
    *a.out = total;
  }
}

// The reduced loss from the per-row losses, in a fixed order (deterministic);
// one block, f64 accumulation.
extern "C" __global__ void __launch_bounds__(1024)
    kd_reduce_loss(const KdReduceArgs a) {
  const float* row_loss = a.row_loss;
  const long long n_rows = a.n_rows;
  const int* valid_count = a.valid_count;
  const KdParams& P = a.params;
  __shared__ double warp_sums[32];
  double acc = 0.0;
  for (long long i = threadIdx.x; i < n_rows; i += blockDim.x) acc += (double)row_loss[i];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += kd_shfl(acc, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int i = 0; i < (int)((blockDim.x + 31) >> 5); ++i) total += warp_sums[i];
    const long long valid = valid_count ? (long long)*valid_count : n_rows;
    if (P.reduction == KD_RED_BATCHMEAN)
      total = valid > 0 ? total / (double)valid : 0.0;
    else if (P.reduction == KD_RED_MEAN)
      total = valid > 0 ? total / ((double)valid * (double)P.vocab) : 0.0;
    *a.out = (float)total;
  }
}
