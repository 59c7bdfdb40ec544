// mlp.cu — the small kernels of a distillation step on an MLP
// (src/distill/cuda.rs); the GEMMs are cuBLAS and the loss is kd_fused.cu.
//
//   mlp_bias_act   z ← act(z + b[col]): ReLU on hidden layers, then inverted
//                  dropout (kept when lowbias32(key ^ i·φ) ≥ threshold, scaled
//                  by 1/(1 − rate)); the mask is a pure function of (key, i),
//                  so the CPU (src/distill/mod.rs, Dropout) draws the same one.
//                  Bytes per element: 8 (read z, write z; b stays in L1).
//   mlp_relu_back  dz = h > 0 ? dh·scale : 0 — ReLU and dropout backward from
//                  the layer's stored output h (h > 0 exactly where the unit
//                  was active and kept). 12 B/element.
//   mlp_bias_grad  db[c] = Σ_r dz[r, c], one thread per column, rows summed in
//                  order (deterministic; the CPU sums in the same order).
//                  4 B/element, coalesced across the columns of a row.
//   mlp_sgd        v ← μv + (g + λp), p ← p − lr·v.              16 B/element.
//   mlp_adam       m, v moments, bias-corrected step, decoupled decay. 24 B.
// All are grid-stride loops over 64-bit indices, one launch per call. Each
// f32 step matches src/distill/{cpu.rs,optim.rs}; results agree with the CPU
// up to FMA contraction (nvcc contracts, rustc does not).

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
    mlp_bias_act(float* z, const float* b, long long rows, int cols, int relu, int dropout,
                 unsigned key, unsigned threshold, float scale) {
  const long long n = rows * cols;
  MLP_GRID_STRIDE(i, n) {
    float v = z[i] + b[i % cols];
    if (relu) v = fmaxf(v, 0.0f);
    if (dropout) v = mlp_mix32(key ^ ((unsigned)i * 0x9e3779b9u)) >= threshold ? v * scale : 0.0f;
    z[i] = v;
  }
}

extern "C" __global__ void __launch_bounds__(MLP_THREADS)
    mlp_relu_back(const float* dh, const float* h, float scale, float* dz, long long n) {
  MLP_GRID_STRIDE(i, n) { dz[i] = h[i] > 0.0f ? dh[i] * scale : 0.0f; }
}

extern "C" __global__ void __launch_bounds__(MLP_THREADS)
    mlp_bias_grad(const float* dz, long long rows, int cols, float* db) {
  MLP_GRID_STRIDE(c, (long long)cols) {
    float s = 0.0f;
    for (long long r = 0; r < rows; ++r) s += dz[r * cols + c];
    db[c] = s;
  }
}

extern "C" __global__ void __launch_bounds__(MLP_THREADS)
    mlp_sgd(float* p, const float* g, float* v, long long n, float lr, float mu, float wd) {
  MLP_GRID_STRIDE(i, n) {
    const float gi = g[i] + wd * p[i];
    const float vi = mu * v[i] + gi;
    v[i] = vi;
    p[i] -= lr * vi;
  }
}

extern "C" __global__ void __launch_bounds__(MLP_THREADS)
    mlp_adam(float* p, const float* g, float* m, float* v, long long n, float lr, float beta1,
             float beta2, float eps, float wd, float c1, float c2) {
  MLP_GRID_STRIDE(i, n) {
    const float gi = g[i];
    const float mi = beta1 * m[i] + (1.0f - beta1) * gi;
    const float vi = beta2 * v[i] + (1.0f - beta2) * (gi * gi);
    m[i] = mi;
    v[i] = vi;
    const float step = (mi * c1) / (sqrtf(vi * c2) + eps);
    p[i] -= lr * (step + wd * p[i]);
  }
}
