// app_args.h — the launch contracts of the apps' kernels (app/): one argument
// struct per kernel, passed by value, as kd/kd_args.h does for the loss.
//
// Written once here; src/cuda/args.rs mirrors each as a #[repr(C)] struct
// (the CUDA launchers pass them; the emulation bridges, kernels/emu/, hand
// them over by pointer) and a test holds the mirrors to this layout
// (kd_host_app_args_layout in kd/kd_host.cpp). Pointers are device pointers
// on the GPU, host pointers under emulation. No per-element cost: kernel
// parameters live in constant memory, as the separate arguments did.
#pragma once

#include "kd/kd_math.cuh"

// ------------------------------------------------------------ eager.cu --

// kd_eager_log_softmax_<in>: out[r, j] = x[r, j]·inv_tau − lse (N rows of V).
struct KdEagerLsmArgs {
  const void* x;     // N rows of V logits of the kernel's input dtype
  long long stride;  // elements between two rows of x
  float* out;        // N·V, dense
  long long n;
  int vocab;
  float inv_tau;
};

// The element-wise kernels over dense N·V fp32 buffers: the divergences'
// terms (out = e), the log-mixture (out = lm) and the backward terms
// (out = g). Each kernel reads the inputs its formula names.
struct KdEagerEwArgs {
  const float* ls;  // log_softmax(s/τ)
  const float* lt;  // log_softmax(t/τ)
  const float* lm;  // JSD's log-mixture, or null
  float* out;
  long long count;  // N·V
  float beta;       // JSD's β
};

// kd_eager_row_loss: row losses from the terms and the hard-label term.
struct KdEagerRowLossArgs {
  const float* e;           // N·V terms
  const float* ls1;         // log_softmax(s) (α > 0), or null
  const long long* labels;  // N labels, or null
  long long n;
  float* row_loss;          // N
  KdParams params;
};

// kd_eager_lsm_back_<out> (g = ∂D/∂ls, ls = log_softmax(s/τ)) and
// kd_eager_ce_back_<out> (ls = log_softmax(s), g unused): the backward rows,
// written into the gradient of the kernel's output dtype.
struct KdEagerBackArgs {
  const float* g;
  const float* ls;
  const long long* labels;
  const int* valid_count;  // rows whose label is not ignore_index, or null: N
  long long n;
  void* grad;
  long long grad_stride;
  KdParams params;
};

// -------------------------------------------------------- bench_fill.cu --

// kd_fill_normal_<dtype>: σ·(ρ·z(shared_seed, i) + √(1−ρ²)·z(own_seed, i)).
struct KdFillArgs {
  void* out;  // count elements of the kernel's dtype
  long long count;
  unsigned long long shared_seed;
  unsigned long long own_seed;
  float rho;
  float sigma;
};

// --------------------------------------------------------------- mlp.cu --

struct MlpBiasActArgs {
  float* z;        // rows × cols, in place
  const float* b;  // cols
  long long rows;
  int cols;
  int relu;
  int dropout;
  unsigned key;
  unsigned threshold;
  float scale;
};

struct MlpReluBackArgs {
  const float* dh;
  const float* h;
  float* dz;
  long long n;
  float scale;
};

struct MlpBiasGradArgs {
  const float* dz;  // rows × cols
  float* db;        // cols
  long long rows;
  int cols;
};

struct MlpSgdArgs {
  float* p;
  const float* g;
  float* v;
  long long n;
  float lr;
  float mu;
  float wd;
};

struct MlpAdamArgs {
  float* p;
  const float* g;
  float* m;
  float* v;
  long long n;
  float lr;
  float beta1;
  float beta2;
  float eps;
  float wd;
  float c1;
  float c2;
};
