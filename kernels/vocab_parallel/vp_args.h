// vp_args.h — the launch contract of the vocab-parallel kernels (vp.cu): one
// argument struct per kernel, passed by value, with the parameter block
// they share.
//
//   kd_vp_round1_<in>, kd_vp_round2_<in>   KdVpStatsArgs
//   kd_vp_finish_<in>_<out>                KdVpFinishArgs
//   kd_vp_reduce_loss                      KdVpReduceArgs
//
// Written once here; src/vocab_parallel/params.rs mirrors it as #[repr(C)]
// structs (the CUDA launcher passes them, the emulator takes them by
// pointer) and a test holds the mirror to this layout (kd_vp_host_layout in
// vp_host.cpp). Pointers are device pointers on the GPU, host pointers under
// emulation; null where absent.
//
// The statistics records are src/vocab_parallel/stats.rs's: [N, 20] f64 per
// rank and round, gathered by the caller into [world, N, 20] in rank order.
#pragma once

#include "kd/kd_math.cuh"

// f64 values per row and rank (stats.rs STATS_WIDTH) and the layout version.
#define KD_VP_WIDTH 20
#define KD_VP_VERSION 1

// Parameters shared by every vocab-parallel kernel; the spec's values in
// f64 (the per-row merge and the loss are f64) and the shard's shape.
struct KdVpParams {
  long long n_rows;         // N
  long long s_stride;       // student row stride (elements)
  long long t_stride;       // dense teacher row stride (elements)
  long long gs_stride;      // student gradient row stride
  long long gt_stride;      // teacher gradient row stride
  long long ignore_index;
  double tau;               // τ
  double inv_tau;           // 1/τ
  double alpha;             // weight of the hard-label CE
  double soft_coef;         // c = (1 − α)·(τ² or 1)
  double beta;              // JSD β (0 < β < 1 when div = JSD)
  double log_beta;          // ln β
  double log_1mbeta;        // ln (1 − β)
  double softcap;           // cap of x ← cap·tanh(x/cap); 0 = off
  double grad_scale;        // upstream scale of the gradient
  double tail_floor;        // top-k tail: a teacher tail mass below it is 0
  int cols;                 // V_local: columns of the shard in memory
  int real_cols;            // its real (unpadded) columns, ≤ cols
  int vocab_start;          // the shard's first global column
  int vocab_size;           // V
  int world;                // ranks in the gathered records
  int div;                  // KD_DIV_* (JSD's endpoints mapped to the KLs)
  int topk_k;               // k of a top-k teacher; 0: dense teacher
  int topk_mode;            // KD_TOPK_*
  int indices_i64;          // top-k indices are int64 (else int32)
  int reduction;            // KD_RED_*
};

// Round 1 (kd_vp_round1_*) and round 2 (kd_vp_round2_*, JSD and TVD): this
// rank's [N, 20] record.
struct KdVpStatsArgs {
  const void* student;        // N rows of `cols` logits
  const void* teacher;        // dense teacher, N rows of `cols`; or null (top-k)
  const void* topk_indices;   // [N, k] global indices (int32/int64), or null
  const void* topk_values;    // [N, k] values (the input dtype), or null
  const long long* labels;    // N global labels, or null
  const float* row_weights;   // N weights, or null
  const double* round1;       // round 2: the gathered round 1, [world, N, 20]
  double* stats;              // out: [N, 20]
  KdVpParams params;
};

// The finish: row losses and this shard's gradients from the gathered
// records of every round.
struct KdVpFinishArgs {
  const void* student;
  const void* teacher;
  const void* topk_indices;
  const void* topk_values;
  const long long* labels;
  const float* row_weights;
  const double* round1;       // [world, N, 20]
  const double* round2;       // [world, N, 20] (JSD, TVD), or null
  const int* valid_count;     // rows whose label is not ignore_index, or null: N
  void* grad;                 // ∂L/∂student [N, cols], or null (loss only)
  void* grad_teacher;         // ∂L/∂teacher (dense teacher), or null
  double* row_loss;           // out: N weighted row losses (f64)
  KdVpParams params;
};

// kd_vp_reduce_loss: w · Σ row_loss in a fixed order, f64.
struct KdVpReduceArgs {
  const double* row_loss;     // N
  long long n_rows;
  const int* valid_count;     // or null: N
  double* out;                // one f64
  int reduction;              // KD_RED_*
  int vocab_size;             // V (the mean's divisor per row)
};
