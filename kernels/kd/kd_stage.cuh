// kd_stage.cuh — where a loss kernel's passes read a row from, shared by the
// two-read kernels (v1: kd_fast.cu, kd_fused.cu) and the single-read ones
// (kd_single.cu):
// - KdSlice: the part of a row one CTA sweeps: scalar elements before the
//   16-byte-aligned 8-element chunks, a range of chunks, scalar elements
//   after. v1: the whole row. Single-read: a cluster of nc CTAs splits the
//   chunks (CTA 0 also takes the unaligned head, the last the tail); rows
//   that are not co-aligned split their elements instead.
// - KdRowIn<T, STAGED>: one input row of that slice. v1 (STAGED false)
//   loads global memory in every pass. Single-read: the first pass loads
//   global memory and keeps what it loaded in shared memory (the layout of
//   kd_single_layout.h); the later passes and the gradient read that copy.
// - KdScope<STAGED>: which rows a CTA takes and how the statistics of a row
//   are merged: over the CTA (v1), or over the cluster (kd_cluster_reduce).
#pragma once

#include "common/cluster.cuh"
#include "common/global.cuh"
#include "kd/kd_single_layout.h"

#if defined(__CUDACC__) || defined(KD_EMU)

__device__ __forceinline__ int kd_imin(int a, int b) { return a < b ? a : b; }

struct KdSlice {
  int a0, a1;  // scalar elements before the chunks
  int c0, c1;  // chunks: chunk c holds elements [head + 8c, head + 8c + 8)
  int b0, b1;  // scalar elements after the chunks
  int head;    // the first chunk's element
  int off;     // single-read: element j is at index j + off of the CTA's copy
  int lo, hi;  // the elements this CTA owns, [lo, hi)
};

// The slice of CTA `rank` of `nc` for a row of V elements whose first
// 16-byte-aligned element is `head` (`vec`: the rows of the call share their
// alignment, so chunks are used; otherwise every element is scalar).
__device__ __forceinline__ KdSlice kd_slice(int V, int head, bool vec, unsigned rank, unsigned nc) {
  KdSlice s;
  if (!vec) {
    const int per = (int)(((long long)V + nc - 1) / nc);
    s.a0 = kd_imin((int)rank * per, V);
    s.a1 = kd_imin(s.a0 + per, V);
    s.c0 = s.c1 = 0;
    s.b0 = s.b1 = V;
    s.head = V;
    s.off = -s.a0;
    s.lo = s.a0;
    s.hi = s.a1;
    return s;
  }
  const int nchunk = (V - head) / 8;
  const int per = (int)(((long long)nchunk + nc - 1) / nc);
  s.head = head;
  s.c0 = kd_imin((int)rank * per, nchunk);
  s.c1 = kd_imin(s.c0 + per, nchunk);
  const bool first = rank == 0, last = rank + 1 == nc;
  s.a0 = 0;
  s.a1 = first ? head : 0;
  s.b0 = last ? head + 8 * nchunk : V;
  s.b1 = V;
  s.off = 8 - head - 8 * s.c0;
  s.lo = first ? 0 : head + 8 * s.c0;
  s.hi = last ? V : head + 8 * s.c1;
  return s;
}

// 8 logits from raw 16-byte words (two for f32, one for 16-bit types).
__device__ __forceinline__ void kd_unpack8(const uint4 (&w)[2], float (&v)[8], float) {
  const unsigned u[8] = {w[0].x, w[0].y, w[0].z, w[0].w, w[1].x, w[1].y, w[1].z, w[1].w};
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = kd_bits_to_f32(u[i]);
}
__device__ __forceinline__ void kd_unpack8(const uint4 (&w)[2], float (&v)[8], kd_bf16) {
  const unsigned u[4] = {w[0].x, w[0].y, w[0].z, w[0].w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    v[2 * i] = kd_bits_to_f32(u[i] << 16);
    v[2 * i + 1] = kd_bits_to_f32(u[i] & 0xffff0000u);
  }
}
__device__ __forceinline__ void kd_unpack8(const uint4 (&w)[2], float (&v)[8], kd_f16) {
  const unsigned u[4] = {w[0].x, w[0].y, w[0].z, w[0].w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    v[2 * i] = kd_f16_to_f32((uint16_t)(u[i] & 0xffffu));
    v[2 * i + 1] = kd_f16_to_f32((uint16_t)(u[i] >> 16));
  }
}

template <typename T, bool STAGED>
struct KdRowIn {
  static constexpr int WORDS = sizeof(T) == 4 ? 2 : 1;  // 16-byte words per chunk
  const T* g;  // the row in global memory
  T* sm;       // single-read: this CTA's copy (index j + off)
  int off;

  // Element j as f32; the first pass keeps a copy.
  template <bool FIRST>
  __device__ __forceinline__ float ld1(int j) const {
    if constexpr (!STAGED) {
      return kd_to_f32(kd_gld(g + j));
    } else if constexpr (FIRST) {
      const T x = kd_gld(g + j);
      sm[j + off] = x;
      return kd_to_f32(x);
    } else {
      return kd_to_f32(sm[j + off]);
    }
  }

  // The 8 elements from j0 (16-byte aligned in global and shared memory).
  template <bool FIRST>
  __device__ __forceinline__ void ld8(int j0, float (&v)[8]) const {
    uint4 w[2];
    if constexpr (!STAGED || FIRST) {
#pragma unroll
      for (int i = 0; i < WORDS; ++i) w[i] = kd_gld16(reinterpret_cast<const uint4*>(g + j0) + i);
      if constexpr (STAGED) {
#pragma unroll
        for (int i = 0; i < WORDS; ++i) reinterpret_cast<uint4*>(sm + j0 + off)[i] = w[i];
      }
    } else {
#pragma unroll
      for (int i = 0; i < WORDS; ++i) w[i] = reinterpret_cast<const uint4*>(sm + j0 + off)[i];
    }
    kd_unpack8(w, v, T{});
  }

  // Element j of this CTA's slice, after the first pass (and a barrier).
  __device__ __forceinline__ float at(int j) const {
    if constexpr (STAGED)
      return kd_to_f32(sm[j + off]);
    else
      return kd_to_f32(kd_gld(g + j));
  }
};

// Calls f(j, s_j, t_j) for this CTA's share of the slice, 8-element chunks
// in between (the single-read kernels' sweep; v1's is kd_sweep).
template <bool FIRST, typename T, bool STAGED, typename F>
__device__ __forceinline__ void kd_slice_sweep(const KdSlice& sl, const KdRowIn<T, STAGED>& s,
                                               const KdRowIn<T, STAGED>& t, F&& f) {
  const int tid = threadIdx.x, nt = blockDim.x;
  for (int j = sl.a0 + tid; j < sl.a1; j += nt) f(j, s.template ld1<FIRST>(j), t.template ld1<FIRST>(j));
  for (int c = sl.c0 + tid; c < sl.c1; c += nt) {
    const int j0 = sl.head + 8 * c;
    float sv[8], tv[8];
    s.template ld8<FIRST>(j0, sv);
    t.template ld8<FIRST>(j0, tv);
#pragma unroll
    for (int e = 0; e < 8; ++e) f(j0 + e, sv[e], tv[e]);
  }
  for (int j = sl.b0 + tid; j < sl.b1; j += nt) f(j, s.template ld1<FIRST>(j), t.template ld1<FIRST>(j));
}

// Rows and merges: v1 (one CTA per row) or single-read (one cluster per row).
template <bool STAGED>
struct KdScope {
  unsigned rank, size;
  unsigned turn;  // kd_cluster_reduce's slot counter

  __device__ __forceinline__ static KdScope make() {
    if constexpr (STAGED)
      return KdScope{kd_cluster_rank(), kd_cluster_size(), 0u};
    else
      return KdScope{0u, 1u, 0u};
  }
  __device__ __forceinline__ long long first_row() const { return blockIdx.x / size; }
  __device__ __forceinline__ long long row_step() const { return gridDim.x / size; }

  // The row's total of every thread's `v` (see kd_cluster_reduce).
  template <typename T, typename Shfl, typename Merge>
  __device__ __forceinline__ T reduce(T v, T* smem, T* slots, const T& empty, Shfl&& shfl,
                                      Merge&& merge) {
    if constexpr (STAGED)
      return kd_cluster_reduce(v, smem, slots, &turn, empty, shfl, merge);
    else
      return kd_block_reduce(v, smem, empty, shfl, merge);
  }

  __device__ __forceinline__ float2 sum2(float2 v, float2* smem, float2* slots) {
    return reduce(
        v, smem, slots, make_float2(0.0f, 0.0f),
        [](float2 a, int off) { return make_float2(kd_shfl(a.x, off), kd_shfl(a.y, off)); },
        [](float2& a, float2 b) {
          a.x += b.x;
          a.y += b.y;
        });
  }

  // Before the kernel returns: no CTA leaves while another may still load
  // its shared memory.
  __device__ __forceinline__ void finish() const {
    if constexpr (STAGED)
      if (size > 1) kd_cluster_sync();
  }
};

// Reduction scratch of a loss kernel whose per-row state is S: one S and one
// float2 per warp, and (single-read) two exchange slots of each.
template <typename S>
struct KdScratch {
  S* red;
  float2* red2;
  S* xs;
  float2* x2;
};

// Single-read: the scratch at the start of the dynamic shared memory.
template <typename S, int THREADS>
__device__ __forceinline__ KdScratch<S> kd_scratch_dyn() {
  static_assert(THREADS / 32 * (sizeof(S) + sizeof(float2)) + 2 * (sizeof(S) + sizeof(float2)) <=
                    KD_SINGLE_SCRATCH,
                "the reduction scratch fits KD_SINGLE_SCRATCH");
  static_assert((THREADS / 32 + 2) * sizeof(S) % 8 == 0, "the float2 scratch is 8-byte aligned");
  unsigned char* p = kd_dyn_smem();
  KdScratch<S> s;
  s.red = reinterpret_cast<S*>(p);
  s.xs = s.red + THREADS / 32;
  s.red2 = reinterpret_cast<float2*>(s.xs + 2);
  s.x2 = s.red2 + THREADS / 32;
  return s;
}

// Single-read: this CTA's copies of the student and teacher slices.
template <typename T>
__device__ __forceinline__ T* kd_stage_buf(int side, long long cap) {
  return reinterpret_cast<T*>(kd_dyn_smem() + KD_SINGLE_SCRATCH) + side * cap;
}

#endif  // __CUDACC__ || KD_EMU
