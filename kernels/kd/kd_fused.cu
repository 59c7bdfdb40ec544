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
#pragma once

#include "kd/kd_args.h"
#include "kd/kd_stage.cuh"

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

// Calls f(j, s_j, t_j) over this CTA's share of the row: v1 from global
// memory (kd_sweep), single-read from the slice (the first pass keeps it).
template <bool FIRST, typename Tin, bool STAGED, typename F>
__device__ __forceinline__ void kd_fused_sweep(const KdSlice& sl, const KdRowIn<Tin, STAGED>& S,
                                               const KdRowIn<Tin, STAGED>& T, int V, F&& f) {
  if constexpr (STAGED)
    kd_slice_sweep<FIRST>(sl, S, T, f);
  else
    kd_sweep(S.g, T.g, V, f);
}

// The exact loss over rows: v1 (STAGED false: one CTA per row, every pass
// from global memory) or single-read (a cluster per row: kd_single.cu).
template <typename Tin, typename Tout, int DIV, bool STAGED>
__device__ void kd_fused_body(const KdFusedArgs& a, KdScratch<KdPass1> sc) {
  using Row = KdRowIn<Tin, STAGED>;
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
  const int V = P.vocab;
  const long long valid = valid_count ? (long long)*valid_count : n_rows;
  const float w = kd_row_weight(P, valid);
  const bool with_ce = P.alpha > 0.0f;
  KdScope<STAGED> scope = KdScope<STAGED>::make();
  const long long cap = STAGED ? kd_single_cap(V, scope.size) : 0;

  for (long long row = scope.first_row(); row < n_rows; row += scope.row_step()) {
    const Tin* srow = s + row * s_stride;
    const Tin* trow = t + row * t_stride;
    Tout* grow = grad ? grad + row * g_stride : nullptr;
    Tout* gtrow = grad_t ? grad_t + row * gt_stride : nullptr;
    const long long y = labels ? labels[row] : -1;
    const float wrow = row_weights ? row_weights[row] : 1.0f;
    const uintptr_t sa = reinterpret_cast<uintptr_t>(srow) & 15u;
    const bool vec = sa == (reinterpret_cast<uintptr_t>(trow) & 15u);
    int head = vec ? (int)(((16u - sa) & 15u) / sizeof(Tin)) : V;
    if (head > V) head = V;
    const KdSlice sl = kd_slice(V, head, vec, scope.rank, scope.size);
    if ((labels && y == P.ignore_index) || wrow == 0.0f) {
      for (int j = sl.lo + threadIdx.x; j < sl.hi; j += blockDim.x) {
        if (grow) kd_gst(grow + j, kd_from_f32<Tout>(0.0f));
        if (gtrow) kd_gst(gtrow + j, kd_from_f32<Tout>(0.0f));
      }
      if (threadIdx.x == 0 && scope.rank == 0) row_loss[row] = 0.0f;
      continue;
    }
    // A label out of range (only possible when the caller skipped validation)
    // makes the row NaN instead of reading outside it.
    const bool bad_label = labels && (y < 0 || y >= V);
    const Row S{srow, STAGED ? kd_stage_buf<Tin>(0, cap) : nullptr, sl.off};
    const Row T{trow, STAGED ? kd_stage_buf<Tin>(1, cap) : nullptr, sl.off};

    KdPass1 st = kd_pass1_init();
    kd_fused_sweep<true>(sl, S, T, V, [&](int, float sv, float tv) {
      kd_pass1_push<DIV>(st, kd_softcap(sv, P), kd_softcap(tv, P), P, with_ce);
    });
    // The CTA that owns the label writes the row loss (it holds s_y; v1:
    // read before the merge's barriers, as an in-place gradient sweep may
    // overwrite srow[y] right after them).
    const bool owns_y = with_ce && !bad_label && y >= sl.lo && y < sl.hi;
    const bool writes_loss =
        threadIdx.x == 0 && (owns_y || (scope.rank == 0 && !(with_ce && !bad_label && scope.size > 1)));
    const float s_y_early = (!STAGED && threadIdx.x == 0 && owns_y) ? kd_softcap(S.at((int)y), P) : 0.0f;
    st = scope.reduce(
        st, sc.red, sc.xs, kd_pass1_init(),
        [](const KdPass1& p, int off) { return kd_shfl_pass1<DIV>(p, off); },
        [&P](KdPass1& x, const KdPass1& z) { kd_pass1_merge<DIV>(x, z, P); });
    const float s_y =
        STAGED ? ((threadIdx.x == 0 && owns_y) ? kd_softcap(S.at((int)y), P) : 0.0f) : s_y_early;
    KdRow r = kd_row_finish<DIV>(st, P);

    if (DIV == KD_DIV_JSD) {
      KdKahan dsum = kd_kahan_init(), qgsum = kd_kahan_init(), phsum = kd_kahan_init();
      kd_fused_sweep<false>(sl, S, T, V, [&](int, float sv, float tv) {
        const KdJsdTerm term = kd_jsd_term(kd_softcap(sv, P), kd_softcap(tv, P), r, P);
        kd_kahan_add(dsum, term.d);
        kd_kahan_add(qgsum, term.qg);
        if (gtrow) kd_kahan_add(phsum, term.ph);
      });
      const float2 acc = scope.sum2(make_float2(dsum.sum, qgsum.sum), sc.red2, sc.x2);
      const float ph = gtrow ? scope.sum2(make_float2(phsum.sum, 0.0f), sc.red2, sc.x2).x : 0.0f;
      kd_jsd_finish(r, acc.x, acc.y, ph);
    }
    if (DIV == KD_DIV_TVD) {
      KdKahan adsum = kd_kahan_init(), upsum = kd_kahan_init(), dnsum = kd_kahan_init();
      // The teacher masses only scale the teacher gradient: plain sums.
      float pusum = 0.0f, pdsum = 0.0f;
      kd_fused_sweep<false>(sl, S, T, V, [&](int, float sv, float tv) {
        const KdTvdTerm term = kd_tvd_term(kd_softcap(sv, P), kd_softcap(tv, P), r, P);
        kd_kahan_add(adsum, term.ad);
        kd_kahan_add(upsum, term.up);
        kd_kahan_add(dnsum, term.dn);
        if (gtrow) {
          pusum += term.pu;
          pdsum += term.pd;
        }
      });
      const float2 a2 = scope.sum2(make_float2(adsum.sum, upsum.sum), sc.red2, sc.x2);
      const float2 b = scope.sum2(make_float2(dnsum.sum, 0.0f), sc.red2, sc.x2);
      const float2 c = gtrow ? scope.sum2(make_float2(pusum, pdsum), sc.red2, sc.x2)
                             : make_float2(0.0f, 0.0f);
      kd_tvd_finish(r, a2.x, a2.y, b.x, c.x, c.y);
    }

    if (writes_loss) {
      row_loss[row] = bad_label ? __int_as_float(0x7fc00000) : wrow * kd_row_loss(r, s_y, P);
    }
    if (grow || gtrow) {
      // Each element is read before it is written, by the same thread, so
      // the gradients may overwrite the student and the teacher (in place).
      // A poisoned row (a NaN or +inf in a used input, kd_row_poison) has a
      // NaN weight: every gradient element of the row is NaN.
      const float wr = bad_label ? __int_as_float(0x7fc00000) : kd_row_grad_weight(r, w * wrow);
      kd_fused_sweep<false>(sl, S, T, V, [&](int j, float sv, float tv) {
        const float sc2 = kd_softcap(sv, P), tc = kd_softcap(tv, P);
        if (grow)
          kd_gst(grow + j, kd_from_f32<Tout>(kd_grad_elem<DIV>(sc2, tc, j == y, r, P, wr) *
                                             kd_softcap_grad(sv, P)));
        if (gtrow)
          kd_gst(gtrow + j, kd_from_f32<Tout>(kd_grad_teacher_elem<DIV>(sc2, tc, r, P, wr) *
                                              kd_softcap_grad(tv, P)));
      });
    }
    __syncthreads();
  }
  scope.finish();
}

// v1's scratch: static shared memory.
__device__ __forceinline__ KdScratch<KdPass1> kd_fused_scratch() {
  __shared__ KdPass1 red[KD_MAX_THREADS / 32];
  __shared__ float2 red2[KD_MAX_THREADS / 32];
  return KdScratch<KdPass1>{red, red2, nullptr, nullptr};
}

#define KD_FUSED(NAME, TIN, TOUT, DIV)                                              \
  extern "C" __global__ void __launch_bounds__(KD_MAX_THREADS, KD_MIN_BLOCKS(DIV, TIN)) \
      NAME(const KdFusedArgs a) {                                                  \
    kd_fused_body<TIN, TOUT, DIV, false>(a, kd_fused_scratch());                   \
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
