// feature_args.h — the launch contract of the feature-loss kernels
// (kd_feat_{mse,cos,at}_<in>_<out>), passed by value: one struct for the
// three, the workspace null except for attention. src/feature/params.rs
// mirrors it (#[repr(C)] FeatureArgs, layout checked by a test against
// kd_feat_host_args_layout in feature_host.cpp). Pointers are device
// pointers on the GPU, host pointers under emulation.
#pragma once

#include "feature/feature_math.cuh"

struct KdFeatArgs {
  const void* student;   // N rows (samples) of the student's features
  const void* teacher;   // N rows of the teacher's
  void* grad_student;    // ∂L/∂student, or null
  void* grad_teacher;    // ∂L/∂teacher, or null
  float* row_loss;       // N row losses
  float* workspace;      // attention: grid·2·S floats; null otherwise
  KdFeatParams params;
};
