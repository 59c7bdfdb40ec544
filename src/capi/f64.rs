//! `kdfuse_compute_host_f64`: the dense loss on double-precision host
//! buffers through the f64 oracle (`crate::oracle`), for gradient checks
//! (PyTorch's `gradcheck` needs float64 end to end). Every floating-point
//! buffer of the batch holds doubles; the rest of the batch and the params
//! mean what they mean for `kdfuse_compute_host`.

use super::types::{KdfuseBatch, KdfuseDtype};
use crate::error::{invalid, Result};
use crate::oracle::row_detailed;
use crate::spec::LossSpec;
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

/// The body of `kdfuse_compute_host_f64` (see its documentation in mod.rs).
///
/// # Safety
/// As `kdfuse_compute_host_f64`.
pub(crate) unsafe fn compute(b: &KdfuseBatch, spec: &LossSpec) -> Result<()> {
    let f64_code = KdfuseDtype::F64 as i32;
    if b.dtype != f64_code {
        return invalid(
            "batch.dtype",
            format!(
                "must be KDFUSE_DTYPE_F64 ({f64_code}) for kdfuse_compute_host_f64, got {}",
                b.dtype
            ),
        );
    }
    if b.grad_dtype != f64_code {
        return invalid(
            "batch.grad_dtype",
            format!(
                "must be KDFUSE_DTYPE_F64 ({f64_code}) for kdfuse_compute_host_f64, got {}",
                b.grad_dtype
            ),
        );
    }
    if !b.topk_indices.is_null() || !b.topk_values.is_null() {
        return invalid(
            "batch.topk_indices",
            "the f64 path takes a dense teacher only (batch.teacher)",
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
        !g.is_null() && (g.cast_const() == b.student || g.cast_const() == b.teacher)
    };
    if overlaps(b.grad) || overlaps(b.grad_teacher) {
        return invalid(
            "batch.grad",
            "a gradient buffer must not overlap the inputs on the host",
        );
    }
    let (n, v) = (sh.rows, sh.cols);
    let s_len = sh.span("batch.student_stride", sh.student_stride, 8)?;
    let t_len = sh.span("batch.teacher_stride", sh.teacher_stride, 8)?;
    sh.span("batch.grad_stride", sh.grad_stride, 8)?;
    sh.span("batch.grad_teacher_stride", sh.grad_teacher_stride, 8)?;
    if n.checked_mul(8).is_none_or(|x| x > isize::MAX as usize) {
        return invalid("batch.rows", format!("N = {n} is too large"));
    }
    let labels: Option<&[i64]> = (!b.labels.is_null()).then(|| {
        // SAFETY: N labels (the caller's contract), aligned (checked).
        unsafe { std::slice::from_raw_parts(b.labels, n) }
    });
    // SAFETY: N doubles when not NULL (this function's contract), aligned.
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
    // SAFETY: the caller's contract: the inputs span these many doubles.
    let (student, teacher) = unsafe { (doubles(b.student, s_len), doubles(b.teacher, t_len)) };
    let valid = labels.map_or(n, |l| l.iter().filter(|&&y| y != spec.ignore_index).count());
    let w = spec.reduction.row_weight(valid, v);
    let mut row_losses = vec![0.0f64; n];
    for r in 0..n {
        let label = labels.map(|l| l[r]);
        let wr = weights.map_or(1.0, |w| w[r]);
        let skip = label == Some(spec.ignore_index) || wr == 0.0;
        let res = (!skip).then(|| {
            let s = &student[r * sh.student_stride..r * sh.student_stride + v];
            let t = &teacher[r * sh.teacher_stride..r * sh.teacher_stride + v];
            row_detailed(s, t, label.map(|y| y as usize), spec, None)
        });
        let scale = spec.grad_scale * w * wr;
        for (out, stride, pick) in [
            (b.grad, sh.grad_stride, 0),
            (b.grad_teacher, sh.grad_teacher_stride, 1),
        ] {
            if out.is_null() {
                continue;
            }
            // SAFETY: the gradient spans (N − 1)·stride + V doubles, aligned.
            let row =
                unsafe { std::slice::from_raw_parts_mut(out.cast::<f64>().add(r * stride), v) };
            match &res {
                None => row.fill(0.0),
                Some(res) => {
                    let g = if pick == 0 { &res.grad_s } else { &res.grad_t };
                    for (dst, &x) in row.iter_mut().zip(g) {
                        *dst = scale * x;
                    }
                }
            }
        }
        if let Some(res) = res {
            row_losses[r] = wr * res.loss;
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
    Ok(())
}
