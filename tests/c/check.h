/* check.h — the C test programs' checks: CHECK reports a failed condition
 * (prefixed with CHECK_NAME, which the program defines first) and counts it
 * in `failures`; CHECK_INVALID expects INVALID_ARGUMENT and a message naming
 * `field`. */
#ifndef KDFUSE_TEST_CHECK_H
#define KDFUSE_TEST_CHECK_H

#include <stdio.h>
#include <string.h>

#include "kdfuse.h"

static int failures = 0;

#define CHECK(cond, ...)                            \
  do {                                              \
    if (!(cond)) {                                  \
      fprintf(stderr, CHECK_NAME ": FAILED: ");     \
      fprintf(stderr, __VA_ARGS__);                 \
      fprintf(stderr, "\n");                        \
      failures++;                                   \
    }                                               \
  } while (0)

/* The call failed with InvalidArgument and a message containing `field`. */
#define CHECK_INVALID(call, field, what)                                                   \
  do {                                                                                     \
    KdfuseStatus st_ = (call);                                                             \
    CHECK(st_ == KDFUSE_STATUS_INVALID_ARGUMENT && strstr(kdfuse_last_error(), (field)), \
          "%s: status %d: %s", (what), (int)st_, kdfuse_last_error());                     \
  } while (0)

#endif
