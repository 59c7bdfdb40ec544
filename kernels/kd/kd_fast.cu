// kd_fast.cu — precision = fast: fused forward KL, reverse KL, soft CE, TVD
// and JSD (loss + ∂L/∂student, one launch; docs/DESIGN.md §3 "fast", §5).
//
// One CTA per row (grid-stride over rows), as kd_fused.cu:
//   pass 1: each thread sweeps its chunks of 8 elements (one 16-byte load per
//           side for 16-bit logits, two for f32), takes each side's chunk
//           maximum and, only when one passes its threshold (a warp vote),
//           moves its references (kd_fast_rescale); then one exp2 per side
//           per element and pairwise chunk sums (kd_fast_term, kd_fast_add);
//           the block merges the threads' statistics (kd_fast_merge).
//   pass 2: TVD and JSD only: a second sweep sums the divergence from the
//           row's log-sum-exp values (kd_fast_term2; JSD: one lg2 more).
//   grad:   re-reads the row and writes ∂L/∂s: q − p (two exp2), reverse
//           KL's q·a·((s − t)·scale2 − Δ − k) (one; Δ = lse_s − lse_t as a
//           hi + lo pair), TVD's q·factor(side), JSD's
//           q·(a·log2(q/m) − k) with log2(q/m) = −log2(β·p/q + 1 − β) and
//           p/q one exp2 of the raw logits (no p), packed into 16-byte stores
//           (cvt.rn.bf16x2 / f16x2); the label's entry (α > 0) is
//           computed in its chunk (kd_fast_grad_label, behind a warp vote).
// The body is shared with the single-read kernels (kd_single.cu: STAGED,
// the passes after the first read a shared-memory copy; kd_stage.cuh).
// Bytes per element (in = input size, out = gradient size), when the re-reads
// miss L2: 4·in + out (10 B in bf16; TVD, JSD 6·in + out); loss only 2·in
// (TVD, JSD 4·in); α > 0: + in per row (the label's student logit).
// Uniform options are template parameters (α > 0: the `fastce` kernels); the
// host takes the exact kernels (kd_fused.cu) for what these do not cover:
// soft-capping and the teacher gradient.
// Issue slots per element (sm_90 SASS, scripts/sass-report: every branch
// side of the vector loops, the vote-guarded rescale apart; bf16 in and out;
// bench/results/sass-sm_90.md): forward KL 26.6 (pass 1 16, gradient 11),
// reverse KL 30.5, soft CE 29.0, TVD 45.2 (13 + 19 + 14), JSD 47.1
// (12 + 19 + 16); α > 0 adds about 7; f32 4–6 fewer. MUFU per element: 4
// (reverse KL 3, TVD 6, JSD 8), α > 0 adds 2. Budgets: kernels/budgets.toml
// (≤ 40, TVD ≤ 55, JSD ≤ 50).
#pragma once

#include "kd/kd_args.h"
#include "kd/kd_fast_math.cuh"
#include "kd/kd_stage.cuh"

#define KD_FAST_THREADS 256

// True when some active lane of the warp asks: the warp takes the rare
// rescale together (lanes that did not ask are unchanged by it). Lane-local
// under the emulator, which gives the same results.
__device__ __forceinline__ bool kd_fast_any(bool p) {
#ifdef KD_EMU
  return p;
#else
  return __any_sync(__activemask(), p);
#endif
}

// Two values rounded to 16 bits, lo in the low half (cvt.rn.*x2: one instruction).
__device__ __forceinline__ unsigned kd_pack2(float lo, float hi, kd_bf16) {
#ifdef __CUDA_ARCH__
  unsigned d;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
  return d;
#else
  return (unsigned)kd_f32_to_bf16(lo) | ((unsigned)kd_f32_to_bf16(hi) << 16);
#endif
}
__device__ __forceinline__ unsigned kd_pack2(float lo, float hi, kd_f16) {
#ifdef __CUDA_ARCH__
  unsigned d;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
  return d;
#else
  return (unsigned)kd_f32_to_f16(lo) | ((unsigned)kd_f32_to_f16(hi) << 16);
#endif
}

// 8 gradient values to a 16-byte-aligned address.
__device__ __forceinline__ void kd_store8(float* p, const float (&g)[8]) {
  uint4 a, b;
  a.x = kd_f32_to_bits(g[0]);
  a.y = kd_f32_to_bits(g[1]);
  a.z = kd_f32_to_bits(g[2]);
  a.w = kd_f32_to_bits(g[3]);
  b.x = kd_f32_to_bits(g[4]);
  b.y = kd_f32_to_bits(g[5]);
  b.z = kd_f32_to_bits(g[6]);
  b.w = kd_f32_to_bits(g[7]);
  kd_gst16(p, a);
  kd_gst16(p + 4, b);
}
template <typename T>
__device__ __forceinline__ void kd_store8(T* p, const float (&g)[8]) {
  uint4 a;
  a.x = kd_pack2(g[0], g[1], T{});
  a.y = kd_pack2(g[2], g[3], T{});
  a.z = kd_pack2(g[4], g[5], T{});
  a.w = kd_pack2(g[6], g[7], T{});
  kd_gst16(p, a);
}

__device__ __forceinline__ float kd_max8(const float (&v)[8]) {
  return fmaxf(fmaxf(fmaxf(v[0], v[1]), fmaxf(v[2], v[3])),
               fmaxf(fmaxf(v[4], v[5]), fmaxf(v[6], v[7])));
}

template <int DIV, bool CE>
__device__ __forceinline__ KdFast kd_fast_shfl(const KdFast& a, int off) {
  KdFast o;
  o.mx = kd_shfl(a.mx, off);
  o.zx = kd_shfl(a.zx, off);
  o.my = kd_shfl(a.my, off);
  o.zy = kd_shfl(a.zy, off);
  o.acc = kd_shfl(a.acc, off);
  o.ent = DIV == KD_DIV_SCE ? kd_shfl(a.ent, off) : 0.0f;
  o.m1 = CE ? kd_shfl(a.m1, off) : KD_FAST_EMPTY;
  o.z1 = CE ? kd_shfl(a.z1, off) : 0.0f;
  o.tx = o.ty = 0.0f;
  return o;
}

// One gradient element; `label`: j is the row's label (α > 0).
template <int DIV, bool CE>
__device__ __forceinline__ float kd_fast_grad_at(float sv, float tv, bool label, const KdFastRow& r,
                                                 const KdParams& P) {
  if (CE && label) return kd_fast_grad_label<DIV, CE>(sv, tv, r, P);
  return kd_fast_grad<DIV, CE>(sv, tv, r, P);
}

// The fast loss over rows: v1 (STAGED false: one CTA per row, every pass
// from global memory) or single-read (a cluster per row, the passes after
// the first from the CTAs' shared-memory copies: kd_single.cu).
template <typename Tin, typename Tout, int DIV, bool CE, bool STAGED>
__device__ void kd_fast_body(const KdFusedArgs& a, KdScratch<KdFast> sc) {
  constexpr bool RKL = DIV == KD_DIV_RKL;
  using Row = KdRowIn<Tin, STAGED>;
  const Tin* s = static_cast<const Tin*>(a.student);
  const Tin* t = static_cast<const Tin*>(a.teacher);
  Tout* grad = static_cast<Tout*>(a.grad);
  const KdParams& P = a.params;
  const int V = P.vocab;
  const int tid = threadIdx.x, nt = blockDim.x;
  const long long valid = a.valid_count ? (long long)*a.valid_count : a.n_rows;
  const float w = kd_row_weight(P, valid);
  KdScope<STAGED> scope = KdScope<STAGED>::make();
  const long long cap = STAGED ? kd_single_cap(V, scope.size) : 0;
  const auto shfl = [](const KdFast& x, int off) { return kd_fast_shfl<DIV, CE>(x, off); };
  const auto merge = [](KdFast& x, const KdFast& y) { kd_fast_merge<DIV, CE>(x, y); };

  for (long long row = scope.first_row(); row < a.n_rows; row += scope.row_step()) {
    const Tin* srow = s + row * a.student_stride;
    const Tin* trow = t + row * a.teacher_stride;
    Tout* grow = grad ? grad + row * a.grad_stride : nullptr;
    const long long y = a.labels ? a.labels[row] : -1;
    const float wrow = a.row_weights ? a.row_weights[row] : 1.0f;

    const uintptr_t sa = reinterpret_cast<uintptr_t>(srow) & 15u;
    const bool vec = sa == (reinterpret_cast<uintptr_t>(trow) & 15u);
    int head = vec ? (int)(((16u - sa) & 15u) / sizeof(Tin)) : V;
    if (head > V) head = V;
    const KdSlice sl = kd_slice(V, head, vec, scope.rank, scope.size);

    if ((a.labels && y == P.ignore_index) || wrow == 0.0f) {
      if (grow)
        for (int j = sl.lo + tid; j < sl.hi; j += nt) kd_gst(grow + j, kd_from_f32<Tout>(0.0f));
      if (tid == 0 && scope.rank == 0) a.row_loss[row] = 0.0f;
      continue;
    }
    const bool bad_label = a.labels && (y < 0 || y >= V);
    const Row S{srow, STAGED ? kd_stage_buf<Tin>(0, cap) : nullptr, sl.off};
    const Row T{trow, STAGED ? kd_stage_buf<Tin>(1, cap) : nullptr, sl.off};
    const Row& X = RKL ? S : T;  // the main side
    const Row& Y = RKL ? T : S;

    KdFast st = kd_fast_init();
    for (int j = sl.a0 + tid; j < sl.a1; j += nt) {
      const float x = X.template ld1<true>(j), yv = Y.template ld1<true>(j);
      kd_fast_push1<DIV, CE>(st, x, yv, RKL ? x : yv, P);
    }
    for (int c = sl.c0 + tid; c < sl.c1; c += nt) {
      float xs[8], ys[8];
      X.template ld8<true>(head + c * KD_FAST_CHUNK, xs);
      Y.template ld8<true>(head + c * KD_FAST_CHUNK, ys);
      const float cx = kd_max8(xs), cy = kd_max8(ys);
      if (kd_fast_any(kd_fast_over(st, cx, cy))) kd_fast_rescale<DIV, CE>(st, cx, cy, P);
      KdFastTerm terms[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) terms[e] = kd_fast_term<DIV, CE>(st, xs[e], ys[e], RKL ? xs[e] : ys[e], P);
      kd_fast_add<DIV, CE, 8>(st, terms);
    }
    for (int j = sl.b0 + tid; j < sl.b1; j += nt) {
      const float x = X.template ld1<true>(j), yv = Y.template ld1<true>(j);
      kd_fast_push1<DIV, CE>(st, x, yv, RKL ? x : yv, P);
    }
    // The CTA that owns the label writes the row loss (it holds s_y; v1:
    // read before the merge's barriers, as an in-place gradient sweep may
    // overwrite srow[y] right after them).
    const bool owns_y = CE && !bad_label && y >= sl.lo && y < sl.hi;
    const bool writes_loss = tid == 0 && (owns_y || (scope.rank == 0 && !(CE && !bad_label && scope.size > 1)));
    const float s_y_early = (!STAGED && tid == 0 && owns_y) ? S.at((int)y) : 0.0f;
    st = scope.reduce(st, sc.red, sc.xs, kd_fast_init(), shfl, merge);
    const float s_y = STAGED ? ((tid == 0 && owns_y) ? S.at((int)y) : 0.0f) : s_y_early;
    const float nan = __int_as_float(0x7fc00000);
    KdFastRow r = kd_fast_finish<DIV, CE>(st, bad_label ? nan : w * wrow, P);
    if (DIV == KD_DIV_TVD || DIV == KD_DIV_JSD) {
      // Pass 2: the divergence's sums from the row's log-sum-exp values.
      float sa2 = 0.0f, sb2 = 0.0f, sc2 = 0.0f;
      for (int j = sl.a0 + tid; j < sl.a1; j += nt) {
        const KdFast2 e = kd_fast_term2<DIV>(S.template ld1<false>(j), T.template ld1<false>(j), r, P);
        sa2 += e.a;
        sb2 += e.b;
        sc2 += e.c;
      }
      for (int c = sl.c0 + tid; c < sl.c1; c += nt) {
        const int j0 = head + c * KD_FAST_CHUNK;
        float ss[8], ts[8];
        S.template ld8<false>(j0, ss);
        T.template ld8<false>(j0, ts);
        KdFast2 e[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) e[i] = kd_fast_term2<DIV>(ss[i], ts[i], r, P);
#pragma unroll
        for (int wd = 1; wd < 8; wd *= 2)
#pragma unroll
          for (int i = 0; i + wd < 8; i += 2 * wd) {
            e[i].a += e[i + wd].a;
            e[i].b += e[i + wd].b;
            if (DIV == KD_DIV_TVD) e[i].c += e[i + wd].c;
          }
        sa2 += e[0].a;
        sb2 += e[0].b;
        sc2 += e[0].c;
      }
      for (int j = sl.b0 + tid; j < sl.b1; j += nt) {
        const KdFast2 e = kd_fast_term2<DIV>(S.template ld1<false>(j), T.template ld1<false>(j), r, P);
        sa2 += e.a;
        sb2 += e.b;
        sc2 += e.c;
      }
      const float2 tot = scope.sum2(make_float2(sa2, sb2), sc.red2, sc.x2);
      const float tot_c = DIV == KD_DIV_TVD ? scope.sum2(make_float2(sc2, 0.0f), sc.red2, sc.x2).x : 0.0f;
      kd_fast_finish2<DIV>(r, tot.x, tot.y, tot_c, P);
    }
    if (writes_loss) a.row_loss[row] = bad_label ? nan : wrow * kd_fast_loss<CE>(r, s_y, P);

    if (grow) {
      // The label's element (α > 0) is computed where it falls; in place,
      // each element is read before it is written, by the same thread.
      const int yl = CE && !bad_label ? (int)y : -1;
      const bool gvec = vec && ((reinterpret_cast<uintptr_t>(grow + head) & 15u) == 0);
      const int sa_end = gvec ? sl.a1 : sl.hi;
      for (int j = (gvec ? sl.a0 : sl.lo) + tid; j < sa_end; j += nt)
        kd_gst(grow + j, kd_from_f32<Tout>(kd_fast_grad_at<DIV, CE>(S.template ld1<false>(j),
                                                                    T.template ld1<false>(j), j == yl, r, P)));
      if (gvec) {
        for (int c = sl.c0 + tid; c < sl.c1; c += nt) {
          const int j0 = head + c * KD_FAST_CHUNK;
          float ss[8], ts[8], g[8];
          S.template ld8<false>(j0, ss);
          T.template ld8<false>(j0, ts);
#pragma unroll
          for (int e = 0; e < 8; ++e) g[e] = kd_fast_grad<DIV, CE>(ss[e], ts[e], r, P);
          // Once per row: a warp vote keeps the label's check off the
          // per-element path (as the rescale).
          if (CE && kd_fast_any((unsigned)(yl - j0) < 8u)) {
#pragma unroll
            for (int e = 0; e < 8; ++e)
              if (j0 + e == yl) g[e] = kd_fast_grad_label<DIV, CE>(ss[e], ts[e], r, P);
          }
          kd_store8(grow + j0, g);
        }
        for (int j = sl.b0 + tid; j < sl.b1; j += nt)
          kd_gst(grow + j, kd_from_f32<Tout>(kd_fast_grad_at<DIV, CE>(S.template ld1<false>(j),
                                                                      T.template ld1<false>(j), j == yl, r, P)));
      }
    }
    __syncthreads();
  }
  scope.finish();
}

// v1's scratch: static shared memory.
__device__ __forceinline__ KdScratch<KdFast> kd_fast_scratch() {
  __shared__ KdFast red[KD_FAST_THREADS / 32];
  __shared__ float2 red2[KD_FAST_THREADS / 32];
  return KdScratch<KdFast>{red, red2, nullptr, nullptr};
}

#define KD_FAST(NAME, TIN, TOUT, DIV, CE)                                              \
  extern "C" __global__ void __launch_bounds__(KD_FAST_THREADS, 4) NAME(const KdFusedArgs a) { \
    kd_fast_body<TIN, TOUT, DIV, CE, false>(a, kd_fast_scratch());                     \
  }

#define KD_FAST_TYPES(DIVNAME, VAR, DIV, CE)                                  \
  KD_FAST(kd_fused_##DIVNAME##_##VAR##_f32_f32, float, float, DIV, CE)        \
  KD_FAST(kd_fused_##DIVNAME##_##VAR##_bf16_bf16, kd_bf16, kd_bf16, DIV, CE)  \
  KD_FAST(kd_fused_##DIVNAME##_##VAR##_bf16_f32, kd_bf16, float, DIV, CE)     \
  KD_FAST(kd_fused_##DIVNAME##_##VAR##_f16_f16, kd_f16, kd_f16, DIV, CE)      \
  KD_FAST(kd_fused_##DIVNAME##_##VAR##_f16_f32, kd_f16, float, DIV, CE)

#define KD_FAST_DIV(DIVNAME, DIV)                 \
  KD_FAST_TYPES(DIVNAME, fast, DIV, false)        \
  KD_FAST_TYPES(DIVNAME, fastce, DIV, true)

KD_FAST_DIV(fkl, KD_DIV_FKL)
KD_FAST_DIV(rkl, KD_DIV_RKL)
KD_FAST_DIV(sce, KD_DIV_SCE)
KD_FAST_DIV(tvd, KD_DIV_TVD)
KD_FAST_DIV(jsd, KD_DIV_JSD)
