//! The C ABI's data types (`#[repr(C)]`, mirrored by include/kdfuse.h) and
//! their conversion into the library's own.

use crate::error::{invalid, Result};
use crate::spec::{Divergence, LossSpec, Reduction};
use crate::tensor::Dtype;
use std::mem::size_of;

/// Version of [`KdfuseParams`] and [`KdfuseBatch`] this library writes and
/// reads; a struct carries its own `size`, so later versions only append.
pub const KDFUSE_ABI_VERSION: u32 = 1;

/// Status of every call: 0 is success; otherwise `kdfuse_last_error()` says why.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KdfuseStatus {
    /// Success.
    Ok = 0,
    /// An argument is out of its domain (the message names it).
    InvalidArgument = 1,
    /// CUDA cannot be used here (no driver, no GPU, no kernels).
    CudaUnavailable = 2,
    /// A CUDA call failed.
    CudaError = 3,
    /// A bug in kdfuse (a Rust panic, caught at the boundary).
    Internal = 4,
}

/// Element types (the `dtype` and `grad_dtype` fields).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KdfuseDtype {
    /// 32-bit float.
    F32 = 0,
    /// bfloat16.
    Bf16 = 1,
    /// IEEE half.
    F16 = 2,
}

/// Divergences (the `divergence` field).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KdfuseDivergence {
    /// KL(p‖q), p the softened teacher, q the student.
    ForwardKl = 0,
    /// KL(q‖p).
    ReverseKl = 1,
    /// Generalized Jensen–Shannon with weight `beta`.
    Jsd = 2,
    /// Total variation distance ½ Σ |p − q|.
    Tvd = 3,
    /// Soft cross-entropy −Σ p log q (forward KL plus the teacher entropy).
    SoftCe = 4,
}

/// Reductions (the `reduction` field).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KdfuseReduction {
    /// Σ row losses / valid rows.
    Batchmean = 0,
    /// Σ row losses.
    Sum = 1,
    /// Σ row losses / (valid rows · V).
    Mean = 2,
    /// Σ row losses (per-row losses are the output of interest).
    None = 3,
}

/// The loss to compute. Fill with `kdfuse_params_default`, then change fields.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct KdfuseParams {
    /// `sizeof(KdfuseParams)` as the caller's header defines it.
    pub size: u32,
    /// `KDFUSE_ABI_VERSION` of the caller's header.
    pub version: u32,
    /// A `KdfuseDivergence` value.
    pub divergence: i32,
    /// A `KdfuseReduction` value.
    pub reduction: i32,
    /// JSD β ∈ [0, 1] (0 = forward KL, 1 = reverse KL).
    pub beta: f64,
    /// Temperature τ > 0.
    pub temperature: f64,
    /// Weight α ∈ [0, 1] of the hard-label cross-entropy (needs labels).
    pub alpha: f64,
    /// Upstream gradient scale: the gradient is that of `grad_scale · L`.
    pub grad_scale: f64,
    /// Rows whose label equals this count nothing (default −100).
    pub ignore_index: i64,
    /// Non-zero: multiply the soft term by τ² (default 1).
    pub t2_scaling: i32,
    /// Reserved, zero.
    pub reserved: i32,
}

/// One batch: pointers (device memory for `kdfuse_compute_cuda`, host memory
/// for `kdfuse_compute_host`), shape, strides and dtypes. Fill with
/// `kdfuse_batch_init`, then set the pointers.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct KdfuseBatch {
    /// `sizeof(KdfuseBatch)` as the caller's header defines it.
    pub size: u32,
    /// `KDFUSE_ABI_VERSION` of the caller's header.
    pub version: u32,
    /// Rows N (≥ 0).
    pub rows: i64,
    /// Vocabulary V (≥ 1).
    pub cols: i64,
    /// Student row stride in elements (≥ V).
    pub student_stride: i64,
    /// Teacher row stride in elements (≥ V).
    pub teacher_stride: i64,
    /// Gradient row stride in elements (≥ V).
    pub grad_stride: i64,
    /// A `KdfuseDtype`: the student's and the teacher's.
    pub dtype: i32,
    /// A `KdfuseDtype`: the gradient's, `dtype` or F32.
    pub grad_dtype: i32,
    /// Student logits, `(N−1)·student_stride + V` elements.
    pub student: *const std::ffi::c_void,
    /// Teacher logits, `(N−1)·teacher_stride + V` elements.
    pub teacher: *const std::ffi::c_void,
    /// Labels (int64, N), or NULL.
    pub labels: *const i64,
    /// Gradient output, or NULL for the loss only (may equal `student`:
    /// in place, same dtype and stride; device only).
    pub grad: *mut std::ffi::c_void,
    /// Per-row losses (float, N): required on the device, optional on the host.
    pub row_losses: *mut f32,
    /// The reduced loss (one float): required.
    pub loss: *mut f32,
    /// Valid-row count (one int32): device scratch, required with labels;
    /// optional output on the host.
    pub valid_rows: *mut i32,
}

/// The caller's struct size: at least the first version's, at most ours.
pub(crate) fn check_size(arg: &'static str, size: u32, ours: usize, first: usize) -> Result<()> {
    let size = size as usize;
    if size < first || size > ours {
        return invalid(
            arg,
            format!(
                "struct size {size} is not one this library knows ({first}..={ours}); \
                 fill it with its kdfuse_*_init/default function"
            ),
        );
    }
    Ok(())
}

pub(crate) fn dtype(arg: &'static str, code: i32) -> Result<Dtype> {
    match code {
        0 => Ok(Dtype::F32),
        1 => Ok(Dtype::Bf16),
        2 => Ok(Dtype::F16),
        _ => invalid(
            arg,
            format!("{code} is not a KdfuseDtype (0 f32, 1 bf16, 2 f16)"),
        ),
    }
}

impl KdfuseParams {
    /// The defaults (forward KL, τ = 1, α = 0, β = 0.5, batchmean, τ² on,
    /// ignore −100, grad_scale 1).
    pub fn defaults() -> Self {
        let d = LossSpec::default();
        KdfuseParams {
            size: size_of::<KdfuseParams>() as u32,
            version: KDFUSE_ABI_VERSION,
            divergence: KdfuseDivergence::ForwardKl as i32,
            reduction: KdfuseReduction::Batchmean as i32,
            beta: d.beta,
            temperature: d.temperature,
            alpha: d.alpha,
            grad_scale: d.grad_scale,
            ignore_index: d.ignore_index,
            t2_scaling: 1,
            reserved: 0,
        }
    }

    /// The library's spec (validated later by the backend).
    pub fn to_spec(&self) -> Result<LossSpec> {
        check_size(
            "params.size",
            self.size,
            size_of::<KdfuseParams>(),
            size_of::<KdfuseParams>(),
        )?;
        let divergence = match self.divergence {
            0 => Divergence::ForwardKl,
            1 => Divergence::ReverseKl,
            2 => Divergence::Jsd,
            3 => Divergence::Tvd,
            4 => Divergence::SoftCe,
            d => {
                return invalid(
                    "params.divergence",
                    format!(
                        "{d} is not a KdfuseDivergence (0 forward KL, 1 reverse KL, 2 JSD, 3 TVD, 4 soft CE)"
                    ),
                )
            }
        };
        let reduction = match self.reduction {
            0 => Reduction::BatchMean,
            1 => Reduction::Sum,
            2 => Reduction::Mean,
            3 => Reduction::None,
            r => {
                return invalid(
                    "params.reduction",
                    format!("{r} is not a KdfuseReduction (0 batchmean, 1 sum, 2 mean, 3 none)"),
                )
            }
        };
        Ok(LossSpec {
            divergence,
            beta: self.beta,
            temperature: self.temperature,
            alpha: self.alpha,
            t2_scaling: self.t2_scaling != 0,
            ignore_index: self.ignore_index,
            reduction,
            grad_scale: self.grad_scale,
            ..LossSpec::default()
        })
    }
}

/// A batch's shape and dtypes, checked.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchShape {
    pub rows: usize,
    pub cols: usize,
    pub student_stride: usize,
    pub teacher_stride: usize,
    pub grad_stride: usize,
    pub dtype: Dtype,
    pub grad_dtype: Dtype,
}

impl KdfuseBatch {
    /// A dense `[rows, cols]` batch of `dtype` with a gradient of the same
    /// dtype, all pointers NULL.
    pub fn init(rows: i64, cols: i64, dtype: i32) -> Self {
        KdfuseBatch {
            size: size_of::<KdfuseBatch>() as u32,
            version: KDFUSE_ABI_VERSION,
            rows,
            cols,
            student_stride: cols,
            teacher_stride: cols,
            grad_stride: cols,
            dtype,
            grad_dtype: dtype,
            student: std::ptr::null(),
            teacher: std::ptr::null(),
            labels: std::ptr::null(),
            grad: std::ptr::null_mut(),
            row_losses: std::ptr::null_mut(),
            loss: std::ptr::null_mut(),
            valid_rows: std::ptr::null_mut(),
        }
    }

    pub(crate) fn shape(&self) -> Result<BatchShape> {
        check_size(
            "batch.size",
            self.size,
            size_of::<KdfuseBatch>(),
            size_of::<KdfuseBatch>(),
        )?;
        let nonneg = |arg: &'static str, x: i64| -> Result<usize> {
            usize::try_from(x).or_else(|_| invalid(arg, format!("must be ≥ 0, got {x}")))
        };
        let rows = nonneg("batch.rows", self.rows)?;
        let cols = nonneg("batch.cols", self.cols)?;
        if cols == 0 || cols > i32::MAX as usize {
            return invalid(
                "batch.cols",
                format!("V must be in [1, {}], got {cols}", i32::MAX),
            );
        }
        let stride = |arg: &'static str, s: i64| -> Result<usize> {
            let s = nonneg(arg, s)?;
            if s < cols {
                return invalid(arg, format!("row stride {s} is below V = {cols}"));
            }
            Ok(s)
        };
        let dt = dtype("batch.dtype", self.dtype)?;
        let gd = dtype("batch.grad_dtype", self.grad_dtype)?;
        if gd != dt && gd != Dtype::F32 {
            return invalid(
                "batch.grad_dtype",
                format!("must be the input dtype ({dt}) or f32, got {gd}"),
            );
        }
        if self.student.is_null() || self.teacher.is_null() || self.loss.is_null() {
            return invalid(
                "batch",
                "student, teacher and loss pointers must not be NULL",
            );
        }
        Ok(BatchShape {
            rows,
            cols,
            student_stride: stride("batch.student_stride", self.student_stride)?,
            teacher_stride: stride("batch.teacher_stride", self.teacher_stride)?,
            grad_stride: stride("batch.grad_stride", self.grad_stride)?,
            dtype: dt,
            grad_dtype: gd,
        })
    }
}

impl BatchShape {
    /// Elements a buffer of row stride `stride` spans.
    pub(crate) fn span(&self, stride: usize) -> usize {
        if self.rows == 0 {
            0
        } else {
            (self.rows - 1) * stride + self.cols
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn divergence_codes_map_onto_the_library() {
        let mut p = KdfuseParams::defaults();
        for (code, want) in [
            (KdfuseDivergence::ForwardKl, Divergence::ForwardKl),
            (KdfuseDivergence::ReverseKl, Divergence::ReverseKl),
            (KdfuseDivergence::Jsd, Divergence::Jsd),
            (KdfuseDivergence::Tvd, Divergence::Tvd),
            (KdfuseDivergence::SoftCe, Divergence::SoftCe),
        ] {
            p.divergence = code as i32;
            assert_eq!(p.to_spec().unwrap().divergence, want);
        }
        assert_eq!(KdfuseDivergence::Tvd as i32, 3);
        assert_eq!(KdfuseDivergence::SoftCe as i32, 4);
        p.divergence = 5;
        let e = p.to_spec().unwrap_err().to_string();
        assert!(
            e.contains("params.divergence") && e.contains("4 soft CE"),
            "{e}"
        );
    }
}
