// kd_fast_math.cuh — precision = fast: the arithmetic of the fast dense
// kernels (forward KL, reverse KL, soft CE; docs/DESIGN.md §3 "fast").
//
// `__host__ __device__` as kd_math.cuh: kernels/kd/kd_fast.cu runs it on the GPU
// and under the emulator, kernels/kd/kd_host.cpp on the CPU.
//
// Per element the fast kernels do the least that a fused loss needs: one
// exp2 per side in the statistics sweep, one per side in the gradient sweep
// (reverse KL: one), no division, no log, no compensated sums. Every careful
// step is per row (the merge and kd_fast_finish).
//
// Statistics: a side's base-2 logits x = logit·scale2 are summarised by a
// reference m and z = Σ 2^(x − m), where m is not the running maximum but a
// value that only moves when a chunk of 8 logits holds one above m + T
// (T = 8, kd_fast_over): z then holds terms up to 2^T (no overflow: 2^8·V
// stays far below fp32's range), and the rescale is a branch the warp takes
// together (a vote) a few times per row instead of per element.
// The divergence's main side P (the teacher for forward KL and soft CE, the
// student for reverse KL; logits x, the other side y) carries
//   acc = Σ 2^(x − mx) · ((x − mx) − (y − my))
// so that D(P‖Q) = acc/Zx + log2(Zy/Zx) in base 2 (in double, per row): no
// difference of two log-sum-exp values of magnitude ~max|logit|. The
// difference inside acc is clamped below at −2^64: a masked main entry
// (x = −inf, weight 0) then adds 0, not 0·(−inf). A masked other entry facing
// a finite main one makes acc +inf, or NaN where the main weight underflowed
// (0·inf); kd_fast_finish turns that NaN into the +inf it stands for when no
// input NaN poisoned the row.
// Soft CE's teacher entropy: ent = Σ 2^(x − mx)·max(x − mx, −2^64),
// H(p) = log2 Zx − ent/Zx (each term ≤ T·weight: no cancellation).
// TVD and JSD keep only the two sides' statistics in pass 1 (no acc) and
// sum their divergence in a second sweep from the row's log-sum-exp values
// (kd_fast_term2): TVD Σ|q − p|, Q₊ = Σ_{q>p} q and Q₋ (ties half), JSD
// Σ p·log2(p/m) and Σ q·log2(q/m), m = βp + (1−β)q (floored at 2^−126),
// one lg2 per element, the differences clamped below as acc's.
#pragma once

#include "kd/kd_math.cuh"

// The fast functions are always inlined: on the host, into the SIMD clones
// of kernels/kd/kd_host_fast.cpp (which a plain `inline` callee, compiled for
// the baseline target, would not be).
#ifdef __CUDACC__
#define KD_FHD __host__ __device__ __forceinline__
#else
#define KD_FHD inline __attribute__((always_inline))
#endif

// The reference of a stream that has seen no finite element: finite, so that
// a masked logit's x − m is −inf (weight 0), never −inf − (−inf).
#define KD_FAST_EMPTY (-1.0e30f)
// Headroom of the reference (base 2) before a chunk moves it.
#define KD_FAST_T 8.0f
// The clamp of acc's and ent's per-element differences.
#define KD_FAST_BIG 1.8446744073709552e19f
// Elements per chunk (one 16-byte load of 16-bit logits per side).
#define KD_FAST_CHUNK 8

// Whether a divergence carries pass 1's acc (the others sum in pass 2).
#define KD_FAST_ACC(DIV) ((DIV) == KD_DIV_FKL || (DIV) == KD_DIV_RKL || (DIV) == KD_DIV_SCE)

// 2^x for x ≤ 0 on the FMA and ALU pipes (no MUFU): round-to-nearest by the
// 1.5·2^23 shifter, a degree-7 Taylor polynomial on [−½, ½] (truncation
// ≤ 5e-9: the result is within about an ulp), the integer part added to the
// exponent; 0 below 2^−126 (flush to zero, as ex2.approx.ftz), NaN stays NaN;
// for x ≤ 127 (the fast statistics' arguments are ≤ T = 8, JSD's gradient
// ratio's ≤ 126). On the host it is every exp2 (kd_ex2): no libm call, so
// the CPU loops vectorize.
KD_FHD float kd_ex2_fma(float x) {
  const float xc = x < -127.0f ? -127.0f : x;  // NaN stays NaN (fmaxf would drop it)
  const float sh = xc + 12582912.0f;   // 1.5·2^23: the integer in the low bits
  const float n = sh - 12582912.0f;    // round(xc)
  const float f = xc - n;              // [−½, ½]
  float y = 1.5252733804059841e-5f;    // ln2^7/5040
  y = fmaf(y, f, 1.5403530393381609e-4f);  // ln2^6/720
  y = fmaf(y, f, 1.3333558146428443e-3f);  // ln2^5/120
  y = fmaf(y, f, 9.6181291076284772e-3f);  // ln2^4/24
  y = fmaf(y, f, 5.5504108664821580e-2f);  // ln2^3/6
  y = fmaf(y, f, 2.4022650695910071e-1f);  // ln2^2/2
  y = fmaf(y, f, 6.9314718055994531e-1f);  // ln2
  y = fmaf(y, f, 1.0f);
  const uint32_t bits = kd_f32_to_bits(y) + (kd_f32_to_bits(sh) << 23);
  return x < -126.0f ? 0.0f : kd_bits_to_f32(bits);
}

// 2^x with flush-to-zero: one MUFU.EX2 on the GPU (ex2.approx.ftz: 2 ulp),
// kd_ex2_fma on the host. Its arguments here are ≤ 126.
KD_FHD float kd_ex2(float x) {
#ifdef __CUDA_ARCH__
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return kd_ex2_fma(x);
#endif
}

// log2 x: one MUFU.LG2 on the GPU (lg2.approx.ftz); on the host the
// exponent plus log2 of the mantissa m ∈ [√½, √2) by the atanh series in
// t = (m − 1)/(m + 1), |t| ≤ 0.172 (five terms: ≈ 1 ulp), with no libm call
// (the loops vectorize). 0 → −inf, x < 0 or NaN → NaN, +inf → +inf; its
// arguments here are normal (JSD's m is floored at 2^−126).
KD_FHD float kd_lg2(float x) {
#ifdef __CUDA_ARCH__
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  const uint32_t b = kd_f32_to_bits(x);
  const uint32_t mb = (b & 0x007fffffu) | 0x3f800000u;
  const bool hi = mb > 0x3fb504f3u;  // m > √2: halve it
  const float m = kd_bits_to_f32(hi ? mb - 0x00800000u : mb);
  const float e = (float)((int)(b >> 23) - 127 + (hi ? 1 : 0));
  const float t = (m - 1.0f) / (m + 1.0f);
  const float t2 = t * t;
  float p = 0.11111111f;                 // 1/9
  p = fmaf(p, t2, 0.14285715f);          // 1/7
  p = fmaf(p, t2, 0.2f);                 // 1/5
  p = fmaf(p, t2, 0.33333334f);          // 1/3
  p = fmaf(p, t2, 1.0f);
  const float y = fmaf(2.8853900817779268f * t, p, e);  // 2/ln2 · atanh-series
  // Selects, not branches: the loops that call it vectorize.
  const float edge = x == 0.0f ? KD_NEG_INF : (x > 0.0f ? x : kd_nan());
  return (x > 0.0f) & (x < -KD_NEG_INF) ? y : edge;
#endif
}


// max(x, lo) for a non-NaN `lo`, a NaN x giving lo (fmaxf's rule): FMNMX
// on the GPU, a compare and select on the host (fmaxf is a libm call there,
// which would keep the loops from vectorizing).
KD_FHD float kd_atleast(float x, float lo) {
#ifdef __CUDA_ARCH__
  return fmaxf(x, lo);
#else
  return x > lo ? x : lo;
#endif
}

// min(x, hi) for a non-NaN `hi`, a NaN x giving hi (as kd_atleast).
KD_FHD float kd_atmost(float x, float hi) {
#ifdef __CUDA_ARCH__
  return fminf(x, hi);
#else
  return x < hi ? x : hi;
#endif
}

// One thread's (or lane's) statistics.
struct KdFast {
  float mx, zx;  // main side: reference (base 2) and Σ 2^(x − mx)
  float my, zy;  // other side
  float acc;     // Σ 2^(x − mx)·max((x − mx) − (y − my), −2^64)
  float ent;     // soft CE: Σ 2^(x − mx)·max(x − mx, −2^64)
  float m1, z1;  // α > 0: the student at τ = 1 (base 2: s·log2 e)
  float tx, ty;  // raw thresholds of the main and the other side: a chunk
                 // whose maximum exceeds one moves the references
};

KD_FHD KdFast kd_fast_init() {
  return KdFast{KD_FAST_EMPTY, 0.0f, KD_FAST_EMPTY, 0.0f, 0.0f,
                0.0f,          KD_FAST_EMPTY, 0.0f, KD_NEG_INF, KD_NEG_INF};
}

// Moves every reference to at least the chunk's raw maxima (cx main, cy
// other), re-expressing the sums, and recomputes the thresholds. Exact where
// nothing moves (2^0 = 1, shift 0): a lane the warp's vote drags along is
// unchanged. The student's threshold also covers the τ = 1 statistics.
template <int DIV, bool CE>
KD_FHD void kd_fast_rescale(KdFast& st, float cx, float cy, const KdParams& P) {
  const float s2 = P.scale2;
  const float nx = fmaxf(st.mx, cx * s2);
  const float ny = fmaxf(st.my, cy * s2);
  const float dx = st.mx - nx, dy = st.my - ny;  // ≤ 0
  const float sx = kd_ex2(dx);
  // Each acc term shifts by dx − dy, each ent term by dx.
  st.acc = sx * (st.acc + st.zx * (dx - dy));
  if (DIV == KD_DIV_SCE) st.ent = sx * (st.ent + st.zx * dx);
  st.zx *= sx;
  st.zy *= kd_ex2(dy);
  st.mx = nx;
  st.my = ny;
  const float inv = 1.0f / s2;
  st.tx = (nx + KD_FAST_T) * inv;
  st.ty = (ny + KD_FAST_T) * inv;
  if (CE) {
    const float cs = DIV == KD_DIV_RKL ? cx : cy;
    const float n1 = fmaxf(st.m1, cs * KD_LOG2E);
    st.z1 *= kd_ex2(st.m1 - n1);
    st.m1 = n1;
    const float t1 = (n1 + KD_FAST_T) * (1.0f / KD_LOG2E);
    if (DIV == KD_DIV_RKL)
      st.tx = fminf(st.tx, t1);
    else
      st.ty = fminf(st.ty, t1);
  }
}

// Whether a chunk with raw maxima (cx, cy) must move the references.
KD_FHD bool kd_fast_over(const KdFast& st, float cx, float cy) { return cx > st.tx || cy > st.ty; }

// One element (raw main x, raw other y, raw student s): its terms, to be
// added to the sums by the caller (a chunk sums its terms pairwise).
struct KdFastTerm {
  float ex, ey, a, h, e1;
};

template <int DIV, bool CE>
KD_FHD KdFastTerm kd_fast_term(const KdFast& st, float x, float y, float s, const KdParams& P) {
  KdFastTerm o;
  const float ax = fmaf(x, P.scale2, -st.mx);
  const float ay = fmaf(y, P.scale2, -st.my);
  o.ex = kd_ex2(ax);
  o.ey = kd_ex2(ay);
  o.a = KD_FAST_ACC(DIV) ? o.ex * kd_atleast(ax - ay, -KD_FAST_BIG) : 0.0f;
  o.h = DIV == KD_DIV_SCE ? o.ex * kd_atleast(ax, -KD_FAST_BIG) : 0.0f;
  o.e1 = CE ? kd_ex2(fmaf(s, KD_LOG2E, -st.m1)) : 0.0f;
  return o;
}

// Adds a chunk of N terms (N a power of 2), pairwise (loops the compilers
// unroll at -O3; N is a constant).
template <int DIV, bool CE, int N>
KD_FHD void kd_fast_add(KdFast& st, KdFastTerm (&t)[N]) {
  for (int w = 1; w < N; w *= 2) {
    for (int i = 0; i + w < N; i += 2 * w) {
      t[i].ex += t[i + w].ex;
      t[i].ey += t[i + w].ey;
      if (KD_FAST_ACC(DIV)) t[i].a += t[i + w].a;
      if (DIV == KD_DIV_SCE) t[i].h += t[i + w].h;
      if (CE) t[i].e1 += t[i + w].e1;
    }
  }
  st.zx += t[0].ex;
  st.zy += t[0].ey;
  if (KD_FAST_ACC(DIV)) st.acc += t[0].a;
  if (DIV == KD_DIV_SCE) st.ent += t[0].h;
  if (CE) st.z1 += t[0].e1;
}

// Pushes one element alone (heads, tails, unaligned rows).
template <int DIV, bool CE>
KD_FHD void kd_fast_push1(KdFast& st, float x, float y, float s, const KdParams& P) {
  if (kd_fast_over(st, x, y)) kd_fast_rescale<DIV, CE>(st, x, y, P);
  KdFastTerm t[1] = {kd_fast_term<DIV, CE>(st, x, y, s, P)};
  kd_fast_add<DIV, CE, 1>(st, t);
}

// b merged into a (both re-expressed from the larger references).
template <int DIV, bool CE>
KD_FHD void kd_fast_merge(KdFast& a, const KdFast& b) {
  const float nx = fmaxf(a.mx, b.mx), ny = fmaxf(a.my, b.my);
  const float dxa = a.mx - nx, dya = a.my - ny, dxb = b.mx - nx, dyb = b.my - ny;
  const float sxa = exp2f(dxa), sxb = exp2f(dxb);
  a.acc = sxa * (a.acc + a.zx * (dxa - dya)) + sxb * (b.acc + b.zx * (dxb - dyb));
  if (DIV == KD_DIV_SCE) a.ent = sxa * (a.ent + a.zx * dxa) + sxb * (b.ent + b.zx * dxb);
  a.zx = a.zx * sxa + b.zx * sxb;
  a.zy = a.zy * exp2f(dya) + b.zy * exp2f(dyb);
  a.mx = nx;
  a.my = ny;
  if (CE) {
    const float n1 = fmaxf(a.m1, b.m1);
    a.z1 = a.z1 * exp2f(a.m1 - n1) + b.z1 * exp2f(b.m1 - n1);
    a.m1 = n1;
  }
}

// A row's constants once its statistics are merged.
struct KdFastRow {
  float lse_s, lse_t;  // base-2 log-sum-exp of s·scale2 and t·scale2
  float lse_1;         // base 2, the student at τ = 1: m_1 + l_1
  float m_1, l_1;      // its reference and log2 Z (kept apart for the CE's digits)
  float kl;            // the divergence (soft CE: the cross-entropy) in nats
  float poison;        // 0, or NaN (kd_row_poison's rule)
  float cw;            // gradient: w·soft_coef/τ (forward KL, soft CE) or ·ln 2 (reverse KL)
  float aw;            // gradient: w·α
  float k;             // reverse KL: D (base 2); JSD: Σ q log2(q/m)
  float kscale;        // reverse KL: cw; JSD: cw·ln2·(1 − β)
  float dlt_hi, dlt_lo;  // reverse KL: lse_s − lse_t (base 2) as hi + lo; JSD: lse_t − lse_s
  float ref_s, inv_zs;   // reverse KL: the student's reference and 1/Z_s
  float omb;           // JSD: 1 − β
  float f_up, f_dn, f_eq;  // TVD: the gradient's factor of q where q > p, q < p, q = p
};

// 0, or NaN for a side with a NaN or +inf logit, or (empty_bad) no finite one.
KD_FHD float kd_fast_poison(float m, float z, bool empty_bad) {
  const bool bad = !(z == z) || m == -KD_NEG_INF || (empty_bad && m == KD_FAST_EMPTY);
  return bad ? kd_nan() : 0.0f;
}

// The row's divergence and gradient constants; `w` the row's gradient weight
// (reduction weight × row weight, before the poison).
template <int DIV, bool CE>
KD_FHD KdFastRow kd_fast_finish(const KdFast& st, float w, const KdParams& P) {
  KdFastRow r;
  const bool rkl = DIV == KD_DIV_RKL;
  const float lx = log2f(st.zx), ly = log2f(st.zy);
  float poison = 0.0f;
  if (P.soft_coef > 0.0f)
    poison += kd_fast_poison(st.mx, st.zx, true) + kd_fast_poison(st.my, st.zy, true);
  if (CE) poison += kd_fast_poison(st.m1, st.z1, true);
  r.poison = poison;
  // In double (once per row): acc/Zx and log2(Zy/Zx) can each be several
  // times D, and fp32 would round each at its own size.
  float d2 = KD_FAST_ACC(DIV)
                 ? (float)((double)st.acc / (double)st.zx + log2((double)st.zy / (double)st.zx))
                 : 0.0f;
  // NaN in acc with clean inputs is 0·inf: a masked other entry facing a
  // main entry whose weight underflowed; the divergence is +inf all the same.
  if (!(d2 == d2)) d2 = -KD_NEG_INF;
  float kl = KD_LN2 * d2;
  if (DIV == KD_DIV_SCE && !kd_isinf(d2)) kl = KD_LN2 * (d2 + (lx - st.ent / st.zx));
  r.kl = kl;
  const float lse_x = st.mx + lx, lse_y = st.my + ly;
  r.lse_s = rkl ? lse_x : lse_y;
  r.lse_t = rkl ? lse_y : lse_x;
  r.dlt_hi = r.dlt_lo = r.ref_s = r.inv_zs = 0.0f;
  if (rkl || DIV == KD_DIV_JSD) {
    // lse_x − lse_y (reverse KL: lse_s − lse_t; JSD: lse_t − lse_s). The
    // references are exact floats: (mx − my) + log2(Zx/Zy) in double.
    const double dl = ((double)st.mx - (double)st.my) + log2((double)st.zx / (double)st.zy);
    r.dlt_hi = (float)dl;
    r.dlt_lo = (float)(dl - (double)r.dlt_hi);
  }
  if (rkl) {
    r.ref_s = st.mx;
    r.inv_zs = 1.0f / st.zx;
  }
  r.m_1 = CE ? st.m1 : 0.0f;
  r.l_1 = CE ? log2f(st.z1) : 0.0f;
  r.lse_1 = r.m_1 + r.l_1;
  const float wr = w + poison;
  r.cw = wr * P.soft_coef * P.inv_tau * (rkl ? KD_LN2 : 1.0f);
  r.aw = wr * P.alpha;
  r.k = d2;
  r.kscale = r.cw;
  r.omb = 1.0f - P.beta;
  r.f_up = r.f_dn = r.f_eq = 0.0f;
  if (P.soft_coef <= 0.0f) {
    // No soft term: q = p = 0 and a zero reverse-KL factor in the gradient,
    // whatever the teacher holds (the poison still reaches it through aw).
    r.lse_s = -KD_NEG_INF;
    r.lse_t = -KD_NEG_INF;
    r.k = 0.0f;
    r.kscale = 0.0f;
    // A NaN difference: every log-ratio clamps to −2^64, and q = 0 makes it 0.
    r.dlt_hi = r.dlt_lo = kd_nan();
    r.inv_zs = 0.0f;
  }
  return r;
}

// Pass 2 (TVD, JSD): one element's pair of sums (see the top).
struct KdFast2 {
  float a, b, c;  // c: TVD's Σ q where q < p (ties half)
  float d;        // JSD: the element's clamped log2(q/m), not summed (the
                  // CPU path keeps it for its gradient sweep)
};

template <int DIV>
KD_FHD KdFast2 kd_fast_term2(float s, float t, const KdFastRow& r, const KdParams& P) {
  const float lq = fmaf(s, P.scale2, -r.lse_s), lp = fmaf(t, P.scale2, -r.lse_t);
  const float q = kd_ex2(lq), p = kd_ex2(lp);
  if (DIV == KD_DIV_TVD) {
    const float tie = q == p ? 0.5f * q : 0.0f;
    return KdFast2{fabsf(q - p), q > p ? q : tie, q < p ? q : tie, 0.0f};
  }
  // m floored at 2^−126: where p and q both underflow, log2(q/m) stays
  // finite (≤ −log2(1−β) in exact arithmetic), never −600 + inf.
  const float lm = kd_lg2(kd_atleast(fmaf(P.beta, p, r.omb * q), 1.17549435e-38f));
  const float d = kd_atleast(lq - lm, -KD_FAST_BIG);
  return KdFast2{p * kd_atleast(lp - lm, -KD_FAST_BIG), q * d, 0.0f, d};
}

// The pass-2 sums into the row's divergence and gradient factors.
template <int DIV>
KD_FHD void kd_fast_finish2(KdFastRow& r, float a, float b, float c, const KdParams& P) {
  if (DIV == KD_DIV_TVD) {
    // g − ⟨q, g⟩ with g = ½ sign(q − p): Q₋ where q > p, −Q₊ where q < p;
    // both summed (identical rows: Q₊ = Q₋ exactly, a zero gradient).
    const float q_up = b, q_dn = c;
    r.kl = 0.5f * a;
    r.f_up = r.cw * q_dn;
    r.f_dn = -r.cw * q_up;
    r.f_eq = 0.5f * r.cw * (q_dn - q_up);
  } else {
    // D = β Σ p log(p/m) + (1−β) Σ q log(q/m); the gradient's
    // q·(g − ⟨q, g⟩)/τ with g = (1−β) log(q/m) is q·A·(log2(q/m) − Σ q log2(q/m)).
    r.kl = KD_LN2 * (P.beta * a + r.omb * b);
    r.kscale = r.cw * KD_LN2 * r.omb;
    r.k = b;
  }
  if (P.soft_coef <= 0.0f) {
    r.k = r.kscale = 0.0f;
    r.f_up = r.f_dn = r.f_eq = 0.0f;
  }
}

// The row's loss ℓ = α·CE + (1−α)·c·D (as kd_row_loss), s_y the raw student
// logit at the label.
template <bool CE>
KD_FHD float kd_fast_loss(const KdFastRow& r, float s_y, const KdParams& P) {
  float loss = r.poison;
  // (m_1 − s_y·log2 e) first: exactly 0 when the label is the maximum, so
  // a confident, correct prediction keeps its small CE.
  if (CE) loss += P.alpha * KD_LN2 * ((r.m_1 - s_y * KD_LOG2E) + r.l_1);
  if (P.soft_coef > 0.0f) loss += P.soft_coef * r.kl;
  return loss;
}

// JSD's soft gradient entry from q and the clamped log2(q/m) (kd_fast_term2's d).
KD_FHD float kd_fast_grad_jsd(float q, float d, const KdFastRow& r) { return (q * r.kscale) * (d - r.k); }

// ∂ℓ/∂s_j·w off the label (the label's −α·w: kd_fast_grad_label).
//   forward KL, soft CE: cw·(q − p) [+ aw·q¹]
//   reverse KL: cw·ln2·q·(log2 q − log2 p − D) = (q·kscale)·(d − D) [+ aw·q¹],
//   d = log2 q − log2 p = (s − t)·scale2 − Δ, Δ = lse_s − lse_t as hi + lo
//   (s − t is exact for 16-bit logits and one fma rounds at |d|' size: not
//   at that of log2 q, ≈ log2 V in a flat row), clamped below (a masked
//   student entry: q = 0, not 0·inf);
//   TVD: q·(f_up, f_dn or f_eq by the side of q against p);
//   JSD: (q·kscale)·(log2(q/m) − Σ q log2(q/m)), log2(q/m) from p/q (no p).
template <int DIV, bool CE>
KD_FHD float kd_fast_grad(float s, float t, const KdFastRow& r, const KdParams& P) {
  // Reverse KL's q from the student's reference and 1/Z (one multiply
  // more): its exponent is rounded at |x − m| ≤ the row's spread, not at
  // |log2 q| ≈ log2 V + |x − m| (a flat row's every q would carry that).
  const float q = DIV == KD_DIV_RKL ? kd_ex2(fmaf(s, P.scale2, -r.ref_s)) * r.inv_zs
                                    : kd_ex2(fmaf(s, P.scale2, -r.lse_s));
  float g;
  if (DIV == KD_DIV_RKL) {
    const float d = fmaf(s - t, P.scale2, -r.dlt_hi) - r.dlt_lo;
    g = (q * r.kscale) * (kd_atleast(d, -KD_FAST_BIG) - r.k);
  } else if (DIV == KD_DIV_TVD) {
    const float p = kd_ex2(fmaf(t, P.scale2, -r.lse_t));
    g = q * (q > p ? r.f_up : (q < p ? r.f_dn : r.f_eq));
  } else if (DIV == KD_DIV_JSD) {
    // log2(q/m) = −log2(β·p/q + 1 − β) with p/q = 2^((t − s)·scale2 − Δ):
    // two MUFU and no p. The exponent is capped at 126 (a NaN, from
    // s = t = −inf, also gives 126): where it binds q ≤ 2^−126 flushes to
    // 0, and 1 − β > 0 (β ∈ (0, 1) here: β = 0, 1 run the KL kernels)
    // keeps the log finite.
    const float x = kd_atmost(fmaf(t - s, P.scale2, -r.dlt_hi), 126.0f);
    g = kd_fast_grad_jsd(q, -kd_lg2(fmaf(P.beta, kd_ex2(x), r.omb)), r);
  } else {
    const float p = kd_ex2(fmaf(t, P.scale2, -r.lse_t));
    g = r.cw * (q - p);
  }
  if (CE) g = fmaf(r.aw, kd_ex2(fmaf(s, KD_LOG2E, -r.lse_1)), g);
  return g;
}

// The label's gradient entry, per row (careful arithmetic: q¹ − 1 by expm1).
template <int DIV, bool CE>
KD_FHD float kd_fast_grad_label(float s, float t, const KdFastRow& r, const KdParams& P) {
  KdFastRow soft = r;
  soft.aw = 0.0f;
  float g = kd_fast_grad<DIV, false>(s, t, soft, P);
  if (CE) g += r.aw * expm1f(((s * KD_LOG2E - r.m_1) - r.l_1) * KD_LN2);
  return g;
}
