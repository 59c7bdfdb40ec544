// kd_host_fast.cpp — precision = fast on the CPU: kernels/kd/kd_fast_math.cuh's
// arithmetic (the fast kernels' own functions) over a row, vectorized.
//
// A row is cut into segments of 16384 elements, each summarised alone and
// merged in order (kd_fast_merge, as the GPU merges its threads), so that a
// row's segments may run on several threads (src/fast_segments.rs) with the
// result of one. A segment is swept in blocks of 64 elements against one set of references
// (m and the thresholds, moved when a block's maximum passes them, as a warp
// does per chunk); each block's terms go to 8 partial sums (element j to
// sum j % 8), which the compiler keeps in one SIMD register per quantity,
// and the blocks' sums are added pairwise (a binary cascade); a block's
// maxima are one explicit 16-lane vector max (KdV16), and a full f32 block
// is read in place.
// The exponentials and JSD's log2 are the FMA-pipe polynomials (kd_ex2,
// kd_lg2 on the host: no libm call, selects rather than branches), so the
// loops vectorize; the second sweep (TVD, JSD) computes a block's terms in
// one straight loop and sums them in another, and JSD keeps each element's
// log2(q/m) in the gradient buffer so that its gradient sweep needs neither
// p nor a log again. Compiled for the x86-64-v4 (AVX-512) and v3 (AVX2 +
// FMA) levels and a portable baseline, dispatched at run time by the loader
// on the CPU's features (GCC/Clang `target_clones`); build.rs compiles it
// with -fno-trapping-math, without which GCC keeps the selects as branches.
// Bytes per element: as the kernel (4·in + gradient; TVD, JSD 6·in).
#include <cstddef>
#include <cstring>
#include <type_traits>

#include "kd/kd_args.h"
#include "kd/kd_fast_math.cuh"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__APPLE__)
#define KD_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KD_SIMD_CLONES
#endif

namespace {

constexpr int KD_HB = 64;  // elements per block

// 16 floats as one vector (GCC/Clang vector extension; lowered to what the
// clone's target has).
typedef float KdV16 __attribute__((vector_size(64)));
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

// Elements per segment: a row is cut into segments of this many elements
// (the last one shorter), each summarised alone and merged in order
// (kd_fast_merge), so that the CPU backend may run one row's segments on
// several threads (few rows, long rows) with the same result as one thread.
constexpr int KD_HSEG = 16384;

// Pass 1 over one segment of n elements: its statistics.
template <typename T, int DIV, bool CE>
KD_SIMD_CLONES void seg_stats(const T* s, const T* t, int n, const KdParams& P, KdFast& out) {
  constexpr bool RKL = DIV == KD_DIV_RKL;
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
  for (int j0 = 0; j0 < n; j0 += KD_HB) {
    const int nb = n - j0 < KD_HB ? n - j0 : KD_HB;
    // A full f32 block is read in place (a copy compiles to `rep movs`,
    // slow to start at 256 bytes); 16-bit blocks are converted, a short
    // block is padded with −inf for the maxima.
    const float* xb = xs;
    const float* yb = ys;
    if (std::is_same<T, float>::value && nb == KD_HB) {
      xb = reinterpret_cast<const float*>(xr + j0);
      yb = reinterpret_cast<const float*>(yr + j0);
    } else {
      for (int i = 0; i < nb; ++i) {
        xs[i] = kd_to_f32(xr[j0 + i]);
        ys[i] = kd_to_f32(yr[j0 + i]);
      }
      for (int i = nb; i < KD_HB; ++i) xs[i] = ys[i] = KD_NEG_INF;
    }
    // The block's maxima in 16 independent lanes: a single running max is a
    // serial chain the compiler may not reorder (x > c ? x : c is not
    // associative with NaN), and was half of this sweep's time. The same
    // value either way (a NaN is passed over by both).
    // (An explicit 16-lane vector: GCC leaves the same loop on plain
    // arrays scalar.)
    KdV16 vx, vy, ax, ay;
    std::memcpy(&vx, xb, sizeof vx);
    std::memcpy(&vy, yb, sizeof vy);
    for (int i = 16; i < KD_HB; i += 16) {
      std::memcpy(&ax, xb + i, sizeof ax);
      std::memcpy(&ay, yb + i, sizeof ay);
      vx = ax > vx ? ax : vx;
      vy = ay > vy ? ay : vy;
    }
    float cx = KD_NEG_INF, cy = KD_NEG_INF;
    for (int l = 0; l < 16; ++l) {
      cx = vx[l] > cx ? vx[l] : cx;
      cy = vy[l] > cy ? vy[l] : cy;
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
    if (nb == KD_HB) {
      for (int i = 0; i < KD_HB; i += KD_HW)
        for (int l = 0; l < KD_HW; ++l) {
          const float x = xb[i + l], yv = yb[i + l];
          const KdFastTerm e = kd_fast_term<DIV, CE>(st, x, yv, RKL ? x : yv, P);
          zx[l] += e.ex;
          zy[l] += e.ey;
          if (KD_FAST_ACC(DIV)) ac[l] += e.a;
          if (DIV == KD_DIV_SCE) en[l] += e.h;
          if (CE) z1[l] += e.e1;
        }
    } else {
      for (int i = 0; i < nb; ++i) {
        const float x = xb[i], yv = yb[i];
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
  out = st;
}

// Pass 2 (TVD, JSD) over one segment: its three sums; JSD also writes each
// element's log2(q/m) to grad (when not null) for its gradient sweep.
template <typename T, int DIV>
KD_SIMD_CLONES void seg_sums2(const T* s, const T* t, int n, const KdFastRow& r, const KdParams& P,
                              float* grad, float (&out)[3]) {
  Cascade<3> sums2;
  float ea[KD_HB], eb[KD_HB], ec[KD_HB], ed[KD_HB];
  for (int j0 = 0; j0 < n; j0 += KD_HB) {
    const int nb = n - j0 < KD_HB ? n - j0 : KD_HB;
    // Straight loops (no sums, no condition) so that they vectorize.
    for (int i = 0; i < nb; ++i) {
      const KdFast2 e = kd_fast_term2<DIV>(kd_to_f32(s[j0 + i]), kd_to_f32(t[j0 + i]), r, P);
      ea[i] = e.a;
      eb[i] = e.b;
      ec[i] = e.c;
      ed[i] = e.d;
    }
    for (int i = nb; i < KD_HB; ++i) ea[i] = eb[i] = ec[i] = 0.0f;
    float b[3][KD_HW] = {};
    for (int i = 0; i < KD_HB; i += KD_HW)
      for (int l = 0; l < KD_HW; ++l) {
        b[0][l] += ea[i + l];
        b[1][l] += eb[i + l];
        b[2][l] += ec[i + l];
      }
    sums2.push(b);
    if (DIV == KD_DIV_JSD && grad)
      for (int i = 0; i < nb; ++i) grad[j0 + i] = ed[i];
  }
  sums2.take(out);
}

// The gradient over one segment (off the label; JSD reads log2(q/m) from
// grad, where seg_sums2 left it: no p, no lg2 again).
template <typename T, int DIV, bool CE>
KD_SIMD_CLONES void seg_grad(const T* s, const T* t, int n, const KdFastRow& r, const KdParams& P,
                             float* grad) {
  if (DIV == KD_DIV_JSD) {
    for (int j = 0; j < n; ++j) {
      const float sj = kd_to_f32(s[j]);
      float g = kd_fast_grad_jsd(kd_ex2(fmaf(sj, P.scale2, -r.lse_s)), grad[j], r);
      if (CE) g = fmaf(r.aw, kd_ex2(fmaf(sj, KD_LOG2E, -r.lse_1)), g);
      grad[j] = g;
    }
  } else {
    for (int j = 0; j < n; ++j) grad[j] = kd_fast_grad<DIV, CE>(kd_to_f32(s[j]), kd_to_f32(t[j]), r, P);
  }
}

template <int DIV, bool CE>
void row_finish(const KdFast& st, int has_label, long long y, float w, const KdParams& P,
                KdFastRow& out) {
  const bool bad_label = has_label && (y < 0 || y >= P.vocab);
  out = kd_fast_finish<DIV, CE>(st, bad_label ? kd_nan() : w, P);
}

// The label's gradient entry (α > 0) and the row's loss.
template <typename T, int DIV, bool CE>
float row_end(const T* s, const T* t, long long y, int has_label, float* grad, const KdFastRow& r,
              const KdParams& P) {
  const bool bad_label = has_label && (y < 0 || y >= P.vocab);
  if (grad && CE && !bad_label)
    grad[y] = kd_fast_grad_label<DIV, CE>(kd_to_f32(s[y]), kd_to_f32(t[y]), r, P);
  if (bad_label) return kd_nan();
  return kd_fast_loss<CE>(r, CE ? kd_to_f32(s[y]) : 0.0f, P);
}

// One whole row, its segments in order on this thread.
template <typename T, int DIV, bool CE>
float fast_row(const T* s, const T* t, long long y, int has_label, float* grad, const KdParams& P,
               float w) {
  const int V = P.vocab;
  if (has_label && y == P.ignore_index) {
    if (grad)
      for (int j = 0; j < V; ++j) grad[j] = 0.0f;
    return 0.0f;
  }
  KdFast st = kd_fast_init();
  for (int j0 = 0; j0 < V || j0 == 0; j0 += KD_HSEG) {
    const int n = V - j0 < KD_HSEG ? V - j0 : KD_HSEG;
    KdFast b;
    seg_stats<T, DIV, CE>(s + j0, t + j0, n, P, b);
    if (j0 == 0)
      st = b;
    else
      kd_fast_merge<DIV, CE>(st, b);
  }
  KdFastRow r;
  row_finish<DIV, CE>(st, has_label, y, w, P, r);
  if (DIV == KD_DIV_TVD || DIV == KD_DIV_JSD) {
    float tot[3] = {0.0f, 0.0f, 0.0f};
    for (int j0 = 0; j0 < V; j0 += KD_HSEG) {
      const int n = V - j0 < KD_HSEG ? V - j0 : KD_HSEG;
      float part[3];
      seg_sums2<T, DIV>(s + j0, t + j0, n, r, P, grad ? grad + j0 : nullptr, part);
      for (int k = 0; k < 3; ++k) tot[k] += part[k];
    }
    kd_fast_finish2<DIV>(r, tot[0], tot[1], tot[2], P);
  }
  if (grad)
    for (int j0 = 0; j0 < V; j0 += KD_HSEG) {
      const int n = V - j0 < KD_HSEG ? V - j0 : KD_HSEG;
      seg_grad<T, DIV, CE>(s + j0, t + j0, n, r, P, grad + j0);
    }
  return row_end<T, DIV, CE>(s, t, y, has_label, grad, r, P);
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<T>, integral_constant<DIV>, bool_constant<CE>) for the
// runtime (dtype, div, ce): dtype 0 f32, 1 bf16, 2 f16; div a valid KD_DIV_*
// (checked by the callers; an unknown one takes soft CE's branch).
template <typename R, typename Fn>
R dispatch(int dtype, int div, int ce, Fn&& fn) {
  auto by_ce = [&](auto tt, auto dv) -> R {
    return ce ? fn(tt, dv, std::true_type{}) : fn(tt, dv, std::false_type{});
  };
  auto by_div = [&](auto tt) -> R {
    switch (div) {
      case KD_DIV_FKL: return by_ce(tt, std::integral_constant<int, KD_DIV_FKL>{});
      case KD_DIV_RKL: return by_ce(tt, std::integral_constant<int, KD_DIV_RKL>{});
      case KD_DIV_JSD: return by_ce(tt, std::integral_constant<int, KD_DIV_JSD>{});
      case KD_DIV_TVD: return by_ce(tt, std::integral_constant<int, KD_DIV_TVD>{});
      default: return by_ce(tt, std::integral_constant<int, KD_DIV_SCE>{});
    }
  };
  switch (dtype) {
    case 0: return by_div(TypeTag<float>{});
    case 1: return by_div(TypeTag<kd_bf16>{});
    default: return by_div(TypeTag<kd_f16>{});
  }
}

}  // namespace

extern "C" {

// One row in fast precision (α > 0 when `ce`): returns ℓ (0 for an ignored
// row, NaN for a label out of range) and, when `grad` is not null, writes
// the V gradient entries (already × w) as f32. dtype: 0 f32, 1 bf16, 2 f16;
// div: KD_DIV_* (an unknown one gives NaN).
float kd_host_fast_row(int div, int ce, int dtype, const void* s, const void* t, long long y,
                       int has_label, float* grad, const KdParams* P, float w) {
  if (div < KD_DIV_FKL || div > KD_DIV_SCE) return kd_nan();
  return dispatch<float>(dtype, div, ce, [&](auto tt, auto dv, auto c) {
    using T = typename decltype(tt)::type;
    return fast_row<T, decltype(dv)::value, decltype(c)::value>(
        static_cast<const T*>(s), static_cast<const T*>(t), y, has_label, grad, *P, w);
  });
}

// The same row in its phases, for a caller that runs one row's segments on
// several threads (src/cpu.rs): segments of kd_host_fast_segment() elements
// from the row's start, the last one shorter; the states are opaque buffers
// of at least kd_host_fast_state_sizes()'s bytes. Done in the order below,
// each segment's statistics merged in order, each segment's pass-2 sums
// added in order, it gives kd_host_fast_row's result bit for bit.
int kd_host_fast_segment(void) { return KD_HSEG; }

void kd_host_fast_state_sizes(long long* out) {
  out[0] = (long long)sizeof(KdFast);
  out[1] = (long long)sizeof(KdFastRow);
}

// Pass 1 over one segment of n elements (s, t at the segment's start).
void kd_host_fast_seg_stats(int div, int ce, int dtype, const void* s, const void* t, int n,
                            const KdParams* P, void* stats) {
  dispatch<void>(dtype, div, ce, [&](auto tt, auto dv, auto c) {
    using T = typename decltype(tt)::type;
    seg_stats<T, decltype(dv)::value, decltype(c)::value>(
        static_cast<const T*>(s), static_cast<const T*>(t), n, *P, *static_cast<KdFast*>(stats));
  });
}

// Merges the next segment's statistics b into a.
void kd_host_fast_merge(int div, int ce, void* a, const void* b) {
  dispatch<void>(0, div, ce, [&](auto, auto dv, auto c) {
    kd_fast_merge<decltype(dv)::value, decltype(c)::value>(*static_cast<KdFast*>(a),
                                                           *static_cast<const KdFast*>(b));
  });
}

// The row's constants from its merged statistics.
void kd_host_fast_row_finish(int div, int ce, const void* stats, int has_label, long long y,
                             float w, const KdParams* P, void* row) {
  dispatch<void>(0, div, ce, [&](auto, auto dv, auto c) {
    row_finish<decltype(dv)::value, decltype(c)::value>(*static_cast<const KdFast*>(stats),
                                                        has_label, y, w, *P,
                                                        *static_cast<KdFastRow*>(row));
  });
}

// Pass 2 (TVD, JSD) over one segment: its three sums into out; JSD writes
// its log-ratios into grad (the segment's, or null without a gradient).
void kd_host_fast_seg_sums2(int div, int dtype, const void* s, const void* t, int n,
                            const void* row, const KdParams* P, float* grad, float* out) {
  dispatch<void>(dtype, div, 0, [&](auto tt, auto dv, auto) {
    using T = typename decltype(tt)::type;
    float o[3];
    seg_sums2<T, decltype(dv)::value>(static_cast<const T*>(s), static_cast<const T*>(t), n,
                                      *static_cast<const KdFastRow*>(row), *P, grad, o);
    out[0] = o[0];
    out[1] = o[1];
    out[2] = o[2];
  });
}

// The pass-2 totals into the row's constants.
void kd_host_fast_row_finish2(int div, void* row, const float* tot, const KdParams* P) {
  KdFastRow& r = *static_cast<KdFastRow*>(row);
  if (div == KD_DIV_TVD) kd_fast_finish2<KD_DIV_TVD>(r, tot[0], tot[1], tot[2], *P);
  if (div == KD_DIV_JSD) kd_fast_finish2<KD_DIV_JSD>(r, tot[0], tot[1], tot[2], *P);
}

// The gradient over one segment (grad: the segment's).
void kd_host_fast_seg_grad(int div, int ce, int dtype, const void* s, const void* t, int n,
                           const void* row, const KdParams* P, float* grad) {
  dispatch<void>(dtype, div, ce, [&](auto tt, auto dv, auto c) {
    using T = typename decltype(tt)::type;
    seg_grad<T, decltype(dv)::value, decltype(c)::value>(
        static_cast<const T*>(s), static_cast<const T*>(t), n, *static_cast<const KdFastRow*>(row),
        *P, grad);
  });
}

// The label's gradient entry and the row's loss (s, t, grad: the whole row).
float kd_host_fast_row_end(int div, int ce, int dtype, const void* s, const void* t, long long y,
                           int has_label, float* grad, const void* row, const KdParams* P) {
  return dispatch<float>(dtype, div, ce, [&](auto tt, auto dv, auto c) {
    using T = typename decltype(tt)::type;
    return row_end<T, decltype(dv)::value, decltype(c)::value>(
        static_cast<const T*>(s), static_cast<const T*>(t), y, has_label, grad,
        *static_cast<const KdFastRow*>(row), *P);
  });
}

}  // extern "C"
