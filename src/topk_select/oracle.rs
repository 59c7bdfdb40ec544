//! The reference: every row sorted whole, the log-sum-exp in f64.

use super::{nan_row, validate, SelectSpec, Selection};
use crate::error::Result;
use crate::tensor::Logits;

/// The selection by a full sort of each row (stable, by value descending,
/// so equal values keep the lower column first), and the log-sum-exp in
/// f64 (max-shifted) rounded to f32. Slow; the tests' reference.
pub fn select_oracle(logits: &Logits, spec: &SelectSpec) -> Result<Selection> {
    validate(logits, spec)?;
    let (n, v, k) = (logits.rows, logits.cols, spec.k);
    let mut indices = Vec::with_capacity(n * k);
    let mut values = Vec::with_capacity(n * k);
    let mut lse = Vec::with_capacity(n);
    for r in 0..n {
        let row: Vec<f64> = (0..v).map(|c| logits.get(r, c) as f64).collect();
        if row.iter().any(|x| x.is_nan()) {
            return nan_row(r);
        }
        let mut cols: Vec<usize> = (0..v).collect();
        // Stable: equal values (−0 = +0 included) stay in column order.
        cols.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap());
        for &c in &cols[..k] {
            indices.push(c as i32);
            values.push(row[c] as f32);
        }
        lse.push(log_sum_exp(&row) as f32);
    }
    Ok(Selection {
        rows: n,
        k,
        indices,
        values,
        lse: spec.with_lse.then_some(lse),
    })
}

/// `ln Σ exp(x)` in f64: `+inf` with a `+inf`, `−inf` when all are `−inf`.
pub(crate) fn log_sum_exp(row: &[f64]) -> f64 {
    let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if m.is_infinite() {
        return m;
    }
    m + row.iter().map(|&x| (x - m).exp()).sum::<f64>().ln()
}
