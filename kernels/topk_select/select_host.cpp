// select_host.cpp — the layout of the selection launch contract
// (select_args.h) as the host C++ compiler sees it, so that a test can hold
// the Rust mirror (src/topk_select/params.rs) to it.
#include <cstddef>

#include "topk_select/select_args.h"

#define KD_SEL_FIELD(F) out[i++] = (long long)offsetof(KdSelectArgs, F)

// Writes sizeof(KdSelectArgs) and the offset of every field in declaration
// order; returns the count of values written (at most 16).
extern "C" int kd_select_host_layout(long long* out) {
  int i = 0;
  out[i++] = (long long)sizeof(KdSelectArgs);
  KD_SEL_FIELD(logits);
  KD_SEL_FIELD(indices);
  KD_SEL_FIELD(values);
  KD_SEL_FIELD(lse);
  KD_SEL_FIELD(bad_row);
  KD_SEL_FIELD(n_rows);
  KD_SEL_FIELD(stride);
  KD_SEL_FIELD(cols);
  KD_SEL_FIELD(k);
  return i;
}
