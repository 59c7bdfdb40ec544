// kd_emu.cpp — kernels/kd_fused.cu and kernels/kd_topk.cu compiled for the
// CPU under cuda_emu.h, so that `cargo test` runs the kernels' own parallel
// code (not only their row arithmetic) on machines without a GPU. Test-only
// entry points: kd_emu_run and kd_emu_topk_run, the same three launches as
// the CUDA backend (count, fused, reduce), and kd_emu_topk_validate.
#include "cuda_emu.h"

#include "../kd_fused.cu"
#include "../kd_topk.cu"

namespace {

// Arguments of one fused launch (type-erased).
struct FusedArgs {
  const void* s;
  long long ss;
  const void* t;
  long long ts;
  const long long* labels;
  const float* row_weights;
  void* grad;
  long long gs;
  void* grad_t;
  long long gts;
  float* row_loss;
  const int* valid;
  long long n;
};

template <typename Tin, typename Tout, int DIV>
void fused_div(const FusedArgs& a, const KdParams& P, unsigned grid, unsigned block) {
  kd_emu_launch(grid, block, [&] {
    kd_fused_body<Tin, Tout, DIV>(static_cast<const Tin*>(a.s), a.ss, static_cast<const Tin*>(a.t),
                                  a.ts, a.labels, a.row_weights, static_cast<Tout*>(a.grad), a.gs,
                                  static_cast<Tout*>(a.grad_t), a.gts, a.row_loss, a.valid, a.n, P);
  });
}

template <typename Tin, typename Tout>
void fused(int div, const FusedArgs& a, const KdParams& P, unsigned grid, unsigned block) {
  switch (div) {
    case KD_DIV_FKL: fused_div<Tin, Tout, KD_DIV_FKL>(a, P, grid, block); break;
    case KD_DIV_RKL: fused_div<Tin, Tout, KD_DIV_RKL>(a, P, grid, block); break;
    case KD_DIV_JSD: fused_div<Tin, Tout, KD_DIV_JSD>(a, P, grid, block); break;
    case KD_DIV_TVD: fused_div<Tin, Tout, KD_DIV_TVD>(a, P, grid, block); break;
    default: fused_div<Tin, Tout, KD_DIV_SCE>(a, P, grid, block); break;
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

extern "C" void kd_emu_count_valid(const long long* labels, long long n, long long ignore_index,
                                   int* valid) {
  kd_emu_launch(1, 64, [&] { kd_count_valid(labels, n, ignore_index, valid); });
}

extern "C" void kd_emu_reduce_loss(const float* row_loss, long long n, const int* valid,
                                   const KdParams* P, float* loss) {
  kd_emu_launch(1, 64, [&] { kd_reduce_loss(row_loss, n, valid, *P, loss); });
}

// dtype codes: 0 f32, 1 bf16, 2 f16. Returns 0, or −1 for an unsupported pair.
extern "C" int kd_emu_run(int div, int in_dtype, int out_dtype, const void* s, long long ss,
                          const void* t, long long ts, const long long* labels, long long ignore_index,
                          const float* row_weights, void* grad, long long gs, void* grad_t,
                          long long gts, float* row_loss, int* valid, float* loss, long long n,
                          const KdParams* P, unsigned grid, unsigned block) {
  std::lock_guard<std::mutex> lock(kd_emu_mutex);
  if (labels) kd_emu_count_valid(labels, n, ignore_index, valid);
  const FusedArgs a{s, ss, t, ts, labels, row_weights, grad, gs, grad_t, gts, row_loss,
                    labels ? valid : nullptr, n};
  if (n > 0 && !with_dtypes(in_dtype, out_dtype, [&](auto tin, auto tout) {
        fused<decltype(tin), decltype(tout)>(div, a, *P, grid, block);
      }))
    return -1;
  kd_emu_reduce_loss(row_loss, n, a.valid, P, loss);
  return 0;
}

// The top-k launches; `idx64`: the indices are int64 (else int32). The bit
// map (the kernel's dynamic shared memory) is a buffer of (V + 31) / 32 words.
extern "C" int kd_emu_topk_run(int in_dtype, int out_dtype, const void* s, long long ss,
                               const void* idx, int idx64, const void* vals,
                               const long long* labels, long long ignore_index,
                               const float* row_weights, void* grad, long long gs, float* row_loss,
                               int* valid, float* loss, long long n, const KdParams* P,
                               unsigned grid, unsigned block) {
  std::lock_guard<std::mutex> lock(kd_emu_mutex);
  if (labels) kd_emu_count_valid(labels, n, ignore_index, valid);
  const int* vp = labels ? valid : nullptr;
  std::vector<uint32_t> bits(((size_t)P->vocab + 31) / 32);
  if (n > 0 && !with_dtypes(in_dtype, out_dtype, [&](auto tin, auto tout) {
        using Tin = decltype(tin);
        using Tout = decltype(tout);
        kd_emu_launch(grid, block, [&] {
          if (idx64)
            kd_topk_body<Tin, Tout, long long>(
                static_cast<const Tin*>(s), ss, static_cast<const long long*>(idx),
                static_cast<const Tin*>(vals), labels, row_weights, static_cast<Tout*>(grad), gs,
                row_loss, vp, n, *P, bits.data());
          else
            kd_topk_body<Tin, Tout, int>(static_cast<const Tin*>(s), ss,
                                         static_cast<const int*>(idx),
                                         static_cast<const Tin*>(vals), labels, row_weights,
                                         static_cast<Tout*>(grad), gs, row_loss, vp, n, *P,
                                         bits.data());
        });
      }))
    return -1;
  kd_emu_reduce_loss(row_loss, n, vp, P, loss);
  return 0;
}

// The validation pass; returns the first bad row, or n when every row is good.
extern "C" long long kd_emu_topk_validate(const void* idx, int idx64, long long n, int k, int V,
                                          unsigned grid, unsigned block) {
  std::lock_guard<std::mutex> lock(kd_emu_mutex);
  unsigned long long first = (unsigned long long)n;
  std::vector<uint32_t> bits(((size_t)V + 31) / 32);
  kd_emu_launch(grid, block, [&] {
    if (idx64)
      kd_topk_validate_body(static_cast<const long long*>(idx), n, k, V, &first, bits.data());
    else
      kd_topk_validate_body(static_cast<const int*>(idx), n, k, V, &first, bits.data());
  });
  return (long long)first;
}
