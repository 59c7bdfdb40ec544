// kd_single_layout.h — the shared-memory layout of the single-read kernels
// (kd_single.cu), written once for the kernels and the host (the launcher
// sizes the dynamic shared memory with it, through kd_host.cpp's
// kd_single_smem_bytes).
//
// A cluster of `nc` CTAs holds one row: each CTA stages its slice of the
// student and teacher rows (in their input dtype) in its dynamic shared
// memory, after KD_SINGLE_SCRATCH bytes of reduction scratch:
//   [scratch | student slice: cap elements | teacher slice: cap elements]
// cap = 8·⌈⌈V/8⌉/nc⌉ + 16: a CTA's share of the row's 8-element chunks,
// plus room for the unaligned head (CTA 0) and tail (the last CTA).
// A top-k teacher (kd_topk.cu) stages the student only, and a bit map of
// the slice's support after it:
//   [scratch | student slice: cap elements | cap bits, in 32-bit words]
#pragma once

#include "common/dtype.cuh"

// Reduction scratch: one state per warp, two exchange slots, and the same
// for float2 sums (kd_single.cu checks that its states fit).
#define KD_SINGLE_SCRATCH 3072
// The most CTAs in a cluster (16: non-portable, sm_90 and later).
#define KD_SINGLE_MAX_CLUSTER 16

// Elements of one side's slice in each CTA.
KD_HD long long kd_single_cap(long long V, long long nc) {
  const long long chunks = (V + 7) / 8;
  return 8 * ((chunks + nc - 1) / nc) + 16;
}

// Dynamic shared memory of one CTA, bytes.
KD_HD long long kd_single_smem(long long V, long long in_size, long long nc) {
  return KD_SINGLE_SCRATCH + 2 * kd_single_cap(V, nc) * in_size;
}

// Dynamic shared memory of one single-read top-k CTA, bytes.
KD_HD long long kd_single_topk_smem(long long V, long long in_size, long long nc) {
  const long long cap = kd_single_cap(V, nc);
  return KD_SINGLE_SCRATCH + cap * in_size + 4 * ((cap + 31) / 32);
}
