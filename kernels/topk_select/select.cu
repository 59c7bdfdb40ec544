// select.cu — per-row top-k selection: kd_select_{f32,bf16,f16}(KdSelectArgs).
// The k largest elements of each row (value descending, ties by the lower
// column), their columns, and optionally the row's log-sum-exp; a row
// holding a NaN is reported through bad_row (docs/DESIGN.md §9).
//
// Algorithm: one CTA per row (grid-stride over rows), any multiple of 32
// threads up to KD_SEL_THREADS.
// 1. Pass 0 reads the row once: the order-preserving uint32 key of every
//    element (fp32 bits, all bits flipped for negatives, the sign bit set
//    for positives; −0 taken as +0), a 256-bin histogram of its top byte in
//    shared memory, the NaN flag, and the online (max, Σ exp(x − max)) of
//    the log-sum-exp, merged over the block at the end.
// 2. Radix select: from the top bucket down, the bucket holding the k-th
//    largest key; passes 1–3 re-read the row and histogram the next byte of
//    the keys in that bucket, until the 32-bit threshold key T is known or
//    the whole bucket is taken (early exit).
// 3. Compaction re-reads the row in tiles of blockDim elements, in column
//    order: keys above the bucket are all winners; of the keys in it, the
//    first `need` by column (a block scan over the tile gives each its rank)
//    — so ties go to the lower column. It stops once all k are found.
// 4. The k winners, as 64-bit (key, ~column) pairs, are sorted descending
//    by a bitonic sort in shared memory; the values are re-read from the row
//    by column (exact: the input element widened), the columns written.
//
// Cost: bytes per element 2–5 reads of the element (pass 0 from DRAM;
// passes 1–3 and the compaction mostly from L2), i.e. 8–20 B/element for
// f32 (a model). Issue slots per element, from the sm_90 SASS
// (scripts/sass-report lists this kernel apart): pass 0 ≈ 60 (2 MUFU),
// each refinement pass ≈ 30, the compaction ≈ 270–310 (its per-tile block
// scan), so ≈ 330–460 in all with 0–3 refinements: predicted issue-bound,
// a few percent of copy bandwidth (not measured). Per row: the bitonic sort
// of next_pow2(k) pairs (k log² k / 2 compare-exchanges) and 4 bucket scans.
// Shared memory: 32 KB of winners + 1 KB of histogram (static). ptxas
// (CUDA 13.0, -O3): 32–40 registers, no stack frame, no spills, 34000 B
// of shared memory on sm_80 and sm_90.
// Known risk, unmeasured: pass 0's shared atomics meet in few bins (logits
// share their top byte: sign and high exponent bits), and same-address
// atomics serialise. Warp-aggregated increments (ballot, shuffle, one
// atomic per distinct bin) were tried: on sm_90 they spilled 16 bytes and
// doubled the emulated tests' time, so they wait for a GPU to time them.
#pragma once

#include "common/block.cuh"
#include "common/dtype.cuh"
#include "topk_select/select_args.h"

// Threads per block of the launcher (src/topk_select/params.rs threads()).
#define KD_SEL_THREADS 512

// The order-preserving key of a non-NaN fp32 value: a > b ⇔ key(a) > key(b),
// −0 and +0 equal.
KD_HD uint32_t kd_sel_key(float v) {
  uint32_t u = kd_f32_to_bits(v);
  if (u == 0x80000000u) u = 0;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

#if defined(__CUDACC__) || defined(KD_EMU)

// Online log-sum-exp state: max m and Σ exp(x − m).
struct KdSelLse {
  float m, s;
};

__device__ __forceinline__ void kd_sel_lse_merge(KdSelLse& a, KdSelLse b) {
  const float m = fmaxf(a.m, b.m);
  // An empty side (m = −inf) adds nothing; with m = +inf s is not used.
  const float sa = a.m > KD_NEG_INF ? a.s * expf(a.m - m) : 0.0f;
  const float sb = b.m > KD_NEG_INF ? b.s * expf(b.m - m) : 0.0f;
  a.m = m;
  a.s = sa + sb;
}

// Thread 0: the bucket of `hist` holding the need-th largest key of the
// current prefix; narrows the prefix by 8 bits. Every thread then reads
// the new state from shared memory (after a barrier).
__device__ __forceinline__ void kd_sel_pick(const uint32_t* hist, uint32_t* st) {
  // st[0] prefix, st[1] need, st[2] done (the whole bucket is taken).
  uint32_t need = st[1], above = 0;
  int b = 255;
  for (; b > 0; --b) {
    if (above + hist[b] >= need) break;
    above += hist[b];
  }
  st[0] = (st[0] << 8) | (uint32_t)b;
  st[1] = need - above;
  st[2] = hist[b] == need - above;
}

template <typename T>
__device__ void kd_select_body(const KdSelectArgs& a) {
  __shared__ unsigned long long win[KD_SEL_MAX_K];
  __shared__ uint32_t hist[256];
  __shared__ uint32_t st[4];  // prefix, need, done, NaN seen
  __shared__ uint32_t wtot[KD_SEL_THREADS / 32];
  __shared__ KdSelLse red[KD_SEL_THREADS / 32];
  const int V = a.cols, K = a.k;
  const int tid = threadIdx.x, nt = blockDim.x;
  const int lane = tid & 31, warp = tid >> 5, nwarps = nt >> 5;

  for (long long row = blockIdx.x; row < a.n_rows; row += gridDim.x) {
    const T* x = (const T*)a.logits + row * a.stride;
    for (int i = tid; i < 256; i += nt) hist[i] = 0;
    if (tid == 0) {
      st[0] = 0;
      st[1] = (uint32_t)K;
      st[2] = 0;
      st[3] = 0;
    }
    __syncthreads();

    // Pass 0: top-byte histogram, NaN, log-sum-exp.
    KdSelLse l{KD_NEG_INF, 0.0f};
    bool nan = false;
    for (int i = tid; i < V; i += nt) {
      const float v = kd_to_f32(x[i]);
      if (v != v) {
        nan = true;
        continue;
      }
      if (v > l.m) {
        l.s = l.s * expf(l.m - v) + 1.0f;
        l.m = v;
      } else if (v > KD_NEG_INF) {
        l.s += expf(v - l.m);
      }
      atomicAdd(&hist[kd_sel_key(v) >> 24], 1u);
    }
    if (nan) atomicOr(&st[3], 1u);
    if (a.lse) {
      l = kd_block_reduce(
          l, red, KdSelLse{KD_NEG_INF, 0.0f},
          [](KdSelLse s, int off) { return KdSelLse{kd_shfl(s.m, off), kd_shfl(s.s, off)}; },
          [](KdSelLse& p, KdSelLse q) { kd_sel_lse_merge(p, q); });
    } else {
      __syncthreads();
    }
    if (st[3]) {
      if (tid == 0) atomicMin(a.bad_row, (unsigned long long)row);
      __syncthreads();  // st is reset by the next row
      continue;
    }

    // Radix select, a byte at a time.
    int depth = 8;
    for (;;) {
      if (tid == 0) kd_sel_pick(hist, st);
      __syncthreads();
      const uint32_t prefix = st[0], done = st[2];
      if (done || depth == 32) break;
      for (int i = tid; i < 256; i += nt) hist[i] = 0;
      __syncthreads();
      const int shift = 32 - depth;
      for (int i = tid; i < V; i += nt) {
        const uint32_t key = kd_sel_key(kd_to_f32(x[i]));
        if ((key >> shift) == prefix) atomicAdd(&hist[(key >> (shift - 8)) & 255u], 1u);
      }
      depth += 8;
      __syncthreads();
    }
    const uint32_t prefix = st[0], need = st[1];
    const uint32_t n_above = (uint32_t)K - need;
    const int shift = 32 - depth;

    // Compaction in column order. Each element's flag packs "above the
    // bucket" in the high half and "in the bucket" in the low half (a tile
    // has at most 1024 elements), so one scan ranks both.
    uint32_t got_above = 0, got_in = 0;
    for (int t0 = 0; t0 < V; t0 += nt) {
      const int i = t0 + tid;
      uint32_t flag = 0, key = 0;
      if (i < V) {
        key = kd_sel_key(kd_to_f32(x[i]));
        const uint32_t hi = key >> shift;
        flag = hi > prefix ? (1u << 16) : hi == prefix ? 1u : 0u;
      }
      // Exclusive scan over the warp (butterfly), then over the warps.
      uint32_t pre = 0, tot = flag;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const uint32_t o = __shfl_xor_sync(0xffffffffu, tot, off);
        if (lane & off) pre += o;
        tot += o;
      }
      if (lane == 0) wtot[warp] = tot;
      __syncthreads();
      uint32_t all = 0;
      for (int w = 0; w < nwarps; ++w) {
        if (w == warp) pre += all;
        all += wtot[w];
      }
      const unsigned long long pair =
          ((unsigned long long)key << 32) | (unsigned long long)(0xffffffffu - (uint32_t)i);
      if (flag >> 16) {
        win[got_above + (pre >> 16)] = pair;
      } else if (flag) {
        const uint32_t r = got_in + (pre & 0xffffu);
        if (r < need) win[n_above + r] = pair;
      }
      got_above += all >> 16;
      got_in += all & 0xffffu;
      __syncthreads();  // wtot is rewritten by the next tile
      if (got_above >= n_above && got_in >= need) break;
    }

    // Bitonic sort of the winners, descending; the padding (0) sorts last.
    int P = 1;
    while (P < K) P <<= 1;
    for (int j = K + tid; j < P; j += nt) win[j] = 0;
    __syncthreads();
    for (int size = 2; size <= P; size <<= 1) {
      for (int half = size >> 1; half > 0; half >>= 1) {
        for (int t = tid; t < (P >> 1); t += nt) {
          const int lo = 2 * t - (t & (half - 1));
          const int hi = lo + half;
          const unsigned long long p = win[lo], q = win[hi];
          const bool desc = (lo & size) == 0;
          if (desc ? p < q : p > q) {
            win[lo] = q;
            win[hi] = p;
          }
        }
        __syncthreads();
      }
    }
    for (int j = tid; j < K; j += nt) {
      const int c = (int)(0xffffffffu - (uint32_t)win[j]);
      a.indices[row * K + j] = c;
      a.values[row * K + j] = kd_to_f32(x[c]);
    }
    if (a.lse && tid == 0) a.lse[row] = kd_isinf(l.m) ? l.m : l.m + logf(l.s);
    __syncthreads();  // win, hist and st are reused by the next row
  }
}

#endif  // __CUDACC__ || KD_EMU

#ifdef __CUDACC__
#define KD_SEL_KERNEL(IN, TIN)                                                     \
  extern "C" __global__ void __launch_bounds__(KD_SEL_THREADS)                     \
      kd_select_##IN(const KdSelectArgs a) {                                       \
    kd_select_body<TIN>(a);                                                        \
  }
KD_SEL_KERNEL(f32, float)
KD_SEL_KERNEL(bf16, kd_bf16)
KD_SEL_KERNEL(f16, kd_f16)
#undef KD_SEL_KERNEL
#endif
