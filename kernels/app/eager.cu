// eager.cu — the eager baseline for `kdfuse bench`: the same loss and gradient
// as kd_fused.cu, computed the way a framework without fusion does it, one
// simple kernel per operation with fp32 intermediates of N·V each.
//
// Forward:   ls = log_softmax(s/τ), lt = log_softmax(t/τ)      (row kernels)
//            [JSD: lm = log(β·e^lt + (1−β)·e^ls)]                (elementwise)
//            e  = the divergence's elementwise terms            (elementwise)
//            row losses = c·Σ_j e (+ α·(−ls¹_y), ls¹ = log_softmax(s) when α > 0),
//            then kd_reduce_loss                                (row kernel)
// Backward:  g  = ∂D/∂ls elementwise (autograd's formula)       (elementwise)
//            ∂L/∂s = w·c·(g − e^ls·Σg)/τ, the log_softmax backward (row kernel)
//            [α > 0: ∂L/∂s += w·α·(e^ls¹ − onehot(y))]          (elementwise)
// It is kinder to eager than PyTorch is: the temperature is folded into
// log_softmax, the divergence's terms are one kernel, not sub/exp/mul/sum.
// Bytes per element (in = input size, out = gradient size; no L2 re-use),
// forward-KL with the gradient, α = 0: log_softmax 2·(2·in + 4), terms 8 + 4,
// row sum 4, backward terms 4 + 4, log_softmax backward 4 + 4 + 4 + out:
// 4·in + out + 44 (54 B in bf16, 64 in f32, against 6 and 12 fused).
// Reverse KL and TVD read ls too in the backward terms (+4); JSD adds lm (8 + 4
// to make, +4 in the terms, +4 in the backward). Soft CE moves forward KL's. cli/src/bench/model.rs has the table.
// Every kernel takes its argument struct (app/app_args.h) by value.
#include "app/app_args.h"

#define KD_EAGER_THREADS 256

// ----------------------------------------------------------- row kernels --

// out[r, j] = x[r, j]·inv_tau − logsumexp(x[r, :]·inv_tau): an online
// (max, Σ) pass, then a write pass.
template <typename T>
__device__ void kd_eager_log_softmax_body(const T* x, long long stride, float* out, long long n,
                                          int V, float inv_tau) {
  __shared__ KdStat red[KD_EAGER_THREADS / 32];
  const float scale2 = inv_tau * KD_LOG2E;
  for (long long row = blockIdx.x; row < n; row += gridDim.x) {
    const T* xr = x + row * stride;
    float* orow = out + row * (long long)V;
    KdStat st = kd_stat_init();
    for (int j = threadIdx.x; j < V; j += blockDim.x) kd_stat_push(st, kd_to_f32(xr[j]) * scale2);
    st = kd_block_stat(st, red);
    const float lse = (st.m + kd_stat_l(st)) * KD_LN2;
    for (int j = threadIdx.x; j < V; j += blockDim.x) orow[j] = kd_to_f32(xr[j]) * inv_tau - lse;
  }
}

#define KD_EAGER_LSM(NAME, T)                                                                \
  extern "C" __global__ void __launch_bounds__(KD_EAGER_THREADS) NAME(const KdEagerLsmArgs a) { \
    kd_eager_log_softmax_body<T>(static_cast<const T*>(a.x), a.stride, a.out, a.n, a.vocab,      \
                                 a.inv_tau);                                                     \
  }
KD_EAGER_LSM(kd_eager_log_softmax_f32, float)
KD_EAGER_LSM(kd_eager_log_softmax_bf16, kd_bf16)
KD_EAGER_LSM(kd_eager_log_softmax_f16, kd_f16)

// Whether row `row` counts (its label is not ignore_index).
__device__ __forceinline__ bool kd_eager_counts(const long long* labels, long long row,
                                                const KdParams& P) {
  return !labels || labels[row] != P.ignore_index;
}

// row_loss[r] = soft_coef·Σ_j e[r, j] + α·(−ls1[r, y_r]); 0 for ignored rows.
extern "C" __global__ void __launch_bounds__(KD_EAGER_THREADS)
    kd_eager_row_loss(const KdEagerRowLossArgs a) {
  const float *e = a.e, *ls1 = a.ls1;
  const long long* labels = a.labels;
  const long long n = a.n;
  const KdParams& P = a.params;
  float* row_loss = a.row_loss;
  __shared__ float2 red[KD_EAGER_THREADS / 32];
  const int V = P.vocab;
  for (long long row = blockIdx.x; row < n; row += gridDim.x) {
    const float* er = e + row * (long long)V;
    float acc = 0.0f;
    for (int j = threadIdx.x; j < V; j += blockDim.x) acc += er[j];
    const float total = kd_block_sum2(make_float2(acc, 0.0f), red).x;
    if (threadIdx.x == 0) {
      float loss = 0.0f;
      if (kd_eager_counts(labels, row, P)) {
        if (P.soft_coef > 0.0f) loss += P.soft_coef * total;
        if (P.alpha > 0.0f) loss -= P.alpha * ls1[row * (long long)V + labels[row]];
      }
      row_loss[row] = loss;
    }
  }
}

// The log_softmax backward, scaled: grad[r, j] = w·c·(g_j − e^{ls_j}·Σg)/τ
// (0 for ignored rows), written in the gradient's dtype.
template <typename Tout>
__device__ void kd_eager_lsm_back_body(const float* g, const float* ls, const long long* labels,
                                       const int* valid_count, long long n, KdParams P, Tout* grad,
                                       long long g_stride) {
  __shared__ float2 red[KD_EAGER_THREADS / 32];
  const int V = P.vocab;
  const long long valid = valid_count ? (long long)*valid_count : n;
  const float w = kd_row_weight(P, valid) * P.soft_coef * P.inv_tau;
  for (long long row = blockIdx.x; row < n; row += gridDim.x) {
    const float* gr = g + row * (long long)V;
    const float* lr = ls + row * (long long)V;
    Tout* out = grad + row * g_stride;
    const float wr = kd_eager_counts(labels, row, P) ? w : 0.0f;
    float acc = 0.0f;
    for (int j = threadIdx.x; j < V; j += blockDim.x) acc += gr[j];
    const float sum = kd_block_sum2(make_float2(acc, 0.0f), red).x;
    for (int j = threadIdx.x; j < V; j += blockDim.x)
      out[j] = kd_from_f32<Tout>(wr == 0.0f ? 0.0f : wr * (gr[j] - expf(lr[j]) * sum));
  }
}

#define KD_EAGER_BACK(NAME, TOUT)                                                            \
  extern "C" __global__ void __launch_bounds__(KD_EAGER_THREADS) NAME(const KdEagerBackArgs a) { \
    kd_eager_lsm_back_body<TOUT>(a.g, a.ls, a.labels, a.valid_count, a.n, a.params,              \
                                 static_cast<TOUT*>(a.grad), a.grad_stride);                     \
  }
KD_EAGER_BACK(kd_eager_lsm_back_f32, float)
KD_EAGER_BACK(kd_eager_lsm_back_bf16, kd_bf16)
KD_EAGER_BACK(kd_eager_lsm_back_f16, kd_f16)

// ---------------------------------------------------- elementwise kernels --
// Dense [N, V] fp32 buffers, grid-stride over the N·V elements.

#define KD_EAGER_FOR(i, count)                                                      \
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (count); \
       i += (long long)gridDim.x * blockDim.x)

// p·log(p/q) with 0·log 0 = 0 (xlogy), p = e^la.
__device__ __forceinline__ float kd_eager_xlogy(float la, float lb) {
  const float p = expf(la);
  return p == 0.0f ? 0.0f : p * (la - lb);
}

// Forward KL terms: p·(lt − ls).
extern "C" __global__ void __launch_bounds__(KD_EAGER_THREADS)
    kd_eager_fkl_terms(const KdEagerEwArgs a) {
  KD_EAGER_FOR(i, a.count) a.out[i] = kd_eager_xlogy(a.lt[i], a.ls[i]);
}

// Reverse KL terms: q·(ls − lt).
extern "C" __global__ void __launch_bounds__(KD_EAGER_THREADS)
    kd_eager_rkl_terms(const KdEagerEwArgs a) {
  KD_EAGER_FOR(i, a.count) a.out[i] = kd_eager_xlogy(a.ls[i], a.lt[i]);
}

// lm = log(β·p + (1−β)·q).
extern "C" __global__ void __launch_bounds__(KD_EAGER_THREADS)
    kd_eager_log_mix(const KdEagerEwArgs a) {
  KD_EAGER_FOR(i, a.count) {
    a.out[i] = logf(a.beta * expf(a.lt[i]) + (1.0f - a.beta) * expf(a.ls[i]));
  }
}

// JSD terms: β·p·(lt − lm) + (1−β)·q·(ls − lm).
extern "C" __global__ void __launch_bounds__(KD_EAGER_THREADS)
    kd_eager_jsd_terms(const KdEagerEwArgs a) {
  KD_EAGER_FOR(i, a.count) {
    a.out[i] = a.beta * kd_eager_xlogy(a.lt[i], a.lm[i]) +
               (1.0f - a.beta) * kd_eager_xlogy(a.ls[i], a.lm[i]);
  }
}

// Soft CE terms: −p·ls (0 where p = 0; +inf where p > 0 faces ls = −inf).
extern "C" __global__ void __launch_bounds__(KD_EAGER_THREADS)
    kd_eager_sce_terms(const KdEagerEwArgs a) {
  KD_EAGER_FOR(i, a.count) {
    const float p = expf(a.lt[i]);
    a.out[i] = p == 0.0f ? 0.0f : -p * a.ls[i];
  }
}

// TVD terms: ½|p − q|.
extern "C" __global__ void __launch_bounds__(KD_EAGER_THREADS)
    kd_eager_tvd_terms(const KdEagerEwArgs a) {
  KD_EAGER_FOR(i, a.count) a.out[i] = 0.5f * fabsf(expf(a.lt[i]) - expf(a.ls[i]));
}

// ∂TVD/∂ls = ½ sign(q − p)·q (sign 0 at a tie).
extern "C" __global__ void __launch_bounds__(KD_EAGER_THREADS)
    kd_eager_tvd_back(const KdEagerEwArgs a) {
  KD_EAGER_FOR(i, a.count) {
    const float q = expf(a.ls[i]), p = expf(a.lt[i]);
    a.out[i] = q > p ? 0.5f * q : (q < p ? -0.5f * q : 0.0f);
  }
}

// ∂KL(p‖q)/∂ls = −p (also soft CE's: the same gradient).
extern "C" __global__ void __launch_bounds__(KD_EAGER_THREADS)
    kd_eager_fkl_back(const KdEagerEwArgs a) {
  KD_EAGER_FOR(i, a.count) a.out[i] = -expf(a.lt[i]);
}

// ∂KL(q‖p)/∂ls = q·(ls − lt + 1).
extern "C" __global__ void __launch_bounds__(KD_EAGER_THREADS)
    kd_eager_rkl_back(const KdEagerEwArgs a) {
  KD_EAGER_FOR(i, a.count) {
    const float q = expf(a.ls[i]);
    a.out[i] = q == 0.0f ? 0.0f : q * (a.ls[i] - a.lt[i] + 1.0f);
  }
}

// ∂JSD/∂ls = (1−β)·q·(ls − lm) (the other terms cancel).
extern "C" __global__ void __launch_bounds__(KD_EAGER_THREADS)
    kd_eager_jsd_back(const KdEagerEwArgs a) {
  KD_EAGER_FOR(i, a.count) {
    const float q = expf(a.ls[i]);
    a.out[i] = q == 0.0f ? 0.0f : (1.0f - a.beta) * q * (a.ls[i] - a.lm[i]);
  }
}

// The hard-label term's backward, added to the gradient:
// grad[r, j] += w·α·(e^{ls1_j} − [j = y_r]).
template <typename Tout>
__device__ void kd_eager_ce_back_body(const float* ls1, const long long* labels,
                                      const int* valid_count, long long n, KdParams P, Tout* grad,
                                      long long g_stride) {
  const long long V = P.vocab;
  const long long valid = valid_count ? (long long)*valid_count : n;
  const float w = kd_row_weight(P, valid) * P.alpha;
  KD_EAGER_FOR(i, n * V) {
    const long long row = i / V, j = i - row * V;
    if (labels[row] == P.ignore_index) continue;
    Tout* out = grad + row * g_stride + j;
    const float ce = expf(ls1[i]) - (j == labels[row] ? 1.0f : 0.0f);
    *out = kd_from_f32<Tout>(kd_to_f32(*out) + w * ce);
  }
}

#define KD_EAGER_CE_BACK(NAME, TOUT)                                                         \
  extern "C" __global__ void __launch_bounds__(KD_EAGER_THREADS) NAME(const KdEagerBackArgs a) { \
    kd_eager_ce_back_body<TOUT>(a.ls, a.labels, a.valid_count, a.n, a.params,                    \
                                static_cast<TOUT*>(a.grad), a.grad_stride);                      \
  }
KD_EAGER_CE_BACK(kd_eager_ce_back_f32, float)
KD_EAGER_CE_BACK(kd_eager_ce_back_bf16, kd_bf16)
KD_EAGER_CE_BACK(kd_eager_ce_back_f16, kd_f16)
