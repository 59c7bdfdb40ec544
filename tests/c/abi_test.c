/* abi_test.c — the C ABI from C: computes a JSD + hard-label loss and its
 * gradient on the CPU backend (kdfuse_compute_host) and compares them with
 * the f64 oracle's values, passed by tests/interfaces/c_abi.rs as argv[1] (loss) and
 * argv[2] (the gradient's L2 norm); the same through version-1 (smaller)
 * structs; then checks the error paths, those of the version-2 fields
 * included. With five more arguments it also checks the version-2 fields
 * numerically: argv[3..5] the loss, gradient norm and teacher-gradient norm
 * with soft-capping, row weights and the teacher gradient; argv[6..7] the
 * loss and gradient norm with a top-k teacher. Prints "abi_test: ok" and
 * exits 0 when everything holds. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK_NAME "abi_test"
#include "check.h"
#include "kdfuse.h"

#define N 5
#define V 37
#define K 4

/* The version-1 structs, as a program built against the version-1 header
 * has them: the version-2 structs only append. */
typedef struct {
  uint32_t size;
  uint32_t version;
  int32_t divergence;
  int32_t reduction;
  double beta;
  double temperature;
  double alpha;
  double grad_scale;
  int64_t ignore_index;
  int32_t t2_scaling;
  int32_t reserved;
} ParamsV1;

typedef struct {
  uint32_t size;
  uint32_t version;
  int64_t rows;
  int64_t cols;
  int64_t student_stride;
  int64_t teacher_stride;
  int64_t grad_stride;
  int32_t dtype;
  int32_t grad_dtype;
  const void* student;
  const void* teacher;
  const int64_t* labels;
  void* grad;
  float* row_losses;
  float* loss;
  int32_t* valid_rows;
} BatchV1;

_Static_assert(sizeof(ParamsV1) == offsetof(KdfuseParams, softcap), "params v1 is a prefix");
_Static_assert(sizeof(BatchV1) == offsetof(KdfuseBatch, row_weights), "batch v1 is a prefix");


/* The same generator as tests/interfaces/c_abi.rs. */
static void lcg(uint64_t seed, float* out, int n) {
  uint64_t x = seed;
  for (int i = 0; i < n; i++) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    out[i] = ((float)(x >> 40) / 16777216.0f - 0.5f) * 6.0f;
  }
}

/* `b` with a top-k teacher instead of its dense one. */
static KdfuseBatch with_topk(KdfuseBatch b, const void* indices, int32_t index_dtype,
                             const float* values) {
  b.teacher = NULL;
  b.topk_indices = indices;
  b.topk_index_dtype = index_dtype;
  b.topk_values = values;
  b.topk_k = K;
  return b;
}

static double norm(const float* x, int n) {
  double s2 = 0.0;
  for (int i = 0; i < n; i++) s2 += (double)x[i] * x[i];
  return sqrt(s2);
}

int main(int argc, char** argv) {
  if (argc != 3 && argc != 8) {
    fprintf(stderr,
            "usage: abi_test LOSS GRAD_NORM [CAP_LOSS CAP_GRAD_NORM CAP_GRAD_TEACHER_NORM "
            "TOPK_LOSS TOPK_GRAD_NORM]\n");
    return 2;
  }
  const double want_loss = strtod(argv[1], NULL), want_gnorm = strtod(argv[2], NULL);
  static float s[N * V], t[N * V], grad[N * V], row_losses[N];
  const int64_t labels[N] = {3, -100, 36, 0, 17};
  lcg(1, s, N * V);
  lcg(2, t, N * V);
  for (int i = 0; i < N * V; i++) grad[i] = NAN; /* poisoned */

  CHECK(strlen(kdfuse_version()) > 0, "empty version");

  KdfuseParams p;
  CHECK(kdfuse_params_default(&p) == KDFUSE_STATUS_OK, "params_default");
  CHECK(p.size == sizeof(KdfuseParams) && p.version == KDFUSE_ABI_VERSION, "params size/version");
  p.divergence = KDFUSE_DIVERGENCE_JSD;
  p.beta = 0.3;
  p.temperature = 2.0;
  p.alpha = 0.25;

  KdfuseBatch b;
  CHECK(kdfuse_batch_init(&b, N, V, KDFUSE_DTYPE_F32) == KDFUSE_STATUS_OK, "batch_init");
  float loss = NAN;
  int32_t valid = -1;
  b.student = s;
  b.teacher = t;
  b.labels = labels;
  b.grad = grad;
  b.row_losses = row_losses;
  b.loss = &loss;
  b.valid_rows = &valid;

  KdfuseStatus st = kdfuse_compute_host(&b, &p);
  CHECK(st == KDFUSE_STATUS_OK, "compute_host: status %d: %s", (int)st, kdfuse_last_error());
  CHECK(fabs(loss - want_loss) <= 1e-5 * fabs(want_loss), "loss %.9g, oracle %.9g", loss, want_loss);
  CHECK(valid == N - 1, "valid rows %d", (int)valid);
  CHECK(row_losses[1] == 0.0f, "ignored row's loss %g", row_losses[1]);
  double g2 = 0.0;
  for (int r = 0; r < N; r++) {
    double row_sum = 0.0;
    for (int j = 0; j < V; j++) {
      const float g = grad[r * V + j];
      CHECK(!isnan(g), "gradient [%d, %d] not written", r, j);
      if (r == 1) CHECK(g == 0.0f, "ignored row's gradient [1, %d] = %g", j, g);
      row_sum += g;
      g2 += (double)g * g;
    }
    /* Softmax shift invariance: each row's gradient sums to zero. */
    CHECK(fabs(row_sum) < 1e-6, "row %d gradient sums to %g", r, row_sum);
  }
  CHECK(fabs(sqrt(g2) - want_gnorm) <= 1e-5 * want_gnorm, "grad norm %.9g, oracle %.9g", sqrt(g2),
        want_gnorm);

  /* Errors: a status and a message naming the argument; nothing written. */
  KdfuseParams bad = p;
  bad.temperature = -1.0;
  st = kdfuse_compute_host(&b, &bad);
  CHECK(st == KDFUSE_STATUS_INVALID_ARGUMENT, "negative temperature: status %d", (int)st);
  CHECK(strstr(kdfuse_last_error(), "temperature") != NULL, "message: %s", kdfuse_last_error());
  bad = p;
  bad.divergence = 7;
  st = kdfuse_compute_host(&b, &bad);
  CHECK(st == KDFUSE_STATUS_INVALID_ARGUMENT && strstr(kdfuse_last_error(), "divergence"),
        "bad divergence: %d %s", (int)st, kdfuse_last_error());
  bad = p;
  bad.size = 8;
  st = kdfuse_compute_host(&b, &bad);
  CHECK(st == KDFUSE_STATUS_INVALID_ARGUMENT && strstr(kdfuse_last_error(), "size"),
        "bad struct size: %d %s", (int)st, kdfuse_last_error());
  KdfuseBatch bb = b;
  bb.student_stride = V - 1;
  st = kdfuse_compute_host(&bb, &p);
  CHECK(st == KDFUSE_STATUS_INVALID_ARGUMENT && strstr(kdfuse_last_error(), "student_stride"),
        "short stride: %d %s", (int)st, kdfuse_last_error());
  bb = b;
  bb.grad_dtype = KDFUSE_DTYPE_BF16;
  st = kdfuse_compute_host(&bb, &p);
  CHECK(st == KDFUSE_STATUS_INVALID_ARGUMENT && strstr(kdfuse_last_error(), "grad_dtype"),
        "bf16 gradient of f32 inputs: %d %s", (int)st, kdfuse_last_error());
  const int64_t bad_labels[N] = {3, -100, 37, 0, 17};
  bb = b;
  bb.labels = bad_labels;
  st = kdfuse_compute_host(&bb, &p);
  CHECK(st == KDFUSE_STATUS_INVALID_ARGUMENT && strstr(kdfuse_last_error(), "label"),
        "label out of range: %d %s", (int)st, kdfuse_last_error());
  st = kdfuse_compute_host(NULL, &p);
  CHECK(st == KDFUSE_STATUS_INVALID_ARGUMENT && strstr(kdfuse_last_error(), "batch"),
        "NULL batch: %d %s", (int)st, kdfuse_last_error());
  CHECK(kdfuse_params_default(NULL) == KDFUSE_STATUS_INVALID_ARGUMENT, "NULL params out");

  /* A success clears the message. */
  st = kdfuse_compute_host(&b, &p);
  CHECK(st == KDFUSE_STATUS_OK && kdfuse_last_error()[0] == '\0', "message after success: %s",
        kdfuse_last_error());

  /* Version-1 structs (a program built against the version-1 header): the
   * appended fields take their defaults; the same result. */
  {
    ParamsV1 p1;
    memcpy(&p1, &p, sizeof p1);
    p1.size = sizeof p1;
    p1.version = 1;
    BatchV1 b1;
    memcpy(&b1, &b, sizeof b1);
    b1.size = sizeof b1;
    b1.version = 1;
    float loss1 = NAN;
    b1.loss = &loss1;
    st = kdfuse_compute_host((const KdfuseBatch*)&b1, (const KdfuseParams*)&p1);
    CHECK(st == KDFUSE_STATUS_OK, "v1 structs: status %d: %s", (int)st, kdfuse_last_error());
    CHECK(loss1 == loss, "v1 structs: loss %.9g, v2 %.9g", loss1, loss);
    /* v1 params with a v2 batch and the other way round. */
    loss1 = NAN;
    KdfuseBatch b2 = b;
    b2.loss = &loss1;
    st = kdfuse_compute_host(&b2, (const KdfuseParams*)&p1);
    CHECK(st == KDFUSE_STATUS_OK && loss1 == loss, "v1 params, v2 batch: %d %.9g", (int)st, loss1);
    loss1 = NAN;
    st = kdfuse_compute_host((const KdfuseBatch*)&b1, &p);
    CHECK(st == KDFUSE_STATUS_OK && loss1 == loss, "v2 params, v1 batch: %d %.9g", (int)st, loss1);
    /* A size between the versions cuts a field: refused. */
    KdfuseParams pm = p;
    pm.size = (uint32_t)(sizeof(ParamsV1) + 8);
    CHECK_INVALID(kdfuse_compute_host(&b, &pm), "params.size", "size between versions");
  }
  CHECK(p.topk_mode == KDFUSE_TOPK_MODE_FULL && p.softcap == 0.0 && p.grad_teacher == 0 &&
            p.teacher_log_probs == 0,
        "version-2 params defaults");
  CHECK(b.row_weights == NULL && b.grad_teacher == NULL && b.grad_teacher_stride == V &&
            b.topk_indices == NULL && b.topk_values == NULL &&
            b.topk_index_dtype == KDFUSE_INDEX_DTYPE_I32 && b.validate_topk == 0,
        "version-2 batch defaults");

  /* The version-2 fields' errors name the field. */
  static float gt[N * V];
  static int64_t idx[N * K];
  static float vals[N * K];
  for (int r = 0; r < N; r++) {
    for (int i = 0; i < K; i++) {
      const int j = (r * 7 + i * 5) % V; /* distinct within a row */
      idx[r * K + i] = j;
      vals[r * K + i] = t[r * V + j];
    }
  }
  {
    KdfuseParams pp = p;
    pp.softcap = -1.0;
    CHECK_INVALID(kdfuse_compute_host(&b, &pp), "softcap", "negative softcap");
    pp = p;
    pp.topk_mode = 7;
    CHECK_INVALID(kdfuse_compute_host(&b, &pp), "topk_mode", "bad topk_mode");
    pp = p;
    pp.grad_teacher = 1;
    CHECK_INVALID(kdfuse_compute_host(&b, &pp), "grad_teacher", "grad_teacher flag, NULL buffer");
    bb = b;
    bb.grad_teacher = gt;
    CHECK_INVALID(kdfuse_compute_host(&bb, &p), "grad_teacher", "grad_teacher buffer, flag 0");
    pp = p;
    pp.grad_teacher = 1;
    bb.grad_teacher_stride = V - 1;
    CHECK_INVALID(kdfuse_compute_host(&bb, &pp), "grad_teacher_stride", "short teacher-grad stride");
    const float short_weights[N] = {1, 1, NAN, 1, 1};
    bb = b;
    bb.row_weights = short_weights;
    CHECK_INVALID(kdfuse_compute_host(&bb, &p), "row_weights", "NaN row weight");

    KdfuseBatch tb = with_topk(b, idx, KDFUSE_INDEX_DTYPE_I64, vals);
    pp = p;
    pp.divergence = KDFUSE_DIVERGENCE_FORWARD_KL;
    pp.beta = 0.5; /* JSD's alone: any other divergence refuses a non-default beta */
    bb = tb;
    bb.topk_values = NULL;
    CHECK_INVALID(kdfuse_compute_host(&bb, &pp), "topk_values", "indices without values");
    bb = tb;
    bb.topk_indices = NULL;
    CHECK_INVALID(kdfuse_compute_host(&bb, &pp), "topk_values", "values without indices");
    bb = tb;
    bb.teacher = t;
    CHECK_INVALID(kdfuse_compute_host(&bb, &pp), "teacher", "dense and top-k teacher");
    bb = tb;
    bb.topk_k = V + 1;
    CHECK_INVALID(kdfuse_compute_host(&bb, &pp), "topk_k", "k > V");
    bb = tb;
    bb.topk_index_dtype = 5;
    CHECK_INVALID(kdfuse_compute_host(&bb, &pp), "topk_index_dtype", "bad index dtype");
    static int64_t dup[N * K];
    memcpy(dup, idx, sizeof dup);
    dup[3 * K + 2] = dup[3 * K];
    bb = tb;
    bb.topk_indices = dup;
    CHECK_INVALID(kdfuse_compute_host(&bb, &pp), "topk_indices", "duplicate index");
    CHECK(strstr(kdfuse_last_error(), "row 3") != NULL, "duplicate index names row 3: %s",
          kdfuse_last_error());
    static int64_t oor[N * K];
    memcpy(oor, idx, sizeof oor);
    oor[K + 1] = V;
    bb = tb;
    bb.topk_indices = oor;
    CHECK_INVALID(kdfuse_compute_host(&bb, &pp), "topk_indices", "index out of range");
    CHECK(strstr(kdfuse_last_error(), "row 1") != NULL, "out-of-range index names row 1: %s",
          kdfuse_last_error());
    pp.grad_teacher = 1;
    bb = tb;
    bb.grad_teacher = gt;
    CHECK_INVALID(kdfuse_compute_host(&bb, &pp), "grad_teacher", "teacher gradient of top-k");
    pp = p;
    CHECK_INVALID(kdfuse_compute_host(&tb, &pp), "forward-kl", "JSD with a top-k teacher");
  }

  if (argc == 8) {
    /* Soft-capping, row weights and the teacher gradient. */
    const double want_cap_loss = strtod(argv[3], NULL), want_cap_gnorm = strtod(argv[4], NULL),
                 want_gtnorm = strtod(argv[5], NULL);
    const float weights[N] = {0.5f, 0.75f, 1.0f, 1.25f, 1.5f};
    KdfuseParams pc = p;
    pc.softcap = 4.0;
    pc.grad_teacher = 1;
    KdfuseBatch bc = b;
    bc.row_weights = weights;
    bc.grad_teacher = gt;
    for (int i = 0; i < N * V; i++) grad[i] = gt[i] = NAN;
    float cap_loss = NAN;
    bc.loss = &cap_loss;
    st = kdfuse_compute_host(&bc, &pc);
    CHECK(st == KDFUSE_STATUS_OK, "softcap/weights/grad_teacher: status %d: %s", (int)st,
          kdfuse_last_error());
    CHECK(fabs(cap_loss - want_cap_loss) <= 1e-5 * fabs(want_cap_loss), "capped loss %.9g, oracle %.9g",
          cap_loss, want_cap_loss);
    CHECK(fabs(norm(grad, N * V) - want_cap_gnorm) <= 1e-5 * want_cap_gnorm,
          "capped grad norm %.9g, oracle %.9g", norm(grad, N * V), want_cap_gnorm);
    CHECK(fabs(norm(gt, N * V) - want_gtnorm) <= 1e-5 * want_gtnorm,
          "teacher grad norm %.9g, oracle %.9g", norm(gt, N * V), want_gtnorm);

    /* A top-k teacher (int32 indices, full mode). */
    const double want_topk_loss = strtod(argv[6], NULL), want_topk_gnorm = strtod(argv[7], NULL);
    static int32_t idx32[N * K];
    for (int i = 0; i < N * K; i++) idx32[i] = (int32_t)idx[i];
    KdfuseParams pk = p;
    pk.divergence = KDFUSE_DIVERGENCE_FORWARD_KL;
    pk.beta = 0.5;
    pk.topk_mode = KDFUSE_TOPK_MODE_FULL;
    KdfuseBatch bk = with_topk(b, idx32, KDFUSE_INDEX_DTYPE_I32, vals);
    for (int i = 0; i < N * V; i++) grad[i] = NAN;
    float topk_loss = NAN;
    bk.loss = &topk_loss;
    st = kdfuse_compute_host(&bk, &pk);
    CHECK(st == KDFUSE_STATUS_OK, "top-k: status %d: %s", (int)st, kdfuse_last_error());
    CHECK(fabs(topk_loss - want_topk_loss) <= 1e-5 * fabs(want_topk_loss),
          "top-k loss %.9g, oracle %.9g", topk_loss, want_topk_loss);
    CHECK(fabs(norm(grad, N * V) - want_topk_gnorm) <= 1e-5 * want_topk_gnorm,
          "top-k grad norm %.9g, oracle %.9g", norm(grad, N * V), want_topk_gnorm);
    printf("abi_test: version-2 fields checked\n");
  }

  /* CUDA: a context on a machine without a GPU is a clean status. */
  KdfuseContext* ctx = NULL;
  st = kdfuse_context_create(0, &ctx);
  if (st == KDFUSE_STATUS_OK) {
    printf("abi_test: CUDA device 0 opened\n");
    CHECK(kdfuse_compute_cuda(ctx, NULL, &p, NULL) == KDFUSE_STATUS_INVALID_ARGUMENT, "NULL batch on CUDA");
    CHECK(kdfuse_context_destroy(ctx) == KDFUSE_STATUS_OK, "destroy");
  } else {
    CHECK(st == KDFUSE_STATUS_CUDA_UNAVAILABLE && ctx == NULL, "context_create: %d", (int)st);
    printf("abi_test: no CUDA context (%s)\n", kdfuse_last_error());
  }
  CHECK(kdfuse_context_create(-1, &ctx) != KDFUSE_STATUS_OK, "negative device");
  CHECK(kdfuse_context_destroy(NULL) == KDFUSE_STATUS_OK, "destroy NULL");

  if (failures) return 1;
  printf("abi_test: ok (loss %.9g, oracle %.9g)\n", loss, want_loss);
  return 0;
}
