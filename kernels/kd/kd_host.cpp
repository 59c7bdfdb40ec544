// kd_host.cpp — the kernels' row arithmetic (kd_math.cuh) compiled for the CPU.
//
// The fast CPU backend calls kd_host_row_* once per row (rayon over rows on
// the Rust side). A row is split over KD_LANES virtual lanes (element j goes
// to lane j % KD_LANES, 256 as the kernel's threads) that are merged as a tree,
// as the CUDA block merges its threads: the same online algorithm and the same fp32 arithmetic, only
// the parallel decomposition differs. Bytes per element: as the v1 kernel.
#include <cstddef>
#include <vector>

#include "kd/kd_args.h"
#include "kd/kd_single_layout.h"
#include "app/app_args.h"

#define KD_LANES 256

namespace {

template <typename T, int DIV>
float host_row(const T* s, const T* t, long long y, int has_label, float* grad, float* grad_t,
               const KdParams& P, float w) {
  const int V = P.vocab;
  if (has_label && y == P.ignore_index) {
    for (int j = 0; j < V; ++j) {
      if (grad) grad[j] = 0.0f;
      if (grad_t) grad_t[j] = 0.0f;
    }
    return 0.0f;
  }
  const bool bad_label = has_label && (y < 0 || y >= V);
  const bool with_ce = P.alpha > 0.0f;
  // The logits as the kernels see them: soft-capped as they are loaded.
  auto S = [&](int j) { return kd_softcap(kd_to_f32(s[j]), P); };
  auto Tt = [&](int j) { return kd_softcap(kd_to_f32(t[j]), P); };

  KdPass1 lanes[KD_LANES];
  for (int l = 0; l < KD_LANES; ++l) lanes[l] = kd_pass1_init();
  for (int j = 0; j < V; ++j) kd_pass1_push<DIV>(lanes[j % KD_LANES], S(j), Tt(j), P, with_ce);
  for (int off = KD_LANES / 2; off > 0; off >>= 1)
    for (int l = 0; l < off; ++l) kd_pass1_merge<DIV>(lanes[l], lanes[l + off], P);
  KdRow r = kd_row_finish<DIV>(lanes[0], P);

  if (DIV == KD_DIV_JSD) {
    KdKahan d[KD_LANES], qg[KD_LANES], ph[KD_LANES];
    for (int l = 0; l < KD_LANES; ++l) d[l] = qg[l] = ph[l] = kd_kahan_init();
    for (int j = 0; j < V; ++j) {
      const KdJsdTerm term = kd_jsd_term(S(j), Tt(j), r, P);
      kd_kahan_add(d[j % KD_LANES], term.d);
      kd_kahan_add(qg[j % KD_LANES], term.qg);
      kd_kahan_add(ph[j % KD_LANES], term.ph);
    }
    for (int off = KD_LANES / 2; off > 0; off >>= 1)
      for (int l = 0; l < off; ++l) {
        d[l].sum += d[l + off].sum;
        qg[l].sum += qg[l + off].sum;
        ph[l].sum += ph[l + off].sum;
      }
    kd_jsd_finish(r, d[0].sum, qg[0].sum, ph[0].sum);
  }
  if (DIV == KD_DIV_TVD) {
    KdKahan ad[KD_LANES], up[KD_LANES], dn[KD_LANES], pu[KD_LANES], pd[KD_LANES];
    for (int l = 0; l < KD_LANES; ++l) ad[l] = up[l] = dn[l] = pu[l] = pd[l] = kd_kahan_init();
    for (int j = 0; j < V; ++j) {
      const KdTvdTerm term = kd_tvd_term(S(j), Tt(j), r, P);
      kd_kahan_add(ad[j % KD_LANES], term.ad);
      kd_kahan_add(up[j % KD_LANES], term.up);
      kd_kahan_add(dn[j % KD_LANES], term.dn);
      kd_kahan_add(pu[j % KD_LANES], term.pu);
      kd_kahan_add(pd[j % KD_LANES], term.pd);
    }
    for (int off = KD_LANES / 2; off > 0; off >>= 1)
      for (int l = 0; l < off; ++l) {
        ad[l].sum += ad[l + off].sum;
        up[l].sum += up[l + off].sum;
        dn[l].sum += dn[l + off].sum;
        pu[l].sum += pu[l + off].sum;
        pd[l].sum += pd[l + off].sum;
      }
    kd_tvd_finish(r, ad[0].sum, up[0].sum, dn[0].sum, pu[0].sum, pd[0].sum);
  }

  const float nan = kd_bits_to_f32(0x7fc00000u);
  const float wr = bad_label ? nan : kd_row_grad_weight(r, w);
  for (int j = 0; j < V; ++j) {
    const float sr = kd_to_f32(s[j]), tr = kd_to_f32(t[j]);
    const float sc = kd_softcap(sr, P), tc = kd_softcap(tr, P);
    if (grad) grad[j] = kd_grad_elem<DIV>(sc, tc, j == y, r, P, wr) * kd_softcap_grad(sr, P);
    if (grad_t) grad_t[j] = kd_grad_teacher_elem<DIV>(sc, tc, r, P, wr) * kd_softcap_grad(tr, P);
  }
  if (bad_label) return nan;
  const float s_y = with_ce ? S((int)y) : 0.0f;
  return kd_row_loss(r, s_y, P);
}

template <typename T>
float host_row_div(int div, const T* s, const T* t, long long y, int has_label, float* grad,
                   float* grad_t, const KdParams* P, float w) {
  switch (div) {
    case KD_DIV_FKL: return host_row<T, KD_DIV_FKL>(s, t, y, has_label, grad, grad_t, *P, w);
    case KD_DIV_RKL: return host_row<T, KD_DIV_RKL>(s, t, y, has_label, grad, grad_t, *P, w);
    case KD_DIV_JSD: return host_row<T, KD_DIV_JSD>(s, t, y, has_label, grad, grad_t, *P, w);
    case KD_DIV_TVD: return host_row<T, KD_DIV_TVD>(s, t, y, has_label, grad, grad_t, *P, w);
    case KD_DIV_SCE: return host_row<T, KD_DIV_SCE>(s, t, y, has_label, grad, grad_t, *P, w);
    default: return kd_bits_to_f32(0x7fc00000u);  // unknown divergence id: NaN
  }
}

// One row with a top-k teacher (kernels/kd/kd_topk.cu's algorithm, lanes as
// host_row's). `idx`/`vals`: the row's k entries, already validated.
template <typename T, typename I>
float host_topk_row(const T* s, const I* idx, const T* vals, long long y, int has_label,
                    float* grad, const KdParams& P, float w) {
  const int V = P.vocab, k = P.topk_k, mode = P.topk_mode;
  if (has_label && y == P.ignore_index) {
    if (grad)
      for (int j = 0; j < V; ++j) grad[j] = 0.0f;
    return 0.0f;
  }
  const bool bad_label = has_label && (y < 0 || y >= V);
  const bool with_ce = P.alpha > 0.0f;
  auto S = [&](long long j) { return kd_softcap(kd_to_f32(s[j]), P); };
  auto Vv = [&](int i) { return kd_softcap(kd_to_f32(vals[i]), P); };
  std::vector<char> on(V, 0);
  for (int i = 0; i < k; ++i) on[(size_t)idx[i]] = 1;

  // Tail mode keeps the support's student statistics in s1 (kd_tail_finish).
  const bool tail = mode == KD_TOPK_TAIL;
  const bool ce1 = with_ce && !tail;
  KdPass1 lanes[KD_LANES];
  for (int l = 0; l < KD_LANES; ++l) lanes[l] = kd_pass1_init();
  for (int j = 0; j < V; ++j) {
    if (on[j]) continue;
    if (mode == KD_TOPK_SUPPORT) {
      if (with_ce) kd_stat_push(lanes[j % KD_LANES].s1, S(j) * KD_LOG2E);
    } else {
      kd_pass1_push<KD_DIV_FKL>(lanes[j % KD_LANES], S(j), KD_NEG_INF, P, ce1);
    }
  }
  KdKahan p_sum[KD_LANES];  // tail: Σ e^{v_i} (k may be ~V)
  for (int l = 0; l < KD_LANES; ++l) p_sum[l] = kd_kahan_init();
  for (int i = 0; i < k; ++i) {
    kd_pass1_push<KD_DIV_FKL>(lanes[i % KD_LANES], S(idx[i]), Vv(i), P, ce1);
    if (tail) {
      kd_stat_push(lanes[i % KD_LANES].s1, S(idx[i]) * KD_LOG2E);
      kd_kahan_add(p_sum[i % KD_LANES], expf(Vv(i)));
    }
  }
  for (int off = KD_LANES / 2; off > 0; off >>= 1)
    for (int l = 0; l < off; ++l) kd_pass1_merge<KD_DIV_FKL>(lanes[l], lanes[l + off], P);
  KdRow r = kd_row_finish<KD_DIV_FKL>(lanes[0], P);

  if (tail) {
    for (int off = KD_LANES / 2; off > 0; off >>= 1)
      for (int l = 0; l < off; ++l) p_sum[l].sum += p_sum[l + off].sum;
    kd_tail_finish(r, lanes[0], p_sum[0].sum, P);
  }

  const float nan = kd_bits_to_f32(0x7fc00000u);
  if (grad) {
    const float wr = bad_label ? nan : kd_row_grad_weight(r, w);
    KdParams ce = P;
    ce.soft_coef = 0.0f;
    for (int j = 0; j < V; ++j) {
      if (on[j]) continue;
      const float sr = kd_to_f32(s[j]), sc = kd_softcap(sr, P);
      float g;
      if (mode == KD_TOPK_SUPPORT)
        g = kd_grad_elem<KD_DIV_FKL>(sc, 0.0f, j == y, r, ce, wr);
      else if (mode == KD_TOPK_FULL)
        g = kd_grad_elem<KD_DIV_FKL>(sc, KD_NEG_INF, j == y, r, P, wr);
      else
        g = kd_tail_grad(sc, 0.0f, false, j == y, r, P, wr);
      grad[j] = g * kd_softcap_grad(sr, P);
    }
    for (int i = 0; i < k; ++i) {
      const long long j = idx[i];
      const float sr = kd_to_f32(s[j]), sc = kd_softcap(sr, P);
      const float g = mode == KD_TOPK_TAIL
                          ? kd_tail_grad(sc, Vv(i), true, j == y, r, P, wr)
                          : kd_grad_elem<KD_DIV_FKL>(sc, Vv(i), j == y, r, P, wr);
      grad[j] = g * kd_softcap_grad(sr, P);
    }
  }
  if (bad_label) return nan;
  const float s_y = with_ce ? S(y) : 0.0f;
  return kd_row_loss(r, s_y, P);
}

}  // namespace

extern "C" {

// One row: returns ℓ (0 for an ignored row, NaN for a label out of range) and,
// when `grad` is not null, writes the V gradient entries (already × w) as f32.
// `grad_t` (may be null): ∂ℓ/∂t, × w, as f32 (mutual learning).
float kd_host_row_f32(int div, const float* s, const float* t, long long y, int has_label,
                      float* grad, float* grad_t, const KdParams* P, float w) {
  return host_row_div(div, s, t, y, has_label, grad, grad_t, P, w);
}
float kd_host_row_bf16(int div, const uint16_t* s, const uint16_t* t, long long y, int has_label,
                       float* grad, float* grad_t, const KdParams* P, float w) {
  return host_row_div(div, reinterpret_cast<const kd_bf16*>(s), reinterpret_cast<const kd_bf16*>(t),
                      y, has_label, grad, grad_t, P, w);
}
float kd_host_row_f16(int div, const uint16_t* s, const uint16_t* t, long long y, int has_label,
                      float* grad, float* grad_t, const KdParams* P, float w) {
  return host_row_div(div, reinterpret_cast<const kd_f16*>(s), reinterpret_cast<const kd_f16*>(t),
                      y, has_label, grad, grad_t, P, w);
}

// One row with a top-k teacher (P->topk_mode, P->topk_k): `idx` the row's k
// indices (int32 when idx64 = 0, else int64; distinct, in [0, V)), `vals`
// its k values in the student's dtype (dtype: 0 f32, 1 bf16, 2 f16).
float kd_host_topk_row(int dtype, const void* s, const void* idx, int idx64, const void* vals,
                       long long y, int has_label, float* grad, const KdParams* P, float w) {
  auto go = [&](auto tag) {
    using T = decltype(tag);
    const T* sp = static_cast<const T*>(s);
    const T* vp = static_cast<const T*>(vals);
    return idx64 ? host_topk_row(sp, static_cast<const long long*>(idx), vp, y, has_label, grad, *P, w)
                 : host_topk_row(sp, static_cast<const int*>(idx), vp, y, has_label, grad, *P, w);
  };
  if (dtype == 0) return go(float{});
  if (dtype == 1) return go(kd_bf16{});
  return go(kd_f16{});
}

float kd_host_row_weight(const KdParams* P, long long valid_rows) {
  return kd_row_weight(*P, valid_rows);
}

// sizeof(KdParams) and the offsets of its non-float fields, so that a test can
// hold the Rust mirror (src/params.rs) to the C layout.
void kd_host_params_layout(long long* out) {
  out[0] = (long long)sizeof(KdParams);
  out[1] = (long long)offsetof(KdParams, ignore_index);
  out[2] = (long long)offsetof(KdParams, reduction);
  out[3] = (long long)offsetof(KdParams, vocab);
  out[4] = (long long)offsetof(KdParams, softcap);
  out[5] = (long long)offsetof(KdParams, topk_mode);
  out[6] = (long long)offsetof(KdParams, topk_k);
}

// The same for the launch contracts (kd_args.h; src/params.rs args_layout).
void kd_host_args_layout(long long* out) {
  const long long v[] = {
      (long long)sizeof(KdFusedArgs),
      (long long)offsetof(KdFusedArgs, student_stride),
      (long long)offsetof(KdFusedArgs, teacher),
      (long long)offsetof(KdFusedArgs, labels),
      (long long)offsetof(KdFusedArgs, grad),
      (long long)offsetof(KdFusedArgs, grad_teacher_stride),
      (long long)offsetof(KdFusedArgs, row_loss),
      (long long)offsetof(KdFusedArgs, valid_count),
      (long long)offsetof(KdFusedArgs, n_rows),
      (long long)offsetof(KdFusedArgs, params),
      (long long)sizeof(KdTopkArgs),
      (long long)offsetof(KdTopkArgs, indices),
      (long long)offsetof(KdTopkArgs, values),
      (long long)offsetof(KdTopkArgs, grad_stride),
      (long long)offsetof(KdTopkArgs, row_loss),
      (long long)offsetof(KdTopkArgs, n_rows),
      (long long)offsetof(KdTopkArgs, params),
      (long long)sizeof(KdCountArgs),
      (long long)offsetof(KdCountArgs, ignore_index),
      (long long)offsetof(KdCountArgs, out),
      (long long)sizeof(KdReduceArgs),
      (long long)offsetof(KdReduceArgs, valid_count),
      (long long)offsetof(KdReduceArgs, out),
      (long long)offsetof(KdReduceArgs, params),
      (long long)sizeof(KdTopkValidateArgs),
      (long long)offsetof(KdTopkValidateArgs, k),
      (long long)offsetof(KdTopkValidateArgs, vocab),
      (long long)offsetof(KdTopkValidateArgs, first_bad),
  };
  for (size_t i = 0; i < sizeof(v) / sizeof(v[0]); ++i) out[i] = v[i];
}

// The same for the apps' launch contracts (app/app_args.h; src/cuda/args.rs):
// each struct's size and the offsets of its last two fields. Returns the
// number of entries written (at most 64).
#define KD_TAIL(T, A, B) \
  (long long)sizeof(T), (long long)offsetof(T, A), (long long)offsetof(T, B)
int kd_host_app_args_layout(long long* out) {
  const long long v[] = {
      KD_TAIL(KdEagerLsmArgs, vocab, inv_tau),   KD_TAIL(KdEagerEwArgs, count, beta),
      KD_TAIL(KdEagerRowLossArgs, row_loss, params), KD_TAIL(KdEagerBackArgs, grad_stride, params),
      KD_TAIL(KdFillArgs, rho, sigma),           KD_TAIL(MlpBiasActArgs, threshold, scale),
      KD_TAIL(MlpReluBackArgs, n, scale),        KD_TAIL(MlpBiasGradArgs, rows, cols),
      KD_TAIL(MlpSgdArgs, mu, wd),               KD_TAIL(MlpAdamArgs, c1, c2),
  };
  const int len = (int)(sizeof(v) / sizeof(v[0]));
  for (int i = 0; i < len; ++i) out[i] = v[i];
  return len;
}
#undef KD_TAIL

// The dtype conversions, exposed so that tests can compare them bit for bit
// with the `half` crate.
uint16_t kd_host_f32_to_bf16(float x) { return kd_f32_to_bf16(x); }
uint16_t kd_host_f32_to_f16(float x) { return kd_f32_to_f16(x); }
float kd_host_bf16_to_f32(uint16_t x) { return kd_bf16_to_f32(x); }
float kd_host_f16_to_f32(uint16_t x) { return kd_f16_to_f32(x); }

// Online statistics, exposed for the unit tests: lse (natural log) of
// `n` values pushed one by one into `lanes` lanes and merged.
float kd_host_online_lse(const float* x, long long n, int lanes) {
  KdStat st[64];
  if (lanes < 1) lanes = 1;
  if (lanes > 64) lanes = 64;
  for (int l = 0; l < lanes; ++l) st[l] = kd_stat_init();
  for (long long i = 0; i < n; ++i) kd_stat_push(st[i % lanes], x[i] * KD_LOG2E);
  for (int l = 1; l < lanes; ++l) st[0] = kd_stat_merge(st[0], st[l]);
  return KD_LN2 * (st[0].m + kd_stat_l(st[0]));
}

// The single-read kernels' dynamic shared memory per CTA for rows of V
// elements of `in_size` bytes held by clusters of `nc` CTAs
// (kd_single_layout.h), and the largest cluster they take.
long long kd_host_single_smem(long long V, long long in_size, long long nc) {
  return kd_single_smem(V, in_size, nc);
}
int kd_host_single_max_cluster() { return KD_SINGLE_MAX_CLUSTER; }
// The same for the single-read top-k kernels (the student and a bit map).
long long kd_host_single_topk_smem(long long V, long long in_size, long long nc) {
  return kd_single_topk_smem(V, in_size, nc);
}

}  // extern "C"
