//! The reference top-k selection, a sort per row: a stand-in with the
//! signature and result of the library's `kdfuse::topk_select::select_cpu`
//! (being written separately), which replaces it once it lands.

use kdfuse::{KdError, Logits};
use rayon::prelude::*;

/// What to select: `k` entries per row, and whether to return each row's
/// log-sum-exp.
#[derive(Debug, Clone, Copy)]
pub struct SelectSpec {
    /// Entries per row, 1 ≤ k ≤ V.
    pub k: usize,
    /// Also return each row's log-sum-exp over all V.
    pub with_lse: bool,
}

/// The selected entries, row-major `[rows, k]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    /// Rows.
    pub rows: usize,
    /// Entries per row.
    pub k: usize,
    /// Column indices, per row by value descending, ties by lower index.
    pub indices: Vec<i32>,
    /// The logits at those indices.
    pub values: Vec<f32>,
    /// Log-sum-exp of each row (f64 sum, rounded to f32), with `with_lse`.
    pub lse: Option<Vec<f32>>,
}

/// The `k` largest logits of each row, values descending and ties by lower
/// index. A NaN logit is an error (it has no place in the order).
pub fn select_rows_reference(logits: &Logits, spec: &SelectSpec) -> kdfuse::Result<Selection> {
    let (n, v, k) = (logits.rows, logits.cols, spec.k);
    if k == 0 || k > v {
        return Err(KdError::InvalidArgument {
            arg: "k",
            msg: format!("must be in [1, V = {v}], got {k}"),
        });
    }
    if v > i32::MAX as usize {
        return Err(KdError::InvalidArgument {
            arg: "logits",
            msg: format!("V = {v} does not fit I32 indices"),
        });
    }
    logits.validate("logits")?;
    let per_row: Vec<(Vec<i32>, Vec<f32>, f32)> = (0..n)
        .into_par_iter()
        .map(|r| {
            let row: Vec<f32> = (0..v).map(|c| logits.get(r, c)).collect();
            if let Some(c) = row.iter().position(|x| x.is_nan()) {
                return Err(KdError::InvalidArgument {
                    arg: "logits",
                    msg: format!("row {r}, column {c} is NaN"),
                });
            }
            let order =
                |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
            let mut idx: Vec<u32> = (0..v as u32).collect();
            if k < v {
                idx.select_nth_unstable_by(k - 1, order);
                idx.truncate(k);
            }
            idx.sort_unstable_by(order);
            let lse = if spec.with_lse {
                lse_f64(&row) as f32
            } else {
                0.0
            };
            Ok((
                idx.iter().map(|&i| i as i32).collect(),
                idx.iter().map(|&i| row[i as usize]).collect(),
                lse,
            ))
        })
        .collect::<kdfuse::Result<_>>()?;
    let mut sel = Selection {
        rows: n,
        k,
        indices: Vec::with_capacity(n * k),
        values: Vec::with_capacity(n * k),
        lse: spec.with_lse.then(|| Vec::with_capacity(n)),
    };
    for (i, x, l) in per_row {
        sel.indices.extend(i);
        sel.values.extend(x);
        if let Some(lse) = sel.lse.as_mut() {
            lse.push(l);
        }
    }
    Ok(sel)
}

/// log Σ exp(x) in f64 (−inf for a row of −inf, +inf with a +inf entry).
fn lse_f64(row: &[f32]) -> f64 {
    let m = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    if !m.is_finite() {
        return m;
    }
    m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln()
}
