// common/block.cuh — the parallel skeleton every kernel shares, device code
// only (and the CPU emulation of it, kernels/emu/cuda_emu.h):
// - kd_block_reduce: one block reduction for every per-row state (online
//   statistics, sums, a pass's whole state): a butterfly over the warp, one
//   state per warp in shared memory, a butterfly over the warps' states.
//   Every thread of the block must call it; every thread gets the total.
//   Per row, not per element: it costs no issue slot of the hot loops.
// - kd_sweep: a thread's share of two rows with 16-byte loads where the rows
//   share their alignment (the row sweep of the exact kernels), through
//   common/global.cuh's counted loads.
#pragma once

#include "common/dtype.cuh"
#include "common/global.cuh"

#if defined(__CUDACC__) || defined(KD_EMU)

// A float exchanged between lanes `off` apart (butterfly).
__device__ __forceinline__ float kd_shfl(float x, int off) {
  return __shfl_xor_sync(0xffffffffu, x, off);
}

// Reduces every thread's `v` over the block: shfl(v, off) exchanges a whole
// state between lanes, merge(a, b) folds b into a, `empty` is the identity
// (what a missing warp contributes); smem holds one T per warp.
template <typename T, typename Shfl, typename Merge>
__device__ __forceinline__ T kd_block_reduce(T v, T* smem, const T& empty, Shfl&& shfl,
                                             Merge&& merge) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) merge(v, shfl(v, off));
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < nwarps ? smem[lane] : empty;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) merge(v, shfl(v, off));
    if (lane == 0) smem[0] = v;
  }
  __syncthreads();
  const T total = smem[0];
  __syncthreads();  // smem is reused by the next reduction
  return total;
}

// Two sums at once; smem holds one float2 per warp.
__device__ __forceinline__ float2 kd_block_sum2(float2 v, float2* smem) {
  return kd_block_reduce(
      v, smem, make_float2(0.0f, 0.0f),
      [](float2 a, int off) { return make_float2(kd_shfl(a.x, off), kd_shfl(a.y, off)); },
      [](float2& a, float2 b) {
        a.x += b.x;
        a.y += b.y;
      });
}

// Calls f(j, s_j, t_j) for this thread's share of two rows of V elements
// (student and teacher logits, or feature rows), with 16-byte loads where
// the two rows share their alignment. No barrier: threads may call it alone.
template <typename T, typename F>
__device__ __forceinline__ void kd_sweep(const T* srow, const T* trow, int V, F&& f) {
  constexpr int VEC = 16 / sizeof(T);
  const int tid = threadIdx.x, nt = blockDim.x;
  const uintptr_t sa = reinterpret_cast<uintptr_t>(srow) & 15u;
  const uintptr_t ta = reinterpret_cast<uintptr_t>(trow) & 15u;
  if (sa != ta) {
    for (int j = tid; j < V; j += nt) f(j, kd_to_f32(kd_gld(srow + j)), kd_to_f32(kd_gld(trow + j)));
    return;
  }
  int head = (int)(((16u - sa) & 15u) / sizeof(T));
  if (head > V) head = V;
  for (int j = tid; j < head; j += nt) f(j, kd_to_f32(kd_gld(srow + j)), kd_to_f32(kd_gld(trow + j)));
  const int nvec = (V - head) / VEC;
  const uint4* sv = reinterpret_cast<const uint4*>(srow + head);
  const uint4* tv = reinterpret_cast<const uint4*>(trow + head);
  for (int c = tid; c < nvec; c += nt) {
    const uint4 a = kd_gld16(sv + c), b = kd_gld16(tv + c);
    const T* ae = reinterpret_cast<const T*>(&a);
    const T* be = reinterpret_cast<const T*>(&b);
    const int j0 = head + c * VEC;
#pragma unroll
    for (int e = 0; e < VEC; ++e) f(j0 + e, kd_to_f32(ae[e]), kd_to_f32(be[e]));
  }
  for (int j = head + nvec * VEC + tid; j < V; j += nt)
    f(j, kd_to_f32(kd_gld(srow + j)), kd_to_f32(kd_gld(trow + j)));
}

#endif  // __CUDACC__ || KD_EMU
