// kd_emu.cpp — kernels/kd/kd_fused.cu and kernels/kd/kd_topk.cu compiled for the
// CPU under cuda_emu.h, so that `cargo test` runs the kernels' own parallel
// code (not only their row arithmetic) on machines without a GPU. Test-only
// entry points: kd_emu_run and kd_emu_topk_run, the same three launches as
// the CUDA backend (count, fused, reduce), and kd_emu_topk_validate.
#include "cuda_emu.h"

#include "kd/kd_fast.cu"
#include "kd/kd_fused.cu"
#include "kd/kd_topk.cu"

namespace {

// variant: 0 the exact kernel (kd_fused.cu), 1 the fast one (kd_fast.cu),
// 2 the fast one with α > 0.
template <typename Tin, typename Tout, int DIV>
void fused_div(int variant, const KdFusedArgs& a, unsigned grid, unsigned block) {
  if (variant == 1) return kd_emu_launch(grid, block, [&] { kd_fast_body<Tin, Tout, DIV, false>(a); });
  if (variant == 2) return kd_emu_launch(grid, block, [&] { kd_fast_body<Tin, Tout, DIV, true>(a); });
  kd_emu_launch(grid, block, [&] { kd_fused_body<Tin, Tout, DIV>(a); });
}

template <typename Tin, typename Tout>
void fused(int div, int variant, const KdFusedArgs& a, unsigned grid, unsigned block) {
  switch (div) {
    case KD_DIV_FKL: fused_div<Tin, Tout, KD_DIV_FKL>(variant, a, grid, block); break;
    case KD_DIV_RKL: fused_div<Tin, Tout, KD_DIV_RKL>(variant, a, grid, block); break;
    case KD_DIV_JSD: fused_div<Tin, Tout, KD_DIV_JSD>(variant, a, grid, block); break;
    case KD_DIV_TVD: fused_div<Tin, Tout, KD_DIV_TVD>(variant, a, grid, block); break;
    default: fused_div<Tin, Tout, KD_DIV_SCE>(variant, a, grid, block); break;
  }
}

// Calls f(Tin{}, Tout{}) for a supported dtype pair; false otherwise.
template <typename F>
bool with_dtypes(int in_dtype, int out_dtype, F&& f) {
  if (in_dtype == 0 && out_dtype == 0) f(float{}, float{});
  else if (in_dtype == 1 && out_dtype == 1) f(kd_bf16{}, kd_bf16{});
  else if (in_dtype == 1 && out_dtype == 0) f(kd_bf16{}, float{});
  else if (in_dtype == 2 && out_dtype == 2) f(kd_f16{}, kd_f16{});
  else if (in_dtype == 2 && out_dtype == 0) f(kd_f16{}, float{});
  else return false;
  return true;
}

}  // namespace

// kd_count_valid and kd_reduce_loss on their launch contracts (kd_args.h);
// also the eager and feature units' (eager_emu.cpp, feature_emu.cpp).
extern "C" void kd_emu_count_valid(const KdCountArgs* a) {
  kd_emu_launch(1, 64, [&] { kd_count_valid(*a); });
}

extern "C" void kd_emu_reduce_loss(const KdReduceArgs* a) {
  kd_emu_launch(1, 64, [&] { kd_reduce_loss(*a); });
}

namespace {

// With labels, the valid-row count into `valid` (the launch contracts' const
// pointer is the count's output here, as on the GPU).
void count_valid(const long long* labels, long long n, long long ignore_index, const int* valid) {
  if (!labels) return;
  const KdCountArgs c{labels, n, ignore_index, const_cast<int*>(valid)};
  kd_emu_count_valid(&c);
}

void reduce_loss(const float* row_loss, long long n, const int* valid, const KdParams& P,
                 float* loss) {
  const KdReduceArgs r{row_loss, n, valid, loss, P};
  kd_emu_reduce_loss(&r);
}

}  // namespace

// The three launches of the CUDA backend (count, fused, reduce) on the
// launch contract `a` (kd_args.h), with the kernel `variant` (fused_div); with labels, the count is written to
// a->valid_count first. dtype codes: 0 f32, 1 bf16, 2 f16. Returns 0, or −1
// for an unsupported pair.
extern "C" int kd_emu_run(int div, int variant, int in_dtype, int out_dtype, const KdFusedArgs* a,
                          float* loss, unsigned grid, unsigned block) {
  std::lock_guard<std::mutex> lock(kd_emu_mutex);
  count_valid(a->labels, a->n_rows, a->params.ignore_index, a->valid_count);
  if (a->n_rows > 0 && !with_dtypes(in_dtype, out_dtype, [&](auto tin, auto tout) {
        fused<decltype(tin), decltype(tout)>(div, variant, *a, grid, block);
      }))
    return -1;
  reduce_loss(a->row_loss, a->n_rows, a->valid_count, a->params, loss);
  return 0;
}

// The top-k launches; `idx64`: the indices are int64 (else int32). The bit
// map (the kernel's dynamic shared memory) is a buffer of (V + 31) / 32 words.
extern "C" int kd_emu_topk_run(int in_dtype, int out_dtype, int idx64, const KdTopkArgs* a,
                               float* loss, unsigned grid, unsigned block) {
  std::lock_guard<std::mutex> lock(kd_emu_mutex);
  count_valid(a->labels, a->n_rows, a->params.ignore_index, a->valid_count);
  std::vector<uint32_t> bits(((size_t)a->params.vocab + 31) / 32);
  if (a->n_rows > 0 && !with_dtypes(in_dtype, out_dtype, [&](auto tin, auto tout) {
        using Tin = decltype(tin);
        using Tout = decltype(tout);
        kd_emu_launch(grid, block, [&] {
          if (idx64)
            kd_topk_body<Tin, Tout, long long>(*a, bits.data());
          else
            kd_topk_body<Tin, Tout, int>(*a, bits.data());
        });
      }))
    return -1;
  reduce_loss(a->row_loss, a->n_rows, a->valid_count, a->params, loss);
  return 0;
}

// The validation pass on its launch contract (a->first_bad set to N by the
// caller); `idx64`: the indices are int64.
extern "C" void kd_emu_topk_validate(const KdTopkValidateArgs* a, int idx64, unsigned grid,
                                     unsigned block) {
  std::lock_guard<std::mutex> lock(kd_emu_mutex);
  std::vector<uint32_t> bits(((size_t)a->vocab + 31) / 32);
  kd_emu_launch(grid, block, [&] {
    if (idx64)
      kd_topk_validate_body(static_cast<const long long*>(a->indices), a->n_rows, a->k, a->vocab,
                            a->first_bad, bits.data());
    else
      kd_topk_validate_body(static_cast<const int*>(a->indices), a->n_rows, a->k, a->vocab,
                            a->first_bad, bits.data());
  });
}
