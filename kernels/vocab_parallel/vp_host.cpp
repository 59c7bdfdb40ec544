// vp_host.cpp — the layout of the vocab-parallel launch contract
// (vp_args.h) as the host C++ compiler sees it, so that a test can hold the
// Rust mirror (src/vocab_parallel/params.rs) to it.
#include <cstddef>

#include "vocab_parallel/vp_args.h"

#define KD_VP_FIELD(S, F) out[i++] = (long long)offsetof(S, F)

extern "C" {

// which: 0 KdVpParams, 1 KdVpStatsArgs, 2 KdVpFinishArgs, 3 KdVpReduceArgs.
// Writes sizeof and the offset of every field in declaration order; returns
// the count of values written (at most 32).
int kd_vp_host_layout(int which, long long* out) {
  int i = 0;
  switch (which) {
    case 0:
      out[i++] = (long long)sizeof(KdVpParams);
      KD_VP_FIELD(KdVpParams, n_rows);
      KD_VP_FIELD(KdVpParams, s_stride);
      KD_VP_FIELD(KdVpParams, t_stride);
      KD_VP_FIELD(KdVpParams, gs_stride);
      KD_VP_FIELD(KdVpParams, gt_stride);
      KD_VP_FIELD(KdVpParams, ignore_index);
      KD_VP_FIELD(KdVpParams, tau);
      KD_VP_FIELD(KdVpParams, inv_tau);
      KD_VP_FIELD(KdVpParams, alpha);
      KD_VP_FIELD(KdVpParams, soft_coef);
      KD_VP_FIELD(KdVpParams, beta);
      KD_VP_FIELD(KdVpParams, log_beta);
      KD_VP_FIELD(KdVpParams, log_1mbeta);
      KD_VP_FIELD(KdVpParams, softcap);
      KD_VP_FIELD(KdVpParams, grad_scale);
      KD_VP_FIELD(KdVpParams, tail_floor);
      KD_VP_FIELD(KdVpParams, cols);
      KD_VP_FIELD(KdVpParams, real_cols);
      KD_VP_FIELD(KdVpParams, vocab_start);
      KD_VP_FIELD(KdVpParams, vocab_size);
      KD_VP_FIELD(KdVpParams, world);
      KD_VP_FIELD(KdVpParams, div);
      KD_VP_FIELD(KdVpParams, topk_k);
      KD_VP_FIELD(KdVpParams, topk_mode);
      KD_VP_FIELD(KdVpParams, indices_i64);
      KD_VP_FIELD(KdVpParams, reduction);
      break;
    case 1:
      out[i++] = (long long)sizeof(KdVpStatsArgs);
      KD_VP_FIELD(KdVpStatsArgs, student);
      KD_VP_FIELD(KdVpStatsArgs, teacher);
      KD_VP_FIELD(KdVpStatsArgs, topk_indices);
      KD_VP_FIELD(KdVpStatsArgs, topk_values);
      KD_VP_FIELD(KdVpStatsArgs, labels);
      KD_VP_FIELD(KdVpStatsArgs, row_weights);
      KD_VP_FIELD(KdVpStatsArgs, round1);
      KD_VP_FIELD(KdVpStatsArgs, stats);
      KD_VP_FIELD(KdVpStatsArgs, params);
      break;
    case 2:
      out[i++] = (long long)sizeof(KdVpFinishArgs);
      KD_VP_FIELD(KdVpFinishArgs, student);
      KD_VP_FIELD(KdVpFinishArgs, teacher);
      KD_VP_FIELD(KdVpFinishArgs, topk_indices);
      KD_VP_FIELD(KdVpFinishArgs, topk_values);
      KD_VP_FIELD(KdVpFinishArgs, labels);
      KD_VP_FIELD(KdVpFinishArgs, row_weights);
      KD_VP_FIELD(KdVpFinishArgs, round1);
      KD_VP_FIELD(KdVpFinishArgs, round2);
      KD_VP_FIELD(KdVpFinishArgs, valid_count);
      KD_VP_FIELD(KdVpFinishArgs, grad);
      KD_VP_FIELD(KdVpFinishArgs, grad_teacher);
      KD_VP_FIELD(KdVpFinishArgs, row_loss);
      KD_VP_FIELD(KdVpFinishArgs, params);
      break;
    case 3:
      out[i++] = (long long)sizeof(KdVpReduceArgs);
      KD_VP_FIELD(KdVpReduceArgs, row_loss);
      KD_VP_FIELD(KdVpReduceArgs, n_rows);
      KD_VP_FIELD(KdVpReduceArgs, valid_count);
      KD_VP_FIELD(KdVpReduceArgs, out);
      KD_VP_FIELD(KdVpReduceArgs, reduction);
      KD_VP_FIELD(KdVpReduceArgs, vocab_size);
      break;
    default:
      break;
  }
  return i;
}

}  // extern "C"
