//! `kdfuse_compute_host_f64` and `kdfuse_compute_topk_host_f64`: the dense
//! and the top-k loss on double-precision host buffers through the f64
//! oracle (`crate::oracle`), for gradient checks (PyTorch's `gradcheck`
//! needs float64 end to end). Every floating-point buffer of the batch holds
//! doubles; the rest of the batch and the params mean what they mean for
//! `kdfuse_compute_host`.

use super::types::{BatchShape, KdfuseBatch, KdfuseDtype, TopkShape};
use crate::error::{invalid, Result};
use crate::oracle::{row_detailed, topk_row};
use crate::spec::LossSpec;
use crate::tensor::{first_bad_topk_row, TopkIndices};
use std::ffi::c_void;

/// Fails, naming `arg`, unless `p` (NULL allowed) is 8-byte aligned.
fn aligned8(arg: &'static str, p: *const c_void) -> Result<()> {
    if !(p as usize).is_multiple_of(8) {
        return invalid(
            arg,
            format!("pointer {p:p} is not aligned to 8 bytes (double)"),
        );
    }
    Ok(())
}

/// `len` doubles at `p`.
///
/// # Safety
/// `p` is aligned and valid for `len` doubles (or `len` is 0).
unsafe fn doubles<'a>(p: *const c_void, len: usize) -> &'a [f64] {
    if len == 0 {
        return &[];
    }
    // SAFETY: the caller's contract.
    unsafe { std::slice::from_raw_parts(p.cast::<f64>(), len) }
}

/// A batch checked by [`check`]: its shape and the host slices every row
/// reads.
struct Checked<'a> {
    sh: BatchShape,
    student: &'a [f64],
    labels: Option<&'a [i64]>,
    weights: Option<&'a [f64]>,
}

/// The checks both f64 entry points share (`entry` names the function in
/// messages): dtype codes, the shape as for the other paths, alignment,
/// overlap, spans, the spec, the row weights and the labels. The top-k
/// teacher's own checks are [`compute_topk`]'s.
///
/// # Safety
/// As the entry points: every non-NULL pointer is host memory large enough
/// for the batch's shape and strides, in doubles (int64 labels).
unsafe fn check<'a>(b: &KdfuseBatch, spec: &LossSpec, entry: &str) -> Result<Checked<'a>> {
    let f64_code = KdfuseDtype::F64 as i32;
    if b.dtype != f64_code {
        return invalid(
            "batch.dtype",
            format!(
                "must be KDFUSE_DTYPE_F64 ({f64_code}) for {entry}, got {}",
                b.dtype
            ),
        );
    }
    if b.grad_dtype != f64_code {
        return invalid(
            "batch.grad_dtype",
            format!(
                "must be KDFUSE_DTYPE_F64 ({f64_code}) for {entry}, got {}",
                b.grad_dtype
            ),
        );
    }
    // The shape checks of the other paths, on an f32-typed copy (the dtype
    // codes are checked above; everything else is the same).
    let mut shaped = *b;
    shaped.dtype = KdfuseDtype::F32 as i32;
    shaped.grad_dtype = KdfuseDtype::F32 as i32;
    let sh = shaped.shape(spec)?;
    for (arg, p) in [
        ("batch.student", b.student),
        ("batch.teacher", b.teacher),
        ("batch.topk_values", b.topk_values),
        ("batch.grad", b.grad.cast_const()),
        ("batch.grad_teacher", b.grad_teacher.cast_const()),
        ("batch.row_weights", b.row_weights.cast()),
        ("batch.row_losses", b.row_losses.cast_const().cast()),
        ("batch.loss", b.loss.cast_const().cast()),
        ("batch.labels", b.labels.cast()),
    ] {
        aligned8(arg, p)?;
    }
    if !(b.valid_rows as usize).is_multiple_of(4) {
        return invalid("batch.valid_rows", "pointer is not aligned to 4 bytes");
    }
    let overlaps = |g: *mut c_void| {
        !g.is_null()
            && [b.student, b.teacher, b.topk_values, b.topk_indices].contains(&g.cast_const())
    };
    if overlaps(b.grad) || overlaps(b.grad_teacher) {
        return invalid(
            "batch.grad",
            "a gradient buffer must not overlap the inputs on the host",
        );
    }
    let (n, v) = (sh.layout.rows, sh.layout.cols);
    let s_len = sh.span("batch.student_stride", sh.layout.student_stride, 8)?;
    sh.span("batch.grad_stride", sh.layout.grad_stride, 8)?;
    sh.span(
        "batch.grad_teacher_stride",
        sh.layout.grad_teacher_stride,
        8,
    )?;
    if n.checked_mul(8).is_none_or(|x| x > isize::MAX as usize) {
        return invalid("batch.rows", format!("N = {n} is too large"));
    }
    let labels: Option<&[i64]> = (!b.labels.is_null()).then(|| {
        // SAFETY: N labels (the caller's contract), aligned (checked).
        unsafe { std::slice::from_raw_parts(b.labels, n) }
    });
    // SAFETY: N doubles when not NULL (the caller's contract), aligned.
    let weights = (!b.row_weights.is_null()).then(|| unsafe { doubles(b.row_weights.cast(), n) });
    spec.validate(labels.is_some())?;
    if let Some(w) = weights {
        if let Some((i, x)) = w.iter().enumerate().find(|(_, x)| !x.is_finite()) {
            return invalid(
                "batch.row_weights",
                format!("row_weights[{i}] = {x} is not finite"),
            );
        }
    }
    if let Some(l) = labels {
        if let Some((i, y)) = l
            .iter()
            .enumerate()
            .find(|(_, &y)| y != spec.ignore_index && !(0..v as i64).contains(&y))
        {
            return invalid(
                "batch.labels",
                format!(
                    "labels[{i}] = {y} is outside [0, {v}) and is not ignore_index ({})",
                    spec.ignore_index
                ),
            );
        }
    }
    Ok(Checked {
        sh,
        // SAFETY: the caller's contract: the student spans these many doubles.
        student: unsafe { doubles(b.student, s_len) },
        labels,
        weights,
    })
}

/// One row's unweighted results: ℓ, ∂ℓ/∂s and, for a dense teacher, ∂ℓ/∂t.
type RowOut = (f64, Vec<f64>, Option<Vec<f64>>);

/// The batch loop of both entry points: skips ignored rows and rows of
/// weight 0 (zero gradients), applies the row weights, the reduction's
/// weight and `grad_scale`, and writes every output of the batch.
/// `row(r, student_row, label)` computes row `r`.
///
/// # Safety
/// As [`check`], which made `c` from `b`.
unsafe fn run(
    b: &KdfuseBatch,
    spec: &LossSpec,
    c: &Checked<'_>,
    mut row: impl FnMut(usize, &[f64], Option<usize>) -> RowOut,
) {
    let sh = &c.sh;
    let (n, v) = (sh.layout.rows, sh.layout.cols);
    let valid = c
        .labels
        .map_or(n, |l| l.iter().filter(|&&y| y != spec.ignore_index).count());
    let w = spec.reduction.row_weight(valid, v);
    let mut row_losses = vec![0.0f64; n];
    for r in 0..n {
        let label = c.labels.map(|l| l[r]);
        let wr = c.weights.map_or(1.0, |w| w[r]);
        let skip = label == Some(spec.ignore_index) || wr == 0.0;
        let res = (!skip).then(|| {
            let s = &c.student[r * sh.layout.student_stride..r * sh.layout.student_stride + v];
            row(r, s, label.map(|y| y as usize))
        });
        let scale = spec.grad_scale * w * wr;
        for (out, stride, pick) in [
            (b.grad, sh.layout.grad_stride, 0),
            (b.grad_teacher, sh.layout.grad_teacher_stride, 1),
        ] {
            if out.is_null() {
                continue;
            }
            // SAFETY: the gradient spans (N − 1)·stride + V doubles, aligned.
            let dst =
                unsafe { std::slice::from_raw_parts_mut(out.cast::<f64>().add(r * stride), v) };
            let g = res
                .as_ref()
                .and_then(|(_, gs, gt)| if pick == 0 { Some(gs) } else { gt.as_ref() });
            match g {
                None => dst.fill(0.0),
                Some(g) => {
                    for (d, &x) in dst.iter_mut().zip(g) {
                        *d = scale * x;
                    }
                }
            }
        }
        if let Some((l, _, _)) = res {
            row_losses[r] = wr * l;
        }
    }
    let loss = w * crate::sum(&row_losses);
    // SAFETY: `loss` is non-NULL (shape() checked it); the others when not
    // NULL hold N doubles / one int32 (the caller's contract).
    unsafe {
        *b.loss.cast::<f64>() = loss;
        if !b.row_losses.is_null() {
            std::ptr::copy_nonoverlapping(row_losses.as_ptr(), b.row_losses.cast::<f64>(), n);
        }
        if !b.valid_rows.is_null() {
            *b.valid_rows = valid as i32;
        }
    }
}

/// The body of `kdfuse_compute_host_f64` (see its documentation in mod.rs).
///
/// # Safety
/// As `kdfuse_compute_host_f64`.
pub(crate) unsafe fn compute(b: &KdfuseBatch, spec: &LossSpec) -> Result<()> {
    if !b.topk_indices.is_null() || !b.topk_values.is_null() {
        return invalid(
            "batch.topk_indices",
            "kdfuse_compute_host_f64 takes a dense teacher only (batch.teacher); \
             a top-k teacher goes to kdfuse_compute_topk_host_f64",
        );
    }
    // SAFETY: the caller's contract.
    let c = unsafe { check(b, spec, "kdfuse_compute_host_f64") }?;
    let sh = c.sh;
    let t_len = sh.span("batch.teacher_stride", sh.layout.teacher_stride, 8)?;
    // SAFETY: the caller's contract: the teacher spans these many doubles.
    let teacher = unsafe { doubles(b.teacher, t_len) };
    // SAFETY: as above.
    unsafe {
        run(b, spec, &c, |r, s, label| {
            let t = &teacher
                [r * sh.layout.teacher_stride..r * sh.layout.teacher_stride + sh.layout.cols];
            let res = row_detailed(s, t, label, spec, None);
            (res.loss, res.grad_s, Some(res.grad_t))
        })
    };
    Ok(())
}

/// The body of `kdfuse_compute_topk_host_f64` (see its documentation in
/// mod.rs).
///
/// # Safety
/// As `kdfuse_compute_topk_host_f64`.
pub(crate) unsafe fn compute_topk(b: &KdfuseBatch, spec: &LossSpec) -> Result<()> {
    if b.topk_indices.is_null() {
        return invalid(
            "batch.topk_indices",
            "must not be NULL for kdfuse_compute_topk_host_f64 (a dense teacher goes to \
             kdfuse_compute_host_f64)",
        );
    }
    // SAFETY: the caller's contract.
    let c = unsafe { check(b, spec, "kdfuse_compute_topk_host_f64") }?;
    spec.validate_topk()?;
    let (n, v) = (c.sh.layout.rows, c.sh.layout.cols);
    // shape() gives a top-k shape whenever topk_indices is set.
    let Some(TopkShape { k, indices_i64 }) = c.sh.topk else {
        return invalid("batch.topk_indices", "no top-k teacher");
    };
    let Some(len) = n
        .checked_mul(k)
        .filter(|l| l.checked_mul(8).is_some_and(|b| b <= isize::MAX as usize))
    else {
        return invalid("batch.topk_k", "N·k overflows");
    };
    let width = if indices_i64 { 8 } else { 4 };
    if !(b.topk_indices as usize).is_multiple_of(width) {
        return invalid(
            "batch.topk_indices",
            format!("pointer is not aligned to {width} bytes (its index dtype)"),
        );
    }
    // SAFETY: N·k indices of the index dtype when N·k > 0 (the caller's
    // contract), aligned (checked above).
    let indices = unsafe {
        match (len, indices_i64) {
            (0, false) => TopkIndices::I32(&[]),
            (0, true) => TopkIndices::I64(&[]),
            (_, false) => TopkIndices::I32(std::slice::from_raw_parts(b.topk_indices.cast(), len)),
            (_, true) => TopkIndices::I64(std::slice::from_raw_parts(b.topk_indices.cast(), len)),
        }
    };
    if let Some((row, msg)) = first_bad_topk_row(&indices, n, k, v) {
        return invalid("batch.topk_indices", format!("row {row}: {msg}"));
    }
    // SAFETY: N·k doubles (the caller's contract), aligned (checked).
    let values = unsafe { doubles(b.topk_values, len) };
    // SAFETY: as above.
    unsafe {
        run(b, spec, &c, |r, s, label| {
            let idx: Vec<usize> = (r * k..(r + 1) * k)
                .map(|i| indices.get(i) as usize)
                .collect();
            let (l, g, _) = topk_row(s, &idx, &values[r * k..(r + 1) * k], label, spec);
            (l, g, None)
        })
    };
    Ok(())
}
