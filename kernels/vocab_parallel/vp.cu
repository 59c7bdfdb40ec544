// vp.cu — vocab-parallel (tensor-parallel) distillation on the device: the
// split-phase protocol of src/vocab_parallel (docs/DESIGN.md §8), whose host
// code (row.rs, stats.rs) is the reference for every formula, NaN rule and
// record slot. Each rank holds columns [vocab_start, vocab_start + cols) of
// the student (and of a dense teacher); columns at global index ≥ V are
// padding, never read, gradient 0.
//
//   kd_vp_round1_<in>     one CTA per row (grid-stride): this shard's partial
//                         statistics, the [N, 20] f64 record of layout
//                         version 1 (stats.rs `slot`), bit-compatible with
//                         the host's, so CPU and GPU ranks can be mixed.
//                         sweep 1: the maxima (student, teacher; top-k: the
//                         in-shard values and the support's student) and
//                         the NaN/+inf flag; block max.
//                         sweep 2: Σ exp((x − max)/τ) per side, the student
//                         at τ = 1 (α > 0), and the divergence accumulators
//                         Σ e·(u − w), Σ e·(u − max u), Σ e·(w − u); block
//                         sum in f64. Top-k: the k entries that fall in the
//                         shard are gathered by a loop over the k indices
//                         (a V_local-bit map in dynamic shared memory marks
//                         them for the tail mode's off-support sum and
//                         flags a repeated index).
//   kd_vp_round2_<in>     JSD and TVD: from the merged round 1 (every rank
//                         merges the gathered records itself, in rank
//                         order, one thread per row, f64): one sweep of
//                         Σ q·g, Σ p·h (JSD) or Σ|p − q| and the class masses
//                         of q > p, q < p, q = p (TVD); block sum in f64.
//   kd_vp_finish_<in>_<out>  merges round 1 (and 2), writes the row loss
//                         (f64, weighted by the row weight) and, one sweep,
//                         this shard's student gradient and optionally the
//                         dense teacher's, in the input dtype or f32.
//   kd_vp_reduce_loss     one block: w·Σ row losses, f64, fixed order (the
//                         valid-row count from kd_count_valid, kd_fused.cu).
//
// Arithmetic: per element fp32 for the exponentials (expf of (x − max)/τ,
// expf/expm1f of an f64 log-probability rounded to fp32), f64 for the
// log-ratios (differences of two fp32 logits, exact in f64, times 1/τ),
// the accumulations, the per-row merge and the loss. q − p is formed as
// −q·expm1(log p − log q) (or p·expm1(log q − log p)), so a gradient where
// the two distributions are close keeps its digits. Rows whose label is
// ignored or whose weight is 0 carry only the record header and get a zero
// gradient and loss. A row whose inputs hold NaN or +inf (after the cap) is
// flagged in every round-1 record of the row; the merge makes the row loss
// and its whole gradient NaN on every rank. On the device path (no host
// validation) a label outside [0, V) or a top-k index outside [0, V) or
// repeated flags the row the same way instead of reading outside it.
//
// Bytes per element of the shard (in = input size, out = gradient size):
//   round 1: 2·in (student) + 2·in (dense teacher): two sweeps, the second
//            mostly from L2 (a shard row is tens of KB); top-k: + k·(index +
//            value) per row, twice.
//   round 2: in + in.        finish: in + in + out (+ out teacher gradient).
// Issue slots per element: not measured. scripts/sass-report selects only
// the fused and top-k loss kernels (kd_fused_*, kd_topk_*) and finds a hot
// loop by its vector loads; these sweeps load one element per thread and
// iteration, so the report cannot count them, and kernels/budgets.toml
// lists them as outside the instruction budget. A rough count from the
// sm_90 SASS (whole kernels, every branch, not per loop; bf16): round 1
// ≈ 2.5k instructions, 41 MUFU, ≈ 200 f64 (DADD/DFMA/DMUL/DSETP); round 2
// ≈ 4k, ≈ 600 f64 (the f64 log-ratios; JSD's expm1/log1p pairs);
// finish ≈ 4k, ≈ 700 f64, the per-row merge included. An estimate, not a
// measurement: of the order of 40–80 issue slots per element and sweep,
// several of them f64, which runs at half the fp32 rate on sm_80/sm_90/
// sm_100 and at 1/64 on sm_86/89/120, where these sweeps will be f64-bound.
// At real sizes a step's time is expected to be the collectives'.
// Registers (ptxas 13.0, sm_90): round 1 56, round 2 72, finish 88, reduce
// 20; no spills or local memory on sm_80–sm_120.
#include "common/block.cuh"
#include "vocab_parallel/vp_args.h"

#define KD_VP_THREADS 256
// At least 2 blocks of 256 per SM: up to 128 registers. With the thread
// bound alone ptxas 13.0 held the finish to 48 registers and spilled 8–16
// bytes on sm_80–sm_89 and sm_120.
#define KD_VP_MIN_BLOCKS 2

// Slots of a record (stats.rs `slot`).
#define KD_VP_S_VERSION 0
#define KD_VP_S_ROUND 1
#define KD_VP_S_COL_START 2
#define KD_VP_S_COL_COUNT 3
#define KD_VP_S_BAD 4
#define KD_VP_S_T_MAX 5
#define KD_VP_S_T_SUM 6
#define KD_VP_S_S_MAX 7
#define KD_VP_S_S_SUM 8
#define KD_VP_S_CE_MAX 9
#define KD_VP_S_CE_SUM 10
#define KD_VP_S_LABEL_LOGIT 11
#define KD_VP_S_LABEL_HERE 12
#define KD_VP_S_FWD_ACC 13
#define KD_VP_S_ENT_ACC 14
#define KD_VP_S_REV_ACC 15
#define KD_VP_S_SUP_MAX 16
#define KD_VP_S_SUP_SUM 17
#define KD_VP_S_TAIL_MASS 18
#define KD_VP_S_OFF_SUM 19
#define KD_VP_S_TAIL_ACC KD_VP_S_FWD_ACC
#define KD_VP_S_JSD_QG 5
#define KD_VP_S_JSD_PH 6
#define KD_VP_S_TVD_ABS 5
#define KD_VP_S_TVD_QA 6
#define KD_VP_S_TVD_QB 7
#define KD_VP_S_TVD_QE 8
#define KD_VP_S_TVD_PA 9
#define KD_VP_S_TVD_PB 10
#define KD_VP_S_TVD_PE 11

#define KD_VP_NEG_INF_D (-__builtin_huge_val())

// The bit map lives in dynamic shared memory; the CPU emulation calls the
// bodies with its own buffer and never runs the entry points.
#ifdef KD_EMU
#define KD_VP_BITS uint32_t* kd_vp_bits = nullptr
#else
#define KD_VP_BITS extern __shared__ uint32_t kd_vp_bits[]
#endif

// ------------------------------------------------------------- helpers --

// NaN or +inf: an input no row can use (row.rs `bad`).
__device__ __forceinline__ bool kd_vp_bad(float x) { return x != x || x == -KD_NEG_INF; }

// x · y with 0 · anything = 0 (oracle.rs `xmul`).
__device__ __forceinline__ double kd_vp_xmul(double x, double y) { return x == 0.0 ? 0.0 : x * y; }

// Soft-capping cap·tanh(x/cap) (cap > 0), −inf stays −inf.
__device__ __forceinline__ float kd_vp_cap(float x, float cap) {
  return (cap <= 0.0f || x == KD_NEG_INF) ? x : cap * tanhf(x / cap);
}

// Its derivative 4e/(1 + e)², e = exp(−2|x|/cap); 0 at −inf.
__device__ __forceinline__ float kd_vp_cap_grad(float x, float cap) {
  if (x == KD_NEG_INF) return 0.0f;
  const float e = expf(-2.0f * fabsf(x) / cap);
  return 4.0f * e / ((1.0f + e) * (1.0f + e));
}

template <typename T>
__device__ __forceinline__ float kd_vp_load(const T* row, long long j, float cap) {
  return kd_vp_cap(kd_to_f32(row[j]), cap);
}

// The top-k index i of a row, either width.
__device__ __forceinline__ long long kd_vp_index(const void* idx, long long at, int i64) {
  return i64 ? static_cast<const long long*>(idx)[at] : (long long)static_cast<const int*>(idx)[at];
}

__device__ __forceinline__ bool kd_vp_on(const uint32_t* bits, int c) {
  return (bits[c >> 5] >> (c & 31)) & 1u;
}

// q − p from the log-probabilities (and their fp32 exponentials), without
// the cancellation of q − p near q = p.
__device__ __forceinline__ double kd_vp_q_minus_p(double lp, double lq, float p, float q) {
  if (lp == KD_VP_NEG_INF_D) return (double)q;
  if (lq == KD_VP_NEG_INF_D) return -(double)p;
  const double d = lp - lq;
  if (d <= 0.0) return -(double)q * (double)expm1f((float)d);
  return (double)p * (double)expm1f((float)-d);
}

// log-add-exp (oracle.rs `logaddexp`), the log1p term in fp32.
__device__ __forceinline__ double kd_vp_logaddexp(double a, double b) {
  const double m = fmax(a, b);
  if (m == KD_VP_NEG_INF_D) return m;
  return m + (double)log1pf(expf((float)-fabs(a - b)));
}

// JSD's g = (1 − β)(log q − log m), h = β(log p − log m), m = βp + (1 − β)q.
// From d = log p − log q: log m − log q = log1p(β·expm1(d)) and
// log m − log p = log1p((1 − β)·expm1(−d)), each exact to fp32 relative to
// itself, so that where p ≈ q (g, h → 0 and the divergence is second order
// in d) nothing is lost to the log-sum-exp's absolute rounding. Beyond
// |d| = 80 (fp32's expm1 range) and at a masked entry, the log-add-exp.
__device__ __forceinline__ void kd_vp_jsd(double lp, double lq, const KdVpParams& P, double& g,
                                          double& h) {
  const double d = lp - lq;
  if (fabs(d) < 80.0) {
    const float lq_m = log1pf((float)(P.beta * (double)expm1f((float)d)));
    const float lp_m = log1pf((float)((1.0 - P.beta) * (double)expm1f((float)-d)));
    g = -(1.0 - P.beta) * (double)lq_m;
    h = -P.beta * (double)lp_m;
    return;
  }
  const double lm = kd_vp_logaddexp(P.log_beta + lp, P.log_1mbeta + lq);
  g = (1.0 - P.beta) * (lq - lm);
  h = P.beta * (lp - lm);
}

// Whether row `r` counts: its label is not ignored and its weight is not 0.
__device__ __forceinline__ bool kd_vp_counts(const long long* labels, const float* weights,
                                             long long r, long long ignore_index) {
  return !(labels && labels[r] == ignore_index) && !(weights && weights[r] == 0.0f);
}

// The label's local column when it falls in this shard, else −1; `bad` when
// it is neither ignore_index nor in [0, V).
__device__ __forceinline__ int kd_vp_label(const long long* labels, long long r,
                                           const KdVpParams& P, bool& bad) {
  bad = false;
  if (!labels) return -1;
  const long long y = labels[r];
  if (y == P.ignore_index) return -1;
  if (y < 0 || y >= P.vocab_size) {
    bad = true;
    return -1;
  }
  const long long c = y - P.vocab_start;
  return (c >= 0 && c < P.real_cols) ? (int)c : -1;
}

// ------------------------------------------------------ block reductions --

struct KdVpMax {
  float s, t, sup;
  int bad;
};

__device__ __forceinline__ KdVpMax kd_vp_block_max(KdVpMax v, KdVpMax* smem) {
  return kd_block_reduce(
      v, smem, KdVpMax{KD_NEG_INF, KD_NEG_INF, KD_NEG_INF, 0},
      [](const KdVpMax& x, int off) {
        return KdVpMax{kd_shfl(x.s, off), kd_shfl(x.t, off), kd_shfl(x.sup, off),
                       __shfl_xor_sync(0xffffffffu, x.bad, off)};
      },
      [](KdVpMax& x, const KdVpMax& y) {
        x.s = fmaxf(x.s, y.s);
        x.t = fmaxf(x.t, y.t);
        x.sup = fmaxf(x.sup, y.sup);
        x.bad |= y.bad;
      });
}

template <int K>
struct KdVpSums {
  double v[K];
};

template <int K>
__device__ __forceinline__ KdVpSums<K> kd_vp_block_sum(const KdVpSums<K>& v, KdVpSums<K>* smem) {
  KdVpSums<K> zero;
#pragma unroll
  for (int i = 0; i < K; ++i) zero.v[i] = 0.0;
  return kd_block_reduce(
      v, smem, zero,
      [](const KdVpSums<K>& x, int off) {
        KdVpSums<K> y;
#pragma unroll
        for (int i = 0; i < K; ++i) y.v[i] = __shfl_xor_sync(0xffffffffu, x.v[i], off);
        return y;
      },
      [](KdVpSums<K>& x, const KdVpSums<K>& y) {
#pragma unroll
        for (int i = 0; i < K; ++i) x.v[i] += y.v[i];
      });
}

// ------------------------------------------------------------- the merge --

// The merged statistics of one row (row.rs `Merged`), every rank the same.
struct KdVpMerged {
  double lse_t, lse_s, lse_1, lse_sup, label_logit, d, qg, ph;
  double tvd_q_up, tvd_q_dn, tvd_p_up, tvd_p_dn, p_tail, q_tail;
  int bad;
  int poison;  // finish: the row loss is NaN
  double loss;  // finish: the unweighted row loss
};

struct KdVpMaxSum {
  double max, sum;
};

__device__ __forceinline__ const double* kd_vp_rec(const double* g, int k, long long r,
                                                   long long n) {
  return g + ((long long)k * n + r) * KD_VP_WIDTH;
}

__device__ __forceinline__ double kd_vp_scale(double mk, double m) {
  return mk == KD_VP_NEG_INF_D ? 0.0 : exp(mk - m);
}

// stats.rs `MaxSum::merge`.
__device__ KdVpMaxSum kd_vp_merge(const double* g, long long r, const KdVpParams& P, int mx,
                                  int sm) {
  double m = KD_VP_NEG_INF_D;
  for (int k = 0; k < P.world; ++k) m = fmax(m, kd_vp_rec(g, k, r, P.n_rows)[mx]);
  double s = 0.0;
  for (int k = 0; k < P.world; ++k) {
    const double* rec = kd_vp_rec(g, k, r, P.n_rows);
    s = s + rec[sm] * kd_vp_scale(rec[mx], m);
  }
  return KdVpMaxSum{m, s};
}

// stats.rs `rescaled`: Σ_k scale_k·rec_k[at], scales of the (mx) maxima.
__device__ double kd_vp_rescaled(const double* g, long long r, const KdVpParams& P, int mx,
                                 double m, int at) {
  double a = 0.0;
  for (int k = 0; k < P.world; ++k) {
    const double* rec = kd_vp_rec(g, k, r, P.n_rows);
    const double f = kd_vp_scale(rec[mx], m);
    if (f != 0.0) a = a + rec[at] * f;
  }
  return a;
}

__device__ double kd_vp_total(const double* g, long long r, const KdVpParams& P, int at) {
  double a = 0.0;
  for (int k = 0; k < P.world; ++k) a = a + kd_vp_rec(g, k, r, P.n_rows)[at];
  return a;
}

__device__ __forceinline__ double kd_vp_lse(KdVpMaxSum x) {
  return x.sum > 0.0 ? x.max + log(x.sum) : (double)kd_nan();
}

// row.rs `Merged::round1` and `round2` (g2 null: no round 2).
__device__ void kd_vp_merge_row(const double* g1, const double* g2, long long r,
                                const KdVpParams& P, KdVpMerged& M) {
  const KdVpMaxSum t = kd_vp_merge(g1, r, P, KD_VP_S_T_MAX, KD_VP_S_T_SUM);
  const KdVpMaxSum s = kd_vp_merge(g1, r, P, KD_VP_S_S_MAX, KD_VP_S_S_SUM);
  const KdVpMaxSum ce = kd_vp_merge(g1, r, P, KD_VP_S_CE_MAX, KD_VP_S_CE_SUM);
  const KdVpMaxSum sup = kd_vp_merge(g1, r, P, KD_VP_S_SUP_MAX, KD_VP_S_SUP_SUM);
  M.bad = kd_vp_total(g1, r, P, KD_VP_S_BAD) > 0.0;
  M.lse_t = kd_vp_lse(t);
  M.lse_s = kd_vp_lse(s);
  M.lse_1 = kd_vp_lse(ce);
  M.lse_sup = kd_vp_lse(sup);
  M.label_logit = kd_vp_total(g1, r, P, KD_VP_S_LABEL_LOGIT);
  M.qg = M.ph = 0.0;
  M.tvd_q_up = M.tvd_q_dn = M.tvd_p_up = M.tvd_p_dn = 0.0;
  M.p_tail = M.q_tail = 0.0;
  const double fwd = kd_vp_rescaled(g1, r, P, KD_VP_S_T_MAX, t.max, KD_VP_S_FWD_ACC) / t.sum;
  if (P.topk_k > 0) {
    if (P.topk_mode == KD_TOPK_FULL) {
      M.d = fwd - M.lse_t + M.lse_s;
    } else if (P.topk_mode == KD_TOPK_SUPPORT) {
      M.d = fwd - M.lse_t + M.lse_sup;
    } else {
      const double mass = kd_vp_total(g1, r, P, KD_VP_S_TAIL_MASS);
      double p_tail = fmax(1.0 - mass, 0.0);
      if (p_tail < P.tail_floor) p_tail = 0.0;
      M.p_tail = p_tail;
      M.q_tail = kd_vp_rescaled(g1, r, P, KD_VP_S_S_MAX, s.max, KD_VP_S_OFF_SUM) / s.sum;
      const double acc = kd_vp_total(g1, r, P, KD_VP_S_TAIL_ACC) + kd_vp_xmul(mass, M.lse_s);
      M.d = acc + kd_vp_xmul(p_tail, log(p_tail) - log(M.q_tail));
    }
  } else if (P.div == KD_DIV_FKL) {
    M.d = fwd - M.lse_t + M.lse_s;
  } else if (P.div == KD_DIV_SCE) {
    double ent = 0.0;
    for (int k = 0; k < P.world; ++k) {
      const double* rec = kd_vp_rec(g1, k, r, P.n_rows);
      const double f = kd_vp_scale(rec[KD_VP_S_T_MAX], t.max);
      if (f != 0.0)
        ent += f * (rec[KD_VP_S_ENT_ACC] + (rec[KD_VP_S_T_MAX] - t.max) * rec[KD_VP_S_T_SUM]);
    }
    M.d = fwd - M.lse_t + M.lse_s + log(t.sum) - ent / t.sum;
  } else if (P.div == KD_DIV_RKL) {
    M.d = kd_vp_rescaled(g1, r, P, KD_VP_S_S_MAX, s.max, KD_VP_S_REV_ACC) / s.sum - M.lse_s +
          M.lse_t;
  } else {
    M.d = (double)kd_nan();
  }
  if (!g2) return;
  if (P.div == KD_DIV_JSD) {
    M.qg = kd_vp_total(g2, r, P, KD_VP_S_JSD_QG);
    M.ph = kd_vp_total(g2, r, P, KD_VP_S_JSD_PH);
    M.d = M.qg + M.ph;
  } else if (P.div == KD_DIV_TVD) {
    const double qa = kd_vp_total(g2, r, P, KD_VP_S_TVD_QA);
    const double qb = kd_vp_total(g2, r, P, KD_VP_S_TVD_QB);
    const double qe = kd_vp_total(g2, r, P, KD_VP_S_TVD_QE);
    const double pa = kd_vp_total(g2, r, P, KD_VP_S_TVD_PA);
    const double pb = kd_vp_total(g2, r, P, KD_VP_S_TVD_PB);
    const double pe = kd_vp_total(g2, r, P, KD_VP_S_TVD_PE);
    M.d = 0.5 * kd_vp_total(g2, r, P, KD_VP_S_TVD_ABS);
    M.tvd_q_up = qa + 0.5 * qe;
    M.tvd_q_dn = qb + 0.5 * qe;
    M.tvd_p_up = pb + 0.5 * pe;
    M.tvd_p_dn = pa + 0.5 * pe;
  }
}

// A record's header; the other slots 0.
__device__ __forceinline__ void kd_vp_header(double* rec, int round, const KdVpParams& P) {
  for (int i = 0; i < KD_VP_WIDTH; ++i) rec[i] = 0.0;
  rec[KD_VP_S_VERSION] = (double)KD_VP_VERSION;
  rec[KD_VP_S_ROUND] = (double)round;
  rec[KD_VP_S_COL_START] = (double)P.vocab_start;
  rec[KD_VP_S_COL_COUNT] = (double)P.real_cols;
}

// Clears the bit map of the shard's columns and sets those of the row's
// in-shard top-k entries; returns this thread's "index out of [0, V) or
// repeated". Ends with a barrier.
__device__ bool kd_vp_mark(const void* idx, long long row, const KdVpParams& P, uint32_t* bits) {
  const int nwords = (P.real_cols + 31) >> 5;
  for (int w = threadIdx.x; w < nwords; w += blockDim.x) bits[w] = 0u;
  __syncthreads();
  bool bad = false;
  for (int i = threadIdx.x; i < P.topk_k; i += blockDim.x) {
    const long long j = kd_vp_index(idx, row * P.topk_k + i, P.indices_i64);
    if (j < 0 || j >= P.vocab_size) {
      bad = true;
      continue;
    }
    const long long c = j - P.vocab_start;
    if (c < 0 || c >= P.real_cols) continue;
    const uint32_t bit = 1u << (c & 31);
    if (atomicOr(&bits[c >> 5], bit) & bit) bad = true;
  }
  __syncthreads();
  return bad;
}

// --------------------------------------------------------------- round 1 --

template <typename Tin>
__device__ void kd_vp_round1_body(const KdVpStatsArgs& a, uint32_t* bits) {
  const KdVpParams& P = a.params;
  __shared__ KdVpMax red_max[KD_VP_THREADS / 32];
  __shared__ KdVpSums<9> red_sum[KD_VP_THREADS / 32];
  const Tin* s_all = static_cast<const Tin*>(a.student);
  const Tin* t_all = static_cast<const Tin*>(a.teacher);
  const Tin* v_all = static_cast<const Tin*>(a.topk_values);
  const bool topk = P.topk_k > 0;
  const bool soft = P.soft_coef > 0.0;
  const bool with_ce = P.alpha > 0.0;
  // Top-k: the whole student row is used (its NaN matter) unless support
  // mode with α = 0 (row.rs `any_bad`).
  const bool whole = !topk || with_ce || P.topk_mode != KD_TOPK_SUPPORT;
  const bool tail = topk && P.topk_mode == KD_TOPK_TAIL;
  const float cap = (float)P.softcap, itau = (float)P.inv_tau;
  const int V = P.real_cols;
  for (long long row = blockIdx.x; row < P.n_rows; row += gridDim.x) {
    double* rec = a.stats + row * KD_VP_WIDTH;
    if (!kd_vp_counts(a.labels, a.row_weights, row, P.ignore_index)) {
      if (threadIdx.x == 0) kd_vp_header(rec, 1, P);
      continue;
    }
    const Tin* srow = s_all + row * P.s_stride;
    const Tin* trow = topk ? nullptr : t_all + row * P.t_stride;
    // Sweep 1: maxima and the bad flag.
    KdVpMax mx{KD_NEG_INF, KD_NEG_INF, KD_NEG_INF, 0};
    if (topk) mx.bad = kd_vp_mark(a.topk_indices, row, P, bits);
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
      const float s = kd_vp_load(srow, j, cap);
      if (kd_vp_bad(s))
        mx.bad |= whole;
      else
        mx.s = fmaxf(mx.s, s);
      if (!topk && soft) {
        const float t = kd_vp_load(trow, j, cap);
        if (kd_vp_bad(t))
          mx.bad = 1;
        else
          mx.t = fmaxf(mx.t, t);
      }
    }
    if (topk) {
      for (int i = threadIdx.x; i < P.topk_k; i += blockDim.x) {
        const long long c =
            kd_vp_index(a.topk_indices, row * P.topk_k + i, P.indices_i64) - P.vocab_start;
        if (c < 0 || c >= V) continue;
        const float v = kd_vp_load(v_all, row * P.topk_k + i, cap);
        const float s = kd_vp_load(srow, c, cap);
        if (soft && kd_vp_bad(v)) mx.bad = 1;
        if (!kd_vp_bad(v)) mx.t = fmaxf(mx.t, v);
        if (soft && kd_vp_bad(s)) mx.bad = 1;
        if (!kd_vp_bad(s)) mx.sup = fmaxf(mx.sup, s);
      }
    }
    const KdVpMax M = kd_vp_block_max(mx, red_max);
    // Sweep 2: the sums, relative to the maxima.
    // 0 ce, 1 s_sum, 2 t_sum, 3 fwd (tail: tail_acc), 4 ent, 5 rev, 6 off,
    // 7 sup_sum, 8 tail_mass.
    KdVpSums<9> acc;
#pragma unroll
    for (int i = 0; i < 9; ++i) acc.v[i] = 0.0;
    const bool s_any = M.s != KD_NEG_INF, t_any = M.t != KD_NEG_INF;
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
      const float s = kd_vp_load(srow, j, cap);
      const bool s_ok = !kd_vp_bad(s);
      float es = 0.0f;
      if (s_ok && s_any) {
        if (with_ce) acc.v[0] += (double)expf(s - M.s);
        if (soft) {
          es = expf((s - M.s) * itau);
          acc.v[1] += (double)es;
          if (tail && !kd_vp_on(bits, j)) acc.v[6] += (double)es;
        }
      }
      if (!topk && soft) {
        const float t = kd_vp_load(trow, j, cap);
        if (kd_vp_bad(t)) continue;
        float et = 0.0f;
        if (t_any) {
          et = expf((t - M.t) * itau);
          acc.v[2] += (double)et;
        }
        if (!s_ok) continue;
        const double ts = ((double)t - (double)s) * P.inv_tau;
        if (t_any) {
          acc.v[3] += kd_vp_xmul((double)et, ts);
          acc.v[4] += kd_vp_xmul((double)et, ((double)t - (double)M.t) * P.inv_tau);
        }
        if (s_any) acc.v[5] += kd_vp_xmul((double)es, -ts);
      }
    }
    if (topk && soft) {
      for (int i = threadIdx.x; i < P.topk_k; i += blockDim.x) {
        const long long c =
            kd_vp_index(a.topk_indices, row * P.topk_k + i, P.indices_i64) - P.vocab_start;
        if (c < 0 || c >= V) continue;
        const float v = kd_vp_load(v_all, row * P.topk_k + i, cap);
        const float s = kd_vp_load(srow, c, cap);
        const bool v_ok = !kd_vp_bad(v), s_ok = !kd_vp_bad(s);
        const double vs = ((double)v - (double)s) * P.inv_tau;
        if (v_ok && t_any) acc.v[2] += (double)expf((v - M.t) * itau);
        if (tail) {
          if (v_ok) acc.v[8] += (double)expf(v);
          if (v_ok && s_ok) acc.v[3] += kd_vp_xmul((double)expf(v * itau), vs);
        } else {
          if (v_ok && s_ok && t_any) acc.v[3] += kd_vp_xmul((double)expf((v - M.t) * itau), vs);
          if (s_ok && M.sup != KD_NEG_INF) acc.v[7] += (double)expf((s - M.sup) * itau);
        }
      }
    }
    const KdVpSums<9> S = kd_vp_block_sum(acc, red_sum);
    if (threadIdx.x == 0) {
      bool label_bad;
      const int y = kd_vp_label(a.labels, row, P, label_bad);
      kd_vp_header(rec, 1, P);
      rec[KD_VP_S_BAD] = (M.bad || label_bad) ? 1.0 : 0.0;
      rec[KD_VP_S_CE_MAX] = KD_VP_NEG_INF_D;
      if (with_ce) {
        rec[KD_VP_S_CE_MAX] = (double)M.s;
        rec[KD_VP_S_CE_SUM] = S.v[0];
        if (y >= 0) {
          rec[KD_VP_S_LABEL_LOGIT] = (double)kd_vp_load(srow, y, cap);
          rec[KD_VP_S_LABEL_HERE] = 1.0;
        }
      }
      rec[KD_VP_S_T_MAX] = rec[KD_VP_S_S_MAX] = rec[KD_VP_S_SUP_MAX] = KD_VP_NEG_INF_D;
      if (soft) {
        rec[KD_VP_S_S_MAX] = (double)M.s / P.tau;
        rec[KD_VP_S_S_SUM] = S.v[1];
        rec[KD_VP_S_T_MAX] = (double)M.t / P.tau;
        rec[KD_VP_S_T_SUM] = S.v[2];
        if (!topk) {
          rec[KD_VP_S_FWD_ACC] = S.v[3];
          rec[KD_VP_S_ENT_ACC] = S.v[4];
          rec[KD_VP_S_REV_ACC] = S.v[5];
        } else if (tail) {
          rec[KD_VP_S_TAIL_MASS] = S.v[8];
          rec[KD_VP_S_TAIL_ACC] = S.v[3];
          rec[KD_VP_S_OFF_SUM] = S.v[6];
        } else {
          rec[KD_VP_S_FWD_ACC] = S.v[3];
          rec[KD_VP_S_SUP_MAX] = (double)M.sup / P.tau;
          rec[KD_VP_S_SUP_SUM] = S.v[7];
        }
      }
    }
  }
}

// --------------------------------------------------------------- round 2 --

// One element's log-probabilities (row.rs `Elem`), f64 from fp32 logits.
struct KdVpElem {
  double lp, lq;
  float p, q;
};

__device__ __forceinline__ KdVpElem kd_vp_elem(float s, float t, const KdVpParams& P,
                                               const KdVpMerged& M) {
  KdVpElem e;
  e.lp = (double)t * P.inv_tau - M.lse_t;
  e.lq = (double)s * P.inv_tau - M.lse_s;
  e.p = expf((float)e.lp);
  e.q = expf((float)e.lq);
  return e;
}

template <typename Tin>
__device__ void kd_vp_round2_body(const KdVpStatsArgs& a) {
  const KdVpParams& P = a.params;
  __shared__ KdVpSums<7> red_sum[KD_VP_THREADS / 32];
  __shared__ KdVpMerged merged;
  const Tin* s_all = static_cast<const Tin*>(a.student);
  const Tin* t_all = static_cast<const Tin*>(a.teacher);
  const float cap = (float)P.softcap;
  const int V = P.real_cols;
  for (long long row = blockIdx.x; row < P.n_rows; row += gridDim.x) {
    double* rec = a.stats + row * KD_VP_WIDTH;
    // Round 2 exists for a dense teacher only (JSD, TVD); a top-k row
    // carries the header.
    if (!kd_vp_counts(a.labels, a.row_weights, row, P.ignore_index) || P.topk_k > 0) {
      if (threadIdx.x == 0) kd_vp_header(rec, 2, P);
      continue;
    }
    if (threadIdx.x == 0) kd_vp_merge_row(a.round1, nullptr, row, P, merged);
    __syncthreads();
    const KdVpMerged& M = merged;
    const Tin* srow = s_all + row * P.s_stride;
    const Tin* trow = t_all + row * P.t_stride;
    KdVpSums<7> acc;
#pragma unroll
    for (int i = 0; i < 7; ++i) acc.v[i] = 0.0;
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
      const KdVpElem e = kd_vp_elem(kd_vp_load(srow, j, cap), kd_vp_load(trow, j, cap), P, M);
      if (P.div == KD_DIV_JSD) {
        double g, h;
        kd_vp_jsd(e.lp, e.lq, P, g, h);
        acc.v[0] += kd_vp_xmul((double)e.q, g);
        acc.v[1] += kd_vp_xmul((double)e.p, h);
      } else {
        acc.v[0] += fabs(kd_vp_q_minus_p(e.lp, e.lq, e.p, e.q));
        // A: q > p, B: q < p, E: q = p (as the log-probabilities compare).
        // (Constant indices: a computed one would put acc in local memory.)
        if (e.lq > e.lp) {
          acc.v[1] += (double)e.q;
          acc.v[4] += (double)e.p;
        } else if (e.lq < e.lp) {
          acc.v[2] += (double)e.q;
          acc.v[5] += (double)e.p;
        } else {
          acc.v[3] += (double)e.q;
          acc.v[6] += (double)e.p;
        }
      }
    }
    const KdVpSums<7> S = kd_vp_block_sum(acc, red_sum);
    if (threadIdx.x == 0) {
      kd_vp_header(rec, 2, P);
#pragma unroll
      for (int i = 0; i < 7; ++i)
        rec[KD_VP_S_JSD_QG + i] = P.div == KD_DIV_JSD && i > 1 ? 0.0 : S.v[i];
    }
  }
}

// ---------------------------------------------------------------- finish --

// τ·∂D/∂s and τ·∂D/∂t of a dense teacher at one element (row.rs
// `Elem::grads`).
__device__ __forceinline__ void kd_vp_grads(const KdVpElem& e, const KdVpParams& P,
                                            const KdVpMerged& M, double& gs, double& gt) {
  const double p = (double)e.p, q = (double)e.q;
  switch (P.div) {
    case KD_DIV_FKL:
      gs = kd_vp_q_minus_p(e.lp, e.lq, e.p, e.q);
      gt = kd_vp_xmul(p, e.lp - e.lq - M.d);
      break;
    case KD_DIV_SCE:
      gs = kd_vp_q_minus_p(e.lp, e.lq, e.p, e.q);
      gt = kd_vp_xmul(p, -e.lq - M.d);
      break;
    case KD_DIV_RKL:
      gs = kd_vp_xmul(q, e.lq - e.lp - M.d);
      gt = -kd_vp_q_minus_p(e.lp, e.lq, e.p, e.q);
      break;
    case KD_DIV_JSD: {
      double g, h;
      kd_vp_jsd(e.lp, e.lq, P, g, h);
      gs = kd_vp_xmul(q, g - M.qg);
      gt = kd_vp_xmul(p, h - M.ph);
      break;
    }
    default: {
      double a, b;
      if (e.lq > e.lp) {
        a = M.tvd_q_dn;
        b = -M.tvd_p_up;
      } else if (e.lq < e.lp) {
        a = -M.tvd_q_up;
        b = M.tvd_p_dn;
      } else {
        a = 0.5 * (M.tvd_q_dn - M.tvd_q_up);
        b = 0.5 * (M.tvd_p_dn - M.tvd_p_up);
      }
      gs = kd_vp_xmul(q, a);
      gt = kd_vp_xmul(p, b);
    }
  }
}

// α·(exp(s − lse₁) − [j = y]).
__device__ __forceinline__ double kd_vp_ce_grad(float s, bool label, const KdVpParams& P,
                                                const KdVpMerged& M) {
  if (!(P.alpha > 0.0)) return 0.0;
  const float x = (float)((double)s - M.lse_1);
  return P.alpha * (label ? (double)expm1f(x) : (double)expf(x));
}

// The stored gradient: poisoned rows NaN, the cap's chain rule, the scale.
template <typename Tout>
__device__ __forceinline__ void kd_vp_store(Tout* dst, double g, float raw, float cap, bool poison,
                                            double scale) {
  if (cap > 0.0f) g = kd_vp_xmul((double)kd_vp_cap_grad(raw, cap), g);
  if (poison) g = (double)kd_nan();
  *dst = kd_from_f32<Tout>((float)(scale * g));
}

template <typename Tin, typename Tout>
__device__ void kd_vp_finish_body(const KdVpFinishArgs& a, uint32_t* bits) {
  const KdVpParams& P = a.params;
  __shared__ KdVpMerged merged;
  const Tin* s_all = static_cast<const Tin*>(a.student);
  const Tin* t_all = static_cast<const Tin*>(a.teacher);
  const Tin* v_all = static_cast<const Tin*>(a.topk_values);
  Tout* gs_all = static_cast<Tout*>(a.grad);
  Tout* gt_all = static_cast<Tout*>(a.grad_teacher);
  const bool topk = P.topk_k > 0;
  const float cap = (float)P.softcap;
  const int V = P.real_cols;
  const double c = P.soft_coef, c_tau = P.soft_coef * P.inv_tau;
  const long long valid = a.valid_count ? (long long)*a.valid_count : P.n_rows;
  double w = 1.0;
  if (P.reduction == KD_RED_BATCHMEAN)
    w = valid > 0 ? 1.0 / (double)valid : 0.0;
  else if (P.reduction == KD_RED_MEAN)
    w = valid > 0 ? 1.0 / ((double)valid * (double)P.vocab_size) : 0.0;
  for (long long row = blockIdx.x; row < P.n_rows; row += gridDim.x) {
    Tout* gsr = gs_all ? gs_all + row * P.gs_stride : nullptr;
    Tout* gtr = gt_all ? gt_all + row * P.gt_stride : nullptr;
    if (!kd_vp_counts(a.labels, a.row_weights, row, P.ignore_index)) {
      for (int j = threadIdx.x; j < P.cols; j += blockDim.x) {
        if (gsr) gsr[j] = kd_from_f32<Tout>(0.0f);
        if (gtr) gtr[j] = kd_from_f32<Tout>(0.0f);
      }
      if (threadIdx.x == 0) a.row_loss[row] = 0.0;
      continue;
    }
    const double wr = a.row_weights ? (double)a.row_weights[row] : 1.0;
    if (threadIdx.x == 0) {
      KdVpMerged& M = merged;
      kd_vp_merge_row(a.round1, a.round2, row, P, M);
      double loss = 0.0;
      if (P.alpha > 0.0) loss += P.alpha * (M.lse_1 - M.label_logit);
      if (c > 0.0) loss += c * M.d;
      M.poison = (loss != loss) || M.bad;
      if (M.poison) loss = (double)kd_nan();
      M.loss = loss;
      a.row_loss[row] = wr * loss;
    }
    if (!gsr) {
      // Loss only: thread 0's merge is the whole row; the next row's
      // merge waits for every thread to be past this one.
      __syncthreads();
      continue;
    }
    bool label_bad;
    const int y = kd_vp_label(a.labels, row, P, label_bad);
    if (topk)
      kd_vp_mark(a.topk_indices, row, P, bits);  // its barriers publish `merged` too
    else
      __syncthreads();
    const KdVpMerged& M = merged;
    const bool poison = M.poison;
    const double scale = P.grad_scale * w * wr;
    const Tin* srow = s_all + row * P.s_stride;
    const Tin* trow = topk ? nullptr : t_all + row * P.t_stride;
    for (int j = threadIdx.x; j < P.cols; j += blockDim.x) {
      if (j >= V) {
        gsr[j] = kd_from_f32<Tout>(0.0f);
        if (gtr) gtr[j] = kd_from_f32<Tout>(0.0f);
        continue;
      }
      if (topk && kd_vp_on(bits, j)) continue;  // written by the support loop
      const float sr = kd_to_f32(srow[j]);
      const float s = kd_vp_cap(sr, cap);
      double g = kd_vp_ce_grad(s, j == y, P, M);
      if (gtr && !(c > 0.0)) gtr[j] = kd_from_f32<Tout>(0.0f);  // no soft term: 0
      if (c > 0.0) {
        if (!topk) {
          const float tr = kd_to_f32(trow[j]);
          const KdVpElem e = kd_vp_elem(s, kd_vp_cap(tr, cap), P, M);
          double a_s, a_t;
          kd_vp_grads(e, P, M, a_s, a_t);
          g += c_tau * a_s;
          if (gtr) kd_vp_store(gtr + j, c_tau * a_t, tr, cap, poison, scale);
        } else if (P.topk_mode == KD_TOPK_FULL) {
          g += c_tau * (double)expf((float)((double)s * P.inv_tau - M.lse_s));
        } else if (P.topk_mode == KD_TOPK_TAIL) {
          const double ratio = M.p_tail == 0.0 ? 0.0 : M.p_tail / M.q_tail;
          const double q = (double)expf((float)((double)s - M.lse_s));
          g += c * kd_vp_xmul(q, 1.0 - ratio);
        }
      }
      kd_vp_store(gsr + j, g, sr, cap, poison, scale);
    }
    if (topk) {
      for (int i = threadIdx.x; i < P.topk_k; i += blockDim.x) {
        const long long cc =
            kd_vp_index(a.topk_indices, row * P.topk_k + i, P.indices_i64) - P.vocab_start;
        if (cc < 0 || cc >= V) continue;
        const int j = (int)cc;
        const float sr = kd_to_f32(srow[j]);
        const float s = kd_vp_cap(sr, cap);
        const float v = kd_vp_load(v_all, row * P.topk_k + i, cap);
        double g = kd_vp_ce_grad(s, j == y, P, M);
        if (c > 0.0) {
          if (P.topk_mode == KD_TOPK_TAIL) {
            const double lq = (double)s - M.lse_s, lp = (double)v;
            g += c * kd_vp_q_minus_p(lp, lq, expf((float)lp), expf((float)lq));
          } else {
            const double lp = (double)v * P.inv_tau - M.lse_t;
            const double lse = P.topk_mode == KD_TOPK_FULL ? M.lse_s : M.lse_sup;
            const double lq = (double)s * P.inv_tau - lse;
            g += c_tau * kd_vp_q_minus_p(lp, lq, expf((float)lp), expf((float)lq));
          }
        }
        kd_vp_store(gsr + j, g, sr, cap, poison, scale);
      }
    }
    __syncthreads();  // `merged` and the bit map are rewritten by the next row
  }
}

// ---------------------------------------------------------------- reduce --

// w·Σ row losses in a fixed order (deterministic), f64; one block.
__device__ void kd_vp_reduce_body(const KdVpReduceArgs& a) {
  __shared__ KdVpSums<1> red[1024 / 32];
  KdVpSums<1> acc;
  acc.v[0] = 0.0;
  for (long long i = threadIdx.x; i < a.n_rows; i += blockDim.x) acc.v[0] += a.row_loss[i];
  const KdVpSums<1> S = kd_vp_block_sum(acc, red);
  if (threadIdx.x == 0) {
    const long long valid = a.valid_count ? (long long)*a.valid_count : a.n_rows;
    double w = 1.0;
    if (a.reduction == KD_RED_BATCHMEAN)
      w = valid > 0 ? 1.0 / (double)valid : 0.0;
    else if (a.reduction == KD_RED_MEAN)
      w = valid > 0 ? 1.0 / ((double)valid * (double)a.vocab_size) : 0.0;
    *a.out = w * S.v[0];
  }
}

// --------------------------------------------------------------- kernels --

#define KD_VP_STATS(IN, TIN)                                                              \
  extern "C" __global__ void __launch_bounds__(KD_VP_THREADS, KD_VP_MIN_BLOCKS)                             \
      kd_vp_round1_##IN(const KdVpStatsArgs a) {                                          \
    KD_VP_BITS;                                                                           \
    kd_vp_round1_body<TIN>(a, kd_vp_bits);                                                \
  }                                                                                       \
  extern "C" __global__ void __launch_bounds__(KD_VP_THREADS, KD_VP_MIN_BLOCKS)                             \
      kd_vp_round2_##IN(const KdVpStatsArgs a) {                                          \
    kd_vp_round2_body<TIN>(a);                                                            \
  }

#define KD_VP_FINISH(IN, OUT, TIN, TOUT)                                                  \
  extern "C" __global__ void __launch_bounds__(KD_VP_THREADS, KD_VP_MIN_BLOCKS)                             \
      kd_vp_finish_##IN##_##OUT(const KdVpFinishArgs a) {                                 \
    KD_VP_BITS;                                                                           \
    kd_vp_finish_body<TIN, TOUT>(a, kd_vp_bits);                                          \
  }

KD_VP_STATS(f32, float)
KD_VP_STATS(bf16, kd_bf16)
KD_VP_STATS(f16, kd_f16)
KD_VP_FINISH(f32, f32, float, float)
KD_VP_FINISH(bf16, bf16, kd_bf16, kd_bf16)
KD_VP_FINISH(bf16, f32, kd_bf16, float)
KD_VP_FINISH(f16, f16, kd_f16, kd_f16)
KD_VP_FINISH(f16, f32, kd_f16, float)

extern "C" __global__ void __launch_bounds__(1024) kd_vp_reduce_loss(const KdVpReduceArgs a) {
  kd_vp_reduce_body(a);
}
