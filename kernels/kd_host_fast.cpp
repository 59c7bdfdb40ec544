// kd_host_fast.cpp — precision = fast on the CPU: kernels/kd_fast_math.cuh's
// arithmetic (the fast kernels' own functions) over a row, vectorized.
//
// A row is swept in blocks of 64 elements against one set of references
// (m and the thresholds, moved when a block's maximum passes them, as a warp
// does per chunk); each block's terms go to 8 partial sums (element j to
// sum j % 8), which the compiler keeps in one SIMD register per quantity,
// and the blocks' sums are added pairwise (a binary cascade).
// The exponentials are kd_ex2 (the FMA-pipe polynomial on the host: no libm
// call), so the loops vectorize. Compiled for the x86-64-v4 (AVX-512) and
// v3 (AVX2 + FMA) levels and a portable baseline, dispatched at run time by
// the loader on the CPU's features (GCC/Clang `target_clones`). TVD and JSD's second sweep and the gradient run per
// element, also vectorized (JSD's log2 is a libm call: scalar).
// Bytes per element: as the kernel (4·in + gradient; TVD, JSD 6·in).
#include <cstddef>

#include "kd_args.h"
#include "kd_fast_math.cuh"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__APPLE__)
#define KD_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KD_SIMD_CLONES
#endif

namespace {

constexpr int KD_HB = 64;  // elements per block
constexpr int KD_HW = 8;   // partial sums

// Block sums of NQ quantities (KD_HW lanes each), added as a binary cascade:
// pairwise over the row, no sequential chain of V/8 additions.
template <int NQ>
struct Cascade {
  float level[32][NQ][KD_HW];
  bool used[32] = {};

  void push(float (&b)[NQ][KD_HW]) {
    for (int k = 0; k < 32; ++k) {
      if (!used[k]) {
        copy(level[k], b);
        used[k] = true;
        return;
      }
      add(b, level[k]);
      used[k] = false;
    }
  }

  // The totals, the cascade emptied.
  void take(float (&out)[NQ]) {
    float acc[NQ][KD_HW] = {};
    for (int k = 0; k < 32; ++k)
      if (used[k]) {
        add(acc, level[k]);
        used[k] = false;
      }
    for (int i = 0; i < NQ; ++i) {
      float a = 0.0f;
      for (int l = 0; l < KD_HW; ++l) a += acc[i][l];
      out[i] = a;
    }
  }

 private:
  static void copy(float (&d)[NQ][KD_HW], const float (&b)[NQ][KD_HW]) {
    for (int i = 0; i < NQ; ++i)
      for (int l = 0; l < KD_HW; ++l) d[i][l] = b[i][l];
  }
  static void add(float (&d)[NQ][KD_HW], const float (&b)[NQ][KD_HW]) {
    for (int i = 0; i < NQ; ++i)
      for (int l = 0; l < KD_HW; ++l) d[i][l] += b[i][l];
  }
};

template <typename T, int DIV, bool CE>
KD_SIMD_CLONES float fast_row(const T* s, const T* t, long long y, int has_label, float* grad,
                              const KdParams& P, float w) {
  constexpr bool RKL = DIV == KD_DIV_RKL;
  const int V = P.vocab;
  if (has_label && y == P.ignore_index) {
    if (grad)
      for (int j = 0; j < V; ++j) grad[j] = 0.0f;
    return 0.0f;
  }
  const bool bad_label = has_label && (y < 0 || y >= V);
  const T* xr = RKL ? s : t;
  const T* yr = RKL ? t : s;

  KdFast st = kd_fast_init();
  Cascade<5> sums;
  auto fold = [&] {
    float tot[5];
    sums.take(tot);
    st.zx += tot[0];
    st.zy += tot[1];
    st.acc += tot[2];
    st.ent += tot[3];
    st.z1 += tot[4];
  };
  float xs[KD_HB], ys[KD_HB];
  for (int j0 = 0; j0 < V; j0 += KD_HB) {
    const int n = V - j0 < KD_HB ? V - j0 : KD_HB;
    for (int i = 0; i < n; ++i) {
      xs[i] = kd_to_f32(xr[j0 + i]);
      ys[i] = kd_to_f32(yr[j0 + i]);
    }
    float cx = KD_NEG_INF, cy = KD_NEG_INF;
    for (int i = 0; i < n; ++i) {
      cx = xs[i] > cx ? xs[i] : cx;
      cy = ys[i] > cy ? ys[i] : cy;
    }
    if (kd_fast_over(st, cx, cy)) {
      fold();
      kd_fast_rescale<DIV, CE>(st, cx, cy, P);
    }
    float b[5][KD_HW] = {};
    float(&zx)[KD_HW] = b[0];
    float(&zy)[KD_HW] = b[1];
    float(&ac)[KD_HW] = b[2];
    float(&en)[KD_HW] = b[3];
    float(&z1)[KD_HW] = b[4];
    if (n == KD_HB) {
      for (int i = 0; i < KD_HB; i += KD_HW)
        for (int l = 0; l < KD_HW; ++l) {
          const float x = xs[i + l], yv = ys[i + l];
          const KdFastTerm e = kd_fast_term<DIV, CE>(st, x, yv, RKL ? x : yv, P);
          zx[l] += e.ex;
          zy[l] += e.ey;
          if (KD_FAST_ACC(DIV)) ac[l] += e.a;
          if (DIV == KD_DIV_SCE) en[l] += e.h;
          if (CE) z1[l] += e.e1;
        }
    } else {
      for (int i = 0; i < n; ++i) {
        const float x = xs[i], yv = ys[i];
        const KdFastTerm e = kd_fast_term<DIV, CE>(st, x, yv, RKL ? x : yv, P);
        zx[i % KD_HW] += e.ex;
        zy[i % KD_HW] += e.ey;
        if (KD_FAST_ACC(DIV)) ac[i % KD_HW] += e.a;
        if (DIV == KD_DIV_SCE) en[i % KD_HW] += e.h;
        if (CE) z1[i % KD_HW] += e.e1;
      }
    }
    sums.push(b);
  }
  fold();
  const float nan = kd_nan();
  KdFastRow r = kd_fast_finish<DIV, CE>(st, bad_label ? nan : w, P);
  if (DIV == KD_DIV_TVD || DIV == KD_DIV_JSD) {
    Cascade<3> sums2;
    for (int j0 = 0; j0 < V; j0 += KD_HB) {
      const int n = V - j0 < KD_HB ? V - j0 : KD_HB;
      float b[3][KD_HW] = {};
      if (n == KD_HB) {
        for (int i = 0; i < KD_HB; i += KD_HW)
          for (int l = 0; l < KD_HW; ++l) {
            const KdFast2 e =
                kd_fast_term2<DIV>(kd_to_f32(s[j0 + i + l]), kd_to_f32(t[j0 + i + l]), r, P);
            b[0][l] += e.a;
            b[1][l] += e.b;
            b[2][l] += e.c;
          }
      } else {
        for (int i = 0; i < n; ++i) {
          const KdFast2 e = kd_fast_term2<DIV>(kd_to_f32(s[j0 + i]), kd_to_f32(t[j0 + i]), r, P);
          b[0][i % KD_HW] += e.a;
          b[1][i % KD_HW] += e.b;
          b[2][i % KD_HW] += e.c;
        }
      }
      sums2.push(b);
    }
    float tot[3];
    sums2.take(tot);
    kd_fast_finish2<DIV>(r, tot[0], tot[1], tot[2], P);
  }
  if (grad) {
    for (int j = 0; j < V; ++j) grad[j] = kd_fast_grad<DIV, CE>(kd_to_f32(s[j]), kd_to_f32(t[j]), r, P);
    if (CE && !bad_label) grad[y] = kd_fast_grad_label<DIV, CE>(kd_to_f32(s[y]), kd_to_f32(t[y]), r, P);
  }
  if (bad_label) return nan;
  return kd_fast_loss<CE>(r, CE ? kd_to_f32(s[y]) : 0.0f, P);
}

template <typename T, int DIV>
float fast_row_ce(int ce, const T* s, const T* t, long long y, int has_label, float* grad,
                  const KdParams& P, float w) {
  return ce ? fast_row<T, DIV, true>(s, t, y, has_label, grad, P, w)
            : fast_row<T, DIV, false>(s, t, y, has_label, grad, P, w);
}

template <typename T>
float fast_row_div(int div, int ce, const T* s, const T* t, long long y, int has_label, float* grad,
                   const KdParams& P, float w) {
  switch (div) {
    case KD_DIV_FKL: return fast_row_ce<T, KD_DIV_FKL>(ce, s, t, y, has_label, grad, P, w);
    case KD_DIV_RKL: return fast_row_ce<T, KD_DIV_RKL>(ce, s, t, y, has_label, grad, P, w);
    case KD_DIV_JSD: return fast_row_ce<T, KD_DIV_JSD>(ce, s, t, y, has_label, grad, P, w);
    case KD_DIV_TVD: return fast_row_ce<T, KD_DIV_TVD>(ce, s, t, y, has_label, grad, P, w);
    case KD_DIV_SCE: return fast_row_ce<T, KD_DIV_SCE>(ce, s, t, y, has_label, grad, P, w);
    default: return kd_nan();
  }
}

}  // namespace

extern "C" {

// One row in fast precision (α > 0 when `ce`): returns ℓ (0 for an ignored
// row, NaN for a label out of range) and, when `grad` is not null, writes
// the V gradient entries (already × w) as f32. dtype: 0 f32, 1 bf16, 2 f16.
float kd_host_fast_row(int div, int ce, int dtype, const void* s, const void* t, long long y,
                       int has_label, float* grad, const KdParams* P, float w) {
  switch (dtype) {
    case 0:
      return fast_row_div(div, ce, static_cast<const float*>(s), static_cast<const float*>(t), y,
                          has_label, grad, *P, w);
    case 1:
      return fast_row_div(div, ce, static_cast<const kd_bf16*>(s), static_cast<const kd_bf16*>(t),
                          y, has_label, grad, *P, w);
    default:
      return fast_row_div(div, ce, static_cast<const kd_f16*>(s), static_cast<const kd_f16*>(t), y,
                          has_label, grad, *P, w);
  }
}

}  // extern "C"
