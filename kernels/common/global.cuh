// common/global.cuh — the loss kernels' loads and stores of logit and
// gradient rows in global memory. On the GPU plain accesses; under the CPU
// emulation (kernels/emu/cuda_emu.h) each also counts its bytes
// (kd_emu_count), which is how the tests hold every kernel to its byte model
// (docs/DESIGN.md §5): a row access that bypasses these helpers is not
// counted, so the kernels use nothing else for rows.
#pragma once

#include "common/dtype.cuh"

#if defined(__CUDACC__) || defined(KD_EMU)

#ifndef KD_EMU
#define kd_emu_count(p, bytes, store) ((void)0)
#endif

// One element.
template <typename T>
__device__ __forceinline__ T kd_gld(const T* p) {
  kd_emu_count(p, sizeof(T), false);
  return *p;
}
template <typename T>
__device__ __forceinline__ void kd_gst(T* p, T v) {
  kd_emu_count(p, sizeof(T), true);
  *p = v;
}

// 16 bytes from / to a 16-byte-aligned address.
__device__ __forceinline__ uint4 kd_gld16(const void* p) {
  kd_emu_count(p, 16, false);
  return *reinterpret_cast<const uint4*>(p);
}
__device__ __forceinline__ void kd_gst16(void* p, uint4 v) {
  kd_emu_count(p, 16, true);
  *reinterpret_cast<uint4*>(p) = v;
}

#endif  // __CUDACC__ || KD_EMU
