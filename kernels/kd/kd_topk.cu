// kd_topk.cu — the fused loss + gradient with a top-k (sparse) teacher
// (docs/DESIGN.md §4): forward KL against a teacher given as k (index, value)
// pairs per row, in modes support / full / tail (P.topk_mode).
//
// One CTA per row (grid-stride over rows), one launch for the whole batch.
//   mark:   the row's k indices set bits in a V-bit map in shared memory; an
//           index out of [0, V) or already set marks the row bad (NaN).
//   pass 1: the student row is swept once; off-support elements join forward
//           KL's online statistics against a −inf teacher (full, tail) or
//           only the hard CE's (support); the k support pairs (s_i, v_i) are
//           gathered and pushed as a dense teacher's would be. The block
//           merge and row finish are the dense kernel's (kd_math.cuh).
//   tail:   full mode's statistics, rescaled (kd_tail_finish) by Σ e^{v_i}
//           (summed in the gather).
//   last:   off-support gradients from a student sweep, support gradients
//           from the gathered pairs (each element written once, by the
//           thread that read it, so the gradient may overwrite the student).
// Bytes per element of the student row: 2·in + out (in = input size, out =
// gradient size) when re-reads miss L2, plus k·(index + value) per row; the
// teacher is never read densely. Loss only with support mode and α = 0:
// the k gathered student entries only.
// Issue slots per element of the student row (sm_90 SASS,
// scripts/sass-report, bf16 in and out): ≈ 675 (sweep ≈ 355, gradient
// ≈ 320), MUFU ≈ 36. The launch contract is KdTopkArgs in kd_args.h.
//
// Also here: kd_topk_validate (the optional validation pass: the first row
// with an index out of range or repeated, via the same bit map).
#include "kd/kd_args.h"

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

__device__ __forceinline__ bool kd_bit(const uint32_t* bits, int j) {
  return (bits[j >> 5] >> (j & 31)) & 1u;
}

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

template <typename Tin, typename Tout, typename I>
__device__ void kd_topk_body(const KdTopkArgs& a, uint32_t* bits) {
  const Tin* s = static_cast<const Tin*>(a.student);
  const long long s_stride = a.student_stride;
  const I* idx = static_cast<const I*>(a.indices);
  const Tin* vals = static_cast<const Tin*>(a.values);
  const long long* labels = a.labels;
  const float* row_weights = a.row_weights;
  Tout* grad = static_cast<Tout*>(a.grad);
  const long long g_stride = a.grad_stride;
  float* row_loss = a.row_loss;
  const int* valid_count = a.valid_count;
  const long long n_rows = a.n_rows;
  const KdParams& P = a.params;
  __shared__ KdPass1 red[KD_TOPK_THREADS / 32];
  __shared__ float2 red2[KD_TOPK_THREADS / 32];
  __shared__ int flag;
  const int V = P.vocab, k = P.topk_k, mode = P.topk_mode;
  const long long valid = valid_count ? (long long)*valid_count : n_rows;
  const float w = kd_row_weight(P, valid);
  const bool with_ce = P.alpha > 0.0f;
  KdParams ce = P;  // the hard CE's part of the gradient alone
  ce.soft_coef = 0.0f;

  for (long long row = blockIdx.x; row < n_rows; row += gridDim.x) {
    const Tin* srow = s + row * s_stride;
    const I* irow = idx + row * (long long)k;
    const Tin* vrow = vals + row * (long long)k;
    Tout* grow = grad ? grad + row * g_stride : nullptr;
    const long long y = labels ? labels[row] : -1;
    const float wrow = row_weights ? row_weights[row] : 1.0f;
    if ((labels && y == P.ignore_index) || wrow == 0.0f) {
      if (grow)
        for (int j = threadIdx.x; j < V; j += blockDim.x) grow[j] = kd_from_f32<Tout>(0.0f);
      if (threadIdx.x == 0) row_loss[row] = 0.0f;
      continue;
    }
    const bool bad = kd_topk_mark(irow, k, V, bits, &flag) || (labels && (y < 0 || y >= V));
    const float nan = __int_as_float(0x7fc00000);
    if (bad) {
      if (grow)
        for (int j = threadIdx.x; j < V; j += blockDim.x) grow[j] = kd_from_f32<Tout>(nan);
      if (threadIdx.x == 0) row_loss[row] = nan;
      __syncthreads();
      continue;
    }

    // Tail mode keeps the support's student statistics in s1 (kd_tail_finish).
    const bool tail = mode == KD_TOPK_TAIL;
    const bool ce1 = with_ce && !tail;
    KdPass1 st = kd_pass1_init();
    if (mode != KD_TOPK_SUPPORT || with_ce) {
      kd_sweep(srow, srow, V, [&](int j, float sv, float) {
        if (kd_bit(bits, j)) return;
        sv = kd_softcap(sv, P);
        if (mode == KD_TOPK_SUPPORT)
          kd_stat_push(st.s1, sv * KD_LOG2E);
        else
          kd_pass1_push<KD_DIV_FKL>(st, sv, KD_NEG_INF, P, ce1);
      });
    }
    KdKahan p_sum = kd_kahan_init();  // tail: Σ e^{v_i} (k may be ~V)
    for (int i = threadIdx.x; i < k; i += blockDim.x) {
      const float sv = kd_softcap(kd_to_f32(srow[kd_index(irow, i)]), P);
      const float vv = kd_softcap(kd_to_f32(vrow[i]), P);
      kd_pass1_push<KD_DIV_FKL>(st, sv, vv, P, ce1);
      if (tail) {
        kd_stat_push(st.s1, sv * KD_LOG2E);
        kd_kahan_add(p_sum, expf(vv));
      }
    }
    // Read before the merge's barriers (an in-place gradient may overwrite it).
    const float s_y = (threadIdx.x == 0 && with_ce) ? kd_softcap(kd_to_f32(srow[y]), P) : 0.0f;
    st = kd_block_merge<KD_DIV_FKL>(st, red, P);
    KdRow r = kd_row_finish<KD_DIV_FKL>(st, P);

    if (tail) kd_tail_finish(r, st, kd_block_sum2(make_float2(p_sum.sum, 0.0f), red2).x, P);

    // A NaN or +inf in a used input poisons the loss and every gradient
    // element of the row (kd_row_poison).
    if (threadIdx.x == 0) row_loss[row] = wrow * kd_row_loss(r, s_y, P);
    if (grow) {
      const float wr = kd_row_grad_weight(r, w * wrow);
      kd_sweep(srow, srow, V, [&](int j, float sv, float) {
        if (kd_bit(bits, j)) return;
        const float sc = kd_softcap(sv, P);
        float g;
        if (mode == KD_TOPK_SUPPORT)
          g = kd_grad_elem<KD_DIV_FKL>(sc, 0.0f, j == y, r, ce, wr);
        else if (mode == KD_TOPK_FULL)
          g = kd_grad_elem<KD_DIV_FKL>(sc, KD_NEG_INF, j == y, r, P, wr);
        else
          g = kd_tail_grad(sc, 0.0f, false, j == y, r, P, wr);
        grow[j] = kd_from_f32<Tout>(g * kd_softcap_grad(sv, P));
      });
      for (int i = threadIdx.x; i < k; i += blockDim.x) {
        const long long j = kd_index(irow, i);
        const float sv = kd_to_f32(srow[j]);
        const float sc = kd_softcap(sv, P), vc = kd_softcap(kd_to_f32(vrow[i]), P);
        const float g = mode == KD_TOPK_TAIL ? kd_tail_grad(sc, vc, true, j == y, r, P, wr)
                                             : kd_grad_elem<KD_DIV_FKL>(sc, vc, j == y, r, P, wr);
        grow[j] = kd_from_f32<Tout>(g * kd_softcap_grad(sv, P));
      }
    }
    __syncthreads();  // the bit map is rebuilt for the next row
  }
}

#define KD_TOPK(NAME, TIN, TOUT, I)                                              \
  extern "C" __global__ void __launch_bounds__(KD_TOPK_THREADS, 4)               \
      NAME(const KdTopkArgs a) {                                                 \
    KD_TOPK_BITS;                                                                \
    kd_topk_body<TIN, TOUT, I>(a, kd_topk_bits);                                 \
  }

#define KD_TOPK_IDX(SUFFIX, I)                                       \
  KD_TOPK(kd_topk_f32_f32_##SUFFIX, float, float, I)                 \
  KD_TOPK(kd_topk_bf16_bf16_##SUFFIX, kd_bf16, kd_bf16, I)           \
  KD_TOPK(kd_topk_bf16_f32_##SUFFIX, kd_bf16, float, I)              \
  KD_TOPK(kd_topk_f16_f16_##SUFFIX, kd_f16, kd_f16, I)               \
  KD_TOPK(kd_topk_f16_f32_##SUFFIX, kd_f16, float, I)

KD_TOPK_IDX(i32, int)
KD_TOPK_IDX(i64, long long)

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
