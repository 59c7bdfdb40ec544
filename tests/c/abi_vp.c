/* abi_vp.c — vocab-parallel distillation through the C ABI: a batch of
 * N = 5 rows over V = 37 columns cut into two shards ([0, 20) and [20, 37)
 * plus 3 padding columns that hold NaN), the two-collective JSD with α > 0
 * and an ignored row, the all-gather done by copying; the loss and the
 * stitched gradient equal kdfuse_compute_host_f64 on the unsharded batch.
 * Then the errors of the three calls. Prints "abi_vp: ok" when every check
 * holds. */
#define CHECK_NAME "abi_vp"
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "check.h"

enum { N = 5, V = 37, STRIDE = 40, W = KDFUSE_VP_STATS_WIDTH };

static double rnd(uint64_t* x) {
  *x = *x * 6364136223846793005ull + 1442695040888963407ull;
  return ((double)(*x >> 40) / 16777216.0 - 0.5) * 6.0;
}

int main(void) {
  static float s[N * STRIDE], t[N * STRIDE], grad[N * STRIDE];
  static double sd[N * V], td[N * V], gref[N * V];
  static double g1[2 * N * W], g2[2 * N * W];
  int64_t labels[N] = {3, -100, 36, 20, 0};
  uint64_t x = 42;
  for (int r = 0; r < N; r++)
    for (int c = 0; c < STRIDE; c++) {
      int pad = c >= V;
      s[r * STRIDE + c] = pad ? NAN : (float)rnd(&x);
      t[r * STRIDE + c] = pad ? NAN : (float)rnd(&x);
      if (!pad) {
        sd[r * V + c] = s[r * STRIDE + c];
        td[r * V + c] = t[r * STRIDE + c];
      }
      grad[r * STRIDE + c] = NAN; /* poisoned: an unwritten entry fails */
    }

  KdfuseParams p;
  kdfuse_params_default(&p);
  p.divergence = KDFUSE_DIVERGENCE_JSD;
  p.beta = 0.3;
  p.temperature = 2.0;
  p.alpha = 0.25;
  int32_t rounds = 0;
  CHECK(kdfuse_vp_collectives(&p, &rounds) == KDFUSE_STATUS_OK && rounds == 2,
        "JSD needs 2 collectives, got %d", rounds);

  /* The two ranks. */
  const int64_t start[2] = {0, 20}, cols[2] = {20, 20};
  KdfuseBatch b[2];
  KdfuseShard sh[2];
  double loss[2] = {0, 0}; /* the vocab-parallel finish writes doubles */
  for (int k = 0; k < 2; k++) {
    kdfuse_batch_init(&b[k], N, cols[k], KDFUSE_DTYPE_F32);
    b[k].student_stride = b[k].teacher_stride = b[k].grad_stride = STRIDE;
    b[k].student = s + start[k];
    b[k].teacher = t + start[k];
    b[k].grad = grad + start[k];
    b[k].labels = labels;
    b[k].loss = (float*)&loss[k];
    kdfuse_shard_init(&sh[k], start[k], V);
  }
  for (int k = 0; k < 2; k++)
    CHECK(kdfuse_vp_round_stats_host(&b[k], &p, &sh[k], 1, NULL, 2, g1 + k * N * W) ==
              KDFUSE_STATUS_OK,
          "round 1, rank %d: %s", k, kdfuse_last_error());
  for (int k = 0; k < 2; k++)
    CHECK(kdfuse_vp_round_stats_host(&b[k], &p, &sh[k], 2, g1, 2, g2 + k * N * W) ==
              KDFUSE_STATUS_OK,
          "round 2, rank %d: %s", k, kdfuse_last_error());
  for (int k = 0; k < 2; k++)
    CHECK(kdfuse_vp_finish_host(&b[k], &p, &sh[k], g1, g2, 2) == KDFUSE_STATUS_OK,
          "finish, rank %d: %s", k, kdfuse_last_error());

  /* The unsharded reference in f64. */
  KdfuseBatch ref;
  double ref_loss = 0;
  kdfuse_batch_init(&ref, N, V, KDFUSE_DTYPE_F32);
  ref.dtype = ref.grad_dtype = KDFUSE_DTYPE_F64;
  ref.student = sd;
  ref.teacher = td;
  ref.grad = gref;
  ref.labels = labels;
  ref.loss = (float*)&ref_loss; /* a double, as the f64 entry point reads it */
  CHECK(kdfuse_compute_host_f64(&ref, &p) == KDFUSE_STATUS_OK, "reference: %s",
        kdfuse_last_error());
  CHECK(loss[0] == loss[1], "ranks disagree on the loss: %g vs %g", loss[0], loss[1]);
  CHECK(fabs(loss[0] - ref_loss) <= 1e-12 * fabs(ref_loss), "loss %.17g vs %.17g", loss[0],
        ref_loss);
  double worst = 0, scale = 0;
  for (int r = 0; r < N; r++) {
    for (int c = 0; c < V; c++) {
      double d = fabs(grad[r * STRIDE + c] - gref[r * V + c]);
      worst = d > worst ? d : worst;
      scale = fabs(gref[r * V + c]) > scale ? fabs(gref[r * V + c]) : scale;
    }
    for (int c = V; c < STRIDE; c++)
      CHECK(grad[r * STRIDE + c] == 0.0f, "padding column %d of row %d: %g", c, r,
            grad[r * STRIDE + c]);
  }
  CHECK(worst <= 1e-6 * scale, "gradient off by %g (largest entry %g)", worst, scale);

  /* Errors, each naming its argument. */
  CHECK_INVALID(kdfuse_vp_finish_host(&b[0], &p, &sh[0], g1, NULL, 2), "round2",
                "JSD's finish without round 2");
  CHECK_INVALID(kdfuse_vp_finish_host(&b[0], &p, &sh[0], NULL, g2, 2), "round1",
                "finish without round 1");
  CHECK_INVALID(kdfuse_vp_finish_host(&b[0], &p, &sh[0], g1, g2, 0), "world", "world 0");
  CHECK_INVALID(kdfuse_vp_finish_host(&b[0], &p, &sh[0], g1, g2, 3), "round1",
                "world 3 on 2 ranks' records");
  CHECK_INVALID(kdfuse_vp_round_stats_host(&b[0], &p, &sh[0], 3, NULL, 2, g1), "round",
                "round 3");
  CHECK_INVALID(kdfuse_vp_round_stats_host(&b[0], &p, &sh[0], 1, NULL, 2, NULL), "stats",
                "NULL stats");
  KdfuseShard bad = sh[0];
  bad.version = 7;
  CHECK_INVALID(kdfuse_vp_round_stats_host(&b[0], &p, &bad, 1, NULL, 2, g1), "shard.version",
                "shard version");
  bad = sh[0];
  bad.vocab_size = 0;
  CHECK_INVALID(kdfuse_vp_round_stats_host(&b[0], &p, &bad, 1, NULL, 2, g1),
                "shard.vocab_size", "vocab size 0");
  int64_t far[N] = {3, -100, 37, 20, 0};
  b[0].labels = far;
  CHECK_INVALID(kdfuse_vp_round_stats_host(&b[0], &p, &sh[0], 1, NULL, 2, g1), "batch.labels",
                "a label past the vocabulary");
  p.divergence = KDFUSE_DIVERGENCE_FORWARD_KL;
  p.beta = 0.5;
  b[0].labels = labels;
  CHECK(kdfuse_vp_collectives(&p, &rounds) == KDFUSE_STATUS_OK && rounds == 1,
        "forward KL needs 1 collective, got %d", rounds);
  CHECK_INVALID(kdfuse_vp_round_stats_host(&b[0], &p, &sh[0], 2, g1, 2, g2), "round",
                "forward KL has no round 2");

  /* The device calls: a NULL context is refused; with a GPU, the argument
   * errors come before anything is enqueued (no device memory is touched). */
  CHECK_INVALID(kdfuse_vp_round_stats_cuda(NULL, &b[0], &p, &sh[0], 1, NULL, 2, g1, NULL), "ctx",
                "NULL context");
  CHECK_INVALID(kdfuse_vp_finish_cuda(NULL, &b[0], &p, &sh[0], g1, NULL, 2, NULL), "ctx",
                "NULL context");
  KdfuseContext* ctx = NULL;
  if (kdfuse_context_create(0, &ctx) == KDFUSE_STATUS_OK) {
    CHECK_INVALID(kdfuse_vp_round_stats_cuda(ctx, &b[0], &p, &sh[0], 3, NULL, 2, g1, NULL),
                  "round", "round 3 on the device");
    CHECK_INVALID(kdfuse_vp_round_stats_cuda(ctx, &b[0], &p, &sh[0], 1, NULL, 2, NULL, NULL),
                  "stats", "NULL stats on the device");
    CHECK_INVALID(kdfuse_vp_finish_cuda(ctx, &b[0], &p, &sh[0], NULL, NULL, 2, NULL), "round1",
                  "finish without round 1 on the device");
    CHECK_INVALID(kdfuse_vp_finish_cuda(ctx, &b[0], &p, &sh[0], g1, g2, 0, NULL), "world",
                  "world 0 on the device");
    bad = sh[0];
    bad.version = 7;
    CHECK_INVALID(kdfuse_vp_finish_cuda(ctx, &b[0], &p, &bad, g1, NULL, 2, NULL),
                  "shard.version", "shard version on the device");
    kdfuse_context_destroy(ctx);
    printf("abi_vp: device argument errors checked\n");
  } else {
    printf("abi_vp: no CUDA device: device argument errors not checked (%s)\n",
           kdfuse_last_error());
  }

  if (failures) return 1;
  printf("abi_vp: ok\n");
  return 0;
}
