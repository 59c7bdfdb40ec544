// kd_host.cpp — the kernels' row arithmetic (kd_math.cuh) compiled for the CPU.
//
// The fast CPU backend calls kd_host_row_* once per row (rayon over rows on
// the Rust side). A row is split over KD_LANES virtual lanes (element j goes
// to lane j % KD_LANES, 256 as the kernel's threads) that are merged as a tree,
// as the CUDA block merges its threads: the same online algorithm and the same fp32 arithmetic, only
// the parallel decomposition differs. Bytes per element: as the v1 kernel.
#include <cstddef>

#include "kd_math.cuh"

#define KD_LANES 256

namespace {

template <typename T, int DIV>
float host_row(const T* s, const T* t, long long y, int has_label, float* grad, const KdParams& P,
               float w) {
  const int V = P.vocab;
  if (has_label && y == P.ignore_index) {
    if (grad)
      for (int j = 0; j < V; ++j) grad[j] = 0.0f;
    return 0.0f;
  }
  const bool bad_label = has_label && (y < 0 || y >= V);
  const bool with_ce = P.alpha > 0.0f;

  KdPass1 lanes[KD_LANES];
  for (int l = 0; l < KD_LANES; ++l) lanes[l] = kd_pass1_init();
  for (int j = 0; j < V; ++j)
    kd_pass1_push<DIV>(lanes[j % KD_LANES], kd_to_f32(s[j]), kd_to_f32(t[j]), P, with_ce);
  for (int off = KD_LANES / 2; off > 0; off >>= 1)
    for (int l = 0; l < off; ++l) kd_pass1_merge<DIV>(lanes[l], lanes[l + off], P);
  KdRow r = kd_row_finish<DIV>(lanes[0], P);

  if (DIV == KD_DIV_JSD) {
    KdKahan d[KD_LANES], qg[KD_LANES];
    for (int l = 0; l < KD_LANES; ++l) d[l] = qg[l] = kd_kahan_init();
    for (int j = 0; j < V; ++j) {
      const KdJsdTerm term = kd_jsd_term(kd_to_f32(s[j]), kd_to_f32(t[j]), r, P);
      kd_kahan_add(d[j % KD_LANES], term.d);
      kd_kahan_add(qg[j % KD_LANES], term.qg);
    }
    for (int off = KD_LANES / 2; off > 0; off >>= 1)
      for (int l = 0; l < off; ++l) {
        d[l].sum += d[l + off].sum;
        qg[l].sum += qg[l + off].sum;
      }
    kd_jsd_finish(r, d[0].sum, qg[0].sum);
  }
  if (DIV == KD_DIV_TVD) {
    KdKahan ad[KD_LANES], up[KD_LANES], dn[KD_LANES];
    for (int l = 0; l < KD_LANES; ++l) ad[l] = up[l] = dn[l] = kd_kahan_init();
    for (int j = 0; j < V; ++j) {
      const KdTvdTerm term = kd_tvd_term(kd_to_f32(s[j]), kd_to_f32(t[j]), r, P);
      kd_kahan_add(ad[j % KD_LANES], term.ad);
      kd_kahan_add(up[j % KD_LANES], term.up);
      kd_kahan_add(dn[j % KD_LANES], term.dn);
    }
    for (int off = KD_LANES / 2; off > 0; off >>= 1)
      for (int l = 0; l < off; ++l) {
        ad[l].sum += ad[l + off].sum;
        up[l].sum += up[l + off].sum;
        dn[l].sum += dn[l + off].sum;
      }
    kd_tvd_finish(r, ad[0].sum, up[0].sum, dn[0].sum);
  }

  const float nan = kd_bits_to_f32(0x7fc00000u);
  if (grad) {
    const float wr = bad_label ? nan : w;
    for (int j = 0; j < V; ++j)
      grad[j] = kd_grad_elem<DIV>(kd_to_f32(s[j]), kd_to_f32(t[j]), j == y, r, P, wr);
  }
  if (bad_label) return nan;
  const float s_y = with_ce ? kd_to_f32(s[y]) : 0.0f;
  return kd_row_loss(r, s_y, P);
}

template <typename T>
float host_row_div(int div, const T* s, const T* t, long long y, int has_label, float* grad,
                   const KdParams* P, float w) {
  switch (div) {
    case KD_DIV_FKL: return host_row<T, KD_DIV_FKL>(s, t, y, has_label, grad, *P, w);
    case KD_DIV_RKL: return host_row<T, KD_DIV_RKL>(s, t, y, has_label, grad, *P, w);
    case KD_DIV_JSD: return host_row<T, KD_DIV_JSD>(s, t, y, has_label, grad, *P, w);
    case KD_DIV_TVD: return host_row<T, KD_DIV_TVD>(s, t, y, has_label, grad, *P, w);
    case KD_DIV_SCE: return host_row<T, KD_DIV_SCE>(s, t, y, has_label, grad, *P, w);
    default: return kd_bits_to_f32(0x7fc00000u);  // unknown divergence id: NaN
  }
}

}  // namespace

extern "C" {

// One row: returns ℓ (0 for an ignored row, NaN for a label out of range) and,
// when `grad` is not null, writes the V gradient entries (already × w) as f32.
float kd_host_row_f32(int div, const float* s, const float* t, long long y, int has_label,
                      float* grad, const KdParams* P, float w) {
  return host_row_div(div, s, t, y, has_label, grad, P, w);
}
float kd_host_row_bf16(int div, const uint16_t* s, const uint16_t* t, long long y, int has_label,
                       float* grad, const KdParams* P, float w) {
  return host_row_div(div, reinterpret_cast<const kd_bf16*>(s), reinterpret_cast<const kd_bf16*>(t),
                      y, has_label, grad, P, w);
}
float kd_host_row_f16(int div, const uint16_t* s, const uint16_t* t, long long y, int has_label,
                      float* grad, const KdParams* P, float w) {
  return host_row_div(div, reinterpret_cast<const kd_f16*>(s), reinterpret_cast<const kd_f16*>(t),
                      y, has_label, grad, P, w);
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

}  // extern "C"
