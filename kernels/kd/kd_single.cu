// kd_single.cu — the single-read fused loss + gradient (docs/DESIGN.md §5
// "Single-read kernels"): every logit leaves global memory once and every
// gradient element is stored once.
//
// One thread-block cluster per row (grid-stride over rows), nc = 1–16 CTAs
// chosen by the host (src/single_read.rs) so that a CTA's slice of the row,
// student and teacher, fits its dynamic shared memory
// (kd_single_layout.h). Per row:
//   pass 1: each CTA sweeps its slice once from global memory (16-byte
//           loads, scalar head and tail), keeps what it loaded in shared
//           memory and pushes it into the statistics of kd_fast_body or
//           kd_fused_body; the CTAs merge theirs through distributed shared
//           memory (kd_cluster_reduce: a block reduction, then each CTA
//           reads the others' totals after one cluster barrier, the same
//           merge order everywhere).
//   pass 2: JSD and TVD: the second sweep reads the shared-memory copy.
//   grad:   from the copy, ∂L/∂s (and ∂L/∂t) stored once per element with
//           16-byte stores; the label's element is computed in its chunk.
// The row loss is written by the CTA that owns the label (else CTA 0).
// Bytes per element (in = input size, out = gradient size): 2·in + out
// (6 B in bf16, 12 in f32), + out with the teacher gradient; loss only
// 2·in. Per row: the label, the row weight and the row loss.
// Issue slots per element (sm_90 SASS, scripts/sass-report; bf16 in and
// out; bench/results/sass-sm_90.md): v1's fast kernels plus one 16-byte
// shared-memory store per side and chunk in pass 1, the later passes'
// global loads replaced by shared-memory loads: forward KL 26.9 (17 +
// 10), JSD 46.6 (13 + 18 + 15), MUFU 4 and 8; α > 0 adds about 7.
// Budgets: kernels/budgets.toml (v1's + 3). Predicted (scripts/sass-report,
// a model): 100% of the copy bandwidth on an H100 for both, on an H200
// 100% and 73% (JSD: MUFU-bound). The exact variants
// (soft-capping, the teacher gradient, precision = exact) are
// kd_fused_body's arithmetic; they are held to 2 CTAs per SM (128
// registers: at 64, ptxas spilled JSD's on sm_120), which the shared
// memory of a staged row allows anyway.
// Built for sm_90 and later (clusters); elsewhere the host runs v1. The
// single-read top-k kernels (kd_single_topk_*) are in kd_topk.cu, one body
// with v1's.
#include "kd/kd_fast.cu"
#include "kd/kd_fused.cu"

#define KD_SINGLE_THREADS 256

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900

// JSD with α > 0 carries the most state: 3 CTAs per SM (80 registers; at
// 64, ptxas 13.0 spilled kd_single_jsd_fastce_f32_f32 on sm_120).
#define KD_SINGLE_FAST_MIN(DIV, CE) ((DIV) == KD_DIV_JSD && (CE) ? 3 : 4)

#define KD_SINGLE_FAST(NAME, TIN, TOUT, DIV, CE)                                  \
  extern "C" __global__ void __launch_bounds__(KD_SINGLE_THREADS, KD_SINGLE_FAST_MIN(DIV, CE)) \
      NAME(const KdFusedArgs a) {                                                 \
    kd_fast_body<TIN, TOUT, DIV, CE, true>(a, kd_scratch_dyn<KdFast, KD_SINGLE_THREADS>());  \
  }

#define KD_SINGLE_EXACT(NAME, TIN, TOUT, DIV)                                                \
  extern "C" __global__ void __launch_bounds__(KD_SINGLE_THREADS, 2)                          \
      NAME(const KdFusedArgs a) {                                                            \
    kd_fused_body<TIN, TOUT, DIV, true>(a, kd_scratch_dyn<KdPass1, KD_SINGLE_THREADS>());    \
  }

#define KD_SINGLE_TYPES(M, PREFIX, ...)                         \
  M(PREFIX##_f32_f32, float, float, __VA_ARGS__)                \
  M(PREFIX##_bf16_bf16, kd_bf16, kd_bf16, __VA_ARGS__)          \
  M(PREFIX##_bf16_f32, kd_bf16, float, __VA_ARGS__)             \
  M(PREFIX##_f16_f16, kd_f16, kd_f16, __VA_ARGS__)              \
  M(PREFIX##_f16_f32, kd_f16, float, __VA_ARGS__)

#define KD_SINGLE_DIV(DIVNAME, DIV)                                           \
  KD_SINGLE_TYPES(KD_SINGLE_EXACT, kd_single_##DIVNAME, DIV)                  \
  KD_SINGLE_TYPES(KD_SINGLE_FAST, kd_single_##DIVNAME##_fast, DIV, false)     \
  KD_SINGLE_TYPES(KD_SINGLE_FAST, kd_single_##DIVNAME##_fastce, DIV, true)

KD_SINGLE_DIV(fkl, KD_DIV_FKL)
KD_SINGLE_DIV(rkl, KD_DIV_RKL)
KD_SINGLE_DIV(sce, KD_DIV_SCE)
KD_SINGLE_DIV(tvd, KD_DIV_TVD)
KD_SINGLE_DIV(jsd, KD_DIV_JSD)

#endif  // sm_90 and later
