//! Per-row top-k selection: the `k` largest logits of every row, their
//! columns and optionally the row's log-sum-exp, in one read of the row —
//! what an offline-distillation teacher cache keeps of each token
//! (docs/DESIGN.md §9).
//!
//! Semantics, the same for every backend:
//! - `1 ≤ k ≤ V` and `k ≤` [`MAX_K`];
//! - a row's winners are ordered by value descending, equal values by the
//!   lower column first (so the result is deterministic); `−0` and `+0` are
//!   equal values; `−inf` is an ordinary value (selected last, by column),
//!   `+inf` an ordinary largest value;
//! - `values` are the input elements exactly (bf16 and f16 widen exactly);
//! - `lse` is `ln Σ exp(x)` over the whole row: `+inf` when the row holds
//!   `+inf`, `−inf` when every element is `−inf`;
//! - a row holding a NaN is an error naming the row (the first such row).
//!
//! Backends: [`select_oracle`] (sort-based, lse in f64), [`select_cpu`]
//! (rayon over rows, one pass with a running threshold) and the CUDA kernel
//! kernels/topk_select/select.cu ([`cuda`]: one CTA per row, a radix select;
//! `emu` runs it under the CPU emulation for the tests).

pub mod check;
mod cpu;
pub mod cuda;
#[cfg(feature = "emulation")]
pub mod emu;
mod oracle;
pub(crate) mod params;

use crate::error::{invalid, Result};
use crate::tensor::Logits;

pub use cpu::select_cpu;
pub use oracle::select_oracle;

/// The largest `k` a selection accepts (the CUDA kernel sorts the winners
/// of a row in shared memory).
pub const MAX_K: usize = 4096;

/// What to select.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SelectSpec {
    /// Elements kept per row, `1 ≤ k ≤ min(V, MAX_K)`.
    pub k: usize,
    /// Also return each row's log-sum-exp.
    pub with_lse: bool,
}

/// The selection of every row.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    /// Rows N.
    pub rows: usize,
    /// Entries per row.
    pub k: usize,
    /// `[rows, k]` row-major: the columns of the winners, by value
    /// descending, ties by the lower column first.
    pub indices: Vec<i32>,
    /// `[rows, k]`: the winners' values, exactly the input elements.
    pub values: Vec<f32>,
    /// `[rows]`: each row's log-sum-exp (natural log), when asked for.
    pub lse: Option<Vec<f32>>,
}

/// Checks the logits' shape and `k` (`1 ≤ k ≤ V`, `k ≤ MAX_K`).
pub fn validate(logits: &Logits, spec: &SelectSpec) -> Result<()> {
    logits.validate("logits")?;
    check_k(spec.k, logits.cols)
}

/// `1 ≤ k ≤ V` and `k ≤ MAX_K`.
pub(crate) fn check_k(k: usize, cols: usize) -> Result<()> {
    let spec = SelectSpec { k, with_lse: false };
    if spec.k == 0 {
        return invalid("k", "must be at least 1");
    }
    if spec.k > cols {
        return invalid(
            "k",
            format!("k = {} exceeds the row length V = {cols}", spec.k),
        );
    }
    if spec.k > MAX_K {
        return invalid("k", format!("k = {} exceeds the maximum {MAX_K}", spec.k));
    }
    Ok(())
}

/// The error of a row holding a NaN.
pub(crate) fn nan_row<T>(row: usize) -> Result<T> {
    invalid(
        "logits",
        format!("row {row} contains NaN (top-k selection needs ordered values)"),
    )
}

/// The order of the selection: value descending (`−0 = +0`), then the lower
/// column. Neither value is NaN.
#[inline]
pub(crate) fn order(a: (f32, u32), b: (f32, u32)) -> std::cmp::Ordering {
    b.0.partial_cmp(&a.0)
        .unwrap_or(std::cmp::Ordering::Equal)
        .then(a.1.cmp(&b.1))
}
