//! The feature losses through the C ABI ([`KdfuseFeatureBatch`]): the CPU
//! backend on host memory (f32, bf16, f16), the f64 oracle on double host
//! buffers (`KDFUSE_DTYPE_F64`, for gradient checks), and the CUDA kernels on
//! device memory (`CudaBackend::feature_raw`).

use super::types::{
    check_size, check_version, KdfuseFeatureBatch, KdfuseReduction, KDFUSE_ABI_VERSION,
};
use super::KdfuseContext;
use crate::cpu::CpuBackend;
use crate::error::{invalid, KdError, Result};
use crate::feature::oracle::{attention_row, cosine_row, mse_row};
use crate::feature::RawFeatureArgs;
use crate::feature::{
    FeatureBackend, FeatureGrads, FeatureInputs, FeatureKind, FeatureLayout, FeatureSpec, Features,
};
use crate::tensor::{Dtype, GradDtype};
use std::ffi::c_void;
use std::mem::size_of;

/// The element type of a feature batch: a kernel dtype or f64 (host only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Elem {
    Kernel(Dtype),
    F64,
}

impl Elem {
    fn size(self) -> usize {
        match self {
            Elem::Kernel(d) => d.size(),
            Elem::F64 => 8,
        }
    }
}

fn elem(arg: &'static str, code: i32) -> Result<Elem> {
    if code == super::KdfuseDtype::F64 as i32 {
        return Ok(Elem::F64);
    }
    super::types::dtype(arg, code).map(Elem::Kernel)
}

/// Everything a feature batch says, checked.
pub(crate) struct FeatureShape {
    pub layout: FeatureLayout,
    pub spec: FeatureSpec,
    pub dtype: Elem,
    pub grad_dtype: Elem,
}

impl KdfuseFeatureBatch {
    /// A dense `[rows, width]` batch of `kind` and `dtype` (gradients in the
    /// same dtype), channels 1, every stride `width`, the `mean` reduction,
    /// the kind's ε, scale 1, every pointer NULL.
    pub fn init(kind: i32, rows: i64, width: i64, dtype: i32) -> Self {
        KdfuseFeatureBatch {
            size: size_of::<KdfuseFeatureBatch>() as u32,
            version: KDFUSE_ABI_VERSION,
            kind,
            reduction: KdfuseReduction::Mean as i32,
            eps: 0.0,
            grad_scale: 1.0,
            rows,
            width,
            student_channels: 1,
            teacher_channels: 1,
            student_stride: width,
            teacher_stride: width,
            grad_student_stride: width,
            grad_teacher_stride: width,
            dtype,
            grad_dtype: dtype,
            student: std::ptr::null(),
            teacher: std::ptr::null(),
            grad_student: std::ptr::null_mut(),
            grad_teacher: std::ptr::null_mut(),
            row_losses: std::ptr::null_mut(),
            loss: std::ptr::null_mut(),
            workspace: std::ptr::null_mut(),
        }
    }

    /// The caller's struct, its size and version checked.
    ///
    /// # Safety
    /// `p` is NULL or points to a readable struct of its own `size`.
    pub(crate) unsafe fn read(p: *const KdfuseFeatureBatch) -> Result<Self> {
        if p.is_null() {
            return invalid("feature_batch", "must not be NULL");
        }
        let ours = size_of::<KdfuseFeatureBatch>();
        // SAFETY: the struct starts with its u32 size, then its u32 version.
        let (size, version) = unsafe {
            (
                p.cast::<u32>().read_unaligned(),
                p.cast::<u32>().add(1).read_unaligned(),
            )
        };
        // Version 2 introduced it; versions 3 to 5 left it as it was.
        let known = [(2, ours), (3, ours), (4, ours), (5, ours)];
        check_size("feature_batch.size", size, &known)?;
        check_version("feature_batch.version", version, size, &known)?;
        // SAFETY: `size` (checked) is ours: the whole struct is readable.
        Ok(unsafe { p.read_unaligned() })
    }

    /// The checked layout, spec and dtypes.
    pub(crate) fn shape(&self) -> Result<FeatureShape> {
        let kind = match self.kind {
            0 => FeatureKind::Mse,
            1 => FeatureKind::Cosine,
            2 => FeatureKind::Attention,
            k => {
                return invalid(
                    "feature_batch.kind",
                    format!("{k} is not a KdfuseFeatureKind (0 mse, 1 cosine, 2 attention)"),
                )
            }
        };
        let reduction = super::types::reduction("feature_batch.reduction", self.reduction)?;
        let spec = FeatureSpec {
            kind,
            reduction,
            eps: (self.eps != 0.0).then_some(self.eps),
            grad_scale: self.grad_scale,
        };
        spec.validate().map_err(field)?;
        let nonneg = |arg: &'static str, x: i64| -> Result<usize> {
            usize::try_from(x).or_else(|_| invalid(arg, format!("must be ≥ 0, got {x}")))
        };
        let (cs, ct) = (
            nonneg("feature_batch.student_channels", self.student_channels)?,
            nonneg("feature_batch.teacher_channels", self.teacher_channels)?,
        );
        if kind != FeatureKind::Attention && (cs != 1 || ct != 1) {
            return invalid(
                "feature_batch.student_channels",
                format!("mse and cosine take rows of `width` values: channels must be 1, got {cs} and {ct}"),
            );
        }
        let layout = FeatureLayout {
            rows: nonneg("feature_batch.rows", self.rows)?,
            width: nonneg("feature_batch.width", self.width)?,
            student_channels: cs,
            teacher_channels: ct,
            student_stride: nonneg("feature_batch.student_stride", self.student_stride)?,
            teacher_stride: nonneg("feature_batch.teacher_stride", self.teacher_stride)?,
            grad_student_stride: nonneg(
                "feature_batch.grad_student_stride",
                self.grad_student_stride,
            )?,
            grad_teacher_stride: nonneg(
                "feature_batch.grad_teacher_stride",
                self.grad_teacher_stride,
            )?,
        };
        layout.validate(kind).map_err(field)?;
        let dtype = elem("feature_batch.dtype", self.dtype)?;
        let grad_dtype = elem("feature_batch.grad_dtype", self.grad_dtype)?;
        let ok = match (dtype, grad_dtype) {
            (Elem::F64, g) => g == Elem::F64,
            (Elem::Kernel(d), Elem::Kernel(g)) => g == d || g == Dtype::F32,
            _ => false,
        };
        if !ok {
            return invalid(
                "feature_batch.grad_dtype",
                "must be the input dtype or f32 (f64 inputs: f64)",
            );
        }
        if self.student.is_null() || self.teacher.is_null() || self.loss.is_null() {
            return invalid(
                "feature_batch",
                "student, teacher and loss pointers must not be NULL",
            );
        }
        for (arg, p, size) in [
            ("feature_batch.student", self.student, dtype.size()),
            ("feature_batch.teacher", self.teacher, dtype.size()),
            (
                "feature_batch.grad_student",
                self.grad_student.cast_const(),
                grad_dtype.size(),
            ),
            (
                "feature_batch.grad_teacher",
                self.grad_teacher.cast_const(),
                grad_dtype.size(),
            ),
            (
                "feature_batch.row_losses",
                self.row_losses.cast_const(),
                loss_size(dtype),
            ),
            (
                "feature_batch.loss",
                self.loss.cast_const(),
                loss_size(dtype),
            ),
            (
                "feature_batch.workspace",
                self.workspace.cast_const().cast(),
                4,
            ),
        ] {
            if !(p as usize).is_multiple_of(size) {
                return invalid(arg, format!("pointer {p:p} is not aligned to {size} bytes"));
            }
        }
        for (arg, stride, len, size) in [
            (
                "feature_batch.student_stride",
                layout.student_stride,
                layout.student_len(),
                dtype.size(),
            ),
            (
                "feature_batch.teacher_stride",
                layout.teacher_stride,
                layout.teacher_len(),
                dtype.size(),
            ),
            (
                "feature_batch.grad_student_stride",
                layout.grad_student_stride,
                layout.student_len(),
                grad_dtype.size(),
            ),
            (
                "feature_batch.grad_teacher_stride",
                layout.grad_teacher_stride,
                layout.teacher_len(),
                grad_dtype.size(),
            ),
        ] {
            span(arg, &layout, stride, len, size)?;
        }
        Ok(FeatureShape {
            layout,
            spec,
            dtype,
            grad_dtype,
        })
    }
}

/// The loss buffers' element size: 4 (float), 8 for f64 batches.
fn loss_size(e: Elem) -> usize {
    match e {
        Elem::F64 => 8,
        Elem::Kernel(_) => 4,
    }
}

/// `(N − 1)·stride + len` elements, or an error naming `arg` on overflow.
fn span(
    arg: &'static str,
    l: &FeatureLayout,
    stride: usize,
    len: usize,
    size: usize,
) -> Result<usize> {
    if l.rows == 0 {
        return Ok(0);
    }
    (l.rows - 1)
        .checked_mul(stride)
        .and_then(|x| x.checked_add(len))
        .filter(|x| {
            x.checked_mul(size)
                .is_some_and(|b| b <= isize::MAX as usize)
        })
        .map_or_else(|| invalid(arg, "(N − 1)·stride + row length overflows"), Ok)
}

/// A library error renamed to the struct's field.
fn field(e: KdError) -> KdError {
    super::renamed(
        e,
        &[
            ("student", "feature_batch.student"),
            ("teacher", "feature_batch.teacher"),
            ("eps", "feature_batch.eps"),
            ("grad_scale", "feature_batch.grad_scale"),
            ("student_stride", "feature_batch.student_stride"),
            ("teacher_stride", "feature_batch.teacher_stride"),
            ("grad_student_stride", "feature_batch.grad_student_stride"),
            ("grad_teacher_stride", "feature_batch.grad_teacher_stride"),
        ],
    )
}

/// Floats of device workspace that `b` needs (attention; 0 otherwise).
pub(crate) fn workspace_len(b: &KdfuseFeatureBatch) -> Result<usize> {
    let sh = b.shape()?;
    Ok(sh.layout.workspace_len(sh.spec.kind))
}

/// The batch on host memory.
///
/// # Safety
/// As `kdfuse_feature_compute_host`.
pub(crate) unsafe fn compute_host(b: &KdfuseFeatureBatch) -> Result<()> {
    let sh = b.shape()?;
    let l = sh.layout;
    let overlaps = |g: *mut c_void| {
        !g.is_null() && (g.cast_const() == b.student || g.cast_const() == b.teacher)
    };
    if overlaps(b.grad_student) || overlaps(b.grad_teacher) {
        return invalid(
            "feature_batch.grad_student",
            "a gradient buffer must not overlap the inputs",
        );
    }
    let (ls, lt) = (l.student_len(), l.teacher_len());
    let s_len = span("feature_batch.student_stride", &l, l.student_stride, ls, 1)?;
    let t_len = span("feature_batch.teacher_stride", &l, l.teacher_stride, lt, 1)?;
    let (loss, rows, gs, gt) = match sh.dtype {
        Elem::F64 => {
            // SAFETY: the caller's contract: doubles spanning these lengths.
            let (s, t) = unsafe { (slice_f64(b.student, s_len), slice_f64(b.teacher, t_len)) };
            let mut rows = vec![0.0; l.rows];
            let mut gs = vec![0.0; l.rows * ls];
            let mut gt = vec![0.0; l.rows * lt];
            let gw = sh.spec.grad_weight(&l);
            for r in 0..l.rows {
                let sr = &s[r * l.student_stride..r * l.student_stride + ls];
                let tr = &t[r * l.teacher_stride..r * l.teacher_stride + lt];
                let (loss, ds, dt) = match sh.spec.kind {
                    FeatureKind::Mse => mse_row(sr, tr),
                    FeatureKind::Cosine => cosine_row(sr, tr, sh.spec.eps()),
                    FeatureKind::Attention => attention_row(
                        sr,
                        l.student_channels,
                        tr,
                        l.teacher_channels,
                        l.width,
                        sh.spec.eps(),
                    ),
                };
                rows[r] = loss;
                for (dst, x) in gs[r * ls..(r + 1) * ls].iter_mut().zip(ds) {
                    *dst = gw * x;
                }
                for (dst, x) in gt[r * lt..(r + 1) * lt].iter_mut().zip(dt) {
                    *dst = gw * x;
                }
            }
            let loss = sh.spec.loss_weight(&l) * crate::sum(&rows);
            (loss, rows, Grads::F64(gs), Grads::F64(gt))
        }
        Elem::Kernel(d) => {
            // SAFETY: the caller's contract: elements of `d` spanning these lengths.
            let (s, t) = unsafe {
                (
                    super::host_data("feature_batch.student", b.student, s_len, d)?,
                    super::host_data("feature_batch.teacher", b.teacher, t_len, d)?,
                )
            };
            let (width, cs, ct) = (l.width, l.student_channels, l.teacher_channels);
            let inputs = FeatureInputs {
                student: Features::maps(s, l.rows, cs, width).with_row_stride(l.student_stride),
                teacher: Features::maps(t, l.rows, ct, width).with_row_stride(l.teacher_stride),
            };
            let grads = FeatureGrads {
                student: !b.grad_student.is_null(),
                teacher: !b.grad_teacher.is_null(),
                dtype: if sh.grad_dtype == sh.dtype {
                    GradDtype::Input
                } else {
                    GradDtype::F32
                },
            };
            let out = CpuBackend
                .feature_loss(&inputs, &sh.spec, grads)
                .map_err(field)?;
            (
                out.loss,
                out.row_losses,
                Grads::F32(out.grad_student.unwrap_or_default()),
                Grads::F32(out.grad_teacher.unwrap_or_default()),
            )
        }
    };
    for (dst, stride, len, g) in [
        (b.grad_student, l.grad_student_stride, ls, &gs),
        (b.grad_teacher, l.grad_teacher_stride, lt, &gt),
    ] {
        if dst.is_null() {
            continue;
        }
        match (g, sh.grad_dtype) {
            (Grads::F64(g), _) => {
                for r in 0..l.rows {
                    // SAFETY: the gradient spans (N − 1)·stride + len doubles.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            g[r * len..].as_ptr(),
                            dst.cast::<f64>().add(r * stride),
                            len,
                        )
                    };
                }
            }
            (Grads::F32(g), Elem::Kernel(gd)) => {
                // SAFETY: the gradient spans (N − 1)·stride + len elements of `gd`.
                unsafe { super::write_rows(dst, stride, gd, g, l.rows, len) };
            }
            (Grads::F32(_), Elem::F64) => unreachable!("f64 batches take the f64 path"),
        }
    }
    // SAFETY: `loss` is non-NULL (shape() checked it); `row_losses` holds N
    // elements when not NULL; both in the batch's loss type.
    unsafe {
        if sh.dtype == Elem::F64 {
            *b.loss.cast::<f64>() = loss;
            if !b.row_losses.is_null() {
                std::ptr::copy_nonoverlapping(rows.as_ptr(), b.row_losses.cast::<f64>(), l.rows);
            }
        } else {
            *b.loss.cast::<f32>() = loss as f32;
            if !b.row_losses.is_null() {
                for (r, x) in rows.iter().enumerate() {
                    *b.row_losses.cast::<f32>().add(r) = *x as f32;
                }
            }
        }
    }
    Ok(())
}

enum Grads {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

/// `len` doubles at `p` (empty for 0).
///
/// # Safety
/// `p` is aligned and valid for `len` doubles.
unsafe fn slice_f64<'a>(p: *const c_void, len: usize) -> &'a [f64] {
    if len == 0 {
        return &[];
    }
    // SAFETY: the caller's contract.
    unsafe { std::slice::from_raw_parts(p.cast(), len) }
}

/// The batch on device memory, enqueued on `stream`.
///
/// # Safety
/// As `kdfuse_feature_compute_cuda`.
pub(crate) unsafe fn compute_cuda(
    ctx: &KdfuseContext,
    b: &KdfuseFeatureBatch,
    stream: *mut c_void,
) -> Result<()> {
    let sh = b.shape()?;
    let (Elem::Kernel(dtype), Elem::Kernel(grad_dtype)) = (sh.dtype, sh.grad_dtype) else {
        return invalid(
            "feature_batch.dtype",
            "f64 is for kdfuse_feature_compute_host only",
        );
    };
    if b.row_losses.is_null() {
        return invalid(
            "feature_batch.row_losses",
            "required on the device (float, N)",
        );
    }
    if sh.spec.kind == FeatureKind::Attention && b.workspace.is_null() {
        return invalid(
            "feature_batch.workspace",
            "attention needs kdfuse_feature_workspace_len floats of device memory",
        );
    }
    // SAFETY: the caller's contract (a stream of this context).
    let stream = unsafe { ctx.stream(stream) };
    let raw = RawFeatureArgs {
        dtype,
        grad_dtype,
        student: b.student as u64,
        teacher: b.teacher as u64,
        grad_student: b.grad_student as u64,
        grad_teacher: b.grad_teacher as u64,
        row_losses: b.row_losses as u64,
        loss: b.loss as u64,
        workspace: b.workspace as u64,
        layout: sh.layout,
    };
    // SAFETY: the caller's contract (device buffers of the batch's shape).
    unsafe { ctx.backend.feature_raw(&stream, &raw, &sh.spec) }.map_err(field)
}
