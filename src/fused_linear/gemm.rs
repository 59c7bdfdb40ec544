//! The host GEMMs of the fused linear path: matrixmultiply's sgemm (fp32
//! operands, fp32 accumulation), split over rayon threads along a dimension
//! that gives each thread its own part of the large operand to pack (the
//! head W, or the logit gradient), so that no thread packs the whole head
//! again.

use crate::tensor::HostData;
use rayon::prelude::*;
use std::borrow::Cow;

/// `[start, start + len)` of `data` as f32: borrowed for f32, widened for
/// bf16 and f16 (matrixmultiply multiplies f32).
pub(super) fn widen<'a>(data: &HostData<'a>, start: usize, len: usize) -> Cow<'a, [f32]> {
    match *data {
        HostData::F32(d) => Cow::Borrowed(&d[start..start + len]),
        HostData::Bf16(d) => Cow::Owned(d[start..start + len].iter().map(|x| x.to_f32()).collect()),
        HostData::F16(d) => Cow::Owned(d[start..start + len].iter().map(|x| x.to_f32()).collect()),
    }
}

/// Splits `0..len` into blocks for the threads: a few per thread (for
/// balance), none under `min` elements.
fn blocks(len: usize, min: usize) -> Vec<(usize, usize)> {
    let want = (rayon::current_num_threads() * 4).max(1);
    let size = len.div_ceil(want).max(min).max(1);
    (0..len)
        .step_by(size)
        .map(|s| (s, (s + size).min(len)))
        .collect()
}

/// A pointer that may cross threads: each thread writes a disjoint block.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: the blocks written through it are disjoint (see the callers).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// `out[rows, v] = h[rows, k] · w[v, k]ᵀ + bias`, threads over blocks of
/// the vocabulary (each packs its own rows of `w`).
pub(super) fn logits(
    h: &[f32],
    rows: usize,
    k: usize,
    w: &[f32],
    v: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    assert!(h.len() >= rows * k && w.len() >= v * k && out.len() >= rows * v);
    if rows == 0 {
        return;
    }
    let o = Out(out.as_mut_ptr());
    blocks(v, 256).into_par_iter().for_each(|(v0, v1)| {
        let o = &o;
        // SAFETY: the asserts bound every access; this block writes the
        // columns [v0, v1) of each row of `out`, no other block does.
        unsafe {
            matrixmultiply::sgemm(
                rows,
                k,
                v1 - v0,
                1.0,
                h.as_ptr(),
                k as isize,
                1,
                w.as_ptr().add(v0 * k),
                1,
                k as isize,
                0.0,
                o.0.add(v0),
                v as isize,
                1,
            );
        }
        if let Some(b) = bias {
            for r in 0..rows {
                // SAFETY: as above, row r's columns [v0, v1).
                let row = unsafe { std::slice::from_raw_parts_mut(o.0.add(r * v + v0), v1 - v0) };
                row.iter_mut().zip(&b[v0..v1]).for_each(|(x, &b)| *x += b);
            }
        }
    });
}

/// `out[rows, k] = g[rows, v] · w[v, k]`, threads over blocks of the hidden
/// size (each packs its own columns of `w`).
pub(super) fn grad_hidden(g: &[f32], rows: usize, v: usize, w: &[f32], k: usize, out: &mut [f32]) {
    assert!(g.len() >= rows * v && w.len() >= v * k && out.len() >= rows * k);
    if rows == 0 {
        return;
    }
    let o = Out(out.as_mut_ptr());
    blocks(k, 32).into_par_iter().for_each(|(k0, k1)| {
        let o = &o;
        // SAFETY: the asserts bound every access; this block writes the
        // columns [k0, k1) of each row of `out`, no other block does.
        unsafe {
            matrixmultiply::sgemm(
                rows,
                v,
                k1 - k0,
                1.0,
                g.as_ptr(),
                v as isize,
                1,
                w.as_ptr().add(k0),
                k as isize,
                1,
                0.0,
                o.0.add(k0),
                k as isize,
                1,
            );
        }
    });
}

/// `out[v, k] += g[rows, v]ᵀ · h[rows, k]`, threads over blocks of the
/// vocabulary (rows of `out`).
pub(super) fn grad_weight(g: &[f32], rows: usize, v: usize, h: &[f32], k: usize, out: &mut [f32]) {
    assert!(g.len() >= rows * v && h.len() >= rows * k && out.len() >= v * k);
    if rows == 0 {
        return;
    }
    let size = blocks(v, 64).first().map_or(v, |&(a, b)| b - a).max(1);
    out[..v * k]
        .par_chunks_mut(size * k)
        .enumerate()
        .for_each(|(i, block)| {
            let v0 = i * size;
            let n = block.len() / k;
            // SAFETY: the asserts bound every read; `block` is this
            // thread's own rows [v0, v0 + n) of `out`.
            unsafe {
                matrixmultiply::sgemm(
                    n,
                    rows,
                    k,
                    1.0,
                    g.as_ptr().add(v0),
                    1,
                    v as isize,
                    h.as_ptr(),
                    k as isize,
                    1,
                    1.0,
                    block.as_mut_ptr(),
                    k as isize,
                    1,
                );
            }
        });
}

/// `out[v] += Σ_rows g[rows, v]`, threads over blocks of the vocabulary.
pub(super) fn grad_bias(g: &[f32], rows: usize, v: usize, out: &mut [f32]) {
    let size = blocks(v, 1024).first().map_or(v, |&(a, b)| b - a).max(1);
    out[..v]
        .par_chunks_mut(size)
        .enumerate()
        .for_each(|(i, block)| {
            let v0 = i * size;
            for r in 0..rows {
                let row = &g[r * v + v0..r * v + v0 + block.len()];
                block.iter_mut().zip(row).for_each(|(b, &x)| *b += x);
            }
        });
}
