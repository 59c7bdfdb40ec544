/* abi_bad_input.c — bad input through the C ABI (kdfuse_compute_host): every
 * case is a status and a message naming the field, never a crash or a
 * silently wrong value. Struct versions other than 1 and 2 (or not matching
 * the struct's size), misaligned output pointers, a row count whose element
 * count overflows, parameters beyond fp32 (temperature, soft-cap), a JSD beta
 * given to another divergence; and an empty batch's loss is +0. Then
 * kdfuse_compute_topk_host_f64: the dtype, the top-k teacher's presence,
 * alignment and indices. Prints
 * "abi_bad_input: ok" and exits 0 when everything holds. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define CHECK_NAME "abi_bad_input"
#include "check.h"
#include "kdfuse.h"

#define N 3
#define V 8


/* `p` moved by one byte: misaligned for any element wider than a byte. */
static void* off_by_one(void* p) { return (void*)((uintptr_t)p + 1); }

int main(void) {
  static float s[N * V], t[N * V], row_losses[N + 1], loss[2];
  static int32_t valid[2];
  static double params_buf[sizeof(KdfuseParams) / sizeof(double) + 2];
  for (int i = 0; i < N * V; i++) {
    s[i] = (float)(i % 5) * 0.5f;
    t[i] = (float)(i % 3) * 0.75f;
  }
  KdfuseParams p;
  CHECK(kdfuse_params_default(&p) == KDFUSE_STATUS_OK, "params_default");
  KdfuseBatch b;
  CHECK(kdfuse_batch_init(&b, N, V, KDFUSE_DTYPE_F32) == KDFUSE_STATUS_OK, "batch_init");
  b.student = s;
  b.teacher = t;
  b.loss = loss;
  KdfuseStatus st = kdfuse_compute_host(&b, &p);
  CHECK(st == KDFUSE_STATUS_OK, "good batch: %d %s", (int)st, kdfuse_last_error());

  /* Versions: 1 to 5 only, the one the size says. */
  const uint32_t bad_versions[] = {0, 6, 99, 0xFFFFFFFFu};
  for (size_t i = 0; i < sizeof bad_versions / sizeof bad_versions[0]; i++) {
    KdfuseParams pv = p;
    pv.version = bad_versions[i];
    CHECK_INVALID(kdfuse_compute_host(&b, &pv), "params.version", "params version");
    KdfuseBatch bv = b;
    bv.version = bad_versions[i];
    CHECK_INVALID(kdfuse_compute_host(&bv, &p), "batch.version", "batch version");
  }
  {
    KdfuseParams pv = p;
    pv.version = 1; /* the version-1 number on a version-3 struct */
    CHECK_INVALID(kdfuse_compute_host(&b, &pv), "params.version", "version 1, size 3");
    pv.version = 2; /* the version-2 number on a version-3 struct */
    CHECK_INVALID(kdfuse_compute_host(&b, &pv), "params.version", "version 2, size 3");
    pv = p;
    pv.precision = 2; /* not a KdfusePrecision */
    CHECK_INVALID(kdfuse_compute_host(&b, &pv), "params.precision", "precision 2");
    KdfuseBatch bv = b;
    bv.size = (uint32_t)offsetof(KdfuseBatch, row_weights); /* version-1 size, version 2 */
    CHECK_INVALID(kdfuse_compute_host(&bv, &p), "batch.version", "version 2, size 1");
  }

  /* Misaligned pointers the host path writes through. */
  {
    KdfuseBatch ba = b;
    ba.loss = (float*)off_by_one(loss);
    CHECK_INVALID(kdfuse_compute_host(&ba, &p), "batch.loss", "misaligned loss");
    ba = b;
    ba.row_losses = (float*)off_by_one(row_losses);
    CHECK_INVALID(kdfuse_compute_host(&ba, &p), "batch.row_losses", "misaligned row_losses");
    ba = b;
    ba.valid_rows = (int32_t*)off_by_one(valid);
    CHECK_INVALID(kdfuse_compute_host(&ba, &p), "batch.valid_rows", "misaligned valid_rows");
    CHECK_INVALID(kdfuse_params_default((KdfuseParams*)off_by_one(params_buf)), "out",
                  "misaligned params_default out");
  }

  /* A row count whose element count wraps. */
  {
    KdfuseBatch bo = b;
    bo.rows = INT64_MAX;
    CHECK_INVALID(kdfuse_compute_host(&bo, &p), "stride", "rows = INT64_MAX");
    bo = b;
    bo.student_stride = INT64_MAX / 2;
    CHECK_INVALID(kdfuse_compute_host(&bo, &p), "student_stride", "huge stride");
  }

  /* Parameters beyond fp32. */
  {
    const double taus[] = {1e19, 1e20, 1e-20};
    for (int i = 0; i < 3; i++) {
      KdfuseParams pt = p;
      pt.temperature = taus[i];
      CHECK_INVALID(kdfuse_compute_host(&b, &pt), "temperature", "temperature beyond fp32");
    }
    const double caps[] = {1e-50, 1e39};
    for (int i = 0; i < 2; i++) {
      KdfuseParams pc = p;
      pc.softcap = caps[i];
      CHECK_INVALID(kdfuse_compute_host(&b, &pc), "softcap", "softcap beyond fp32");
    }
    KdfuseParams pg = p;
    pg.grad_scale = 1e39;
    CHECK_INVALID(kdfuse_compute_host(&b, &pg), "grad_scale", "grad_scale beyond fp32");
  }

  /* β is JSD's. */
  {
    KdfuseParams pb = p;
    pb.divergence = KDFUSE_DIVERGENCE_REVERSE_KL;
    pb.beta = 0.3;
    CHECK_INVALID(kdfuse_compute_host(&b, &pb), "beta", "beta with reverse KL");
    pb.divergence = KDFUSE_DIVERGENCE_JSD;
    st = kdfuse_compute_host(&b, &pb);
    CHECK(st == KDFUSE_STATUS_OK, "beta with JSD: %d %s", (int)st, kdfuse_last_error());
  }

  /* An empty batch: the loss is +0, not -0. */
  {
    KdfuseBatch be = b;
    be.rows = 0;
    be.row_losses = row_losses;
    be.valid_rows = valid;
    const int32_t reductions[] = {KDFUSE_REDUCTION_BATCHMEAN, KDFUSE_REDUCTION_SUM,
                                  KDFUSE_REDUCTION_MEAN, KDFUSE_REDUCTION_NONE};
    for (int i = 0; i < 4; i++) {
      KdfuseParams pr = p;
      pr.reduction = reductions[i];
      loss[0] = NAN;
      st = kdfuse_compute_host(&be, &pr);
      CHECK(st == KDFUSE_STATUS_OK && loss[0] == 0.0f && !signbit(loss[0]),
            "empty batch, reduction %d: status %d, loss %g (sign %d)", (int)reductions[i], (int)st,
            loss[0], signbit(loss[0]) != 0);
    }
  }

  /* kdfuse_compute_topk_host_f64: doubles, a checked top-k teacher. */
  {
    static double s64[N * V], vals64[N * 2], loss64[2], grad64[N * V];
    static int32_t idx[N * 2];
    for (int i = 0; i < N * V; i++) s64[i] = s[i];
    for (int r = 0; r < N; r++) {
      idx[2 * r] = r;
      idx[2 * r + 1] = r + 1;
      vals64[2 * r] = 1.0;
      vals64[2 * r + 1] = -0.5;
    }
    KdfuseBatch bk;
    CHECK(kdfuse_batch_init(&bk, N, V, KDFUSE_DTYPE_F32) == KDFUSE_STATUS_OK, "batch_init");
    bk.dtype = bk.grad_dtype = KDFUSE_DTYPE_F64;
    bk.student = s64;
    bk.topk_indices = idx;
    bk.topk_values = vals64;
    bk.topk_k = 2;
    bk.grad = grad64;
    bk.loss = (float*)(void*)loss64; /* doubles on the f64 paths */
    st = kdfuse_compute_topk_host_f64(&bk, &p);
    CHECK(st == KDFUSE_STATUS_OK && isfinite(loss64[0]) && loss64[0] > 0.0,
          "top-k f64: status %d, loss %g: %s", (int)st, loss64[0], kdfuse_last_error());
    KdfuseBatch bad = bk;
    bad.dtype = KDFUSE_DTYPE_F32;
    CHECK_INVALID(kdfuse_compute_topk_host_f64(&bad, &p), "batch.dtype", "top-k f64, f32 dtype");
    bad = bk;
    bad.topk_indices = NULL;
    bad.topk_values = NULL;
    bad.teacher = s64;
    CHECK_INVALID(kdfuse_compute_topk_host_f64(&bad, &p), "batch.topk_indices",
                  "top-k f64, dense teacher");
    bad = bk;
    bad.topk_values = off_by_one(vals64);
    CHECK_INVALID(kdfuse_compute_topk_host_f64(&bad, &p), "batch.topk_values",
                  "top-k f64, misaligned values");
    idx[3] = V;
    CHECK_INVALID(kdfuse_compute_topk_host_f64(&bk, &p), "batch.topk_indices",
                  "top-k f64, index out of range");
    idx[3] = idx[2];
    CHECK_INVALID(kdfuse_compute_topk_host_f64(&bk, &p), "batch.topk_indices",
                  "top-k f64, repeated index");
    CHECK_INVALID(kdfuse_compute_host_f64(&bk, &p), "batch.topk_indices",
                  "the dense f64 path given a top-k teacher");
  }

  if (failures) return 1;
  printf("abi_bad_input: ok\n");
  return 0;
}
