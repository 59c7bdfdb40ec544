/* abi_linear.c — the fused linear + distillation loss through the C ABI
 * (kdfuse_linear_loss_host): a student head with a bias and a wider linear
 * teacher head, labels with an ignored row, chunks of 2 rows; checked
 * against kdfuse_compute_host on the logits materialised here (naive C
 * GEMMs) and the naive gradient GEMMs of its logit gradient. Then a few bad
 * inputs: NULL args and outputs, a bad version, a teacher head narrower
 * than the student's, a bad teacher kind, a missing bias gradient, a bad
 * top-k index. Prints "abi_linear: ok" and exits 0 when everything holds. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define CHECK_NAME "abi_linear"
#include "check.h"
#include "kdfuse.h"

#define N 5
#define H 6
#define V 11
#define HT 4
#define VT 13
#define K 3

static float lcg_state_f(uint64_t* x) {
  *x = *x * 6364136223846793005ull + 1442695040888963407ull;
  return ((float)(*x >> 40) / 16777216.0f - 0.5f) * 2.0f;
}

static void fill(float* a, int n, uint64_t seed) {
  uint64_t x = seed;
  for (int i = 0; i < n; i++) a[i] = lcg_state_f(&x);
}

/* logits[n, V] = h[n, hd] · w[:V, hd]ᵀ + b[:V] in double, then rounded. */
static void logits(const float* h, const float* w, const float* b, int hd, float* out) {
  for (int r = 0; r < N; r++)
    for (int j = 0; j < V; j++) {
      double acc = b ? b[j] : 0.0;
      for (int c = 0; c < hd; c++) acc += (double)h[r * hd + c] * w[j * hd + c];
      out[r * V + j] = (float)acc;
    }
}

static double max_abs_diff(const float* a, const double* b, int n, double* scale) {
  double err = 0.0, s = 0.0;
  for (int i = 0; i < n; i++) {
    err = fmax(err, fabs((double)a[i] - b[i]));
    s = fmax(s, fabs(b[i]));
  }
  *scale = s;
  return err;
}

#define CLOSE(what, got, want, n)                                              \
  do {                                                                         \
    double scale_;                                                             \
    double err_ = max_abs_diff((got), (want), (n), &scale_);                   \
    CHECK(err_ <= 1e-4 * scale_ + 1e-6, "%s: max error %g (scale %g)", (what), \
          err_, scale_);                                                       \
  } while (0)

int main(void) {
  static float hs[N * H], ws[V * H], bs[V], ht[N * HT], wt[VT * HT], bt[VT];
  static float s_logits[N * V], t_logits[N * V], g[N * V];
  static float loss, row_losses[N], gh[N * H], gw[V * H], gb[V];
  static double want_gh[N * H], want_gw[V * H], want_gb[V], want_rows[N];
  static int32_t valid;
  static const int64_t labels[N] = {3, -100, 10, 0, 7};
  fill(hs, N * H, 1);
  fill(ws, V * H, 2);
  fill(bs, V, 3);
  fill(ht, N * HT, 4);
  fill(wt, VT * HT, 5);
  fill(bt, VT, 6);

  KdfuseParams p;
  CHECK(kdfuse_params_default(&p) == KDFUSE_STATUS_OK, "params_default");
  p.divergence = KDFUSE_DIVERGENCE_FORWARD_KL;
  p.temperature = 2.0;
  p.alpha = 0.25;

  /* The reference: materialised logits through kdfuse_compute_host. */
  logits(hs, ws, bs, H, s_logits);
  logits(ht, wt, bt, HT, t_logits);
  float ref_loss = 0.0f, ref_rows[N];
  int32_t ref_valid = 0;
  KdfuseBatch b;
  CHECK(kdfuse_batch_init(&b, N, V, KDFUSE_DTYPE_F32) == KDFUSE_STATUS_OK, "batch_init");
  b.student = s_logits;
  b.teacher = t_logits;
  b.labels = labels;
  b.grad = g;
  b.loss = &ref_loss;
  b.row_losses = ref_rows;
  b.valid_rows = &ref_valid;
  KdfuseStatus st = kdfuse_compute_host(&b, &p);
  CHECK(st == KDFUSE_STATUS_OK, "reference: %s", kdfuse_last_error());
  for (int r = 0; r < N; r++) want_rows[r] = ref_rows[r];
  for (int r = 0; r < N; r++)
    for (int c = 0; c < H; c++) {
      double acc = 0.0;
      for (int j = 0; j < V; j++) acc += (double)g[r * V + j] * ws[j * H + c];
      want_gh[r * H + c] = acc;
    }
  for (int j = 0; j < V; j++) {
    double acc_b = 0.0;
    for (int r = 0; r < N; r++) acc_b += g[r * V + j];
    want_gb[j] = acc_b;
    for (int c = 0; c < H; c++) {
      double acc = 0.0;
      for (int r = 0; r < N; r++) acc += (double)g[r * V + j] * hs[r * H + c];
      want_gw[j * H + c] = acc;
    }
  }

  /* The fused linear call. */
  KdfuseLinearArgs a;
  CHECK(kdfuse_linear_args_init(&a) == KDFUSE_STATUS_OK, "linear_args_init");
  CHECK(a.size == sizeof(KdfuseLinearArgs) && a.version == KDFUSE_ABI_VERSION && KDFUSE_ABI_VERSION == 5,
        "linear args size/version");
  a.dtype = KDFUSE_DTYPE_F32;
  a.teacher_kind = KDFUSE_LINEAR_TEACHER_LINEAR;
  a.rows = N;
  a.vocab = V;
  a.hidden_size = H;
  a.student_hidden = hs;
  a.student_weight = ws;
  a.student_bias = bs;
  a.teacher_hidden_size = HT;
  a.teacher_vocab = VT;
  a.teacher_hidden = ht;
  a.teacher_weight = wt;
  a.teacher_bias = bt;
  a.labels = labels;
  a.chunk_rows = 2;
  a.loss = &loss;
  a.row_losses = row_losses;
  a.valid_rows = &valid;
  a.grad_hidden = gh;
  a.grad_weight = gw;
  a.grad_bias = gb;
  st = kdfuse_linear_loss_host(&a, &p);
  CHECK(st == KDFUSE_STATUS_OK, "linear host: %d %s", (int)st, kdfuse_last_error());
  CHECK(fabs((double)loss - ref_loss) <= 1e-5 * fabs(ref_loss) + 1e-6, "loss %.9g vs %.9g",
        (double)loss, (double)ref_loss);
  CHECK(valid == ref_valid && valid == N - 1, "valid rows %d vs %d", valid, ref_valid);
  CLOSE("row losses", row_losses, want_rows, N);
  CLOSE("grad hidden", gh, want_gh, N * H);
  CLOSE("grad weight", gw, want_gw, V * H);
  CLOSE("grad bias", gb, want_gb, V);

  /* Loss only: the gradient outputs may be NULL. */
  {
    KdfuseLinearArgs l = a;
    float loss2 = 0.0f;
    l.compute_grads = 0;
    l.grad_hidden = NULL;
    l.grad_weight = NULL;
    l.grad_bias = NULL;
    l.row_losses = NULL;
    l.valid_rows = NULL;
    l.loss = &loss2;
    l.chunk_rows = 0; /* the default memory budget */
    CHECK(kdfuse_linear_loss_host(&l, &p) == KDFUSE_STATUS_OK, "loss only: %s", kdfuse_last_error());
    CHECK(fabs((double)loss2 - ref_loss) <= 1e-5 * fabs(ref_loss) + 1e-6, "loss only %.9g",
          (double)loss2);
  }

  /* A logits teacher with mutual learning: the teacher's logit gradient
   * against kdfuse_compute_host's, chunks of 3 rows. */
  {
    static float gs2[N * V], gt2[N * V], want_gt_f[N * V], gh2[N * H], gw2[V * H], gb2[V];
    static double want_gt[N * V];
    KdfuseParams pm = p;
    pm.divergence = KDFUSE_DIVERGENCE_JSD;
    pm.grad_teacher = 1;
    float ref2 = 0.0f, loss2 = 0.0f;
    KdfuseBatch bm = b;
    bm.grad = gs2;
    bm.grad_teacher = want_gt_f;
    bm.loss = &ref2;
    bm.row_losses = NULL;
    bm.valid_rows = NULL;
    st = kdfuse_compute_host(&bm, &pm);
    CHECK(st == KDFUSE_STATUS_OK, "mutual reference: %s", kdfuse_last_error());
    for (int i = 0; i < N * V; i++) want_gt[i] = want_gt_f[i];
    KdfuseLinearArgs l = a;
    l.teacher_kind = KDFUSE_LINEAR_TEACHER_LOGITS;
    l.teacher_logits = t_logits;
    l.teacher_stride = 0; /* V */
    l.chunk_rows = 3;
    l.loss = &loss2;
    l.grad_hidden = gh2;
    l.grad_weight = gw2;
    l.grad_bias = gb2;
    l.teacher_grad_logits = gt2;
    st = kdfuse_linear_loss_host(&l, &pm);
    CHECK(st == KDFUSE_STATUS_OK, "mutual linear host: %s", kdfuse_last_error());
    CHECK(fabs((double)loss2 - ref2) <= 1e-5 * fabs(ref2) + 1e-6, "mutual loss %.9g vs %.9g",
          (double)loss2, (double)ref2);
    CLOSE("teacher grad logits", gt2, want_gt, N * V);
    l.teacher_grad_logits = NULL;
    CHECK_INVALID(kdfuse_linear_loss_host(&l, &pm), "linear.teacher_grad_logits",
                  "NULL teacher gradient");
  }

  /* Bad input: a status and a message naming the field. */
  CHECK_INVALID(kdfuse_linear_loss_host(NULL, &p), "linear", "NULL args");
  CHECK_INVALID(kdfuse_linear_loss_host(&a, NULL), "params", "NULL params");
  {
    KdfuseLinearArgs l = a;
    l.version = 4;
    CHECK_INVALID(kdfuse_linear_loss_host(&l, &p), "linear.version", "version 4");
    l = a;
    l.size = 8;
    CHECK_INVALID(kdfuse_linear_loss_host(&l, &p), "linear.size", "size 8");
    l = a;
    l.loss = NULL;
    CHECK_INVALID(kdfuse_linear_loss_host(&l, &p), "linear.loss", "NULL loss");
    l = a;
    l.student_hidden = NULL;
    CHECK_INVALID(kdfuse_linear_loss_host(&l, &p), "linear.student_hidden", "NULL hidden");
    l = a;
    l.teacher_vocab = V - 1;
    CHECK_INVALID(kdfuse_linear_loss_host(&l, &p), "linear.teacher_vocab", "narrow teacher");
    l = a;
    l.teacher_kind = 7;
    CHECK_INVALID(kdfuse_linear_loss_host(&l, &p), "linear.teacher_kind", "teacher kind 7");
    l = a;
    l.dtype = KDFUSE_DTYPE_F64;
    CHECK_INVALID(kdfuse_linear_loss_host(&l, &p), "linear.dtype", "f64");
    l = a;
    l.grad_bias = NULL;
    CHECK_INVALID(kdfuse_linear_loss_host(&l, &p), "linear.grad_bias", "NULL bias gradient");
    l = a;
    l.chunk_rows = -1;
    CHECK_INVALID(kdfuse_linear_loss_host(&l, &p), "linear.chunk_rows", "chunk_rows -1");
    l = a;
    l.memory_budget = 16;
    l.chunk_rows = 0;
    CHECK_INVALID(kdfuse_linear_loss_host(&l, &p), "linear.memory_budget", "tiny budget");
    /* A top-k teacher with an index out of range. */
    static int32_t idx[N * K];
    static float vals[N * K];
    for (int i = 0; i < N * K; i++) {
      idx[i] = i % K;
      vals[i] = 0.1f * (float)i;
    }
    idx[4] = V;
    l = a;
    l.teacher_kind = KDFUSE_LINEAR_TEACHER_TOPK;
    l.topk_indices = idx;
    l.topk_values = vals;
    l.topk_k = K;
    l.topk_index_dtype = KDFUSE_INDEX_DTYPE_I32;
    CHECK_INVALID(kdfuse_linear_loss_host(&l, &p), "linear.topk_indices", "bad top-k index");
    idx[4] = 1; /* row 1: {0, 1, 2} again */
    CHECK(kdfuse_linear_loss_host(&l, &p) == KDFUSE_STATUS_OK, "top-k: %s", kdfuse_last_error());
  }
  /* The device call without a context. */
  CHECK_INVALID(kdfuse_linear_loss_cuda(NULL, &a, &p, NULL), "ctx", "NULL ctx");

  if (failures) {
    fprintf(stderr, "abi_linear: %d failure(s)\n", failures);
    return 1;
  }
  printf("abi_linear: ok\n");
  return 0;
}
