// kd_topk.cu — the fused loss + gradient with a top-k (sparse) teacher
// (docs/DESIGN.md §4): forward KL against a teacher given as k (index, value)
// pairs per row, in modes support / full / tail (P.topk_mode).
//
// One body, two kernels: v1 (kd_topk_*: one CTA per row, grid-stride over
// rows) and single-read (kd_single_topk_*, sm_90 and later: a thread-block
// cluster of 1–16 CTAs per row, each CTA staging its slice of the student in
// shared memory; docs/DESIGN.md §5 "Single-read kernels").
//   mark:   the row's k indices (single-read: those in the CTA's slice) set
//           bits in a bit map in shared memory; an index out of [0, V) or
//           already set makes the row bad (NaN): the row's CTAs agree
//           through one reduction.
//   pass 1: the student slice is swept once (single-read: and kept);
//           off-support elements join forward KL's online statistics
//           against a −inf teacher (full, tail) or only the hard CE's
//           (support); the support pairs (s_i, v_i) a CTA owns are gathered
//           (s_i from the copy) and pushed as a dense teacher's would be. The
//           merge and row finish are the dense kernel's (kd_math.cuh).
//   tail:   full mode's statistics, rescaled (kd_tail_finish) by Σ e^{v_i}
//           (summed in the gather).
//   last:   off-support gradients from a sweep (single-read: of the copy),
//           support gradients from the owned pairs; each element written
//           once (v1: by the thread that read it, so the gradient may
//           overwrite the student).
// Bytes per element of the student row: v1 2·in + out (in = input size,
// out = gradient size) when the re-read misses L2, single-read in + out
// (4 B in bf16); per row the values twice (once for loss only) and the k
// indices three times per CTA (twice for loss only); the teacher is never
// read densely. Loss only with support mode and α = 0: the k gathered
// student entries only.
// Issue slots per element of the student row (sm_90 SASS,
// scripts/sass-report, bf16 in and out): v1 ≈ 675 (sweep ≈ 353, gradient
// ≈ 322), MUFU 36; single-read ≈ 660 (355 + 306), MUFU 35: the same exact
// arithmetic, under ceilings (kernels/budgets.toml). The launch
// contract is KdTopkArgs in kd_args.h; the single-read layout
// kd_single_topk_smem (kd_single_layout.h).
//
// Also here: kd_topk_validate (the optional validation pass: the first row
// with an index out of range or repeated, via kd_topk_mark's bit map).
#include "kd/kd_args.h"
#include "kd/kd_stage.cuh"

#define KD_TOPK_THREADS 256

// The bit map lives in dynamic shared memory; the CPU emulation calls the
// bodies with its own buffer and never runs these entry points.
#ifdef KD_EMU
#define KD_TOPK_BITS uint32_t* kd_topk_bits = nullptr
#else
#define KD_TOPK_BITS extern __shared__ uint32_t kd_topk_bits[]
#endif

// 64-bit index loads of either index type.
__device__ __forceinline__ long long kd_index(const int* p, int i) { return p[i]; }
__device__ __forceinline__ long long kd_index(const long long* p, int i) { return p[i]; }

// Clears the bit map and sets the row's k indices; every thread gets whether
// an index was out of [0, V) or repeated. Ends with a barrier.
template <typename I>
__device__ bool kd_topk_mark(const I* irow, int k, int V, uint32_t* bits, int* flag) {
  const int nwords = (V + 31) >> 5;
  for (int w = threadIdx.x; w < nwords; w += blockDim.x) bits[w] = 0u;
  if (threadIdx.x == 0) *flag = 0;
  __syncthreads();
  for (int i = threadIdx.x; i < k; i += blockDim.x) {
    const long long j = kd_index(irow, i);
    if (j < 0 || j >= V) {
      *flag = 1;
      continue;
    }
    const uint32_t bit = 1u << (j & 31);
    if (atomicOr(&bits[j >> 5], bit) & bit) *flag = 1;
  }
  __syncthreads();
  const bool bad = *flag != 0;
  __syncthreads();  // flag is reset by the next row
  return bad;
}

// Calls f(j, s_j) over this CTA's share of the student row (the slice's
// scalar head, its 8-element chunks, its scalar tail); the first pass of a
// single-read kernel keeps what it loads.
template <bool FIRST, typename T, bool STAGED, typename F>
__device__ __forceinline__ void kd_topk_sweep(const KdSlice& sl, const KdRowIn<T, STAGED>& s, F&& f) {
  const int tid = threadIdx.x, nt = blockDim.x;
  for (int j = sl.a0 + tid; j < sl.a1; j += nt) f(j, s.template ld1<FIRST>(j));
  for (int c = sl.c0 + tid; c < sl.c1; c += nt) {
    const int j0 = sl.head + 8 * c;
    float v[8];
    s.template ld8<FIRST>(j0, v);
#pragma unroll
    for (int e = 0; e < 8; ++e) f(j0 + e, v[e]);
  }
  for (int j = sl.b0 + tid; j < sl.b1; j += nt) f(j, s.template ld1<FIRST>(j));
}

// The top-k loss over rows: v1 (STAGED false: one CTA per row, the student
// read in each sweep; `bits` the V-bit map) or single-read (a cluster per
// row, each CTA staging its slice of the student; `bits` maps the slice).
template <typename Tin, typename Tout, typename I, bool STAGED>
__device__ void kd_topk_body(const KdTopkArgs& a, uint32_t* bits, KdScratch<KdPass1> sc) {
  using Row = KdRowIn<Tin, STAGED>;
  const Tin* s = static_cast<const Tin*>(a.student);
  const I* idx = static_cast<const I*>(a.indices);
  const Tin* vals = static_cast<const Tin*>(a.values);
  const long long* labels = a.labels;
  Tout* grad = static_cast<Tout*>(a.grad);
  const long long n_rows = a.n_rows;
  const KdParams& P = a.params;
  const int V = P.vocab, k = P.topk_k, mode = P.topk_mode;
  const int tid = threadIdx.x, nt = blockDim.x;
  const long long valid = a.valid_count ? (long long)*a.valid_count : n_rows;
  const float w = kd_row_weight(P, valid);
  const bool with_ce = P.alpha > 0.0f;
  const bool tail = mode == KD_TOPK_TAIL;
  const bool ce1 = with_ce && !tail;  // tail keeps the support's student statistics in s1
  KdParams ce = P;  // the hard CE's part of the gradient alone
  ce.soft_coef = 0.0f;
  KdScope<STAGED> scope = KdScope<STAGED>::make();
  const long long cap = STAGED ? kd_single_cap(V, scope.size) : 0;
  const float nan = __int_as_float(0x7fc00000);

  for (long long row = scope.first_row(); row < n_rows; row += scope.row_step()) {
    const Tin* srow = s + row * a.student_stride;
    const I* irow = idx + row * (long long)k;
    const Tin* vrow = vals + row * (long long)k;
    Tout* grow = grad ? grad + row * a.grad_stride : nullptr;
    const long long y = labels ? labels[row] : -1;
    const float wrow = a.row_weights ? a.row_weights[row] : 1.0f;
    int head = (int)(((16u - (reinterpret_cast<uintptr_t>(srow) & 15u)) & 15u) / sizeof(Tin));
    if (head > V) head = V;
    const KdSlice sl = kd_slice(V, head, true, scope.rank, scope.size);
    // Element j's bit: v1 maps the row, single-read this CTA's slice.
    const auto bit_of = [&](long long j) { return (int)(STAGED ? j + sl.off : j); };
    const auto has_bit = [&](int j) {
      const int b = bit_of(j);
      return (bits[b >> 5] >> (b & 31)) & 1u;
    };
    if ((labels && y == P.ignore_index) || wrow == 0.0f) {
      if (grow)
        for (int j = sl.lo + tid; j < sl.hi; j += nt) kd_gst(grow + j, kd_from_f32<Tout>(0.0f));
      if (tid == 0 && scope.rank == 0) a.row_loss[row] = 0.0f;
      continue;
    }

    // Mark: the support's bits (single-read: those in this CTA's slice). An
    // index out of [0, V) (seen by every CTA) or repeated (seen by the CTA
    // that owns it) makes the whole row NaN; the row's CTAs agree through
    // the reduction.
    const int nwords = (int)(STAGED ? (cap + 31) / 32 : (V + 31) / 32);
    for (int wd = tid; wd < nwords; wd += nt) bits[wd] = 0u;
    __syncthreads();
    float my_bad = 0.0f;
    for (int i = tid; i < k; i += nt) {
      const long long j = (long long)kd_gld(irow + i);
      if (j < 0 || j >= V) {
        my_bad = 1.0f;
        continue;
      }
      if (j < sl.lo || j >= sl.hi) continue;
      const int b = bit_of(j);
      const uint32_t m = 1u << (b & 31);
      if (atomicOr(&bits[b >> 5], m) & m) my_bad = 1.0f;
    }
    const bool bad = scope.sum2(make_float2(my_bad, 0.0f), sc.red2, sc.x2).x > 0.0f ||
                     (labels && (y < 0 || y >= V));
    if (bad) {
      if (grow)
        for (int j = sl.lo + tid; j < sl.hi; j += nt) kd_gst(grow + j, kd_from_f32<Tout>(nan));
      if (tid == 0 && scope.rank == 0) a.row_loss[row] = nan;
      __syncthreads();
      continue;
    }

    // Pass 1: the off-support student joins forward KL's statistics against
    // a −inf teacher (full, tail) or only the hard CE's (support); with a
    // gradient, single-read sweeps (and stages) the slice in every mode.
    const Row S{srow, STAGED ? kd_stage_buf<Tin>(0, cap) : nullptr, sl.off};
    const bool stats = mode != KD_TOPK_SUPPORT || with_ce;
    const bool staged = STAGED && (stats || grow);
    KdPass1 st = kd_pass1_init();
    if (stats || staged) {
      kd_topk_sweep<true>(sl, S, [&](int j, float sv) {
        if (!stats || has_bit(j)) return;
        sv = kd_softcap(sv, P);
        if (mode == KD_TOPK_SUPPORT)
          kd_stat_push(st.s1, sv * KD_LOG2E);
        else
          kd_pass1_push<KD_DIV_FKL>(st, sv, KD_NEG_INF, P, ce1);
      });
    }
    if constexpr (STAGED) __syncthreads();  // the slice is staged
    // The student at a support index: this CTA's copy, or global memory.
    const auto s_at = [&](long long j) {
      return staged ? S.at((int)j) : kd_to_f32(kd_gld(srow + j));
    };
    // The support pairs (single-read: those this CTA owns), pushed as a
    // dense teacher's would be.
    KdKahan p_sum = kd_kahan_init();  // tail: Σ e^{v_i} (k may be ~V)
    for (int i = tid; i < k; i += nt) {
      const long long j = (long long)kd_gld(irow + i);
      if (j < sl.lo || j >= sl.hi) continue;
      const float sv = kd_softcap(s_at(j), P);
      const float vv = kd_softcap(kd_to_f32(kd_gld(vrow + i)), P);
      kd_pass1_push<KD_DIV_FKL>(st, sv, vv, P, ce1);
      if (tail) {
        kd_stat_push(st.s1, sv * KD_LOG2E);
        kd_kahan_add(p_sum, expf(vv));
      }
    }
    // The CTA that owns the label writes the row loss (it holds s_y; v1:
    // read before the merge's barriers, as an in-place gradient sweep may
    // overwrite srow[y] right after them).
    const bool owns_y = with_ce && y >= sl.lo && y < sl.hi;
    const bool writes_loss = tid == 0 && (owns_y || (scope.rank == 0 && !(with_ce && scope.size > 1)));
    const float s_y_early = (!STAGED && tid == 0 && owns_y) ? kd_softcap(s_at(y), P) : 0.0f;
    st = scope.reduce(
        st, sc.red, sc.xs, kd_pass1_init(),
        [](const KdPass1& p, int off) { return kd_shfl_pass1<KD_DIV_FKL>(p, off); },
        [&P](KdPass1& x, const KdPass1& z) { kd_pass1_merge<KD_DIV_FKL>(x, z, P); });
    const float s_y = STAGED ? ((tid == 0 && owns_y) ? kd_softcap(s_at(y), P) : 0.0f) : s_y_early;
    KdRow r = kd_row_finish<KD_DIV_FKL>(st, P);
    if (tail) kd_tail_finish(r, st, scope.sum2(make_float2(p_sum.sum, 0.0f), sc.red2, sc.x2).x, P);

    // A NaN or +inf in a used input poisons the loss and every gradient
    // element of the row (kd_row_poison).
    if (writes_loss) a.row_loss[row] = wrow * kd_row_loss(r, s_y, P);
    if (grow) {
      // Each element is written once, by the thread that read it (v1: so
      // the gradient may overwrite the student).
      const float wr = kd_row_grad_weight(r, w * wrow);
      kd_topk_sweep<false>(sl, S, [&](int j, float sv) {
        if (has_bit(j)) return;
        const float sc2 = kd_softcap(sv, P);
        float g;
        if (mode == KD_TOPK_SUPPORT)
          g = kd_grad_elem<KD_DIV_FKL>(sc2, 0.0f, j == y, r, ce, wr);
        else if (mode == KD_TOPK_FULL)
          g = kd_grad_elem<KD_DIV_FKL>(sc2, KD_NEG_INF, j == y, r, P, wr);
        else
          g = kd_tail_grad(sc2, 0.0f, false, j == y, r, P, wr);
        kd_gst(grow + j, kd_from_f32<Tout>(g * kd_softcap_grad(sv, P)));
      });
      for (int i = tid; i < k; i += nt) {
        const long long j = (long long)kd_gld(irow + i);
        if (j < sl.lo || j >= sl.hi) continue;
        const float sv = s_at(j);
        const float sc2 = kd_softcap(sv, P), vc = kd_softcap(kd_to_f32(kd_gld(vrow + i)), P);
        const float g = tail ? kd_tail_grad(sc2, vc, true, j == y, r, P, wr)
                             : kd_grad_elem<KD_DIV_FKL>(sc2, vc, j == y, r, P, wr);
        kd_gst(grow + j, kd_from_f32<Tout>(g * kd_softcap_grad(sv, P)));
      }
    }
    __syncthreads();  // the bit map (and the staged slice) are rebuilt for the next row
  }
  scope.finish();
}

// v1's reduction scratch: static shared memory.
__device__ __forceinline__ KdScratch<KdPass1> kd_topk_scratch() {
  __shared__ KdPass1 red[KD_TOPK_THREADS / 32];
  __shared__ float2 red2[KD_TOPK_THREADS / 32];
  return KdScratch<KdPass1>{red, red2, nullptr, nullptr};
}

// Single-read: the slice's bit map, after the staged student
// (kd_single_layout.h, kd_single_topk_smem).
template <typename Tin>
__device__ __forceinline__ uint32_t* kd_topk_slice_bits(int V) {
  return reinterpret_cast<uint32_t*>(kd_stage_buf<Tin>(0, kd_single_cap(V, kd_cluster_size())) +
                                     kd_single_cap(V, kd_cluster_size()));
}

// 3 CTAs per SM (80 registers): at 64, ptxas 13.0 spilled 4 bytes of
// kd_topk_bf16_bf16_* on sm_100 once the body became a template over the
// single-read stage.
#define KD_TOPK(NAME, TIN, TOUT, I)                                              \
  extern "C" __global__ void __launch_bounds__(KD_TOPK_THREADS, 3)               \
      NAME(const KdTopkArgs a) {                                                 \
    KD_TOPK_BITS;                                                                \
    kd_topk_body<TIN, TOUT, I, false>(a, kd_topk_bits, kd_topk_scratch());      \
  }

#define KD_TOPK_IDX(SUFFIX, I)                                       \
  KD_TOPK(kd_topk_f32_f32_##SUFFIX, float, float, I)                 \
  KD_TOPK(kd_topk_bf16_bf16_##SUFFIX, kd_bf16, kd_bf16, I)           \
  KD_TOPK(kd_topk_bf16_f32_##SUFFIX, kd_bf16, float, I)              \
  KD_TOPK(kd_topk_f16_f16_##SUFFIX, kd_f16, kd_f16, I)               \
  KD_TOPK(kd_topk_f16_f32_##SUFFIX, kd_f16, float, I)

KD_TOPK_IDX(i32, int)
KD_TOPK_IDX(i64, long long)

// The single-read top-k kernels (sm_90 and later: clusters), held to 2 CTAs
// per SM as the exact dense single-read kernels.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900

#define KD_SINGLE_TOPK(NAME, TIN, TOUT, I)                                                 \
  extern "C" __global__ void __launch_bounds__(KD_TOPK_THREADS, 2) NAME(const KdTopkArgs a) { \
    kd_topk_body<TIN, TOUT, I, true>(a, kd_topk_slice_bits<TIN>(a.params.vocab),              \
                                     kd_scratch_dyn<KdPass1, KD_TOPK_THREADS>());             \
  }

#define KD_SINGLE_TOPK_IDX(SUFFIX, I)                                     \
  KD_SINGLE_TOPK(kd_single_topk_f32_f32_##SUFFIX, float, float, I)        \
  KD_SINGLE_TOPK(kd_single_topk_bf16_bf16_##SUFFIX, kd_bf16, kd_bf16, I)  \
  KD_SINGLE_TOPK(kd_single_topk_bf16_f32_##SUFFIX, kd_bf16, float, I)     \
  KD_SINGLE_TOPK(kd_single_topk_f16_f16_##SUFFIX, kd_f16, kd_f16, I)      \
  KD_SINGLE_TOPK(kd_single_topk_f16_f32_##SUFFIX, kd_f16, float, I)

KD_SINGLE_TOPK_IDX(i32, int)
KD_SINGLE_TOPK_IDX(i64, long long)

#endif  // sm_90 and later

// The validation pass: `first_bad` (one int64, set to n_rows by the host)
// ends as the smallest row with an index out of [0, V) or repeated.
template <typename I>
__device__ void kd_topk_validate_body(const I* idx, long long n_rows, int k, int V,
                                      unsigned long long* first_bad, uint32_t* bits) {
  __shared__ int flag;
  for (long long row = blockIdx.x; row < n_rows; row += gridDim.x) {
    if (kd_topk_mark(idx + row * (long long)k, k, V, bits, &flag) && threadIdx.x == 0)
      atomicMin(first_bad, (unsigned long long)row);
  }
}

#define KD_TOPK_VALIDATE(NAME, I)                                                             \
  extern "C" __global__ void __launch_bounds__(KD_TOPK_THREADS) NAME(const KdTopkValidateArgs a) { \
    KD_TOPK_BITS;                                                                             \
    kd_topk_validate_body<I>(static_cast<const I*>(a.indices), a.n_rows, a.k, a.vocab,         \
                             a.first_bad, kd_topk_bits);                                      \
  }

KD_TOPK_VALIDATE(kd_topk_validate_i32, int)
KD_TOPK_VALIDATE(kd_topk_validate_i64, long long)
