// bench_fill.cu — random inputs for `kdfuse bench`, made on the device (a
// host generator would spend minutes on the 4·10⁹-element configurations).
//
// Element i of a buffer gets σ·(ρ·z(shared_seed, i) + √(1−ρ²)·z(own_seed, i)),
// z ≈ N(0, 1) from a counter-based hash (splitmix64, four uniforms summed), so
// a teacher filled with the student's shared seed and ρ < 1 is correlated with
// it as real logits are; never zeros. One write of the buffer: in·N·V bytes.
// Takes its argument struct (app/app_args.h) by value.
#include "app/app_args.h"

__device__ __forceinline__ unsigned long long kd_splitmix64(unsigned long long x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// ≈ N(0, 1): the sum of four 16-bit uniforms, centred and scaled (Irwin–Hall).
__device__ __forceinline__ float kd_hash_normal(unsigned long long seed, unsigned long long i) {
  const unsigned long long h = kd_splitmix64(seed * 0x100000001b3ull ^ kd_splitmix64(i));
  const float u = (float)(h & 0xffff) + (float)((h >> 16) & 0xffff) + (float)((h >> 32) & 0xffff) +
                  (float)(h >> 48);
  return (u * (1.0f / 65536.0f) - 2.0f) * 1.7320508f;
}

template <typename T>
__device__ void kd_fill_body(T* out, long long count, unsigned long long shared_seed,
                             unsigned long long own_seed, float rho, float sigma) {
  const float own = sqrtf(fmaxf(1.0f - rho * rho, 0.0f));
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count;
       i += (long long)gridDim.x * blockDim.x) {
    float z = rho * kd_hash_normal(shared_seed, (unsigned long long)i);
    if (own > 0.0f) z += own * kd_hash_normal(own_seed, (unsigned long long)i);
    out[i] = kd_from_f32<T>(sigma * z);
  }
}

#define KD_FILL(NAME, T)                                                                      \
  extern "C" __global__ void __launch_bounds__(256) NAME(const KdFillArgs a) {               \
    kd_fill_body<T>(static_cast<T*>(a.out), a.count, a.shared_seed, a.own_seed, a.rho, a.sigma); \
  }
KD_FILL(kd_fill_normal_f32, float)
KD_FILL(kd_fill_normal_bf16, kd_bf16)
KD_FILL(kd_fill_normal_f16, kd_f16)
