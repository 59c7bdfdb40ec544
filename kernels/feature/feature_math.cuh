// feature_math.cuh — the per-element and per-row arithmetic of the feature
// distillation losses (docs/DESIGN.md §1 "Feature losses"): MSE, cosine and
// attention transfer, with the gradients for student and teacher.
//
// `__host__ __device__` like kd_math.cuh: kernels/feature/feature.cu wraps it in the
// parallel decomposition (one CTA per row), kernels/feature/feature_host.cpp runs it
// on the CPU for the fast CPU backend. All math is fp32; sums are Kahan-
// compensated per thread and then merged as a tree.
//
// Definitions (per row i; w = the reduction's weight × the upstream scale):
//   mse        r = Σ_h (s_h − t_h)²;  ∂r/∂s = 2 (s − t), ∂r/∂t = −2 (s − t)
//   cosine     n_s = max(‖s‖₂, ε), n_t = max(‖t‖₂, ε) (PyTorch's
//              cosine_similarity, ε = 1e-8), a = s/n_s, b = t/n_t, cos = ⟨a, b⟩,
//              r = 1 − cos, evaluated as ½‖a − b‖² + ½(1 − ‖a‖²) + ½(1 − ‖b‖²)
//              (‖a‖ = 1 exactly when ‖s‖ > ε): no cancellation for close rows.
//              ∂r/∂s = −(b − κ_s cos a)/n_s, κ_s = [‖s‖ > ε] (a clamped norm is
//              a constant); ∂r/∂t likewise.
//   attention  a sample is [C, S] (C channels, S = H·W positions);
//              Q_j = (1/C) Σ_c x_{c,j}², Q̂ = Q / max(‖Q‖₂, ε) (F.normalize,
//              ε = 1e-12); u = Q̂_s − Q̂_t, r = Σ_j u_j² (Zagoruyko & Komodakis'
//              code: (at(x) − at(y)).pow(2).mean()). With g = 2u:
//              ∂r/∂Q_s = (g − κ_s Q̂_s ⟨Q̂_s, g⟩)/n_s, ∂r/∂x_{c,j} = (2/C) x_{c,j} ∂r/∂Q_j;
//              the teacher with g = −2u. ⟨Q̂_s, u⟩ = 1 − ⟨Q̂_s, Q̂_t⟩ where
//              ‖Q̂_s‖ = 1 (unclamped), which makes constant losses exact.
#pragma once

#include "kd/kd_math.cuh"

// Loss kinds (src/feature/mod.rs: FeatureKind::id).
#define KD_FEAT_MSE 0
#define KD_FEAT_COS 1
#define KD_FEAT_AT 2

// One call's shape and parameters; mirrored by src/feature/params.rs
// (#[repr(C)], same field order).
struct KdFeatParams {
  long long s_stride;   // elements between two student rows (samples)
  long long t_stride;   // teacher
  long long gs_stride;  // student gradient
  long long gt_stride;  // teacher gradient
  long long n_rows;     // N
  int cols;             // H (mse, cosine) or S (attention)
  int s_channels;       // C_s (attention; 1 otherwise)
  int t_channels;       // C_t
  int kind;             // KD_FEAT_*
  float w;              // gradient weight of every row (reduction × upstream scale)
  float eps;            // ε (cosine, attention)
};

// ------------------------------------------------------------------ mse --

// ∂(w·r)/∂s for d = s − t (the teacher's is its negative).
KD_HD float kd_mse_grad(float d, float w) { return 2.0f * w * d; }

// --------------------------------------------------------------- cosine --

struct KdCosRow {
  float inv_ns;  // 1 / n_s
  float inv_nt;  // 1 / n_t
  float cos;     // ⟨s, t⟩ / (n_s n_t), from the pass-1 sums (for the gradient)
  float ks;      // κ_s: 1 when ‖s‖ > ε, else 0
  float kt;      // κ_t
  float a2;      // ‖a‖² (1 when unclamped)
  float b2;      // ‖b‖²
};

// The row's constants from the pass-1 sums Σs², Σt², Σst.
KD_HD KdCosRow kd_cos_row(float ss, float tt, float st, float eps) {
  const float ns = sqrtf(ss), nt = sqrtf(tt);
  KdCosRow r;
  r.ks = ns > eps ? 1.0f : 0.0f;
  r.kt = nt > eps ? 1.0f : 0.0f;
  r.inv_ns = 1.0f / (ns > eps ? ns : eps);
  r.inv_nt = 1.0f / (nt > eps ? nt : eps);
  // Unclamped: ⟨s, t⟩ / sqrt(Σs²·Σt²) in double (one division per row), so
  // identical rows give cos = 1 and antiparallel ones −1 exactly (Σs² = Σt² =
  // ±Σst bit for bit, and sqrt(x²) = |x|): their gradients are exactly 0.
  if (ns > eps && nt > eps)
    r.cos = (float)((double)st / sqrt((double)ss * (double)tt));
  else
    r.cos = (st * r.inv_ns) * r.inv_nt;
  r.a2 = ns > eps ? 1.0f : (ns * r.inv_ns) * (ns * r.inv_ns);
  r.b2 = nt > eps ? 1.0f : (nt * r.inv_nt) * (nt * r.inv_nt);
  return r;
}

// One element's share of ‖a − b‖².
KD_HD float kd_cos_diff2(float s, float t, const KdCosRow& r) {
  const float d = s * r.inv_ns - t * r.inv_nt;
  return d * d;
}

// r = 1 − cos from Σ(a − b)² (pass 2).
KD_HD float kd_cos_loss(const KdCosRow& r, float diff2) {
  return 0.5f * diff2 + 0.5f * (1.0f - r.a2) + 0.5f * (1.0f - r.b2);
}

// w·∂r/∂s_j = −w (b_j − κ_s cos a_j) / n_s.
KD_HD float kd_cos_grad_s(float s, float t, const KdCosRow& r, float w) {
  return -w * r.inv_ns * (t * r.inv_nt - r.ks * r.cos * (s * r.inv_ns));
}

// w·∂r/∂t_j = −w (a_j − κ_t cos b_j) / n_t.
KD_HD float kd_cos_grad_t(float s, float t, const KdCosRow& r, float w) {
  return -w * r.inv_nt * (s * r.inv_ns - r.kt * r.cos * (t * r.inv_nt));
}

// ------------------------------------------------------------ attention --

// Q_j of one sample at position j: channels c at x[c·S + j], Kahan-summed.
template <typename T>
KD_HD float kd_at_q(const T* x, int channels, int S, int j) {
  KdKahan acc = kd_kahan_init();
  for (int c = 0; c < channels; ++c) {
    const float v = kd_to_f32(x[(long long)c * S + j]);
    kd_kahan_add(acc, v * v);
  }
  return acc.sum / (float)channels;
}

struct KdAtRow {
  float inv_ns;  // 1 / max(‖Q_s‖, ε)
  float inv_nt;
  float ks;      // κ_s
  float kt;
  float ps;      // ⟨Q̂_s, u⟩ = 1 − ⟨Q̂_s, Q̂_t⟩ (used only when κ_s = 1, ‖Q̂_s‖ = 1)
  float pt;      // ⟨Q̂_t, u⟩ = ⟨Q̂_s, Q̂_t⟩ − 1 (used only when κ_t = 1)
};

// The row's constants from Σ Q_s², Σ Q_t², Σ Q_s Q_t. ⟨Q̂_s, Q̂_t⟩ in double
// when neither norm is clamped, as for the cosine: identical maps give 1 and
// a zero map 0 exactly, so that the gradients of a constant loss (identical
// maps, or one map all zero) are exactly 0 rather than rounding noise.
KD_HD KdAtRow kd_at_row(float qss, float qtt, float qst, float eps) {
  const float ns = sqrtf(qss), nt = sqrtf(qtt);
  KdAtRow r;
  r.ks = ns > eps ? 1.0f : 0.0f;
  r.kt = nt > eps ? 1.0f : 0.0f;
  r.inv_ns = 1.0f / (ns > eps ? ns : eps);
  r.inv_nt = 1.0f / (nt > eps ? nt : eps);
  const float c = (ns > eps && nt > eps)
                      ? (float)((double)qst / sqrt((double)qss * (double)qtt))
                      : (qst * r.inv_ns) * r.inv_nt;
  r.ps = 1.0f - c;
  r.pt = c - 1.0f;
  return r;
}

// u_j = Q̂_s,j − Q̂_t,j.
KD_HD float kd_at_u(float qs, float qt, const KdAtRow& r) { return qs * r.inv_ns - qt * r.inv_nt; }

// w·∂r/∂Q_s,j times 2/C_s: the factor of x_{c,j} in the student's gradient.
KD_HD float kd_at_coef_s(float qs, float qt, const KdAtRow& r, float w, int channels) {
  const float u = kd_at_u(qs, qt, r);
  const float gq = 2.0f * w * r.inv_ns * (u - r.ks * (qs * r.inv_ns) * r.ps);
  return gq * (2.0f / (float)channels);
}

// The teacher's: g = −2u.
KD_HD float kd_at_coef_t(float qs, float qt, const KdAtRow& r, float w, int channels) {
  const float u = kd_at_u(qs, qt, r);
  const float gq = -2.0f * w * r.inv_nt * (u - r.kt * (qt * r.inv_nt) * r.pt);
  return gq * (2.0f / (float)channels);
}
