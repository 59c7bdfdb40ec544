// common/cluster.cuh — what the single-read kernels (kernels/kd/kd_single.cu)
// use beyond one CTA, and its CPU emulation (kernels/emu/cuda_emu.h):
// - dynamic shared memory (kd_dyn_smem);
// - a thread-block cluster along x: its size and this CTA's rank, the cluster
//   barrier, and loads and stores of another CTA's shared memory
//   (distributed shared memory) through kd_dsmem_load / kd_dsmem_store, so
//   that the emulator can catch a remote access that no barrier orders;
// - kd_cluster_reduce: kd_block_reduce over every CTA of the cluster.
// Below sm_90 (no clusters) a cluster is one CTA: the kernels still build
// for every architecture and run there with a cluster of 1.
#pragma once

#include "common/block.cuh"

#if defined(__CUDACC__) && !defined(KD_EMU)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#include <cooperative_groups.h>
#define KD_HAS_CLUSTER 1
#endif
#endif

#if defined(__CUDACC__) || defined(KD_EMU)

#ifndef KD_EMU
__device__ __forceinline__ unsigned char* kd_dyn_smem() {
  extern __shared__ __align__(16) unsigned char kd_dyn_smem_bytes[];
  return kd_dyn_smem_bytes;
}

__device__ __forceinline__ unsigned kd_cluster_size() {
#ifdef KD_HAS_CLUSTER
  return cooperative_groups::this_cluster().num_blocks();
#else
  return 1u;
#endif
}

__device__ __forceinline__ unsigned kd_cluster_rank() {
#ifdef KD_HAS_CLUSTER
  return cooperative_groups::this_cluster().block_rank();
#else
  return 0u;
#endif
}

// Every thread of every CTA of the cluster; orders shared-memory accesses
// across the cluster (and within the CTA).
__device__ __forceinline__ void kd_cluster_sync() {
#ifdef KD_HAS_CLUSTER
  cooperative_groups::this_cluster().sync();
#else
  __syncthreads();
#endif
}

// `*p` in CTA `rank`'s shared memory (p: an address of this CTA's).
template <typename T>
__device__ __forceinline__ T kd_dsmem_load(T* p, unsigned rank) {
#ifdef KD_HAS_CLUSTER
  return *cooperative_groups::this_cluster().map_shared_rank(p, rank);
#else
  (void)rank;
  return *p;
#endif
}

// A store to this CTA's shared memory that other CTAs will read.
template <typename T>
__device__ __forceinline__ void kd_dsmem_store(T* p, const T& v) {
  *p = v;
}
#endif  // !KD_EMU

// Reduces every thread's `v` over the cluster (kd_block_reduce, then the
// CTAs' totals): every thread of every CTA gets the same total, merged in
// rank order. `smem`: one T per warp; `slots`: two T of this CTA's shared
// memory that the other CTAs read, used in turn (`*turn` counts the calls;
// with two slots one cluster barrier per call suffices: a slot is written
// again only after every CTA has passed the next call's barrier, so after
// its reads of the slot). Every thread of the cluster must call it.
template <typename T, typename Shfl, typename Merge>
__device__ __forceinline__ T kd_cluster_reduce(T v, T* smem, T* slots, unsigned* turn,
                                               const T& empty, Shfl&& shfl, Merge&& merge) {
  T total = kd_block_reduce(v, smem, empty, shfl, merge);
  const unsigned nc = kd_cluster_size();
  if (nc == 1) return total;
  T* slot = slots + (*turn & 1u);
  *turn += 1;
  if (threadIdx.x == 0) kd_dsmem_store(slot, total);
  kd_cluster_sync();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (warp == 0) {
    T u = (unsigned)lane < nc ? kd_dsmem_load(slot, (unsigned)lane) : empty;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) merge(u, shfl(u, off));
    if (lane == 0) smem[0] = u;
  }
  __syncthreads();
  total = smem[0];
  __syncthreads();
  return total;
}

#endif  // __CUDACC__ || KD_EMU
