// feature_host.cpp — the feature losses' row arithmetic (feature_math.cuh)
// compiled for the CPU: the fast CPU backend calls kd_feat_host_row once per
// row (rayon over rows on the Rust side). As in kd_host.cpp, a row is split
// over KD_FEAT_LANES virtual lanes (position j to lane j % lanes, like the
// kernel's threads), each with its Kahan sums, merged as a tree: the kernel's
// algorithm and fp32 arithmetic, another parallel decomposition.
#include <cstddef>
#include <vector>

#include "feature/feature_args.h"

#define KD_FEAT_LANES 256

namespace {

// Tree merge of the lanes' sums into lane 0.
void merge(float* x) {
  for (int off = KD_FEAT_LANES / 2; off > 0; off >>= 1)
    for (int l = 0; l < off; ++l) x[l] += x[l + off];
}

template <typename T>
float mse_row(const T* s, const T* t, float* gs, float* gt, const KdFeatParams& P) {
  KdKahan acc[KD_FEAT_LANES];
  for (auto& a : acc) a = kd_kahan_init();
  for (int j = 0; j < P.cols; ++j) {
    const float d = kd_to_f32(s[j]) - kd_to_f32(t[j]);
    kd_kahan_add(acc[j % KD_FEAT_LANES], d * d);
    const float g = kd_mse_grad(d, P.w);
    if (gs) gs[j] = g;
    if (gt) gt[j] = -g;
  }
  float sums[KD_FEAT_LANES];
  for (int l = 0; l < KD_FEAT_LANES; ++l) sums[l] = acc[l].sum;
  merge(sums);
  return sums[0];
}

template <typename T>
float cos_row(const T* s, const T* t, float* gs, float* gt, const KdFeatParams& P) {
  KdKahan ss[KD_FEAT_LANES], tt[KD_FEAT_LANES], st[KD_FEAT_LANES];
  for (int l = 0; l < KD_FEAT_LANES; ++l) ss[l] = tt[l] = st[l] = kd_kahan_init();
  for (int j = 0; j < P.cols; ++j) {
    const float sv = kd_to_f32(s[j]), tv = kd_to_f32(t[j]);
    const int l = j % KD_FEAT_LANES;
    kd_kahan_add(ss[l], sv * sv);
    kd_kahan_add(tt[l], tv * tv);
    kd_kahan_add(st[l], sv * tv);
  }
  float a[KD_FEAT_LANES], b[KD_FEAT_LANES], c[KD_FEAT_LANES];
  for (int l = 0; l < KD_FEAT_LANES; ++l) {
    a[l] = ss[l].sum;
    b[l] = tt[l].sum;
    c[l] = st[l].sum;
  }
  merge(a);
  merge(b);
  merge(c);
  const KdCosRow r = kd_cos_row(a[0], b[0], c[0], P.eps);
  KdKahan d2[KD_FEAT_LANES];
  for (auto& d : d2) d = kd_kahan_init();
  for (int j = 0; j < P.cols; ++j) {
    const float sv = kd_to_f32(s[j]), tv = kd_to_f32(t[j]);
    kd_kahan_add(d2[j % KD_FEAT_LANES], kd_cos_diff2(sv, tv, r));
    if (gs) gs[j] = kd_cos_grad_s(sv, tv, r, P.w);
    if (gt) gt[j] = kd_cos_grad_t(sv, tv, r, P.w);
  }
  for (int l = 0; l < KD_FEAT_LANES; ++l) a[l] = d2[l].sum;
  merge(a);
  return kd_cos_loss(r, a[0]);
}

template <typename T>
float at_row(const T* s, const T* t, float* gs, float* gt, const KdFeatParams& P) {
  const int S = P.cols, cs = P.s_channels, ct = P.t_channels;
  std::vector<float> q(2 * (size_t)S);
  float* qs = q.data();
  float* qt = qs + S;
  KdKahan k1[KD_FEAT_LANES], k2[KD_FEAT_LANES], k3[KD_FEAT_LANES];
  for (int l = 0; l < KD_FEAT_LANES; ++l) k1[l] = k2[l] = k3[l] = kd_kahan_init();
  for (int j = 0; j < S; ++j) {
    qs[j] = kd_at_q(s, cs, S, j);
    qt[j] = kd_at_q(t, ct, S, j);
    const int l = j % KD_FEAT_LANES;
    kd_kahan_add(k1[l], qs[j] * qs[j]);
    kd_kahan_add(k2[l], qt[j] * qt[j]);
    kd_kahan_add(k3[l], qs[j] * qt[j]);
  }
  float a[KD_FEAT_LANES], b[KD_FEAT_LANES], c[KD_FEAT_LANES];
  for (int l = 0; l < KD_FEAT_LANES; ++l) {
    a[l] = k1[l].sum;
    b[l] = k2[l].sum;
    c[l] = k3[l].sum;
  }
  merge(a);
  merge(b);
  merge(c);
  const KdAtRow r = kd_at_row(a[0], b[0], c[0], P.eps);
  for (auto& k : k1) k = kd_kahan_init();
  for (int j = 0; j < S; ++j) {
    const float u = kd_at_u(qs[j], qt[j], r);
    kd_kahan_add(k1[j % KD_FEAT_LANES], u * u);
    if (gs) {
      const float k = kd_at_coef_s(qs[j], qt[j], r, P.w, cs);
      for (int ch = 0; ch < cs; ++ch) {
        const long long i = (long long)ch * S + j;
        gs[i] = k * kd_to_f32(s[i]);
      }
    }
    if (gt) {
      const float k = kd_at_coef_t(qs[j], qt[j], r, P.w, ct);
      for (int ch = 0; ch < ct; ++ch) {
        const long long i = (long long)ch * S + j;
        gt[i] = k * kd_to_f32(t[i]);
      }
    }
  }
  for (int l = 0; l < KD_FEAT_LANES; ++l) a[l] = k1[l].sum;
  merge(a);
  return a[0];
}

template <typename T>
float row(const void* s, const void* t, float* gs, float* gt, const KdFeatParams& P) {
  const T* sp = static_cast<const T*>(s);
  const T* tp = static_cast<const T*>(t);
  switch (P.kind) {
    case KD_FEAT_MSE: return mse_row(sp, tp, gs, gt, P);
    case KD_FEAT_COS: return cos_row(sp, tp, gs, gt, P);
    default: return at_row(sp, tp, gs, gt, P);
  }
}

}  // namespace

extern "C" {

// One row (sample) of kind P->kind: returns r_i and, for each non-null
// gradient pointer, writes that row's w·∂r/∂x as f32 (student: C_s·S or H
// values, teacher: C_t·S or H). dtype: 0 f32, 1 bf16, 2 f16.
float kd_feat_host_row(int dtype, const void* s, const void* t, float* gs, float* gt,
                       const KdFeatParams* P) {
  switch (dtype) {
    case 0: return row<float>(s, t, gs, gt, *P);
    case 1: return row<kd_bf16>(s, t, gs, gt, *P);
    default: return row<kd_f16>(s, t, gs, gt, *P);
  }
}

// sizeof(KdFeatParams) and the offsets of n_rows, cols, kind, w and eps, so
// that a test can hold the Rust mirror (src/feature/params.rs) to the C layout.
void kd_feat_host_params_layout(long long* out) {
  out[0] = (long long)sizeof(KdFeatParams);
  out[1] = (long long)offsetof(KdFeatParams, n_rows);
  out[2] = (long long)offsetof(KdFeatParams, cols);
  out[3] = (long long)offsetof(KdFeatParams, kind);
  out[4] = (long long)offsetof(KdFeatParams, w);
  out[5] = (long long)offsetof(KdFeatParams, eps);
}

// sizeof(KdFeatArgs) and the offsets of its fields after the first (the
// launch contract, feature_args.h; src/feature/params.rs FeatureArgs).
void kd_feat_host_args_layout(long long* out) {
  out[0] = (long long)sizeof(KdFeatArgs);
  out[1] = (long long)offsetof(KdFeatArgs, teacher);
  out[2] = (long long)offsetof(KdFeatArgs, grad_student);
  out[3] = (long long)offsetof(KdFeatArgs, grad_teacher);
  out[4] = (long long)offsetof(KdFeatArgs, row_loss);
  out[5] = (long long)offsetof(KdFeatArgs, workspace);
  out[6] = (long long)offsetof(KdFeatArgs, params);
}

}  // extern "C"
