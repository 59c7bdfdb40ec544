/* abi_test.c — the C ABI from C: computes a JSD + hard-label loss and its
 * gradient on the CPU backend (kdfuse_compute_host) and compares them with
 * the f64 oracle's values, passed by tests/c_abi.rs as argv[1] (loss) and
 * argv[2] (the gradient's L2 norm); then checks the error paths. Prints
 * "abi_test: ok" and exits 0 when everything holds. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kdfuse.h"

#define N 5
#define V 37

static int failures = 0;

#define CHECK(cond, ...)                      \
  do {                                        \
    if (!(cond)) {                            \
      fprintf(stderr, "abi_test: FAILED: ");  \
      fprintf(stderr, __VA_ARGS__);           \
      fprintf(stderr, "\n");                  \
      failures++;                             \
    }                                         \
  } while (0)

/* The same generator as tests/c_abi.rs. */
static void lcg(uint64_t seed, float* out, int n) {
  uint64_t x = seed;
  for (int i = 0; i < n; i++) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    out[i] = ((float)(x >> 40) / 16777216.0f - 0.5f) * 6.0f;
  }
}

int main(int argc, char** argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: abi_test EXPECTED_LOSS EXPECTED_GRAD_NORM\n");
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
