//! The C ABI's data types (`#[repr(C)]`, mirrored by include/kdfuse.h) and
//! their conversion into the library's own.

use crate::cuda::RowLayout;
use crate::error::{invalid, Result};
use crate::spec::{Divergence, LossSpec, Precision, Reduction, TopkMode};
use crate::tensor::Dtype;
use std::mem::size_of;

/// Version of [`KdfuseParams`] and [`KdfuseBatch`] this library writes and
/// reads; a struct carries its own `size`, so later versions only append.
/// Version 2 appended soft-capping, teacher log-probs, the teacher gradient,
/// the top-k mode (params) and row weights, the teacher gradient's buffer and
/// the top-k teacher (batch); a version-1 struct (its smaller `size`) is still
/// accepted, the appended fields taking their defaults. Version 3 appended
/// the precision (params); its batch is version 2's. Version 4 appended the
/// vocab-parallel functions and `KdfuseShard`; its params and batch are
/// version 3's. Version 5 appended the fused linear functions and
/// `KdfuseLinearArgs`; its params and batch are version 3's.
pub const KDFUSE_ABI_VERSION: u32 = 5;

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
    /// IEEE double: `kdfuse_compute_host_f64`, `kdfuse_compute_topk_host_f64`
    /// and `kdfuse_feature_compute_host` only (the f64 oracle, for gradient
    /// checks); every other function refuses it.
    F64 = 3,
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

/// How a top-k teacher meets the student (the `topk_mode` field; docs/DESIGN.md §4).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KdfuseTopkMode {
    /// Both distributions renormalised over the k teacher entries.
    Support = 0,
    /// The teacher is zero off its support, the student a full softmax (default).
    Full = 1,
    /// k + 1 buckets (the support and one tail); needs log-prob values and τ = 1.
    Tail = 2,
}

/// Element types of a top-k teacher's indices (the `topk_index_dtype` field).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KdfuseIndexDtype {
    /// int32 indices.
    I32 = 0,
    /// int64 indices.
    I64 = 1,
}

/// The loss to compute. Fill with `kdfuse_params_default`, then change fields.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct KdfuseParams {
    /// `sizeof(KdfuseParams)` as the caller's header defines it.
    pub size: u32,
    /// `KDFUSE_ABI_VERSION` of the caller's header: 1 to 5, the version
    /// whose size `size` is (3 to 5 share a size); anything else is refused.
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
    /// Soft-capping `x ← softcap·tanh(x/softcap)` of the student's and the
    /// teacher's logits; 0 = off (default). Since version 2.
    pub softcap: f64,
    /// Non-zero: the teacher (dense rows or top-k values) holds log-probs,
    /// not logits (default 0; the `tail` top-k mode needs it). Since version 2.
    pub teacher_log_probs: i32,
    /// Non-zero: also compute ∂L/∂teacher into `batch.grad_teacher` (mutual
    /// learning; dense teachers only; default 0). Since version 2.
    pub grad_teacher: i32,
    /// A `KdfuseTopkMode` (default FULL); used with a top-k teacher only.
    /// Since version 2.
    pub topk_mode: i32,
    /// Reserved, zero. Since version 2.
    pub reserved2: i32,
    /// A `KdfusePrecision` (default FAST): the dense kernels' arithmetic, on
    /// the GPU and in the CPU backend. Since version 3.
    pub precision: i32,
    /// Reserved, zero. Since version 3.
    pub reserved3: i32,
}

/// The GPU kernels' arithmetic (the `precision` field; docs/DESIGN.md §3).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KdfusePrecision {
    /// The fast kernels where they cover the loss (default).
    Fast = 0,
    /// The exact kernels.
    Exact = 1,
}

/// One batch: pointers (device memory for `kdfuse_compute_cuda`, host memory
/// for `kdfuse_compute_host`), shape, strides and dtypes. Fill with
/// `kdfuse_batch_init`, then set the pointers.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct KdfuseBatch {
    /// `sizeof(KdfuseBatch)` as the caller's header defines it.
    pub size: u32,
    /// `KDFUSE_ABI_VERSION` of the caller's header: 1 to 5 (2 to 5 share a
    /// size); anything else is refused.
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
    /// Per-row weights (float, N, finite), or NULL: each row's loss and
    /// gradient is multiplied by its weight. Since version 2.
    pub row_weights: *const f32,
    /// ∂L/∂teacher output in `grad_dtype`, or NULL; given exactly when
    /// `params.grad_teacher` is set (dense teacher only; may equal `teacher`:
    /// in place, same dtype and stride; device only). Since version 2.
    pub grad_teacher: *mut std::ffi::c_void,
    /// Teacher-gradient row stride in elements (≥ V; default V). Since version 2.
    pub grad_teacher_stride: i64,
    /// A top-k teacher's indices `[N, topk_k]` row-major (`topk_index_dtype`),
    /// or NULL for a dense teacher (`teacher`, which must then be set; with
    /// indices, `teacher` must be NULL). Since version 2.
    pub topk_indices: *const std::ffi::c_void,
    /// The top-k teacher's values `[N, topk_k]` row-major in `dtype` (logits,
    /// or log-probs with `params.teacher_log_probs`); required with
    /// `topk_indices`. Since version 2.
    pub topk_values: *const std::ffi::c_void,
    /// Entries per row of the top-k teacher, 1 ≤ k ≤ V. Since version 2.
    pub topk_k: i64,
    /// A `KdfuseIndexDtype`: the indices' type (default I32). Since version 2.
    pub topk_index_dtype: i32,
    /// Non-zero: on the device, first check every index (in `[0, V)`,
    /// distinct within its row; it waits for the stream) and fail naming the
    /// first bad row. The host path always checks. Since version 2.
    pub validate_topk: i32,
}

/// Feature losses (the `kind` field of [`KdfuseFeatureBatch`]; README,
/// "Feature distillation").
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KdfuseFeatureKind {
    /// Σ_h (s_h − t_h)² per row; `mean` divides by N·H (`mse_loss`).
    Mse = 0,
    /// 1 − cos(s, t) per row, each norm clamped at ε; `mean` divides by N.
    Cosine = 1,
    /// Attention transfer between maps `[C, S]` (C may differ between
    /// student and teacher); `mean` divides by N·S.
    Attention = 2,
}

/// One feature-loss batch and its loss (`kdfuse_feature_compute_host`,
/// `kdfuse_feature_compute_cuda`). Fill with `kdfuse_feature_batch_init`,
/// then set the pointers. A sample (row) is `channels × width` elements,
/// channel c at offset c·width; mse and cosine take rows of `width` values
/// (channels 1). A new struct of ABI version 2: its `size` and `version`
/// are checked as those of the other structs.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct KdfuseFeatureBatch {
    /// `sizeof(KdfuseFeatureBatch)` as the caller's header defines it.
    pub size: u32,
    /// `KDFUSE_ABI_VERSION` of the caller's header (2).
    pub version: u32,
    /// A `KdfuseFeatureKind`.
    pub kind: i32,
    /// A `KdfuseReduction` (default MEAN: the kind's mean, see
    /// `KdfuseFeatureKind`; BATCHMEAN Σ/N; SUM; NONE the per-row losses).
    pub reduction: i32,
    /// ε of the norm clamps (cosine, attention); 0 = the kind's default
    /// (1e-8 cosine, 1e-12 attention); must stay 0 for mse.
    pub eps: f64,
    /// Upstream gradient scale: the gradients are those of `grad_scale · L`.
    pub grad_scale: f64,
    /// Rows (samples) N ≥ 0.
    pub rows: i64,
    /// Elements per channel: H (mse, cosine) or S = H·W (attention), ≥ 1.
    pub width: i64,
    /// Channels C_s of a student sample (1 for mse and cosine).
    pub student_channels: i64,
    /// Channels C_t of a teacher sample (1 for mse and cosine).
    pub teacher_channels: i64,
    /// Elements between two student samples (≥ C_s·width).
    pub student_stride: i64,
    /// Elements between two teacher samples (≥ C_t·width).
    pub teacher_stride: i64,
    /// Elements between two rows of ∂L/∂student (≥ C_s·width).
    pub grad_student_stride: i64,
    /// Elements between two rows of ∂L/∂teacher (≥ C_t·width).
    pub grad_teacher_stride: i64,
    /// A `KdfuseDtype`: the student's and the teacher's (F64: host only).
    pub dtype: i32,
    /// A `KdfuseDtype`: the gradients', `dtype` or F32 (F64 with F64).
    pub grad_dtype: i32,
    /// Student features.
    pub student: *const std::ffi::c_void,
    /// Teacher features.
    pub teacher: *const std::ffi::c_void,
    /// ∂L/∂student output, or NULL.
    pub grad_student: *mut std::ffi::c_void,
    /// ∂L/∂teacher output, or NULL.
    pub grad_teacher: *mut std::ffi::c_void,
    /// Per-row losses r_i (N; float, double for F64): required on the
    /// device, optional on the host.
    pub row_losses: *mut std::ffi::c_void,
    /// The reduced loss (one float, double for F64): required.
    pub loss: *mut std::ffi::c_void,
    /// Device only, attention only: a float workspace of
    /// `kdfuse_feature_workspace_len` elements.
    pub workspace: *mut f32,
}

/// `sizeof(KdfuseParams)` of version 1 (the fields before `softcap`).
pub(crate) const PARAMS_V1_SIZE: usize = std::mem::offset_of!(KdfuseParams, softcap);
/// `sizeof(KdfuseParams)` of version 2 (the fields before `precision`).
pub(crate) const PARAMS_V2_SIZE: usize = std::mem::offset_of!(KdfuseParams, precision);
/// `sizeof(KdfuseBatch)` of version 1 (the fields before `row_weights`).
pub(crate) const BATCH_V1_SIZE: usize = std::mem::offset_of!(KdfuseBatch, row_weights);

/// (version, size) of every `KdfuseParams` this library reads.
pub(crate) const PARAMS_SIZES: [(u32, usize); 5] = [
    (1, PARAMS_V1_SIZE),
    (2, PARAMS_V2_SIZE),
    (3, size_of::<KdfuseParams>()),
    (4, size_of::<KdfuseParams>()),
    (5, size_of::<KdfuseParams>()),
];
/// (version, size) of every `KdfuseBatch` this library reads.
pub(crate) const BATCH_SIZES: [(u32, usize); 5] = [
    (1, BATCH_V1_SIZE),
    (2, size_of::<KdfuseBatch>()),
    (3, size_of::<KdfuseBatch>()),
    (4, size_of::<KdfuseBatch>()),
    (5, size_of::<KdfuseBatch>()),
];

/// Reads a caller's struct of any known (version, size) in `known`: the
/// caller's prefix over `defaults`, which supplies the fields an older caller
/// does not have.
///
/// # Safety
/// `p` is NULL or points to at least its own leading `u32` size, and to that
/// many readable bytes.
pub(crate) unsafe fn read_sized<T: Copy>(
    arg: &'static str,
    p: *const T,
    defaults: T,
    known: &[(u32, usize)],
) -> Result<T> {
    if p.is_null() {
        return invalid(arg, "must not be NULL");
    }
    // SAFETY: every versioned struct starts with its u32 size.
    let size = unsafe { p.cast::<u32>().read_unaligned() };
    let size_arg = match arg {
        "params" => "params.size",
        "shard" => "shard.size",
        "linear" => "linear.size",
        _ => "batch.size",
    };
    check_size(size_arg, size, known)?;
    // SAFETY: every versioned struct has its u32 version after the size, and
    // `size` (checked) covers it.
    let version = unsafe { p.cast::<u32>().add(1).read_unaligned() };
    let version_arg = match arg {
        "params" => "params.version",
        "shard" => "shard.version",
        "linear" => "linear.version",
        _ => "batch.version",
    };
    check_version(version_arg, version, size, known)?;
    let mut out = defaults;
    // SAFETY: the caller's struct holds `size` bytes (checked ≤ ours), and
    // every prefix of these plain-data structs is a valid one.
    unsafe {
        std::ptr::copy_nonoverlapping(
            p.cast::<u8>(),
            (&mut out as *mut T).cast::<u8>(),
            size as usize,
        )
    };
    Ok(out)
}

/// The caller's struct size: one of the known versions' (a size between
/// would cut a field).
pub(crate) fn check_size(arg: &'static str, size: u32, known: &[(u32, usize)]) -> Result<()> {
    let size = size as usize;
    let mut sizes: Vec<usize> = known.iter().map(|&(_, s)| s).collect();
    sizes.dedup();
    if !sizes.contains(&size) {
        let list = match sizes.split_last() {
            Some((last, rest)) if !rest.is_empty() => format!(
                "{} or {last}",
                rest.iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            _ => sizes.first().map_or(String::new(), |s| s.to_string()),
        };
        return invalid(
            arg,
            format!(
                "struct size {size} is not one this library knows ({list}); \
                 fill it with its kdfuse_*_init/default function"
            ),
        );
    }
    Ok(())
}

/// The caller's struct version: one this library knows, whose size is the
/// struct's `size`.
pub(crate) fn check_version(
    arg: &'static str,
    version: u32,
    size: u32,
    known: &[(u32, usize)],
) -> Result<()> {
    let (lo, hi) = (
        known.iter().map(|k| k.0).min().unwrap_or(1),
        known
            .iter()
            .map(|k| k.0)
            .max()
            .unwrap_or(KDFUSE_ABI_VERSION),
    );
    if !known.iter().any(|&(v, _)| v == version) {
        return invalid(
            arg,
            format!(
                "{version} is not a version this library knows ({lo} to {hi}); \
                 fill the struct with its kdfuse_*_init/default function"
            ),
        );
    }
    if !known.contains(&(version, size as usize)) {
        let want = known
            .iter()
            .filter(|&&(_, s)| s == size as usize)
            .map(|&(v, _)| v)
            .max()
            .unwrap_or(hi);
        return invalid(
            arg,
            format!("version {version} does not match the struct size {size} (version {want}'s)"),
        );
    }
    Ok(())
}

/// The `KdfuseReduction` code `code` of argument `arg`.
pub(crate) fn reduction(arg: &'static str, code: i32) -> Result<Reduction> {
    match code {
        0 => Ok(Reduction::BatchMean),
        1 => Ok(Reduction::Sum),
        2 => Ok(Reduction::Mean),
        3 => Ok(Reduction::None),
        r => invalid(
            arg,
            format!("{r} is not a KdfuseReduction (0 batchmean, 1 sum, 2 mean, 3 none)"),
        ),
    }
}

pub(crate) fn dtype(arg: &'static str, code: i32) -> Result<Dtype> {
    match code {
        0 => Ok(Dtype::F32),
        1 => Ok(Dtype::Bf16),
        2 => Ok(Dtype::F16),
        3 => invalid(
            arg,
            "3 (f64) is for kdfuse_compute_host_f64 and kdfuse_compute_topk_host_f64 only \
             (0 f32, 1 bf16, 2 f16 here)",
        ),
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
            softcap: 0.0,
            teacher_log_probs: 0,
            grad_teacher: 0,
            topk_mode: KdfuseTopkMode::Full as i32,
            reserved2: 0,
            precision: KdfusePrecision::Fast as i32,
            reserved3: 0,
        }
    }

    /// The library's spec (validated later by the backend).
    pub fn to_spec(&self) -> Result<LossSpec> {
        check_size("params.size", self.size, &PARAMS_SIZES)?;
        check_version("params.version", self.version, self.size, &PARAMS_SIZES)?;
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
        let reduction = reduction("params.reduction", self.reduction)?;
        let topk_mode = match self.topk_mode {
            0 => TopkMode::Support,
            1 => TopkMode::Full,
            2 => TopkMode::Tail,
            m => {
                return invalid(
                    "params.topk_mode",
                    format!("{m} is not a KdfuseTopkMode (0 support, 1 full, 2 tail)"),
                )
            }
        };
        let precision = match self.precision {
            x if x == KdfusePrecision::Fast as i32 => Precision::Fast,
            x if x == KdfusePrecision::Exact as i32 => Precision::Exact,
            x => {
                return invalid(
                    "params.precision",
                    format!("{x} is not a KdfusePrecision (0 fast, 1 exact)"),
                )
            }
        };
        // 0 = off; anything else (negative, NaN, inf) reaches the spec's
        // validation, which names `softcap`.
        let softcap = (self.softcap != 0.0).then_some(self.softcap);
        Ok(LossSpec {
            divergence,
            beta: self.beta,
            temperature: self.temperature,
            alpha: self.alpha,
            t2_scaling: self.t2_scaling != 0,
            ignore_index: self.ignore_index,
            reduction,
            grad_scale: self.grad_scale,
            softcap,
            teacher_log_probs: self.teacher_log_probs != 0,
            grad_teacher: self.grad_teacher != 0,
            topk_mode,
            precision,
        })
    }
}

/// A top-k teacher's shape, checked.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TopkShape {
    /// Entries per row.
    pub k: usize,
    /// The indices are int64 (else int32).
    pub indices_i64: bool,
}

/// A batch's shape and dtypes, checked.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchShape {
    pub layout: RowLayout,
    pub dtype: Dtype,
    pub grad_dtype: Dtype,
    /// `Some` for a top-k teacher.
    pub topk: Option<TopkShape>,
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
            row_weights: std::ptr::null(),
            grad_teacher: std::ptr::null_mut(),
            grad_teacher_stride: cols,
            topk_indices: std::ptr::null(),
            topk_values: std::ptr::null(),
            topk_k: 0,
            topk_index_dtype: KdfuseIndexDtype::I32 as i32,
            validate_topk: 0,
        }
    }

    /// Reads a caller's batch of version 1 or 2; a version-1 batch gets the
    /// defaults of the appended fields (no row weights, no teacher gradient,
    /// a dense teacher).
    ///
    /// # Safety
    /// As [`read_sized`].
    pub(crate) unsafe fn read(p: *const KdfuseBatch) -> Result<KdfuseBatch> {
        // SAFETY: the caller's contract.
        let mut b = unsafe { read_sized("batch", p, KdfuseBatch::init(0, 0, 0), &BATCH_SIZES) }?;
        if (b.size as usize) < size_of::<KdfuseBatch>() {
            b.grad_teacher_stride = b.cols;
        }
        Ok(b)
    }

    /// Checks the batch against the spec it is computed with: shape, strides,
    /// dtypes, the required pointers, and which teacher (dense or top-k).
    pub(crate) fn shape(&self, spec: &LossSpec) -> Result<BatchShape> {
        self.shape_with(spec, None, true)
    }

    /// [`KdfuseBatch::shape`] with a top-k `k` of up to `k_limit` (default
    /// V = `cols`: a vocabulary shard's teacher spans the whole vocabulary)
    /// and, when `need_loss` is false, no `loss` pointer required.
    pub(crate) fn shape_with(
        &self,
        spec: &LossSpec,
        k_limit: Option<usize>,
        need_loss: bool,
    ) -> Result<BatchShape> {
        check_size("batch.size", self.size, &BATCH_SIZES)?;
        check_version("batch.version", self.version, self.size, &BATCH_SIZES)?;
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
        let topk = if self.topk_indices.is_null() {
            if !self.topk_values.is_null() {
                return invalid(
                    "batch.topk_values",
                    "given without batch.topk_indices (set both for a top-k teacher)",
                );
            }
            None
        } else {
            if self.topk_values.is_null() {
                return invalid(
                    "batch.topk_values",
                    "must not be NULL when batch.topk_indices is given",
                );
            }
            if !self.teacher.is_null() {
                return invalid(
                    "batch.teacher",
                    "must be NULL with a top-k teacher (batch.topk_indices): give one teacher",
                );
            }
            let k_max = k_limit.unwrap_or(cols);
            if self.topk_k < 1 || self.topk_k > k_max as i64 {
                return invalid(
                    "batch.topk_k",
                    format!("must be in [1, V = {k_max}], got {}", self.topk_k),
                );
            }
            let indices_i64 = match self.topk_index_dtype {
                0 => false,
                1 => true,
                d => {
                    return invalid(
                        "batch.topk_index_dtype",
                        format!("{d} is not a KdfuseIndexDtype (0 int32, 1 int64)"),
                    )
                }
            };
            if !self.grad_teacher.is_null() || spec.grad_teacher {
                return invalid(
                    "batch.grad_teacher",
                    "a top-k teacher is fixed data: it has no gradient (dense teachers only)",
                );
            }
            Some(TopkShape {
                k: self.topk_k as usize,
                indices_i64,
            })
        };
        if self.student.is_null() || (need_loss && self.loss.is_null()) {
            return invalid("batch", "student and loss pointers must not be NULL");
        }
        if topk.is_none() && self.teacher.is_null() {
            return invalid(
                "batch.teacher",
                "must not be NULL (or give a top-k teacher: batch.topk_indices and topk_values)",
            );
        }
        if spec.grad_teacher && self.grad_teacher.is_null() {
            return invalid(
                "batch.grad_teacher",
                "must not be NULL when params.grad_teacher is set",
            );
        }
        if !spec.grad_teacher && !self.grad_teacher.is_null() {
            return invalid(
                "batch.grad_teacher",
                "is given but params.grad_teacher is 0 (set it to compute the teacher gradient)",
            );
        }
        let teacher_stride = if topk.is_some() {
            cols
        } else {
            stride("batch.teacher_stride", self.teacher_stride)?
        };
        let grad_teacher_stride = if self.grad_teacher.is_null() {
            cols
        } else {
            stride("batch.grad_teacher_stride", self.grad_teacher_stride)?
        };
        Ok(BatchShape {
            layout: RowLayout {
                rows,
                cols,
                student_stride: stride("batch.student_stride", self.student_stride)?,
                teacher_stride,
                grad_stride: stride("batch.grad_stride", self.grad_stride)?,
                grad_teacher_stride,
            },
            dtype: dt,
            grad_dtype: gd,
            topk,
        })
    }
}

impl BatchShape {
    /// Elements a buffer of row stride `stride` spans, `(N − 1)·stride + V`;
    /// an error naming `arg` when that overflows (or exceeds what one
    /// allocation can hold, `isize::MAX` bytes of `elem_size`-byte elements).
    pub(crate) fn span(&self, arg: &'static str, stride: usize, elem_size: usize) -> Result<usize> {
        if self.layout.rows == 0 {
            return Ok(0);
        }
        match (self.layout.rows - 1)
            .checked_mul(stride)
            .and_then(|x| x.checked_add(self.layout.cols))
            .filter(|&x| {
                x.checked_mul(elem_size)
                    .is_some_and(|b| b <= isize::MAX as usize)
            }) {
            Some(x) => Ok(x),
            None => invalid(
                arg,
                format!(
                    "(N − 1)·stride + V = ({} − 1)·{stride} + {} elements overflows",
                    self.layout.rows, self.layout.cols
                ),
            ),
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

    #[test]
    fn version_1_sizes_and_defaults_of_the_appended_fields() {
        assert_eq!(PARAMS_V1_SIZE, 64);
        assert_eq!(BATCH_V1_SIZE, 112);
        // A version-1 params struct: only its 64 bytes are read.
        let mut v1 = KdfuseParams::defaults();
        v1.size = PARAMS_V1_SIZE as u32;
        v1.version = 1;
        v1.temperature = 3.0;
        let mut buf = [0xffu8; 64];
        // SAFETY: both are plain data; 64 bytes of a larger struct.
        unsafe {
            std::ptr::copy_nonoverlapping((&v1 as *const KdfuseParams).cast(), buf.as_mut_ptr(), 64)
        };
        // SAFETY: `buf` holds the struct's size field and `size` bytes
        // (the read never touches beyond them).
        let read = unsafe {
            read_sized(
                "params",
                buf.as_ptr().cast::<KdfuseParams>(),
                KdfuseParams::defaults(),
                &PARAMS_SIZES,
            )
        }
        .unwrap();
        let spec = read.to_spec().unwrap();
        assert_eq!(spec.temperature, 3.0);
        assert_eq!(spec.softcap, None);
        assert_eq!(spec.topk_mode, TopkMode::Full);
        assert!(!spec.grad_teacher && !spec.teacher_log_probs);
        let mut p = KdfuseParams::defaults();
        p.size = 72;
        let e = p.to_spec().unwrap_err().to_string();
        assert!(
            e.contains("params.size") && e.contains("64, 88 or 96"),
            "{e}"
        );
        // A version-2 struct (88 bytes) reads as fast, the default; version 3
        // carries the precision, and refuses anything but 0 and 1.
        p = KdfuseParams::defaults();
        p.size = PARAMS_V2_SIZE as u32;
        p.version = 2;
        p.precision = 1;
        assert_eq!(p.to_spec().unwrap().precision, crate::Precision::Exact);
        p = KdfuseParams::defaults();
        assert_eq!(p.to_spec().unwrap().precision, crate::Precision::Fast);
        p.precision = 1;
        assert_eq!(p.to_spec().unwrap().precision, crate::Precision::Exact);
        p.precision = 2;
        let e = p.to_spec().unwrap_err().to_string();
        assert!(
            e.contains("params.precision") && e.contains("0 fast, 1 exact"),
            "{e}"
        );
        p = KdfuseParams::defaults();
        p.version = 2;
        let e = p.to_spec().unwrap_err().to_string();
        assert!(
            e.contains("version 2 does not match the struct size 96 (version 5's)"),
            "{e}"
        );
        p = KdfuseParams::defaults();
        p.softcap = 30.0;
        p.topk_mode = KdfuseTopkMode::Tail as i32;
        let spec = p.to_spec().unwrap();
        assert_eq!((spec.softcap, spec.topk_mode), (Some(30.0), TopkMode::Tail));
    }
}
