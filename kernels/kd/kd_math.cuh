// kd/kd_math.cuh — the per-element and per-row arithmetic of every kdfuse kernel
// (dtype conversions: common/dtype.cuh; block reduction and row sweep:
// common/block.cuh).
//
// Everything here is `__host__ __device__`: the CUDA kernels include it, and
// kernels/kd/kd_host.cpp compiles it for the CPU (through the `cc` crate), where
// the fast CPU backend runs it and `cargo test` checks it against the f64
// oracle. The kernels add only the parallel decomposition (threads, block
// reductions) around these functions.
//
// Domain: logits are scaled into base 2 (x2 = x · log2(e) / τ) so that every
// exponential is an exp2 and every log a log2; results are turned back into
// nats (× ln 2) only when a row is finished. All math is fp32.
//
// Online statistics: a stream of base-2 logits x_i is summarised by (m, z) with
// m = max x_i and z = Σ 2^(x_i − m) over every element but the maximum itself,
// so lse2 = m + log2(1 + z) = m + L. Keeping the maximum's 1 out of z makes
// log2 of the largest probability, −L, exact to fp32 precision even when it
// is close to 1 (a confident model), where 1 + z would have rounded it away.
// Accumulators ride along with a stat (Σ 2^(x_i − m) · d_i, rescaled whenever
// m moves), so Σ p_i d_i = acc / (1 + z) comes out of the same single pass.
#pragma once

#include "common/dtype.cuh"

// Divergence ids (template arguments of the kernels; the host maps the JSD
// endpoints β = 0 / β = 1 onto forward / reverse KL before launching).
// TVD and soft CE run forward KL's pass 1 (teacher = main side); soft CE adds
// the teacher entropy to its loss and shares its gradient; TVD adds a second
// sweep, as JSD does, for ½ Σ |p − q| and the student masses above and below
// the teacher.
#define KD_DIV_FKL 0
#define KD_DIV_RKL 1
#define KD_DIV_JSD 2
#define KD_DIV_TVD 3
#define KD_DIV_SCE 4

// Reductions.
#define KD_RED_BATCHMEAN 0
#define KD_RED_SUM 1
#define KD_RED_MEAN 2
#define KD_RED_NONE 3

// Top-k teacher modes (docs/DESIGN.md §4).
#define KD_TOPK_SUPPORT 0
#define KD_TOPK_FULL 1
#define KD_TOPK_TAIL 2

// Parameters shared by the host and the kernels; mirrored by
// `src/params.rs::KernelParams` (#[repr(C)], same field order).
struct KdParams {
  float scale2;       // log2(e) / τ
  float inv_tau;      // 1 / τ
  float alpha;        // weight of the hard-label CE
  float soft_coef;    // (1 − α) · c, c = τ² or 1
  float beta;         // JSD β (0 < β < 1 when DIV = JSD)
  float log2_beta;    // log2 β
  float log2_1mbeta;  // log2 (1 − β)
  float grad_scale;   // upstream scale of the gradient
  long long ignore_index;
  int reduction;      // KD_RED_*
  int vocab;          // V
  float softcap;      // cap of x ← cap·tanh(x/cap); 0 = off
  int topk_mode;      // KD_TOPK_* (top-k teacher kernels only)
  int topk_k;         // k (top-k teacher kernels only)
};

// ------------------------------------------------------------ softcap --

// Soft-capping x ← cap·tanh(x/cap) (P.softcap > 0; 0 = off), applied to the
// student's and the teacher's logits as they are loaded. A −inf logit is a
// masked entry and stays −inf.
KD_HD float kd_softcap(float x, const KdParams& P) {
  if (P.softcap <= 0.0f || x == KD_NEG_INF) return x;
  return P.softcap * tanhf(x / P.softcap);
}

// Its derivative 1 − tanh²(x/cap) = 4e/(1 + e)², e = exp(−2|x|/cap): no
// cancellation where tanh is close to ±1. 1 when off, 0 at a masked entry.
KD_HD float kd_softcap_grad(float x, const KdParams& P) {
  if (P.softcap <= 0.0f) return 1.0f;
  if (x == KD_NEG_INF) return 0.0f;
  const float e = expf(-2.0f * fabsf(x) / P.softcap);
  return 4.0f * e / ((1.0f + e) * (1.0f + e));
}

// ------------------------------------------------------ online statistics --

struct KdStat {
  float m;  // running max (base 2)
  float z;  // Σ 2^(x − m) over the elements other than the (first) maximum
};

KD_HD KdStat kd_stat_init() { return KdStat{KD_NEG_INF, 0.0f}; }

// −inf is a masked entry and contributes nothing; NaN poisons z (x > m is
// false for NaN, so it lands in the sum whatever m is), and +inf becomes m.
// Both are found once per row (kd_stat_poison): no per-element test.
KD_HD void kd_stat_push(KdStat& st, float x) {
  if (x == KD_NEG_INF) return;
  if (x > st.m) {
    st.z = (st.z + 1.0f) * exp2f(st.m - x);  // the old maximum joins the sum
    st.m = x;
  } else {
    st.z += exp2f(x - st.m);
  }
}

// An empty side (m = −inf) still hands on its z: 0, or NaN when a NaN was
// pushed into it (a lane that saw only NaN and −inf must not lose it).
KD_HD KdStat kd_stat_merge(KdStat a, KdStat b) {
  if (b.m == KD_NEG_INF) return KdStat{a.m, a.z + b.z};
  if (a.m == KD_NEG_INF) return KdStat{b.m, b.z + a.z};
  if (a.m >= b.m) return KdStat{a.m, a.z + (b.z + 1.0f) * exp2f(b.m - a.m)};
  return KdStat{b.m, b.z + (a.z + 1.0f) * exp2f(a.m - b.m)};
}

// L = log2(1 + z) = lse2 − m.
KD_HD float kd_stat_l(KdStat st) { return log1pf(st.z) * KD_LOG2E; }

// 0, or NaN when the stream summarised by `st` held a NaN or a +inf, or
// (with `empty_bad`) nothing but −inf (a distribution with no support). Per
// row: the NaN reached z and the +inf m as they were pushed (kd_stat_push).
KD_HD float kd_stat_poison(KdStat st, bool empty_bad) {
  const bool bad = !(st.z == st.z) || st.m == -KD_NEG_INF || (empty_bad && st.m == KD_NEG_INF);
  return bad ? kd_nan() : 0.0f;
}

// acc · scale, where an infinite acc (a p > 0 entry facing q = 0) stays
// infinite even if the scale underflowed.
KD_HD float kd_rescale(float acc, float scale) { return kd_isinf(acc) ? acc : acc * scale; }

// e · (2^r − 1) with e = 2^u, u ≤ 0: expm1 where r is small (no
// cancellation), a difference of exponentials elsewhere (no overflow of 2^r).
KD_HD float kd_wem1(float e, float u, float r) {
  return fabsf(r) < 1.0f ? e * expm1f(r * KD_LN2) : exp2f(u + r) - e;
}

// ------------------------------------------------------------ pass 1 --
//
// The divergence's "main" distribution P (the teacher for FKL and JSD, the
// student for RKL; base-2 logits x) carries two accumulators against the
// other side Q (logits y). Each element's log-ratio is taken from the raw
// logits and measured from a reference c: the student-minus-teacher
// difference s − t at P's running maximum (its heaviest element) while a
// thread sweeps, the P-weighted mean of s − t after each merge:
// r' = σ·((s − t) − c)·scale2 = y − x − ρ (σ = +1 for FKL/JSD, −1 for RKL;
// ρ = σ·c·scale2). Then, with Z = 1 + z,
//   acc1 = −Σ 2^(x−m) r'        → Σ P (x − y) = acc1/Z − ρ
//   acc2 =  Σ 2^(x−m) (2^r' − 1) → lse2(y) − lse2(x) − ρ = log2(1 + acc2/Z)
// so D(P‖Q) = acc1/Z + log2(1 + acc2/Z) in base 2, ρ cancelling analytically.
// Every term is measured from the heaviest element, so a divergence far below
// log2 V, a constant offset between teacher and student logits, or a peaked
// P cost no digits; two separately summed lse values would lose them. When
// the reference moves, the accumulators are re-expressed from the new one
// (kd_rebase), which is exact up to one rounding.
// Q's mass where x = −inf is summed apart (`hole`, a stat of those y) and
// added at the end; `gap` flags only a rebase that would have overflowed, and
// the lse difference then comes from the two (m, z) stats.
// Soft CE also needs the teacher entropy H(p) = ln2·(L − ent/Z) with
// ent = Σ 2^(x−m)·(x − m) over the main side: every term is ≤ 0 (no
// cancellation), re-expressed exactly as the maximum moves (kd_ent_rescale).

struct KdPass1 {
  KdStat main;   // main side
  KdStat other;  // other side
  KdStat s1;     // student at τ = 1 (hard CE), only when α > 0
  float acc1;
  float acc2;
  KdStat hole;   // the other side's logits where the main side is −inf
  float s_top;   // the student's largest logit (raw), for JSD's g reference
  float c_top;   // s − t (raw) there
  float t_top;   // the teacher's largest logit (raw), for JSD's h reference
  float ct_top;  // s − t (raw) there
  float c;       // reference: s − t (raw) at main's maximum
  float gap;     // 1 when acc2 is unusable (see above)
  float ent;     // soft CE: Σ 2^(x−m)(x − m) over the main side
  float cref;    // 1 once c is a finite s − t of this stream (0: still the initial 0)
};

KD_HD KdPass1 kd_pass1_init() {
  return KdPass1{kd_stat_init(), kd_stat_init(), kd_stat_init(), 0.0f, 0.0f, kd_stat_init(),
                 KD_NEG_INF, 0.0f, KD_NEG_INF, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
}

// Re-expresses acc1/acc2 of `st` from reference c_new: r' becomes r' − Δ.
KD_HD void kd_rebase(KdPass1& st, float c_new, float sigma, float scale2) {
  if (st.main.m != KD_NEG_INF) {
    const float delta = sigma * (c_new - st.c) * scale2;
    const float zt = 1.0f + st.main.z;
    st.acc1 += zt * delta;
    if (st.cref == 0.0f) {
      // Every element so far faced a −inf (r' = −inf, a term of exactly
      // −2^(x−m)): acc2 is −Z by definition, whatever its rounding order.
      st.acc2 = -zt;
    } else if (fabsf(delta) < 64.0f) {
      // acc2 + Z = Σ 2^(x−m)·2^r' ≥ 0. Where 2^−Δ ≥ 2 it is scaled directly:
      // the split form would cancel two terms of ~Z·2^−Δ.
      st.acc2 = delta <= -1.0f ? (st.acc2 + zt) * exp2f(-delta) - zt
                               : st.acc2 * exp2f(-delta) + zt * expm1f(-delta * KD_LN2);
    } else {
      st.gap = 1.0f;
    }
  }
  st.c = c_new;
}

// `ent` (Σ 2^(x−m)(x − m) of the stat `st`) re-expressed from a maximum
// m_new ≥ st.m: each term becomes 2^δ·2^(x−m)((x − m) + δ), δ = st.m − m_new,
// over the 1 + z elements (the old maximum's term was 0). 0 for an empty stat.
KD_HD float kd_ent_rescale(float ent, KdStat st, float m_new) {
  if (st.m == KD_NEG_INF) return 0.0f;
  if (st.m == m_new) return ent;
  const float delta = st.m - m_new;
  return exp2f(delta) * (ent + delta * (1.0f + st.z));
}

template <bool ENT>
KD_HD void kd_main_push(KdPass1& st, float x, float y, float sd, float sigma, float scale2) {
  if (x == KD_NEG_INF) {
    kd_stat_push(st.hole, y);
    return;
  }
  if (x > st.main.m) {
    if (ENT) st.ent = kd_ent_rescale(st.ent, st.main, x);  // x's own term is 0
    if (sd - sd == 0.0f) {  // finite s − t
      kd_rebase(st, sd, sigma, scale2);
      st.cref = 1.0f;
    }
    const float r = sigma * (sd - st.c) * scale2;
    const float scale = exp2f(st.main.m - x);
    st.main.z = (st.main.z + 1.0f) * scale;
    st.acc1 = kd_rescale(st.acc1, scale) - r;
    st.acc2 = kd_rescale(st.acc2, scale) + kd_wem1(1.0f, 0.0f, r);
    st.main.m = x;
  } else {
    // The maximum so far faced a −inf on the other side: the first finite
    // s − t becomes the reference, or every later r' would be measured from 0.
    if (st.cref == 0.0f && sd - sd == 0.0f) {
      kd_rebase(st, sd, sigma, scale2);
      st.cref = 1.0f;
    }
    const float r = sigma * (sd - st.c) * scale2;
    const float u = x - st.main.m;
    const float e = exp2f(u);
    st.main.z += e;
    if (ENT) st.ent += e * u;
    st.acc1 -= e * r;
    st.acc2 += kd_wem1(e, u, r);
  }
}

template <int DIV>
KD_HD void kd_pass1_push(KdPass1& st, float s, float t, const KdParams& P, bool with_ce) {
  const float a = t * P.scale2;
  const float b = s * P.scale2;
  if (DIV == KD_DIV_JSD && s > st.s_top) {
    st.s_top = s;
    st.c_top = s - t;
  }
  if (DIV == KD_DIV_JSD && t > st.t_top) {
    st.t_top = t;
    st.ct_top = s - t;
  }
  if (DIV == KD_DIV_RKL) {
    kd_main_push<false>(st, b, a, s - t, -1.0f, P.scale2);
    kd_stat_push(st.other, a);
  } else {
    kd_main_push<DIV == KD_DIV_SCE>(st, a, b, s - t, 1.0f, P.scale2);
    kd_stat_push(st.other, b);
  }
  if (with_ce) kd_stat_push(st.s1, s * KD_LOG2E);
}

template <int DIV>
KD_HD void kd_pass1_merge(KdPass1& a, const KdPass1& b, const KdParams& P) {
  const float sigma = DIV == KD_DIV_RKL ? -1.0f : 1.0f;
  // An empty main side (m = −inf) has z = 0, or NaN when a NaN was pushed
  // into it: handed on either way (kd_stat_merge).
  if (b.main.m != KD_NEG_INF) {
    if (a.main.m == KD_NEG_INF) {
      const float za = a.main.z;
      a.main = b.main;
      a.main.z += za;
      a.acc1 = b.acc1;
      a.acc2 = b.acc2;
      a.c = b.c;
      a.gap = fmaxf(a.gap, b.gap);
      a.ent = b.ent;
      a.cref = b.cref;
    } else {
      KdPass1 bb = b;
      // The reference comes from the heavier side, unless only the other
      // one has a finite reference at all.
      if (a.cref != bb.cref ? a.cref != 0.0f : a.main.m >= b.main.m) {
        kd_rebase(bb, a.c, sigma, P.scale2);
      } else {
        kd_rebase(a, bb.c, sigma, P.scale2);
      }
      const bool a_big = a.main.m >= bb.main.m;
      const float m = a_big ? a.main.m : bb.main.m;
      const float sa = exp2f(a.main.m - m), sb = exp2f(bb.main.m - m);
      if (DIV == KD_DIV_SCE)
        a.ent = kd_ent_rescale(a.ent, a.main, m) + kd_ent_rescale(bb.ent, bb.main, m);
      a.main.z = a_big ? a.main.z + (bb.main.z + 1.0f) * sb : (a.main.z + 1.0f) * sa + bb.main.z;
      a.acc1 = kd_rescale(a.acc1, sa) + kd_rescale(bb.acc1, sb);
      a.acc2 = kd_rescale(a.acc2, sa) + kd_rescale(bb.acc2, sb);
      a.main.m = m;
      a.gap = fmaxf(a.gap, bb.gap);
      a.cref = fmaxf(a.cref, bb.cref);
      // Recentre on the P-weighted mean of s − t: the heaviest element of a
      // flat P need not be typical of it.
      const float mean = a.c - sigma * (a.acc1 / (1.0f + a.main.z)) / P.scale2;
      if (mean - mean == 0.0f) kd_rebase(a, mean, sigma, P.scale2);
    }
  } else {
    a.gap = fmaxf(a.gap, b.gap);
    a.main.z += b.main.z;
  }
  a.other = kd_stat_merge(a.other, b.other);
  a.s1 = kd_stat_merge(a.s1, b.s1);
  a.hole = kd_stat_merge(a.hole, b.hole);
  if (b.s_top > a.s_top) {
    a.s_top = b.s_top;
    a.c_top = b.c_top;
  }
  if (b.t_top > a.t_top) {
    a.t_top = b.t_top;
    a.ct_top = b.ct_top;
  }
}

// log2(2^x + 2^y), −inf when both are.
KD_HD float kd_log2addexp2(float x, float y) {
  const float m = fmaxf(x, y);
  if (m == KD_NEG_INF) return m;
  return m + log1pf(exp2f(-fabsf(x - y))) * KD_LOG2E;
}

// log2(1 + 2^x) without overflow.
KD_HD float kd_softplus2(float x) {
  return fmaxf(x, 0.0f) + log1pf(exp2f(-fabsf(x))) * KD_LOG2E;
}

// With d = log2 q − log2 p: log2(p/m) = −log2(β + (1−β)·2^d) and
// log2(q/m) = −log2(β·2^−d + 1 − β), both free of cancellation.
// Near d = 0 as −log2(1 + (1−β)·expm1(d ln2)) and −log2(1 + β·expm1(−d ln2)):
// exactly 0 at d = 0 (log2 β and log2(1−β) rounded to fp32 would leave a
// bias there of the size of a small divergence).
KD_HD void kd_jsd_logs(float d, const KdParams& P, float& lpm, float& lqm) {
  if (fabsf(d) < 16.0f) {
    lpm = -log1pf((1.0f - P.beta) * expm1f(d * KD_LN2)) * KD_LOG2E;
    lqm = -log1pf(P.beta * expm1f(-d * KD_LN2)) * KD_LOG2E;
  } else {
    lpm = -kd_log2addexp2(P.log2_beta, P.log2_1mbeta + d);
    lqm = -kd_log2addexp2(P.log2_beta - d, P.log2_1mbeta);
  }
}

// The JSD gradient's g = (1−β) log2(q/m) (base 2) of an element with
// log-ratio d. The gradient needs g_j − ⟨q, g⟩, blind to a constant, so pass 2
// sums q·(g − g_top) with g_top the value at the student's maximum: where q
// is concentrated, ⟨q, g⟩ − g_top is then small and keeps its digits.
KD_HD float kd_jsd_g(float d, const KdParams& P) {
  float lpm, lqm;
  kd_jsd_logs(d, P, lpm, lqm);
  return (1.0f - P.beta) * lqm;
}

// The JSD teacher gradient's h = β log2(p/m) (base 2); referenced to its
// value at the teacher's maximum as g is at the student's.
KD_HD float kd_jsd_h(float d, const KdParams& P) {
  float lpm, lqm;
  kd_jsd_logs(d, P, lpm, lqm);
  return P.beta * lpm;
}

// A row's statistics once pass 1 is merged.
struct KdRow {
  float m_s, l_s;  // student: max and L (lse2 = m + L) of b = s · scale2
  float m_t, l_t;  // teacher, a = t · scale2
  float m_1, l_1;  // student at τ = 1 (hard CE)
  float c_ref;     // the reference s − t (raw) at the main side's maximum
  float ubar;      // Σ P u / Σ P (the main side's mean log-ratio from c_ref)
  float g_top;     // JSD: g at the student's maximum (the reference of g)
  float dlt;       // (lse2_s − lse2_t) − c_ref · scale2
  float kl;        // the divergence in nats (JSD, TVD: filled by pass 2)
  float qg;        // JSD: ⟨q, g − g_top⟩ in nats (pass 2)
  float q_up;      // TVD: Σ q over q > p (ties count half; pass 2)
  float q_dn;      // TVD: Σ q over q < p (ties count half; pass 2)
  float h_top;     // JSD: h = β log2(p/m) at the teacher's maximum (teacher gradient)
  float ph;        // JSD: ⟨p, h − h_top⟩ in nats (pass 2, teacher gradient)
  float p_up;      // TVD: Σ p over q > p (ties count half; pass 2, teacher gradient)
  float p_dn;      // TVD: Σ p over q < p (ties count half; pass 2, teacher gradient)
  float ent_mean;  // soft CE: Σ p (x − m_t) in base 2 (teacher gradient)
  float tail;      // top-k tail mode: 1 − P_tail / Q_tail (1 when P_tail = 0)
  float poison;    // 0, or NaN for a row with a NaN or +inf input (kd_row_poison)
};

// The row's poison: NaN when a used input held a NaN or a +inf, or a used
// distribution is all −inf (the oracle's log-softmax is NaN there), else 0.
// Used: the student and the teacher when the soft term is on (soft_coef >
// 0; every column, masked or not, as each side's normaliser sums them all),
// the student at τ = 1 when α > 0 (`s1`: the whole row). Added to the row's
// loss and to its gradient weight, it turns the whole row NaN at no
// per-element cost.
KD_HD float kd_row_poison(KdStat ss, KdStat ts, KdStat s1, const KdParams& P) {
  float poison = 0.0f;
  if (P.soft_coef > 0.0f) poison += kd_stat_poison(ss, true) + kd_stat_poison(ts, true);
  if (P.alpha > 0.0f) poison += kd_stat_poison(s1, true);
  return poison;
}

template <int DIV>
KD_HD KdRow kd_row_finish(const KdPass1& st, const KdParams& P) {
  const float c_ref = st.c;
  KdRow r;
  const KdStat& ss = DIV == KD_DIV_RKL ? st.main : st.other;
  const KdStat& ts = DIV == KD_DIV_RKL ? st.other : st.main;
  r.m_s = ss.m;
  r.l_s = kd_stat_l(ss);
  r.m_t = ts.m;
  r.l_t = kd_stat_l(ts);
  r.m_1 = st.s1.m;
  r.l_1 = kd_stat_l(st.s1);
  r.c_ref = c_ref;
  // The lse difference from acc2 where the two distributions are close (the
  // log1p form keeps every digit there); from the stats where they are far
  // apart (1 + acc2/Z near 0 would have lost its digits) or acc2 is
  // incomplete.
  const float zm = 1.0f + st.main.z;
  const float sigma = DIV == KD_DIV_RKL ? -1.0f : 1.0f;
  // Σ 2^y over the hole, relative to 2^(lse2(x) + ρ).
  const float hole = exp2f((st.hole.m + kd_stat_l(st.hole)) -
                           (st.main.m + kd_stat_l(st.main)) - sigma * c_ref * P.scale2);
  const float ratio = st.acc2 / zm + hole;
  float dmp;  // lse2(y) − lse2(x) − ρ
  if (st.gap == 0.0f && fabsf(ratio) <= 0.5f) {
    dmp = log1pf(ratio) * KD_LOG2E;
    r.dlt = DIV == KD_DIV_RKL ? -dmp : dmp;
  } else {
    // The lse difference as the log of a ratio of sums: a difference of
    // the two L values (up to log2 V each) would cost it their roundings.
    r.dlt = (log2f((1.0f + ss.z) / (1.0f + ts.z)) + (r.m_s - r.m_t)) - c_ref * P.scale2;
    dmp = DIV == KD_DIV_RKL ? -r.dlt : r.dlt;
  }
  r.ubar = st.acc1 / zm;
  const float d_main_other = kd_isinf(st.acc1) ? st.acc1 : r.ubar + dmp;
  r.kl = (DIV == KD_DIV_JSD || DIV == KD_DIV_TVD) ? 0.0f : KD_LN2 * d_main_other;
  if (DIV == KD_DIV_SCE) {
    // −Σ p log q = KL(p‖q) + H(p); both ≥ 0, so the sum keeps their digits.
    const float h2 = r.l_t - st.ent / zm;
    r.kl = kd_isinf(d_main_other) ? r.kl : KD_LN2 * (d_main_other + h2);
  }
  r.qg = 0.0f;
  r.q_up = 0.0f;
  r.q_dn = 0.0f;
  r.g_top = 0.0f;
  r.h_top = 0.0f;
  r.ph = 0.0f;
  r.p_up = 0.0f;
  r.p_dn = 0.0f;
  r.ent_mean = DIV == KD_DIV_SCE ? st.ent / zm : 0.0f;
  r.tail = 0.0f;
  r.poison = kd_row_poison(ss, ts, st.s1, P);
  if (DIV == KD_DIV_JSD && st.s_top != KD_NEG_INF)
    r.g_top = kd_jsd_g((st.c_top - c_ref) * P.scale2 - r.dlt, P);
  if (DIV == KD_DIV_JSD && st.t_top != KD_NEG_INF)
    r.h_top = kd_jsd_h((st.ct_top - c_ref) * P.scale2 - r.dlt, P);
  return r;
}

// Per-element probabilities (base-2 log first, measured from the maximum).
KD_HD float kd_q(float s, const KdRow& r, const KdParams& P) {
  return exp2f((s * P.scale2 - r.m_s) - r.l_s);
}
KD_HD float kd_p(float t, const KdRow& r, const KdParams& P) {
  return exp2f((t * P.scale2 - r.m_t) - r.l_t);
}

// d = log2 q − log2 p for one element: u − dlt, both measured from the
// row's reference, so q ≈ p keeps its digits (log q and log p of magnitude
// ~log2 V would not). ±inf where one side is −inf.
KD_HD float kd_log2_ratio(float s, float t, const KdRow& r, const KdParams& P) {
  return ((s - t) - r.c_ref) * P.scale2 - r.dlt;
}

// ------------------------------------------------------ pass 2 (JSD) --

// One element's share of the JSD and of ⟨q, h⟩ (both in base 2; the row
// total is multiplied by ln 2 once).
struct KdJsdTerm {
  float d;   // β p (log2 p − log2 m) + (1−β) q (log2 q − log2 m)
  float qg;  // q · (g − g_top) (kd_jsd_g)
  float ph;  // p · (h − h_top) (kd_jsd_h)
};

KD_HD KdJsdTerm kd_jsd_term(float s, float t, const KdRow& r, const KdParams& P) {
  const float p = kd_p(t, r, P);
  const float q = kd_q(s, r, P);
  KdJsdTerm out{0.0f, 0.0f, 0.0f};
  if (p == 0.0f && q == 0.0f) return out;
  float lpm, lqm;
  const float d = kd_log2_ratio(s, t, r, P);
  kd_jsd_logs(d, P, lpm, lqm);
  if (p > 0.0f && q > 0.0f && fabsf(d) < 16.0f) {
    // p·(β lpm + (1−β)·2^d·lqm): q taken as p·2^d, so that the two halves,
    // first order in d and opposite, cancel exactly as they should (q and p
    // normalised separately differ by a rounding of their lse values).
    out.d = p * (P.beta * lpm + (1.0f - P.beta) * exp2f(d) * lqm);
  } else {
    if (p > 0.0f) out.d += P.beta * p * lpm;
    if (q > 0.0f) out.d += (1.0f - P.beta) * q * lqm;
  }
  if (q > 0.0f) out.qg = q * ((1.0f - P.beta) * lqm - r.g_top);
  if (p > 0.0f) out.ph = p * (P.beta * lpm - r.h_top);
  return out;
}

// Compensated (Kahan) sum: pass 2's sums feed g − ⟨q, g⟩, where the rounding
// of a plain running sum over thousands of terms would show.
struct KdKahan {
  float sum;
  float c;
};

KD_HD KdKahan kd_kahan_init() { return KdKahan{0.0f, 0.0f}; }

KD_HD void kd_kahan_add(KdKahan& k, float x) {
  const float y = x - k.c;
  const float t = k.sum + y;
  k.c = (t - k.sum) - y;
  k.sum = t;
}

// Turns the pass-2 sums (base 2) into the row's JSD and ⟨q, h⟩ in nats.
KD_HD void kd_jsd_finish(KdRow& r, float d_sum, float qg_sum, float ph_sum) {
  r.kl = KD_LN2 * d_sum;
  r.qg = KD_LN2 * qg_sum;
  r.ph = KD_LN2 * ph_sum;
}

// ------------------------------------------------------ pass 2 (TVD) --
//
// TVD's g = ½ sign(q − p) makes g − ⟨q, g⟩ = Q₋ where q > p and −Q₊ where
// q < p (Q₊, Q₋ the student masses above and below the teacher, ties counted
// half to each side, Q₊ + Q₋ = 1), and ½(Q₋ − Q₊) at a tie: no cancellation
// of ½ − ⟨q, g⟩ when one side's mass is small. The side of an element is the
// sign of d = log2 q − log2 p measured from the row's reference, so that
// identical rows are all ties (zero TVD, zero gradient).

struct KdTvdTerm {
  float ad;  // |p − q|
  float up;  // q where q > p (half of it at a tie)
  float dn;  // q where q < p (half of it at a tie)
  float pu;  // p where q > p (half of it at a tie)
  float pd;  // p where q < p (half of it at a tie)
};

KD_HD KdTvdTerm kd_tvd_term(float s, float t, const KdRow& r, const KdParams& P) {
  const float p = kd_p(t, r, P);
  const float q = kd_q(s, r, P);
  KdTvdTerm out{0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  if (p == 0.0f && q == 0.0f) return out;
  const float d = kd_log2_ratio(s, t, r, P);
  // |p − q| = p·|2^d − 1| by expm1 where q ≈ p (the separately normalised p
  // and q would leave a rounding of their lse values); plain elsewhere.
  out.ad = (p > 0.0f && q > 0.0f && fabsf(d) < 1.0f) ? p * fabsf(expm1f(d * KD_LN2)) : fabsf(q - p);
  if (d > 0.0f) {
    out.up = q;
    out.pu = p;
  } else if (d < 0.0f) {
    out.dn = q;
    out.pd = p;
  } else {
    out.up = 0.5f * q;
    out.dn = 0.5f * q;
    out.pu = 0.5f * p;
    out.pd = 0.5f * p;
  }
  return out;
}

// The pass-2 sums into the row's TVD (½ Σ |p − q|) and Q₊, Q₋.
KD_HD void kd_tvd_finish(KdRow& r, float ad_sum, float up_sum, float dn_sum, float pu_sum,
                         float pd_sum) {
  r.kl = 0.5f * ad_sum;
  r.q_up = up_sum;
  r.q_dn = dn_sum;
  r.p_up = pu_sum;
  r.p_dn = pd_sum;
}

// ------------------------------------------------------------- the row --

// The row's loss ℓ = α·CE + (1−α)·c·D. `s_y` is the student logit at the
// label (ignored when α = 0); CE = ln2·(L_1 + (m_1 − s_y·log2 e)) is exact
// when the label is the student's maximum. A zero weight skips its term, so
// an infinite divergence does not turn α = 1 into NaN.
KD_HD float kd_row_loss(const KdRow& r, float s_y, const KdParams& P) {
  float loss = r.poison;
  if (P.alpha > 0.0f) loss += P.alpha * KD_LN2 * (r.l_1 + (r.m_1 - s_y * KD_LOG2E));
  if (P.soft_coef > 0.0f) loss += P.soft_coef * r.kl;
  return loss;
}

// The gradient weight of a row: w·row weight, NaN for a poisoned row (every
// gradient element is w times something, so the whole row turns NaN).
KD_HD float kd_row_grad_weight(const KdRow& r, float w) { return w + r.poison; }

// The reduction's weight of one valid row, times the upstream scale.
KD_HD float kd_row_weight(const KdParams& P, long long valid_rows) {
  if (P.reduction == KD_RED_BATCHMEAN)
    return valid_rows > 0 ? P.grad_scale / (float)valid_rows : 0.0f;
  if (P.reduction == KD_RED_MEAN)
    return valid_rows > 0 ? P.grad_scale / ((float)valid_rows * (float)P.vocab) : 0.0f;
  return P.grad_scale;
}

// ∂L/∂s_j for one element: w · [α (q¹_j − [j = y]) + (1−α) c ∂D/∂s_j].
template <int DIV>
KD_HD float kd_grad_elem(float s, float t, bool is_label, const KdRow& r, const KdParams& P,
                         float w) {
  float g = 0.0f;
  if (P.alpha > 0.0f) {
    const float lq1 = (s * KD_LOG2E - r.m_1) - r.l_1;  // log2 q¹
    // q¹ − 1 = expm1(ln q¹): exact for a confident, correct prediction.
    g += P.alpha * (is_label ? expm1f(lq1 * KD_LN2) : exp2f(lq1));
  }
  if (P.soft_coef > 0.0f) {
    const float q = kd_q(s, r, P);
    float dd;
    if (DIV == KD_DIV_FKL || DIV == KD_DIV_SCE) {
      const float d = kd_log2_ratio(s, t, r, P);
      // q − p = −q·expm1(−d ln2): exact where q ≈ p; plain difference elsewhere.
      dd = (q > 0.0f && fabsf(d) < 1.0f) ? -q * expm1f(-d * KD_LN2) : q - kd_p(t, r, P);
    } else if (q == 0.0f) {
      dd = 0.0f;
    } else if (DIV == KD_DIV_RKL) {
      // log q − log p − KL = ln2·(u − ū), both measured from the reference.
      dd = q * KD_LN2 * (((s - t) - r.c_ref) * P.scale2 - r.ubar);
    } else if (DIV == KD_DIV_TVD) {
      // q·(g − ⟨q, g⟩), see kd_tvd_term.
      const float d = kd_log2_ratio(s, t, r, P);
      dd = d > 0.0f ? q * r.q_dn : (d < 0.0f ? -q * r.q_up : 0.5f * q * (r.q_dn - r.q_up));
    } else {
      dd = q * (KD_LN2 * (kd_jsd_g(kd_log2_ratio(s, t, r, P), P) - r.g_top) - r.qg);
    }
    g += P.soft_coef * P.inv_tau * dd;
  }
  return w * g;
}

// ∂L/∂t_j for one element (mutual learning, docs/DESIGN.md §2): w · (1−α) c ∂D/∂t_j
// (the hard CE does not depend on the teacher). With h = ∂D/∂p,
// ∂D/∂t_j = p_j (h_j − ⟨p, h⟩)/τ; each divergence's h − ⟨p, h⟩ is formed
// from the row's reference as the student side's is. A masked teacher entry
// (t = −inf) has no gradient, nor has any entry without the soft term: dd
// = 0 through the same final product, so that a poisoned row's NaN weight
// reaches it too (a select in place of the early exit: no per-element cost,
// and no extra register for a hoisted 0·w).
template <int DIV>
KD_HD float kd_grad_teacher_elem(float s, float t, const KdRow& r, const KdParams& P, float w) {
  const float p = kd_p(t, r, P);
  const float d = kd_log2_ratio(s, t, r, P);
  float dd;
  if (DIV == KD_DIV_RKL) {
    // p − q = −p·expm1(d ln2) where q ≈ p.
    dd = (p > 0.0f && fabsf(d) < 1.0f) ? -p * expm1f(d * KD_LN2) : p - kd_q(s, r, P);
  } else if (p == 0.0f) {
    dd = 0.0f;
  } else if (DIV == KD_DIV_FKL || DIV == KD_DIV_SCE) {
    // log p − log q − KL = ln2·(−u − ū), u = ((s − t) − c)·scale2 (ū:
    // kd_row_finish). Soft CE adds ∂H(p)/∂t's −(log p − Σ p log p) =
    // −ln2·((x − m_t) − ent_mean): both parts measured from references (the
    // row's s − t, the teacher's maximum), so that a peaked teacher's
    // h − ⟨p, h⟩ keeps its digits.
    float h = -((s - t) - r.c_ref) * P.scale2 - r.ubar;
    if (DIV == KD_DIV_SCE) h -= (t * P.scale2 - r.m_t) - r.ent_mean;
    dd = p * KD_LN2 * h;
  } else if (DIV == KD_DIV_TVD) {
    // h = ½ sign(p − q): h − ⟨p, h⟩ = P₊ where p > q, −P₋ where p < q.
    dd = d < 0.0f ? p * r.p_up : (d > 0.0f ? -p * r.p_dn : 0.5f * p * (r.p_up - r.p_dn));
  } else {
    dd = p * (KD_LN2 * (kd_jsd_h(d, P) - r.h_top) - r.ph);
  }
  if (P.soft_coef <= 0.0f || t == KD_NEG_INF) dd = 0.0f;
  return w * P.soft_coef * P.inv_tau * dd;
}

// ------------------------------------------------------ top-k teacher --
//
// A top-k teacher row (indices I, values v) is the dense teacher row with
// v on I and −inf elsewhere, so `full` runs forward KL's pass 1 with the
// student's off-support elements pushed against a −inf teacher and the
// support's (s_i, v_i) pairs pushed as gathered; `support` pushes the pairs
// only (the student's statistics then cover I: q̃), plus the off-support
// student into the hard CE's statistics. `tail` (τ = 1, log-prob values)
// runs `full`'s pass 1 and rescales its KL (kd_tail_finish); the student's
// off-support mass Q_tail comes from pass 1's `hole` statistics.

// Σ 2^x of stat `a` relative to Σ 2^x of stat `b` (b not empty), as a ratio
// of the (1 + z) sums: no difference of lse values of magnitude ~log V.
KD_HD float kd_stat_ratio(KdStat a, KdStat b) {
  if (a.m == KD_NEG_INF) return 0.0f;
  return (1.0f + a.z) / (1.0f + b.z) * exp2f(a.m - b.m);
}

// The row's tail-mode KL from the merged pass-1 state `st` (τ = 1, values
// log-probs) and S = Σ_I P_i = Σ e^{v_i}, summed from the raw values (the
// teacher statistics hold v·log2 e, rounded to ~1e-7 of |v| ~ ln V: too
// coarse for ln S); p̃ = P/S is the support's normalised teacher.
// With pass 1 run as `full` mode, r.kl = KL(p̃‖q) over the support, kept to
// its own digits by the reference machinery, and
//   D = S·(KL(p̃‖q) + ln S) + P_tail (ln P_tail − ln Q_tail),
// P_tail = 1 − S (0 below 1e-6, the rounding of a full support). Summing
// P_i (v_i − ln q_i) directly would lose the digits of log-probs of
// magnitude ~ln V. Q_tail = Σ_{j∉I} q_j comes from the off-support student
// statistics (`hole`), or as 1 − Q_I from the support's while Q_I ≤ ½; at
// τ = 1 the hard CE's student statistics are the main ones, so pass 1 keeps
// the support's student statistics in `s1` instead (restored here). Keeps
// 1 − P_tail / Q_tail for the gradient.
KD_HD void kd_tail_finish(KdRow& r, const KdPass1& st, float S, const KdParams& P) {
  r.m_1 = r.m_s;
  r.l_1 = r.l_s;
  // The poison of kd_row_poison with tail's sides: the whole student row
  // (`other`: the soft term's and the hard CE's), and the values when the
  // soft term is on; all values −inf is a legal empty support (P_tail = 1).
  r.poison = kd_stat_poison(st.other, true) +
             (P.soft_coef > 0.0f ? kd_stat_poison(st.main, false) : 0.0f);
  float p_tail = 1.0f - S;
  if (p_tail < 1e-6f) p_tail = 0.0f;
  r.kl = S > 0.0f ? S * (r.kl + logf(S)) : 0.0f;
  r.tail = 1.0f;
  if (p_tail > 0.0f) {
    const float q_on = kd_stat_ratio(st.s1, st.other);
    if (q_on <= 0.5f) {
      // Q_tail = 1 − Q_I: ln(P_tail/Q_tail) = −log1p((S − Q_I)/P_tail) and
      // 1 − P_tail/Q_tail = (S − Q_I)/Q_tail, exact where P_tail ≈ Q_tail.
      const float d = S - q_on;
      r.kl -= p_tail * log1pf(d / p_tail);
      r.tail = d / (1.0f - q_on);
    } else {
      // −inf when the support holds all the student's mass.
      const float lq = logf(kd_stat_ratio(st.hole, st.other));
      r.kl += p_tail * (logf(p_tail) - lq);
      r.tail = 1.0f - p_tail / expf(lq);
    }
  }
}

// Tail-mode ∂D/∂s_j (τ = 1): q_j − P_j on the support, q_j (1 − P_tail/Q_tail)
// off it; plus the hard CE's part (kd_grad_elem with the soft term off).
KD_HD float kd_tail_grad(float s, float v, bool on_support, bool is_label, const KdRow& r,
                         const KdParams& P, float w) {
  KdParams ce = P;
  ce.soft_coef = 0.0f;
  float g = kd_grad_elem<KD_DIV_FKL>(s, 0.0f, is_label, r, ce, w);
  if (P.soft_coef > 0.0f) {
    const float q = kd_q(s, r, P);
    const float dd = on_support ? q - expf(v) : (q == 0.0f ? 0.0f : q * r.tail);
    g += w * P.soft_coef * dd;
  }
  return g;
}

// ------------------------------------------------------- block helpers --
// Device code only (and the CPU emulation of it): the kd states' shuffles
// and merges for common/block.cuh's kd_block_reduce.
#if defined(__CUDACC__) || defined(KD_EMU)

#include "common/block.cuh"

__device__ __forceinline__ KdStat kd_shfl_stat(KdStat s, int off) {
  return KdStat{kd_shfl(s.m, off), kd_shfl(s.z, off)};
}

// Merges every thread's online (max, Σ2^x); smem holds one KdStat per warp.
__device__ __forceinline__ KdStat kd_block_stat(KdStat st, KdStat* smem) {
  return kd_block_reduce(st, smem, kd_stat_init(), [](KdStat a, int off) { return kd_shfl_stat(a, off); },
                         [](KdStat& a, KdStat b) { a = kd_stat_merge(a, b); });
}

template <int DIV>
__device__ __forceinline__ KdPass1 kd_shfl_pass1(const KdPass1& p, int off) {
  KdPass1 o;
  o.main = kd_shfl_stat(p.main, off);
  o.other = kd_shfl_stat(p.other, off);
  o.s1 = kd_shfl_stat(p.s1, off);
  o.acc1 = kd_shfl(p.acc1, off);
  o.acc2 = kd_shfl(p.acc2, off);
  o.hole = kd_shfl_stat(p.hole, off);
  o.s_top = kd_shfl(p.s_top, off);
  o.c_top = kd_shfl(p.c_top, off);
  o.t_top = DIV == KD_DIV_JSD ? kd_shfl(p.t_top, off) : KD_NEG_INF;
  o.ct_top = DIV == KD_DIV_JSD ? kd_shfl(p.ct_top, off) : 0.0f;
  o.c = kd_shfl(p.c, off);
  o.gap = kd_shfl(p.gap, off);
  o.ent = DIV == KD_DIV_SCE ? kd_shfl(p.ent, off) : 0.0f;
  o.cref = kd_shfl(p.cref, off);
  return o;
}

// Merges every thread's pass-1 state; every thread gets the row's total.
template <int DIV>
__device__ KdPass1 kd_block_merge(KdPass1 st, KdPass1* smem, const KdParams& P) {
  return kd_block_reduce(st, smem, kd_pass1_init(),
                         [](const KdPass1& p, int off) { return kd_shfl_pass1<DIV>(p, off); },
                         [&P](KdPass1& a, const KdPass1& b) { kd_pass1_merge<DIV>(a, b, P); });
}

#endif  // __CUDACC__ || KD_EMU
