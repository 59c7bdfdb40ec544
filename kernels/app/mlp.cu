// mlp.cu — the small kernels of a distillation step on an MLP
// (src/distill/cuda.rs); the GEMMs are cuBLAS and the loss is kd_fused.cu.
//
//   mlp_bias_act   z ← act(z + b[col]): ReLU on hidden layers, then inverted
//                  dropout (kept when lowbias32(key ^ i·φ) ≥ threshold, scaled
//                  by 1/(1 − rate)); the mask is a pure function of (key, i),
//                  so the CPU (src/distill/dropout.rs) draws the same one.
//                  Bytes per element: 8 (read z, write z; b stays in L1).
//   mlp_relu_back  dz = h > 0 ? dh·scale : 0 — ReLU and dropout backward from
//                  the layer's stored output h (h > 0 exactly where the unit
//                  was active and kept). 12 B/element.
//   mlp_bias_grad  db[c] = Σ_r dz[r, c], one thread per column, rows summed in
//                  order (deterministic; the CPU sums in the same order).
//                  4 B/element, coalesced across the columns of a row.
//   mlp_sgd        v ← μv + (g + λp), p ← p − lr·v.              16 B/element.
//   mlp_adam       m, v moments, bias-corrected step, decoupled decay. 24 B.
// All are grid-stride loops over 64-bit indices, one launch per call, each
// taking its argument struct (app/app_args.h) by value. Each f32 step
// matches src/distill/{ops.rs,optim.rs}; results agree with the CPU up to FMA
// contraction (nvcc contracts, rustc does not).
#include "app/app_args.h"

#define MLP_THREADS 256

__device__ __forceinline__ unsigned mlp_mix32(unsigned x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

#define MLP_GRID_STRIDE(i, n)                                                   \
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
       i += (long long)gridDim.x * blockDim.x)

extern "C" __global__ void __launch_bounds__(MLP_THREADS)
    mlp_bias_act(const MlpBiasActArgs a) {
  const long long n = a.rows * a.cols;
  MLP_GRID_STRIDE(i, n) {
    float v = a.z[i] + a.b[i % a.cols];
    if (a.relu) v = fmaxf(v, 0.0f);
    if (a.dropout)
      v = mlp_mix32(a.key ^ ((unsigned)i * 0x9e3779b9u)) >= a.threshold ? v * a.scale : 0.0f;
    a.z[i] = v;
  }
}

extern "C" __global__ void __launch_bounds__(MLP_THREADS)
    mlp_relu_back(const MlpReluBackArgs a) {
  MLP_GRID_STRIDE(i, a.n) { a.dz[i] = a.h[i] > 0.0f ? a.dh[i] * a.scale : 0.0f; }
}

extern "C" __global__ void __launch_bounds__(MLP_THREADS)
    mlp_bias_grad(const MlpBiasGradArgs a) {
  MLP_GRID_STRIDE(c, (long long)a.cols) {
    float s = 0.0f;
    for (long long r = 0; r < a.rows; ++r) s += a.dz[r * a.cols + c];
    a.db[c] = s;
  }
}

extern "C" __global__ void __launch_bounds__(MLP_THREADS)
    mlp_sgd(const MlpSgdArgs a) {
  MLP_GRID_STRIDE(i, a.n) {
    const float gi = a.g[i] + a.wd * a.p[i];
    const float vi = a.mu * a.v[i] + gi;
    a.v[i] = vi;
    a.p[i] -= a.lr * vi;
  }
}

extern "C" __global__ void __launch_bounds__(MLP_THREADS)
    mlp_adam(const MlpAdamArgs a) {
  MLP_GRID_STRIDE(i, a.n) {
    const float gi = a.g[i];
    const float mi = a.beta1 * a.m[i] + (1.0f - a.beta1) * gi;
    const float vi = a.beta2 * a.v[i] + (1.0f - a.beta2) * (gi * gi);
    a.m[i] = mi;
    a.v[i] = vi;
    const float step = (mi * a.c1) / (sqrtf(vi * a.c2) + a.eps);
    a.p[i] -= a.lr * (step + a.wd * a.p[i]);
  }
}
