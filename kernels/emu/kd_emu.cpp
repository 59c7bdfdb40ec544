// kd_emu.cpp — kernels/kd/kd_fused.cu, kd_fast.cu, kd_single.cu and
// kd_topk.cu compiled for the CPU under cuda_emu.h, so that `cargo test`
// runs the kernels' own parallel code (not only their row arithmetic) on
// machines without a GPU. Test-only entry points: kd_emu_run,
// kd_emu_single_run, kd_emu_topk_run and kd_emu_single_topk_run, the same three launches as the CUDA
// backend (count, fused, reduce), each counting the bytes its loss kernel
// moves (KdEmuTrack); kd_emu_topk_validate; and kd_emu_cluster_probe, the
// race checker's own test.
#include "cuda_emu.h"

#include "kd/kd_fast.cu"
#include "kd/kd_fused.cu"
#include "kd/kd_single.cu"
#include "kd/kd_topk.cu"

namespace {

// variant: 0 the exact kernel (kd_fused.cu), 1 the fast one (kd_fast.cu),
// 2 the fast one with α > 0.
template <typename Tin, typename Tout, int DIV>
void fused_div(int variant, const KdFusedArgs& a, unsigned grid, unsigned block) {
  if (variant == 1)
    return kd_emu_launch(grid, block, [&] { kd_fast_body<Tin, Tout, DIV, false, false>(a, kd_fast_scratch()); });
  if (variant == 2)
    return kd_emu_launch(grid, block, [&] { kd_fast_body<Tin, Tout, DIV, true, false>(a, kd_fast_scratch()); });
  kd_emu_launch(grid, block, [&] { kd_fused_body<Tin, Tout, DIV, false>(a, kd_fused_scratch()); });
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
// `track` (or null) gets the bytes the loss kernel moved.
extern "C" int kd_emu_run(int div, int variant, int in_dtype, int out_dtype, const KdFusedArgs* a,
                          float* loss, unsigned grid, unsigned block, KdEmuTrack* track) {
  std::lock_guard<std::mutex> lock(kd_emu_mutex);
  count_valid(a->labels, a->n_rows, a->params.ignore_index, a->valid_count);
  kd_emu_bytes_begin(track);
  if (a->n_rows > 0 && !with_dtypes(in_dtype, out_dtype, [&](auto tin, auto tout) {
        fused<decltype(tin), decltype(tout)>(div, variant, *a, grid, block);
      }))
    return -1;
  kd_emu_bytes_end(track);
  kd_emu_bytes_begin(nullptr);
  reduce_loss(a->row_loss, a->n_rows, a->valid_count, a->params, loss);
  return 0;
}

namespace {

template <typename Tin, typename Tout, int DIV>
void single_div(int variant, const KdFusedArgs& a, unsigned grid, unsigned block, unsigned cluster,
                unsigned long long smem, std::string& race) {
  auto run = [&](auto body) { race = kd_emu_launch_cluster(grid, block, cluster, smem, body); };
  constexpr int T = KD_SINGLE_THREADS;
  if (variant == 1)
    return run([&] { kd_fast_body<Tin, Tout, DIV, false, true>(a, kd_scratch_dyn<KdFast, T>()); });
  if (variant == 2)
    return run([&] { kd_fast_body<Tin, Tout, DIV, true, true>(a, kd_scratch_dyn<KdFast, T>()); });
  run([&] { kd_fused_body<Tin, Tout, DIV, true>(a, kd_scratch_dyn<KdPass1, T>()); });
}

template <typename Tin, typename Tout>
void single(int div, int variant, const KdFusedArgs& a, unsigned grid, unsigned block, unsigned cluster,
            unsigned long long smem, std::string& race) {
  switch (div) {
    case KD_DIV_FKL: single_div<Tin, Tout, KD_DIV_FKL>(variant, a, grid, block, cluster, smem, race); break;
    case KD_DIV_RKL: single_div<Tin, Tout, KD_DIV_RKL>(variant, a, grid, block, cluster, smem, race); break;
    case KD_DIV_JSD: single_div<Tin, Tout, KD_DIV_JSD>(variant, a, grid, block, cluster, smem, race); break;
    case KD_DIV_TVD: single_div<Tin, Tout, KD_DIV_TVD>(variant, a, grid, block, cluster, smem, race); break;
    default: single_div<Tin, Tout, KD_DIV_SCE>(variant, a, grid, block, cluster, smem, race); break;
  }
}

void copy_message(const std::string& m, char* out, unsigned long long cap) {
  if (!out || cap == 0) return;
  const unsigned long long n = m.size() < cap - 1 ? m.size() : cap - 1;
  std::memcpy(out, m.data(), n);
  out[n] = 0;
}

// A single-read launch on the launch contract `a` (with labels, row_loss,
// valid_count, n_rows, params): checks the shape (`need` bytes of shared
// memory per CTA, at most `max_block` threads), then count, the loss kernel
// (`run(found)`: false for an unsupported dtype pair; `found` the race
// checker's report) with its bytes counted, and the reduction. Returns 0,
// −1 (unsupported) or −2 (a race, described in `race`).
template <typename Args, typename F>
int cluster_launch(const Args& a, long long need, unsigned clusters, unsigned cluster, unsigned block,
                   unsigned max_block, unsigned long long smem, float* loss, KdEmuTrack* track,
                   char* race, unsigned long long race_cap, F&& run) {
  if (cluster == 0 || cluster > KD_SINGLE_MAX_CLUSTER || block == 0 || block % 32 ||
      block > max_block || clusters == 0 || (unsigned long long)need > smem)
    return -1;
  std::lock_guard<std::mutex> lock(kd_emu_mutex);
  count_valid(a.labels, a.n_rows, a.params.ignore_index, a.valid_count);
  std::string found;
  kd_emu_bytes_begin(track);
  if (a.n_rows > 0 && !run(found)) return -1;
  kd_emu_bytes_end(track);
  kd_emu_bytes_begin(nullptr);
  reduce_loss(a.row_loss, a.n_rows, a.valid_count, a.params, loss);
  copy_message(found, race, race_cap);
  return found.empty() ? 0 : -2;
}

}  // namespace

// The single-read launches (kd_single.cu): count, the loss kernel as
// `clusters` clusters of `cluster` CTAs of `block` threads (at most
// KD_SINGLE_THREADS) with `smem` bytes of dynamic shared memory each, and
// the reduction. Returns 0; −1 for an unsupported dtype pair or launch
// shape; −2 when the race checker found a race (described in `race`, a
// buffer of `race_cap` bytes).
extern "C" int kd_emu_single_run(int div, int variant, int in_dtype, int out_dtype,
                                 const KdFusedArgs* a, float* loss, unsigned clusters,
                                 unsigned cluster, unsigned block, unsigned long long smem,
                                 KdEmuTrack* track, char* race, unsigned long long race_cap) {
  const long long need = kd_single_smem(a->params.vocab, in_dtype == 0 ? 4 : 2, cluster);
  return cluster_launch(*a, need, clusters, cluster, block, KD_SINGLE_THREADS, smem, loss, track,
                        race, race_cap, [&](std::string& found) {
                          return with_dtypes(in_dtype, out_dtype, [&](auto tin, auto tout) {
                            single<decltype(tin), decltype(tout)>(div, variant, *a, clusters * cluster,
                                                                  block, cluster, smem, found);
                          });
                        });
}

// The race checker's own test: a cluster of 4 CTAs, each publishes its rank
// in its shared memory and reads its neighbour's. `mode` 0: correctly (a
// cluster barrier between the store and the loads, and one before leaving);
// 1: loads before the barrier; 2: stores again while the others may still
// be loading; 3: leaves without the last barrier. Returns 1 when a race
// was reported (described in `race`), 0 when none, −1 when the values read
// were wrong without a report.
extern "C" int kd_emu_cluster_probe(int mode, char* race, unsigned long long race_cap) {
  std::lock_guard<std::mutex> lock(kd_emu_mutex);
  std::atomic<int> wrong{0};
  const std::string found = kd_emu_launch_cluster(4, 32, 4, 64, [&] {
    unsigned* slot = reinterpret_cast<unsigned*>(kd_dyn_smem());
    const unsigned me = kd_cluster_rank(), next = (me + 1) % kd_cluster_size();
    if (threadIdx.x == 0) kd_dsmem_store(slot, me);
    if (mode != 1) kd_cluster_sync();
    const unsigned got = threadIdx.x == 0 ? kd_dsmem_load(slot, next) : next;
    if (mode == 1) kd_cluster_sync();
    if (got != next) wrong = 1;
    if (mode == 2 && threadIdx.x == 0) kd_dsmem_store(slot, me + 100);
    if (mode != 3) kd_cluster_sync();
  });
  copy_message(found, race, race_cap);
  if (!found.empty()) return 1;
  return wrong ? -1 : 0;
}

// The top-k launches; `idx64`: the indices are int64 (else int32). The bit
// map (the kernel's dynamic shared memory) is a buffer of (V + 31) / 32 words.
extern "C" int kd_emu_topk_run(int in_dtype, int out_dtype, int idx64, const KdTopkArgs* a,
                               float* loss, unsigned grid, unsigned block, KdEmuTrack* track) {
  std::lock_guard<std::mutex> lock(kd_emu_mutex);
  count_valid(a->labels, a->n_rows, a->params.ignore_index, a->valid_count);
  kd_emu_bytes_begin(track);
  std::vector<uint32_t> bits(((size_t)a->params.vocab + 31) / 32);
  if (a->n_rows > 0 && !with_dtypes(in_dtype, out_dtype, [&](auto tin, auto tout) {
        using Tin = decltype(tin);
        using Tout = decltype(tout);
        kd_emu_launch(grid, block, [&] {
          if (idx64)
            kd_topk_body<Tin, Tout, long long, false>(*a, bits.data(), kd_topk_scratch());
          else
            kd_topk_body<Tin, Tout, int, false>(*a, bits.data(), kd_topk_scratch());
        });
      }))
    return -1;
  kd_emu_bytes_end(track);
  kd_emu_bytes_begin(nullptr);
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

// The single-read top-k launches (kd_topk.cu, kd_single_topk_*): as
// kd_emu_single_run, with the top-k launch contract; `idx64`: the indices
// are int64.
extern "C" int kd_emu_single_topk_run(int in_dtype, int out_dtype, int idx64, const KdTopkArgs* a,
                                      float* loss, unsigned clusters, unsigned cluster, unsigned block,
                                      unsigned long long smem, KdEmuTrack* track, char* race,
                                      unsigned long long race_cap) {
  const long long need = kd_single_topk_smem(a->params.vocab, in_dtype == 0 ? 4 : 2, cluster);
  return cluster_launch(*a, need, clusters, cluster, block, KD_TOPK_THREADS, smem, loss, track, race,
                        race_cap, [&](std::string& found) {
                          return with_dtypes(in_dtype, out_dtype, [&](auto tin, auto tout) {
                            using Tin = decltype(tin);
                            using Tout = decltype(tout);
                            found = kd_emu_launch_cluster(clusters * cluster, block, cluster, smem, [&] {
                              constexpr int T = KD_TOPK_THREADS;
                              uint32_t* bits = kd_topk_slice_bits<Tin>(a->params.vocab);
                              if (idx64)
                                kd_topk_body<Tin, Tout, long long, true>(*a, bits,
                                                                         kd_scratch_dyn<KdPass1, T>());
                              else
                                kd_topk_body<Tin, Tout, int, true>(*a, bits, kd_scratch_dyn<KdPass1, T>());
                            });
                          });
                        });
}
