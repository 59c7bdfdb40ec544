//! The C ABI (`include/kdfuse.h`, generated from this module by cbindgen and
//! checked by `tests/interfaces/c_abi.rs`): a context per CUDA device, the fused loss on
//! raw device pointers on the caller's `CUstream`, the same on host pointers
//! through the CPU backend, integer status codes and a thread-local message.
//! Every entry point catches panics: none crosses the boundary.

mod f64;
mod feature;
mod linear;
mod topk_select;
mod types;
mod vocab_parallel;

pub use linear::{
    kdfuse_linear_args_init, kdfuse_linear_loss_cuda, kdfuse_linear_loss_host, KdfuseLinearArgs,
    KdfuseLinearTeacher,
};
pub use topk_select::{kdfuse_topk_select_cuda, kdfuse_topk_select_host};
pub use types::{
    KdfuseBatch, KdfuseDivergence, KdfuseDtype, KdfuseFeatureBatch, KdfuseFeatureKind,
    KdfuseIndexDtype, KdfuseParams, KdfuseReduction, KdfuseStatus, KdfuseTopkMode,
    KDFUSE_ABI_VERSION,
};
pub use vocab_parallel::{KdfuseShard, KDFUSE_VP_STATS_VERSION, KDFUSE_VP_STATS_WIDTH};

use crate::cpu::CpuBackend;
use crate::cuda::{CudaBackend, PreparedCache, RawFusedArgs, RawTopkArgs};
use crate::driver::Backend;
use crate::error::{invalid, KdError, Result};
use crate::tensor::{
    Dtype, GradDtype, HostData, KdInputs, Logits, TopkIndices, TopkInputs, TopkTeacher,
};
use half::{bf16, f16};
use std::cell::RefCell;
use std::ffi::{c_char, c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// A CUDA device with the kdfuse kernels loaded (opaque to C).
pub struct KdfuseContext {
    backend: CudaBackend,
    /// The losses this context's calls prepared: a training loop passes the
    /// same params every step, and such a call only fills in its pointers.
    prepared: PreparedCache,
}

impl KdfuseContext {
    /// The caller's stream, borrowed (never destroyed by kdfuse).
    ///
    /// # Safety
    /// `stream` is a `CUstream` of this device's primary context (NULL: the
    /// legacy default stream) that outlives the work enqueued on it.
    unsafe fn stream(&self, stream: *mut c_void) -> std::sync::Arc<cudarc::driver::CudaStream> {
        // SAFETY: the caller's contract.
        unsafe {
            self.backend
                .context()
                .wrap_borrowed_stream(stream as cudarc::driver::sys::CUstream)
        }
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

fn status_of(e: &KdError) -> KdfuseStatus {
    match e {
        KdError::InvalidArgument { .. } => KdfuseStatus::InvalidArgument,
        KdError::CudaUnavailable(_) => KdfuseStatus::CudaUnavailable,
        KdError::Cuda(_) => KdfuseStatus::CudaError,
    }
}

/// Runs `f`, turning its error or panic into a status and the thread's
/// last-error message (cleared on success).
fn guard(f: impl FnOnce() -> Result<()>) -> KdfuseStatus {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => {
            set_error("");
            KdfuseStatus::Ok
        }
        Ok(Err(e)) => {
            set_error(&e.to_string());
            status_of(&e)
        }
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            set_error(&format!("internal error (a bug in kdfuse): {what}"));
            KdfuseStatus::Internal
        }
    }
}

/// Fails, naming `arg`, unless `p` (NULL allowed) is aligned for `T`.
fn aligned<T>(arg: &'static str, p: *const T) -> Result<()> {
    let align = std::mem::align_of::<T>();
    if !(p as usize).is_multiple_of(align) {
        return invalid(
            arg,
            format!("pointer {p:p} is not aligned to {align} bytes (its element type's alignment)"),
        );
    }
    Ok(())
}

/// `*out` for writing, or an error naming `out`.
fn out_ref<'a, T>(out: *mut T) -> Result<&'a mut T> {
    aligned("out", out.cast_const())?;
    // SAFETY: the caller passes writable memory or NULL; alignment checked.
    unsafe { out.as_mut() }.ok_or_else(|| KdError::InvalidArgument {
        arg: "out",
        msg: "must not be NULL".into(),
    })
}

fn non_null<'a, T>(arg: &'static str, p: *const T) -> Result<&'a T> {
    aligned(arg, p)?;
    // SAFETY: the caller passes a valid pointer or NULL; alignment checked.
    unsafe { p.as_ref() }.ok_or_else(|| KdError::InvalidArgument {
        arg,
        msg: "must not be NULL".into(),
    })
}

/// Every pointer of a batch is aligned for its element type (NULL allowed):
/// the host path dereferences them, and the kernels need it too.
fn check_batch_alignment(b: &KdfuseBatch, sh: &types::BatchShape) -> Result<()> {
    let elem = |arg: &'static str, p: *const c_void, dtype: Dtype| -> Result<()> {
        if !(p as usize).is_multiple_of(dtype.size()) {
            return invalid(
                arg,
                format!(
                    "pointer {p:p} is not aligned for {dtype} ({} bytes)",
                    dtype.size()
                ),
            );
        }
        Ok(())
    };
    elem("batch.student", b.student, sh.dtype)?;
    elem("batch.teacher", b.teacher, sh.dtype)?;
    elem("batch.topk_values", b.topk_values, sh.dtype)?;
    elem("batch.grad", b.grad.cast_const(), sh.grad_dtype)?;
    elem(
        "batch.grad_teacher",
        b.grad_teacher.cast_const(),
        sh.grad_dtype,
    )?;
    aligned("batch.labels", b.labels)?;
    aligned("batch.row_weights", b.row_weights)?;
    aligned("batch.row_losses", b.row_losses.cast_const())?;
    aligned("batch.loss", b.loss.cast_const())?;
    aligned("batch.valid_rows", b.valid_rows.cast_const())?;
    match sh.topk {
        Some(t) if t.indices_i64 => aligned("batch.topk_indices", b.topk_indices.cast::<i64>()),
        Some(_) => aligned("batch.topk_indices", b.topk_indices.cast::<i32>()),
        None => Ok(()),
    }
}

/// The caller's params (version 1 or 2) as a spec.
///
/// # Safety
/// `p` is NULL or a readable `KdfuseParams` of its own `size`.
unsafe fn read_spec(p: *const KdfuseParams) -> Result<crate::spec::LossSpec> {
    // SAFETY: the caller's contract.
    unsafe { types::read_sized("params", p, KdfuseParams::defaults(), &types::PARAMS_SIZES) }?
        .to_spec()
}

/// A library error with its argument renamed to the C field the caller set
/// (`names`: library argument, field); other errors unchanged.
fn renamed(e: KdError, names: &[(&str, &'static str)]) -> KdError {
    match e {
        KdError::InvalidArgument { arg, msg } => KdError::InvalidArgument {
            arg: names
                .iter()
                .find(|(from, _)| *from == arg)
                .map_or(arg, |&(_, field)| field),
            msg,
        },
        e => e,
    }
}

/// A library error about a top-k teacher, the argument renamed to the
/// batch field the caller set.
fn batch_field(e: KdError) -> KdError {
    renamed(
        e,
        &[
            ("teacher_topk_indices", "batch.topk_indices"),
            ("teacher_topk_values", "batch.topk_values"),
            ("k", "batch.topk_k"),
            ("row_weights", "batch.row_weights"),
            ("labels", "batch.labels"),
            ("student", "batch.student"),
        ],
    )
}

/// Reads the caller's batch and params, then runs `f` on them, as a status.
///
/// # Safety
/// `batch` and `params` are NULL or readable structs of their own size.
unsafe fn with_batch(
    batch: *const KdfuseBatch,
    params: *const KdfuseParams,
    f: impl FnOnce(&KdfuseBatch, &crate::spec::LossSpec) -> Result<()>,
) -> KdfuseStatus {
    guard(|| {
        // SAFETY: the caller's contract (readable structs of their own size).
        let b = unsafe { KdfuseBatch::read(batch) }?;
        // SAFETY: as above.
        let spec = unsafe { read_spec(params) }?;
        f(&b, &spec)
    })
}

/// The library version, e.g. "0.1.0" (static storage).
#[no_mangle]
pub extern "C" fn kdfuse_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The message of this thread's last failed call ("" after a success). Valid
/// until the thread's next kdfuse call.
#[no_mangle]
pub extern "C" fn kdfuse_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Fills `*out` with the default parameters (and its size and version):
/// `sizeof(KdfuseParams)` of this library's version, so `out` must be a
/// struct of the same header version.
///
/// # Safety
/// `out` must be NULL or point to writable memory for one `KdfuseParams`.
#[no_mangle]
pub unsafe extern "C" fn kdfuse_params_default(out: *mut KdfuseParams) -> KdfuseStatus {
    guard(|| {
        let out = out_ref(out)?;
        *out = KdfuseParams::defaults();
        Ok(())
    })
}

/// Fills `*out` for a dense `[rows, cols]` batch of `dtype` (a `KdfuseDtype`)
/// with a gradient of the same dtype, every stride `cols` (the teacher
/// gradient's too), every pointer NULL (a dense teacher, no row weights, no
/// teacher gradient); `sizeof(KdfuseBatch)` of this library's version.
///
/// # Safety
/// `out` must be NULL or point to writable memory for one `KdfuseBatch`.
#[no_mangle]
pub unsafe extern "C" fn kdfuse_batch_init(
    out: *mut KdfuseBatch,
    rows: i64,
    cols: i64,
    dtype: i32,
) -> KdfuseStatus {
    guard(|| {
        let out = out_ref(out)?;
        types::dtype("dtype", dtype)?;
        *out = KdfuseBatch::init(rows, cols, dtype);
        Ok(())
    })
}

/// Number of CUDA devices in `*out` (0 with status `CudaUnavailable` when
/// there is no driver).
///
/// # Safety
/// `out` must be NULL or point to a writable int32.
#[no_mangle]
pub unsafe extern "C" fn kdfuse_device_count(out: *mut i32) -> KdfuseStatus {
    guard(|| {
        let out = out_ref(out)?;
        *out = 0;
        *out = crate::cuda::device_count()? as i32;
        Ok(())
    })
}

/// Opens CUDA device `device` (its primary context, the one the CUDA runtime
/// and PyTorch use) with the kernels loaded; `*out` gets the context.
///
/// # Safety
/// `out` must be NULL or point to a writable pointer.
#[no_mangle]
pub unsafe extern "C" fn kdfuse_context_create(
    device: i32,
    out: *mut *mut KdfuseContext,
) -> KdfuseStatus {
    guard(|| {
        let out = out_ref(out)?;
        *out = std::ptr::null_mut();
        let ordinal = usize::try_from(device).or_else(|_| {
            invalid(
                "device",
                format!("must be a CUDA ordinal ≥ 0, got {device}"),
            )
        })?;
        let backend = CudaBackend::new(ordinal)?;
        *out = Box::into_raw(Box::new(KdfuseContext {
            backend,
            prepared: PreparedCache::default(),
        }));
        Ok(())
    })
}

/// Frees a context from `kdfuse_context_create` (NULL is allowed). Work
/// already enqueued still runs.
///
/// # Safety
/// `ctx` must come from `kdfuse_context_create` and not be used afterwards.
#[no_mangle]
pub unsafe extern "C" fn kdfuse_context_destroy(ctx: *mut KdfuseContext) -> KdfuseStatus {
    guard(|| {
        if !ctx.is_null() {
            // SAFETY: made by Box::into_raw in kdfuse_context_create.
            drop(unsafe { Box::from_raw(ctx) });
        }
        Ok(())
    })
}

/// Enqueues the fused loss (and gradient, when `batch->grad` is not NULL) on
/// `stream` (a `CUstream`/`cudaStream_t` of the device's primary context;
/// NULL = the legacy default stream) and returns without waiting. Pointers
/// are device memory; `row_losses` and `loss` are required, `valid_rows`
/// too when `labels` is given. Results are ready when the stream reaches them.
/// Optional: `row_weights`; `grad_teacher` (with `params.grad_teacher`); a
/// top-k teacher in `topk_indices`/`topk_values` instead of `teacher`, whose
/// indices are checked first (a wait on the stream) when `validate_topk` is
/// set — unchecked, a bad index gives a NaN row, never an out-of-bounds access.
///
/// # Safety
/// Every non-NULL pointer must be device memory of this device, large enough
/// for the batch's shape and strides, alive until the stream has run the work.
#[no_mangle]
pub unsafe extern "C" fn kdfuse_compute_cuda(
    ctx: *const KdfuseContext,
    batch: *const KdfuseBatch,
    params: *const KdfuseParams,
    stream: *mut c_void,
) -> KdfuseStatus {
    guard(|| {
        let ctx = non_null("ctx", ctx)?;
        // SAFETY: the caller's contract (readable structs of their own size).
        let b = unsafe { KdfuseBatch::read(batch) }?;
        // SAFETY: as above.
        let spec = unsafe { read_spec(params) }?;
        let shape = b.shape(&spec)?;
        check_batch_alignment(&b, &shape)?;
        if b.row_losses.is_null() {
            return invalid("batch.row_losses", "required on the device (float, N)");
        }
        // SAFETY: the caller's contract.
        let stream = unsafe { ctx.stream(stream) };
        let layout = shape.layout;
        let dtypes = (shape.dtype, shape.grad_dtype);
        let labels = !b.labels.is_null();
        if let Some(topk) = shape.topk {
            let prepared = ctx.prepared.get(
                &ctx.backend,
                &spec,
                dtypes,
                shape.layout.cols,
                labels,
                Some(topk.indices_i64),
            )?;
            if b.validate_topk != 0 {
                // SAFETY: the caller's contract (indices: N·k on the device).
                unsafe {
                    ctx.backend.validate_topk_raw(
                        &stream,
                        b.topk_indices as u64,
                        topk.indices_i64,
                        shape.layout.rows,
                        topk.k,
                        shape.layout.cols,
                    )
                }
                .map_err(batch_field)?;
            }
            let raw = RawTopkArgs {
                dtype: shape.dtype,
                grad_dtype: shape.grad_dtype,
                student: b.student as u64,
                indices: b.topk_indices as u64,
                indices_i64: topk.indices_i64,
                values: b.topk_values as u64,
                k: topk.k,
                labels: b.labels as u64,
                row_weights: b.row_weights as u64,
                grad: b.grad as u64,
                row_losses: b.row_losses as u64,
                loss: b.loss as u64,
                valid_rows: b.valid_rows as u64,
                layout,
            };
            // SAFETY: the caller's contract above.
            return unsafe { ctx.backend.launch_topk_prepared(&stream, &prepared, &raw) };
        }
        if !b.grad_teacher.is_null()
            && b.grad_teacher.cast_const() == b.teacher
            && (shape.grad_dtype != shape.dtype
                || shape.layout.grad_teacher_stride != shape.layout.teacher_stride)
        {
            return invalid(
                "batch.grad_teacher",
                "an in-place teacher gradient needs the teacher's dtype and row stride",
            );
        }
        let prepared =
            ctx.prepared
                .get(&ctx.backend, &spec, dtypes, shape.layout.cols, labels, None)?;
        let raw = RawFusedArgs {
            dtype: shape.dtype,
            grad_dtype: shape.grad_dtype,
            student: b.student as u64,
            teacher: b.teacher as u64,
            labels: b.labels as u64,
            grad: b.grad as u64,
            row_losses: b.row_losses as u64,
            loss: b.loss as u64,
            valid_rows: b.valid_rows as u64,
            row_weights: b.row_weights as u64,
            grad_teacher: b.grad_teacher as u64,
            layout,
        };
        // SAFETY: the caller's contract above.
        unsafe { ctx.backend.launch_prepared(&stream, &prepared, &raw) }
    })
}

/// Host memory of `len` elements of `dtype` at `p`, checked for alignment.
///
/// # Safety
/// `p` must be valid for `len` elements.
unsafe fn host_data<'a>(
    arg: &'static str,
    p: *const c_void,
    len: usize,
    dtype: Dtype,
) -> Result<HostData<'a>> {
    if !(p as usize).is_multiple_of(dtype.size()) {
        return invalid(arg, format!("pointer is not aligned for {dtype}"));
    }
    // SAFETY: the caller's contract; alignment checked above.
    Ok(unsafe {
        match dtype {
            Dtype::F32 => HostData::F32(std::slice::from_raw_parts(p.cast::<f32>(), len)),
            Dtype::Bf16 => HostData::Bf16(std::slice::from_raw_parts(p.cast::<bf16>(), len)),
            Dtype::F16 => HostData::F16(std::slice::from_raw_parts(p.cast::<f16>(), len)),
        }
    })
}

/// The fused loss (and gradient, when `batch->grad` is not NULL) on host
/// memory, computed by the CPU backend (rayon over rows, the kernels' fp32
/// arithmetic). `loss` is required; `row_losses` and `valid_rows` are
/// optional outputs; the gradient is written in `grad_dtype` with
/// `grad_stride` and must not overlap the inputs, as the teacher gradient
/// (`grad_teacher`, `grad_teacher_stride`). A top-k teacher's indices are
/// always checked (the first bad row is named). Every pointer must be
/// aligned for its element type (float, int32, int64, the dtype's), and every
/// buffer's element count `(N − 1)·stride + V` must not overflow: otherwise
/// `INVALID_ARGUMENT` naming the field.
///
/// # Safety
/// Every non-NULL pointer must be host memory large enough for the batch's
/// shape and strides.
#[no_mangle]
pub unsafe extern "C" fn kdfuse_compute_host(
    batch: *const KdfuseBatch,
    params: *const KdfuseParams,
) -> KdfuseStatus {
    // SAFETY: the caller's contract (readable structs of their own size).
    unsafe { with_batch(batch, params, |b, spec| compute_host(b, spec)) }
}

/// A host batch's inputs, read and checked (not yet validated against the
/// loss: the backends do that).
pub(crate) struct HostBatch<'a> {
    pub shape: types::BatchShape,
    pub student: Logits<'a>,
    pub teacher: HostTeacher<'a>,
    pub labels: Option<&'a [i64]>,
    pub row_weights: Option<&'a [f32]>,
    /// The gradient's dtype, when a gradient pointer is set.
    pub grad: Option<GradDtype>,
}

/// A host batch's teacher.
pub(crate) enum HostTeacher<'a> {
    Dense(Logits<'a>),
    Topk(TopkTeacher<'a>),
}

/// Reads the buffers of a host batch (`k_limit`, `need_loss` as
/// [`KdfuseBatch::shape_with`]).
///
/// # Safety
/// As `kdfuse_compute_host`: the batch's pointers are host memory large
/// enough for its shape and strides.
pub(crate) unsafe fn host_batch<'a>(
    b: &KdfuseBatch,
    spec: &crate::spec::LossSpec,
    k_limit: Option<usize>,
    need_loss: bool,
) -> Result<HostBatch<'a>> {
    let sh = b.shape_with(spec, k_limit, need_loss)?;
    if !b.grad.is_null() && b.grad.cast_const() == b.student {
        return invalid(
            "batch.grad",
            "an in-place gradient is for device memory only",
        );
    }
    if !b.grad_teacher.is_null() && b.grad_teacher.cast_const() == b.teacher {
        return invalid(
            "batch.grad_teacher",
            "an in-place teacher gradient is for device memory only",
        );
    }
    check_batch_alignment(b, &sh)?;
    let student_len = sh.span(
        "batch.student_stride",
        sh.layout.student_stride,
        sh.dtype.size(),
    )?;
    let teacher_len = sh.span(
        "batch.teacher_stride",
        sh.layout.teacher_stride,
        sh.dtype.size(),
    )?;
    sh.span(
        "batch.grad_stride",
        sh.layout.grad_stride,
        sh.grad_dtype.size(),
    )?;
    sh.span(
        "batch.grad_teacher_stride",
        sh.layout.grad_teacher_stride,
        sh.grad_dtype.size(),
    )?;
    if sh
        .layout
        .rows
        .checked_mul(8)
        .is_none_or(|b| b > isize::MAX as usize)
    {
        return invalid("batch.rows", format!("N = {} is too large", sh.layout.rows));
    }
    // SAFETY: the caller's contract: the student spans these elements.
    let s = unsafe { host_data("batch.student", b.student, student_len, sh.dtype) }?;
    let student = Logits::strided(s, sh.layout.rows, sh.layout.cols, sh.layout.student_stride);
    // SAFETY: N labels when not NULL.
    let labels = (!b.labels.is_null())
        .then(|| unsafe { std::slice::from_raw_parts(b.labels, sh.layout.rows) });
    // SAFETY: N weights when not NULL (alignment checked above).
    let row_weights = (!b.row_weights.is_null())
        .then(|| unsafe { std::slice::from_raw_parts(b.row_weights, sh.layout.rows) });
    let want_grad = !b.grad.is_null() || !b.grad_teacher.is_null();
    let grad = want_grad.then_some(if sh.grad_dtype == sh.dtype {
        GradDtype::Input
    } else {
        GradDtype::F32
    });
    let teacher = match sh.topk {
        None => {
            // SAFETY: the caller's contract: the teacher spans these elements.
            let t = unsafe { host_data("batch.teacher", b.teacher, teacher_len, sh.dtype) }?;
            HostTeacher::Dense(Logits::strided(
                t,
                sh.layout.rows,
                sh.layout.cols,
                sh.layout.teacher_stride,
            ))
        }
        Some(topk) => {
            let Some(len) = sh
                .layout
                .rows
                .checked_mul(topk.k)
                .filter(|l| l.checked_mul(8).is_some_and(|b| b <= isize::MAX as usize))
            else {
                return invalid("batch.topk_k", "N·k overflows");
            };
            // SAFETY: N·k indices (aligned, checked above).
            let indices = unsafe {
                if topk.indices_i64 {
                    TopkIndices::I64(std::slice::from_raw_parts(b.topk_indices.cast(), len))
                } else {
                    TopkIndices::I32(std::slice::from_raw_parts(b.topk_indices.cast(), len))
                }
            };
            // SAFETY: N·k values of the batch's dtype.
            let values = unsafe { host_data("batch.topk_values", b.topk_values, len, sh.dtype) }?;
            HostTeacher::Topk(TopkTeacher {
                indices,
                values,
                k: topk.k,
            })
        }
    };
    Ok(HostBatch {
        shape: sh,
        student,
        teacher,
        labels,
        row_weights,
        grad,
    })
}

/// `kdfuse_compute_host` on the caller's structs.
///
/// # Safety
/// As `kdfuse_compute_host`: the batch's pointers are host memory large
/// enough for its shape and strides.
unsafe fn compute_host(b: &KdfuseBatch, spec: &crate::spec::LossSpec) -> Result<()> {
    // SAFETY: the caller's contract.
    let hb = unsafe { host_batch(b, spec, None, true) }?;
    let out = match hb.teacher {
        HostTeacher::Dense(teacher) => {
            let inputs = KdInputs {
                student: hb.student,
                teacher,
                labels: hb.labels,
                row_weights: hb.row_weights,
            };
            CpuBackend.compute(&inputs, spec, hb.grad)?
        }
        HostTeacher::Topk(teacher) => {
            let inputs = TopkInputs {
                student: hb.student,
                teacher,
                labels: hb.labels,
                row_weights: hb.row_weights,
            };
            crate::backend::validate_topk(&inputs, spec).map_err(batch_field)?;
            CpuBackend
                .compute_topk(&inputs, spec, hb.grad)
                .map_err(batch_field)?
        }
    };
    // SAFETY: the caller's contract, as above.
    unsafe { write_host_outputs(b, &hb.shape, &out, false) }
}

/// Writes a result into a host batch's outputs: the gradients where their
/// pointers are set, the loss (`loss` must be set), and the row losses and
/// valid rows where set; the losses as floats, or as doubles with
/// `f64_losses`.
///
/// # Safety
/// The batch's output pointers are host memory large enough for its shape
/// and strides (and doubles where `f64_losses` says so).
pub(crate) unsafe fn write_host_outputs(
    b: &KdfuseBatch,
    sh: &types::BatchShape,
    out: &crate::KdOutput,
    f64_losses: bool,
) -> Result<()> {
    for (p, g, arg, stride) in [
        (
            b.grad,
            out.grad.as_deref(),
            "batch.grad",
            sh.layout.grad_stride,
        ),
        (
            b.grad_teacher,
            out.grad_teacher.as_deref(),
            "batch.grad_teacher",
            sh.layout.grad_teacher_stride,
        ),
    ] {
        if p.is_null() {
            continue;
        }
        let g = g.ok_or_else(|| KdError::InvalidArgument {
            arg,
            msg: "the backend returned no gradient".into(),
        })?;
        // SAFETY: the gradient spans (N−1)·stride + V elements.
        unsafe { write_rows(p, stride, sh.grad_dtype, g, sh.layout.rows, sh.layout.cols) };
    }
    if f64_losses {
        aligned("batch.loss", b.loss.cast_const().cast::<f64>())?;
        aligned("batch.row_losses", b.row_losses.cast_const().cast::<f64>())?;
    }
    // SAFETY: `loss` checked non-NULL by the caller; the others when not NULL.
    unsafe {
        if f64_losses {
            *b.loss.cast::<f64>() = out.loss;
        } else {
            *b.loss = out.loss as f32;
        }
        if !b.row_losses.is_null() {
            for (r, l) in out.row_losses.iter().enumerate() {
                if f64_losses {
                    *b.row_losses.cast::<f64>().add(r) = *l;
                } else {
                    *b.row_losses.add(r) = *l as f32;
                }
            }
        }
        if !b.valid_rows.is_null() {
            *b.valid_rows = out.valid_rows as i32;
        }
    }
    Ok(())
}

/// The dense loss (and gradients) on host memory in double precision,
/// computed by the f64 oracle (the definitions evaluated directly, one row
/// at a time, no online tricks): for gradient checks, not for speed.
/// `batch.dtype` and `batch.grad_dtype` must be `KDFUSE_DTYPE_F64`, and
/// every floating-point buffer holds doubles: `student`, `teacher`, `grad`,
/// `grad_teacher`, `row_weights` (N), `row_losses` (N) and `loss` (one),
/// whatever their C type in `KdfuseBatch`. `labels` (int64) and
/// `valid_rows` (int32) are as for `kdfuse_compute_host`, as are the
/// params, the strides and the outputs' meaning; a dense teacher only (a
/// top-k teacher: `kdfuse_compute_topk_host_f64`). Every pointer must be
/// aligned for its element type; otherwise `INVALID_ARGUMENT` naming the
/// field. Since ABI version 2 (an appended function: the structs are
/// unchanged).
///
/// # Safety
/// Every non-NULL pointer must be host memory large enough for the batch's
/// shape and strides, in the element types above.
#[no_mangle]
pub unsafe extern "C" fn kdfuse_compute_host_f64(
    batch: *const KdfuseBatch,
    params: *const KdfuseParams,
) -> KdfuseStatus {
    // SAFETY: the caller's contract (readable structs; buffers of doubles).
    unsafe { with_batch(batch, params, |b, spec| f64::compute(b, spec)) }
}

/// The loss against a top-k teacher (and the student's gradient, when
/// `batch->grad` is not NULL) on host memory in double precision, computed
/// by the f64 oracle (the top-k definitions of docs/DESIGN.md §4 evaluated
/// directly, one row at a time): for gradient checks, not for speed. The
/// top-k counterpart of `kdfuse_compute_host_f64`: `batch.dtype` and
/// `batch.grad_dtype` must be `KDFUSE_DTYPE_F64`, and every floating-point
/// buffer holds doubles: `student`, `topk_values` (N·k), `grad`,
/// `row_weights` (N), `row_losses` (N) and `loss` (one), whatever their C
/// type in `KdfuseBatch`. `topk_indices` (int32 or int64 per
/// `topk_index_dtype`, N·k, distinct within a row, in `[0, V)`: always
/// checked, the first bad row named), `topk_k`, `labels` (int64) and
/// `valid_rows` (int32) are as for `kdfuse_compute_host`, as are the params
/// (forward KL only; `topk_mode`, `teacher_log_probs`), the strides and the
/// outputs' meaning. `teacher` must be NULL and there is no teacher gradient
/// (a top-k teacher is fixed data). Every pointer must be aligned for its
/// element type; otherwise `INVALID_ARGUMENT` naming the field. Appended in
/// ABI version 3 (the structs are unchanged).
///
/// # Safety
/// Every non-NULL pointer must be host memory large enough for the batch's
/// shape, `topk_k` and strides, in the element types above.
#[no_mangle]
pub unsafe extern "C" fn kdfuse_compute_topk_host_f64(
    batch: *const KdfuseBatch,
    params: *const KdfuseParams,
) -> KdfuseStatus {
    // SAFETY: the caller's contract (readable structs; buffers of doubles).
    unsafe { with_batch(batch, params, |b, spec| f64::compute_topk(b, spec)) }
}

/// Fills `*out` for a dense `[rows, width]` feature batch of `kind` (a
/// `KdfuseFeatureKind`) and `dtype` (a `KdfuseDtype`, F64 for the host's
/// f64 path): gradients in the same dtype, channels 1, every stride `width`,
/// the MEAN reduction, the kind's ε, scale 1, every pointer NULL. For
/// attention maps `[N, C, S]` set `width` = S, the channels and the strides.
///
/// # Safety
/// `out` must be NULL or point to writable memory for one `KdfuseFeatureBatch`.
#[no_mangle]
pub unsafe extern "C" fn kdfuse_feature_batch_init(
    out: *mut KdfuseFeatureBatch,
    kind: i32,
    rows: i64,
    width: i64,
    dtype: i32,
) -> KdfuseStatus {
    guard(|| {
        let out = out_ref(out)?;
        *out = KdfuseFeatureBatch::init(kind, rows, width, dtype);
        Ok(())
    })
}

/// `*out` = the floats of device workspace that `kdfuse_feature_compute_cuda`
/// needs for `batch` (`batch.workspace`; 0 unless attention). The batch is
/// checked as for a computation (its pointers set).
///
/// # Safety
/// `batch` must be NULL or a readable struct of its own `size`; `out` NULL
/// or a writable int64.
#[no_mangle]
pub unsafe extern "C" fn kdfuse_feature_workspace_len(
    batch: *const KdfuseFeatureBatch,
    out: *mut i64,
) -> KdfuseStatus {
    guard(|| {
        let out = out_ref(out)?;
        // SAFETY: the caller's contract.
        let b = unsafe { KdfuseFeatureBatch::read(batch) }?;
        *out = feature::workspace_len(&b)? as i64;
        Ok(())
    })
}

/// The feature loss (and the gradients whose pointers are set) on host
/// memory: the CPU backend (f32, bf16, f16; fp32 math) or, for
/// `dtype = grad_dtype = KDFUSE_DTYPE_F64`, the f64 oracle with every
/// floating-point buffer in doubles (`loss` and `row_losses` too). `loss`
/// is required, `row_losses` optional; gradients must not overlap the
/// inputs. Errors name the field (`feature_batch.*`).
///
/// # Safety
/// Every non-NULL pointer must be host memory large enough for the batch's
/// shape and strides.
#[no_mangle]
pub unsafe extern "C" fn kdfuse_feature_compute_host(
    batch: *const KdfuseFeatureBatch,
) -> KdfuseStatus {
    guard(|| {
        // SAFETY: the caller's contract.
        let b = unsafe { KdfuseFeatureBatch::read(batch) }?;
        // SAFETY: as above.
        unsafe { feature::compute_host(&b) }
    })
}

/// Enqueues the feature loss (and the gradients whose pointers are set) on
/// `stream` (as `kdfuse_compute_cuda`) and returns without waiting. Device
/// pointers; `row_losses` (float, N) and `loss` are required, `workspace`
/// too for attention (`kdfuse_feature_workspace_len` floats).
///
/// # Safety
/// Every non-NULL pointer must be device memory of this device, large enough
/// for the batch's shape and strides, alive until the stream has run the work.
#[no_mangle]
pub unsafe extern "C" fn kdfuse_feature_compute_cuda(
    ctx: *const KdfuseContext,
    batch: *const KdfuseFeatureBatch,
    stream: *mut c_void,
) -> KdfuseStatus {
    guard(|| {
        let ctx = non_null("ctx", ctx)?;
        // SAFETY: the caller's contract.
        let b = unsafe { KdfuseFeatureBatch::read(batch) }?;
        // SAFETY: as above.
        unsafe { feature::compute_cuda(ctx, &b, stream) }
    })
}

/// Writes dense `[rows, cols]` f32 values into `dst` (row stride `stride`,
/// elements of `dtype`, rounded once).
///
/// # Safety
/// `dst` is aligned for `dtype` and writable for (rows−1)·stride + cols
/// elements.
unsafe fn write_rows(
    dst: *mut c_void,
    stride: usize,
    dtype: Dtype,
    src: &[f32],
    rows: usize,
    cols: usize,
) {
    for (r, row) in src.chunks_exact(cols.max(1)).enumerate().take(rows) {
        let base = r * stride;
        // SAFETY: the caller's contract.
        unsafe {
            match dtype {
                Dtype::F32 => {
                    let p = dst.cast::<f32>().add(base);
                    std::ptr::copy_nonoverlapping(row.as_ptr(), p, row.len());
                }
                Dtype::Bf16 => {
                    let p = dst.cast::<bf16>().add(base);
                    for (j, &x) in row.iter().enumerate() {
                        *p.add(j) = bf16::from_f32(x);
                    }
                }
                Dtype::F16 => {
                    let p = dst.cast::<f16>().add(base);
                    for (j, &x) in row.iter().enumerate() {
                        *p.add(j) = f16::from_f32(x);
                    }
                }
            }
        }
    }
}
