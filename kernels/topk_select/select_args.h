// select_args.h — the launch contract of the top-k selection kernels
// (select.cu): kd_select_<in>(KdSelectArgs), passed by value.
//
// Written once here; src/topk_select/params.rs mirrors it as a #[repr(C)]
// struct (the CUDA launcher passes it, the emulator takes it by pointer) and
// a test holds the mirror to this layout (kd_select_host_layout in
// select_host.cpp). Pointers are device pointers on the GPU, host pointers
// under emulation; null where absent.
#pragma once

// The largest k (the winners of a row are sorted in shared memory); the
// same as src/topk_select/mod.rs MAX_K.
#define KD_SEL_MAX_K 4096

struct KdSelectArgs {
  const void* logits;            // n_rows rows of `cols` elements, `stride` apart
  int* indices;                  // [n_rows, k] int32, row-major
  float* values;                 // [n_rows, k] fp32
  float* lse;                    // [n_rows], or null: no log-sum-exp
  unsigned long long* bad_row;   // min'ed with every row holding a NaN
                                 // (the caller sets it to ~0 first)
  long long n_rows;              // N
  long long stride;              // row stride of the logits (elements)
  int cols;                      // V
  int k;                         // 1 ≤ k ≤ min(V, KD_SEL_MAX_K)
};
