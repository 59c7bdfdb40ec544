// common/dtype.cuh — what every kernel file and the CPU build share: the
// host/device function marker (KD_HD), the constants of the base-2 domain,
// and the storage types of the 16-bit formats with their conversions to and
// from fp32 (round to nearest even, NaN kept, overflow to ±inf), identical on
// the GPU and the CPU. No per-element cost beyond the conversions themselves.
#pragma once

#ifdef __CUDACC__
#include <cuda_fp16.h>
#define KD_HD __host__ __device__ __forceinline__
#else
#include <cmath>
#include <cstdint>
#include <cstring>
#define KD_HD inline
#endif

#include <stdint.h>

#define KD_LOG2E 1.4426950408889634f
#define KD_LN2 0.6931471805599453f
#define KD_NEG_INF (-__builtin_huge_valf())

// ---------------------------------------------------------------- dtypes --

// Storage types for the 16-bit formats: plain bits, so the header needs no
// CUDA headers on the host.
struct kd_bf16 { uint16_t bits; };
struct kd_f16 { uint16_t bits; };

KD_HD float kd_bits_to_f32(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

KD_HD uint32_t kd_f32_to_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

KD_HD bool kd_isinf(float x) { return x == -KD_NEG_INF || x == KD_NEG_INF; }

// A quiet NaN (the poison of a bad row).
KD_HD float kd_nan() { return kd_bits_to_f32(0x7fc00000u); }

KD_HD float kd_bf16_to_f32(uint16_t h) { return kd_bits_to_f32((uint32_t)h << 16); }

// Round to nearest, ties to even; NaN stays a (quiet) NaN.
KD_HD uint16_t kd_f32_to_bf16(float f) {
  uint32_t u = kd_f32_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x0040u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

KD_HD float kd_f16_to_f32(uint16_t h) {
#ifdef __CUDA_ARCH__
  return __half2float(__ushort_as_half(h));
#else
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    const float mag = (float)mant * 5.9604644775390625e-8f;  // mant · 2^-24, exact
    return sign ? -mag : mag;
  }
  if (exp == 31) return kd_bits_to_f32(sign | 0x7f800000u | (mant << 13));
  return kd_bits_to_f32(sign | ((exp + 112u) << 23) | (mant << 13));
#endif
}

// Round to nearest, ties to even, overflow to ±inf (as __float2half_rn).
KD_HD uint16_t kd_f32_to_f16(float f) {
#ifdef __CUDA_ARCH__
  return __half_as_ushort(__float2half_rn(f));
#else
  uint32_t u = kd_f32_to_bits(f);
  const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return sign | 0x7e00u;
  if (u >= 0x477ff000u) return sign | 0x7c00u;  // ≥ 65520 rounds to inf
  if (u < 0x38800000u) {                         // below 2^-14: subnormal or 0
    const float scaled = kd_bits_to_f32(u) * 16777216.0f;  // · 2^24, exact
    return sign | (uint16_t)std::nearbyint(scaled);
  }
  const uint32_t mant = u & 0x7fffffu;
  uint32_t h = (((u >> 23) - 112u) << 10) | (mant >> 13);
  const uint32_t rest = mant & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h += 1u;
  return sign | (uint16_t)h;
#endif
}

KD_HD float kd_to_f32(float x) { return x; }
KD_HD float kd_to_f32(kd_bf16 x) { return kd_bf16_to_f32(x.bits); }
KD_HD float kd_to_f32(kd_f16 x) { return kd_f16_to_f32(x.bits); }

template <typename T> KD_HD T kd_from_f32(float x);
template <> KD_HD float kd_from_f32<float>(float x) { return x; }
template <> KD_HD kd_bf16 kd_from_f32<kd_bf16>(float x) { return kd_bf16{kd_f32_to_bf16(x)}; }
template <> KD_HD kd_f16 kd_from_f32<kd_f16>(float x) { return kd_f16{kd_f32_to_f16(x)}; }
