// kd_args.h — the launch contract of the loss kernels: one argument struct
// per kernel family, passed by value (kernel parameters live in constant
// memory, so a struct costs what the separate arguments did).
//
// Written once here; src/params.rs mirrors it as #[repr(C)] structs (the
// CUDA launcher passes them, the emulator hands them over by pointer) and a
// test holds the mirror to this layout (kd_host_args_layout in kd_host.cpp).
// Pointers are device pointers on the GPU, host pointers under emulation;
// the element types follow the kernel's name (kd_fused_<div>_<in>_<out>,
// kd_topk_<in>_<out>_<idx>).
#pragma once

#include "kd/kd_math.cuh"

struct KdFusedArgs {
  const void* student;            // N rows of V logits, row stride student_stride
  long long student_stride;
  const void* teacher;            // N rows of V logits
  long long teacher_stride;
  const long long* labels;        // N labels, or null (α = 0)
  const float* row_weights;       // N weights, or null
  void* grad;                     // ∂L/∂s (N rows), or null: loss only; may be the student
  long long grad_stride;
  void* grad_teacher;             // ∂L/∂t (mutual learning), or null; may be the teacher
  long long grad_teacher_stride;
  float* row_loss;                // N weighted row losses
  const int* valid_count;         // rows whose label is not ignore_index, or null: N
  long long n_rows;
  KdParams params;
};

struct KdTopkArgs {
  const void* student;            // N rows of V logits
  long long student_stride;
  const void* indices;            // N·k teacher indices (int32 or int64, by the kernel's name)
  const void* values;             // N·k teacher logits (the input dtype)
  const long long* labels;
  const float* row_weights;
  void* grad;
  long long grad_stride;
  float* row_loss;
  const int* valid_count;
  long long n_rows;
  KdParams params;                // params.topk_k = k
};

// kd_count_valid: the rows of `labels` that are not ignore_index, into *out.
struct KdCountArgs {
  const long long* labels;  // N labels
  long long n_rows;
  long long ignore_index;
  int* out;                 // one int
};

// kd_reduce_loss: the reduced loss of the row losses, in a fixed order.
struct KdReduceArgs {
  const float* row_loss;    // N
  long long n_rows;
  const int* valid_count;   // or null: N
  float* out;               // one float
  KdParams params;          // reduction and V
};

// kd_topk_validate_<i32|i64>: *first_bad (set to N by the host) ends as the
// smallest row with an index out of [0, V) or repeated.
struct KdTopkValidateArgs {
  const void* indices;      // N·k, int32 or int64 by the kernel's name
  long long n_rows;
  int k;
  int vocab;
  unsigned long long* first_bad;
};
