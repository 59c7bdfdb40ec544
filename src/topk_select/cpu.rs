//! The CPU backend: rayon over rows; each row in one pass that keeps the
//! candidates above a running threshold (the current k-th largest), then a
//! vectorised sum of exponentials for the log-sum-exp.

use super::{nan_row, order, validate, SelectSpec, Selection};
use crate::error::Result;
use crate::tensor::{HostData, Logits};
use rayon::prelude::*;

/// Per-thread buffers: the widened row (16-bit inputs) and the candidates.
#[derive(Default)]
struct Scratch {
    row: Vec<f32>,
    cand: Vec<(f32, u32)>,
}

/// The selection on the CPU (rayon over rows). See the module's semantics.
pub fn select_cpu(logits: &Logits, spec: &SelectSpec) -> Result<Selection> {
    validate(logits, spec)?;
    let (n, v, k) = (logits.rows, logits.cols, spec.k);
    // Poisoned, so that an element left unwritten shows in the tests.
    let mut indices = vec![-1i32; n * k];
    let mut values = vec![f32::NAN; n * k];
    let mut lse = vec![f32::NAN; n];
    let mut nan = vec![false; n];
    let stride = logits.row_stride;
    indices
        .par_chunks_mut(k)
        .zip(values.par_chunks_mut(k))
        .zip(lse.par_iter_mut().zip(nan.par_iter_mut()))
        .enumerate()
        .for_each_init(Scratch::default, |s, (r, ((idx, val), (lse, bad)))| {
            let Scratch { row: buf, cand } = s;
            let off = r * stride;
            let row: &[f32] = match logits.data {
                HostData::F32(d) => &d[off..off + v],
                HostData::Bf16(d) => {
                    buf.clear();
                    // bf16 is the top half of an f32 (NaN included): a shift
                    // that vectorises, where `to_f32` does not.
                    buf.extend(
                        d[off..off + v]
                            .iter()
                            .map(|x| f32::from_bits((x.to_bits() as u32) << 16)),
                    );
                    buf
                }
                HostData::F16(d) => {
                    buf.clear();
                    buf.extend(d[off..off + v].iter().map(|x| x.to_f32()));
                    buf
                }
            };
            if !select_row(row, k, cand, idx, val) {
                *bad = true;
            } else if spec.with_lse {
                *lse = row_lse(row, val[0]);
            }
        });
    if let Some(r) = nan.iter().position(|&b| b) {
        return nan_row(r);
    }
    Ok(Selection {
        rows: n,
        k,
        indices,
        values,
        lse: spec.with_lse.then_some(lse),
    })
}

/// Elements per block of the fast scan (compared with the threshold at once).
const BLOCK: usize = 16;

/// The top `k` of `row` into `idx` and `val`, in order; false (and the
/// outputs unspecified) when the row holds a NaN.
///
/// Candidates are appended while they beat the threshold: the k-th largest
/// of the candidates kept at the last compaction. A later element equal to
/// the threshold loses to it (its column is higher), hence the strict `>`.
/// When the buffer fills, `select_nth_unstable_by` keeps its top k.
fn select_row(
    row: &[f32],
    k: usize,
    cand: &mut Vec<(f32, u32)>,
    idx: &mut [i32],
    val: &mut [f32],
) -> bool {
    let cap = 2 * k + 256;
    cand.clear();
    cand.reserve(cap);
    // Until the first compaction every element is a candidate.
    let mut thr = f32::NEG_INFINITY;
    let mut have_thr = false;
    let compact = |cand: &mut Vec<(f32, u32)>| -> f32 {
        cand.select_nth_unstable_by(k - 1, |a, b| order(*a, *b));
        cand.truncate(k);
        // The k-th in order: the minimum of what is kept.
        cand.iter().map(|c| c.0).fold(f32::INFINITY, f32::min)
    };
    let mut base = 0usize;
    let blocks = row.chunks_exact(BLOCK);
    let tail = blocks.remainder();
    let push = |cand: &mut Vec<(f32, u32)>,
                thr: &mut f32,
                have_thr: &mut bool,
                chunk: &[f32],
                base: usize|
     -> bool {
        for (j, &x) in chunk.iter().enumerate() {
            if x.is_nan() {
                return false;
            }
            if !*have_thr || x > *thr {
                cand.push((x, (base + j) as u32));
                if cand.len() == cap {
                    *thr = compact(cand);
                    *have_thr = true;
                }
            }
        }
        true
    };
    for chunk in blocks {
        // Branch-free test of the whole block (vectorises): anything above
        // the threshold, or a NaN (which compares unequal to itself)?
        let mut hit = false;
        for &x in chunk {
            hit |= (x > thr) | x.is_nan();
        }
        if (hit || !have_thr) && !push(cand, &mut thr, &mut have_thr, chunk, base) {
            return false;
        }
        base += BLOCK;
    }
    if !push(cand, &mut thr, &mut have_thr, tail, base) {
        return false;
    }
    if cand.len() > k {
        compact(cand);
    }
    cand.sort_unstable_by(|a, b| order(*a, *b));
    for (j, c) in cand.iter().enumerate() {
        idx[j] = c.1 as i32;
        val[j] = c.0;
    }
    true
}

/// `ln Σ exp(x)` of a row without NaN whose maximum is `m`: the sum of
/// `exp(x − m)` (fp32, [`exp_neg`]) in 16 fp32 lanes over spans of 1024
/// elements (64 terms ≤ 1 per lane: a relative error below 64 ε₃₂), the
/// spans' sums added in f64.
fn row_lse(row: &[f32], m: f32) -> f32 {
    if m.is_infinite() {
        return m;
    }
    const L: usize = 16;
    let mut s = 0f64;
    for span in row.chunks(1024) {
        let mut acc = [0f32; L];
        let blocks = span.chunks_exact(L);
        let tail = blocks.remainder();
        for chunk in blocks {
            for j in 0..L {
                acc[j] += exp_neg(chunk[j] - m);
            }
        }
        for &x in tail {
            acc[0] += exp_neg(x - m);
        }
        s += acc.iter().map(|&a| a as f64).sum::<f64>();
    }
    (m as f64 + s.ln()) as f32
}

/// `exp(x)` for `x ≤ 0` in fp32, branch-free so that loops over it
/// vectorise (SSE2 has no rounding instruction, hence the magic-number
/// rounding): `2^n · 2^f`, `f ∈ [−½, ½]`, `2^f` by a degree-7 polynomial.
/// Relative error below 3e-7 + 8e-8·|x|, mostly the rounding of `x·log2 e`
/// (a term far below the row's maximum weighs little in the sum). Below
/// `−87` (where `exp` leaves the normal range) it returns `exp(−87) ≈
/// 1.6e-38`: next to a row maximum's term of 1 that is below f32
/// resolution, even summed over 2^24 elements.
#[inline(always)]
fn exp_neg(x: f32) -> f32 {
    // 1.5 · 2^23: adding it rounds to an integer, which then sits in the
    // low mantissa bits (read as an integer, no saturating `as i32`, which
    // would not vectorise).
    const MAGIC: f32 = 12582912.0;
    // Not `f32::max` (NaN rules): a plain select becomes one max instruction.
    let x = if x < -87.0 { -87.0 } else { x };
    let t = x * std::f32::consts::LOG2_E;
    let r = t + MAGIC;
    let n = r - MAGIC;
    let ni = (r.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let f = (t - n) * std::f32::consts::LN_2;
    // e^f, |f| ≤ ln2/2, Taylor to degree 7.
    let p = 1.0
        + f * (1.0
            + f * (0.5
                + f * (1.0 / 6.0
                    + f * (1.0 / 24.0
                        + f * (1.0 / 120.0 + f * (1.0 / 720.0 + f * (1.0 / 5040.0)))))));
    let scale = f32::from_bits((ni.wrapping_add(127) << 23) as u32);
    p * scale
}

#[cfg(test)]
mod tests {
    use super::exp_neg;

    #[test]
    fn exp_neg_is_accurate() {
        let mut x = 0.0f32;
        while x > -87.0 {
            let want = (x as f64).exp();
            let got = exp_neg(x) as f64;
            // The polynomial, plus the rounding of x·log2(e) (an ulp of |x|).
            let tol = 3e-7 + 8e-8 * (x as f64).abs();
            assert!(
                ((got - want) / want).abs() < tol,
                "x = {x}: {got} vs {want}"
            );
            x -= 0.0137;
        }
        assert_eq!(exp_neg(f32::NEG_INFINITY), exp_neg(-87.0));
    }
}
