//! Launching the fused kernels on device memory, asynchronously, on any
//! stream of the backend's context: no host synchronisation inside.
//!
//! Per call: `kd_count_valid` (only with labels: the valid-row count the
//! batchmean/mean weights need, kept on the device), one `kd_fused_*` launch
//! for the whole batch, and `kd_reduce_loss` (the reduced loss, on the device).

use super::CudaBackend;
use crate::error::{invalid, Result};
use crate::params::{FusedArgs, KernelParams, TopkArgs};
use crate::spec::LossSpec;
use crate::tensor::{Dtype, TopkIndices};
use cudarc::driver::{
    CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr,
    LaunchConfig, PushKernelArg,
};
use half::{bf16, f16};
use std::sync::Arc;

/// Element types the kernels read and write.
pub trait KdElement: DeviceRepr + Copy + Send + Sync + 'static {
    /// The matching [`Dtype`].
    const DTYPE: Dtype;
}
impl KdElement for f32 {
    const DTYPE: Dtype = Dtype::F32;
}
impl KdElement for bf16 {
    const DTYPE: Dtype = Dtype::Bf16;
}
impl KdElement for f16 {
    const DTYPE: Dtype = Dtype::F16;
}

/// Shape and strides (in elements) of one batch on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowLayout {
    /// Rows N.
    pub rows: usize,
    /// Vocabulary V.
    pub cols: usize,
    /// Student row stride (≥ V).
    pub student_stride: usize,
    /// Teacher row stride (≥ V).
    pub teacher_stride: usize,
    /// Gradient row stride (≥ V).
    pub grad_stride: usize,
    /// Teacher-gradient row stride (≥ V; used only with a teacher gradient).
    pub grad_teacher_stride: usize,
}

impl RowLayout {
    /// A dense batch: every stride is V.
    pub fn dense(rows: usize, cols: usize) -> Self {
        RowLayout {
            rows,
            cols,
            student_stride: cols,
            teacher_stride: cols,
            grad_stride: cols,
            grad_teacher_stride: cols,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.cols == 0 || self.cols > i32::MAX as usize {
            return invalid(
                "cols",
                format!("V must be in [1, {}], got {}", i32::MAX, self.cols),
            );
        }
        for (arg, s) in [
            ("student_stride", self.student_stride),
            ("teacher_stride", self.teacher_stride),
            ("grad_stride", self.grad_stride),
        ] {
            if s < self.cols {
                return invalid(arg, format!("row stride {s} is below V = {}", self.cols));
            }
        }
        Ok(())
    }

    /// Elements a buffer of row stride `stride` must hold.
    fn needed(&self, stride: usize) -> usize {
        if self.rows == 0 {
            0
        } else {
            (self.rows - 1) * stride + self.cols
        }
    }
}

/// Device outputs of one call, reusable across calls of at most `capacity` rows.
pub struct LossBuffers {
    /// Per-row losses ℓ (f32, ignored rows 0).
    pub row_losses: CudaSlice<f32>,
    /// The reduced loss (one f32).
    pub loss: CudaSlice<f32>,
    /// Valid-row count (one i32), written when labels are given.
    pub valid_rows: CudaSlice<i32>,
}

impl LossBuffers {
    /// Allocates buffers for up to `rows` rows on `stream`.
    pub fn new(stream: &Arc<CudaStream>, rows: usize) -> Result<Self> {
        Ok(LossBuffers {
            row_losses: stream.alloc_zeros::<f32>(rows.max(1))?,
            loss: stream.alloc_zeros::<f32>(1)?,
            valid_rows: stream.alloc_zeros::<i32>(1)?,
        })
    }
}

/// Raw arguments of one fused call: device pointers (0 = absent).
/// The C ABI and the typed API both lower to this.
#[derive(Debug, Clone, Copy)]
pub struct RawFusedArgs {
    /// Dtype of student and teacher.
    pub dtype: Dtype,
    /// Dtype of the gradient: `dtype` or `F32`.
    pub grad_dtype: Dtype,
    /// Student logits.
    pub student: u64,
    /// Teacher logits.
    pub teacher: u64,
    /// Labels (i64, N), or 0.
    pub labels: u64,
    /// Gradient output, or 0 for loss only. May equal `student` (in place)
    /// when dtypes and strides match.
    pub grad: u64,
    /// Per-row losses (f32, N).
    pub row_losses: u64,
    /// Reduced loss (f32, 1).
    pub loss: u64,
    /// Valid-row count scratch (i32, 1); needed with labels.
    pub valid_rows: u64,
    /// Per-row weights (f32, N), or 0.
    pub row_weights: u64,
    /// ∂L/∂teacher output (the gradient's dtype, `grad_teacher_stride`), or
    /// 0. Needs `LossSpec::grad_teacher`. May equal `teacher` (in place)
    /// when dtypes and strides match.
    pub grad_teacher: u64,
    /// Shape and strides.
    pub layout: RowLayout,
}

/// Raw arguments of one top-k teacher call (docs/DESIGN.md §4): device pointers
/// (0 = absent). `layout.teacher_stride` is unused (indices and values are
/// dense `[N, k]`).
#[derive(Debug, Clone, Copy)]
pub struct RawTopkArgs {
    /// Dtype of the student and of the teacher's values.
    pub dtype: Dtype,
    /// Dtype of the gradient: `dtype` or `F32`.
    pub grad_dtype: Dtype,
    /// Student logits.
    pub student: u64,
    /// Teacher indices `[N, k]` (i32 or i64, see `indices_i64`).
    pub indices: u64,
    /// The indices are int64 (else int32).
    pub indices_i64: bool,
    /// Teacher values `[N, k]` (logits or log-probs, `dtype`).
    pub values: u64,
    /// Entries per row.
    pub k: usize,
    /// Labels (i64, N), or 0.
    pub labels: u64,
    /// Per-row weights (f32, N), or 0.
    pub row_weights: u64,
    /// Gradient output, or 0 for loss only; may equal `student` (in place).
    pub grad: u64,
    /// Per-row losses (f32, N).
    pub row_losses: u64,
    /// Reduced loss (f32, 1).
    pub loss: u64,
    /// Valid-row count scratch (i32, 1); needed with labels.
    pub valid_rows: u64,
    /// Shape and strides.
    pub layout: RowLayout,
}

/// One block of 1024 threads (the count and reduce kernels).
const ONE_BLOCK: LaunchConfig = LaunchConfig {
    grid_dim: (1, 1, 1),
    block_dim: (1024, 1, 1),
    shared_mem_bytes: 0,
};

/// Threads per block for a row of `cols` elements of `dtype`.
pub(crate) fn threads_for(cols: usize, dtype: Dtype) -> u32 {
    let vecs = cols / (16 / dtype.size());
    match vecs {
        v if v >= 1024 => 256,
        v if v >= 256 => 128,
        v if v >= 64 => 64,
        _ => 32,
    }
}

impl CudaBackend {
    /// Enqueues the fused loss (and gradient, when `raw.grad` ≠ 0) on `stream`.
    ///
    /// # Safety
    /// Every non-zero pointer must be valid device memory of this context,
    /// large enough for `raw.layout` (student/teacher/grad: (N−1)·stride + V
    /// elements; labels and row losses: N), and stay alive until the stream
    /// has run the work. Labels out of `[0, V)` (other than `ignore_index`)
    /// give NaN rows, never out-of-bounds reads.
    pub unsafe fn launch_raw(
        &self,
        stream: &CudaStream,
        raw: &RawFusedArgs,
        spec: &LossSpec,
    ) -> Result<()> {
        spec.validate(raw.labels != 0)?;
        raw.layout.validate()?;
        if raw.student == 0 || raw.teacher == 0 || raw.row_losses == 0 || raw.loss == 0 {
            return invalid(
                "pointers",
                "student, teacher, row_losses and loss must be non-null",
            );
        }
        check_outputs(
            raw.dtype,
            raw.grad_dtype,
            (raw.labels, raw.valid_rows),
            (raw.student, raw.grad),
            &raw.layout,
        )?;
        if raw.grad_teacher != 0 {
            if !spec.grad_teacher {
                return invalid(
                    "grad_teacher",
                    "a teacher-gradient buffer needs LossSpec::grad_teacher",
                );
            }
            if raw.layout.grad_teacher_stride < raw.layout.cols {
                return invalid(
                    "grad_teacher_stride",
                    format!(
                        "row stride {} is below V = {}",
                        raw.layout.grad_teacher_stride, raw.layout.cols
                    ),
                );
            }
            if raw.grad_teacher == raw.teacher
                && (raw.grad_dtype != raw.dtype
                    || raw.layout.grad_teacher_stride != raw.layout.teacher_stride)
            {
                return invalid(
                    "grad_teacher",
                    "an in-place teacher gradient needs the teacher's dtype and row stride",
                );
            }
        }
        let l = raw.layout;
        let p = KernelParams::new(spec, l.cols);
        let n = l.rows as i64;
        // SAFETY: the caller's contract (labels: N, valid_rows: 1).
        let valid_ptr =
            unsafe { self.count_valid_rows(stream, raw.labels, n, spec, raw.valid_rows) }?;
        if l.rows > 0 {
            let name = spec.dense_kernel_name(raw.dtype, raw.grad_dtype);
            let f = self.function(&name)?;
            let args = FusedArgs {
                student: raw.student,
                student_stride: l.student_stride as i64,
                teacher: raw.teacher,
                teacher_stride: l.teacher_stride as i64,
                labels: raw.labels,
                row_weights: raw.row_weights,
                grad: raw.grad,
                grad_stride: l.grad_stride as i64,
                grad_teacher: raw.grad_teacher,
                grad_teacher_stride: l.grad_teacher_stride as i64,
                row_loss: raw.row_losses,
                valid_count: valid_ptr,
                n_rows: n,
                params: p,
            };
            let mut b = stream.launch_builder(&f);
            b.arg(&args);
            b.launch(LaunchConfig {
                grid_dim: (l.rows.min(1 << 20) as u32, 1, 1),
                block_dim: (threads_for(l.cols, raw.dtype), 1, 1),
                shared_mem_bytes: 0,
            })?;
        }
        // SAFETY: the caller's contract (row_losses: N, loss: 1).
        unsafe { self.launch_reduce_loss(stream, raw.row_losses, n, valid_ptr, &p, raw.loss) }
    }

    /// Enqueues the loss (and gradient, when `raw.grad` ≠ 0) with a top-k
    /// teacher (docs/DESIGN.md §4, mode `spec.topk_mode`) on `stream`. Indices
    /// out of range or repeated within a row give NaN rows, never
    /// out-of-bounds accesses; [`CudaBackend::validate_topk_raw`] finds them.
    ///
    /// # Safety
    /// As [`CudaBackend::launch_raw`]; `indices` and `values` hold N·k
    /// elements.
    pub unsafe fn launch_topk_raw(
        &self,
        stream: &CudaStream,
        raw: &RawTopkArgs,
        spec: &LossSpec,
    ) -> Result<()> {
        spec.validate(raw.labels != 0)?;
        spec.validate_topk()?;
        let l = RowLayout {
            teacher_stride: l_cols(&raw.layout),
            grad_teacher_stride: l_cols(&raw.layout),
            ..raw.layout
        };
        l.validate()?;
        if raw.k == 0 || raw.k > l.cols {
            return invalid(
                "k",
                format!("must be in [1, V = {}], got {}", l.cols, raw.k),
            );
        }
        if raw.student == 0
            || raw.indices == 0
            || raw.values == 0
            || raw.row_losses == 0
            || raw.loss == 0
        {
            return invalid(
                "pointers",
                "student, indices, values, row_losses and loss must be non-null",
            );
        }
        check_outputs(
            raw.dtype,
            raw.grad_dtype,
            (raw.labels, raw.valid_rows),
            (raw.student, raw.grad),
            &l,
        )?;
        let mut p = KernelParams::new(spec, l.cols);
        p.topk_k = raw.k as i32;
        let n = l.rows as i64;
        // SAFETY: the caller's contract (labels: N, valid_rows: 1).
        let valid_ptr =
            unsafe { self.count_valid_rows(stream, raw.labels, n, spec, raw.valid_rows) }?;
        if l.rows > 0 {
            let name = format!(
                "kd_topk_{}_{}_{}",
                raw.dtype,
                raw.grad_dtype,
                if raw.indices_i64 { "i64" } else { "i32" }
            );
            let f = self.function(&name)?;
            let smem = self.bitmap_bytes(&f, l.cols)?;
            let args = TopkArgs {
                student: raw.student,
                student_stride: l.student_stride as i64,
                indices: raw.indices,
                values: raw.values,
                labels: raw.labels,
                row_weights: raw.row_weights,
                grad: raw.grad,
                grad_stride: l.grad_stride as i64,
                row_loss: raw.row_losses,
                valid_count: valid_ptr,
                n_rows: n,
                params: p,
            };
            let mut b = stream.launch_builder(&f);
            b.arg(&args);
            b.launch(LaunchConfig {
                grid_dim: (l.rows.min(1 << 20) as u32, 1, 1),
                block_dim: (threads_for(l.cols, raw.dtype), 1, 1),
                shared_mem_bytes: smem,
            })?;
        }
        // SAFETY: the caller's contract (row_losses: N, loss: 1).
        unsafe { self.launch_reduce_loss(stream, raw.row_losses, n, valid_ptr, &p, raw.loss) }
    }

    /// Bytes of the top-k kernels' V-bit map, raising the function's dynamic
    /// shared-memory limit when the map needs more than the default 48 KiB.
    fn bitmap_bytes(&self, f: &cudarc::driver::CudaFunction, cols: usize) -> Result<u32> {
        use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
        let bytes = cols.div_ceil(32) * 4;
        if bytes > 48 * 1024 {
            let max = self.context().attribute(
                CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )? as usize;
            // The kernels' static shared memory (block reductions) comes on top.
            if bytes + 4096 > max {
                return invalid(
                    "cols",
                    format!(
                        "a top-k teacher on this device supports V ≤ {} (a V-bit map in shared memory), got {cols}",
                        (max - 4096) * 8
                    ),
                );
            }
            f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )?;
        }
        Ok(bytes as u32)
    }

    /// The optional validation pass of a top-k teacher's indices on the
    /// device: waits for `stream`, then fails naming the first row with an
    /// index outside `[0, cols)` or repeated.
    ///
    /// # Safety
    /// `indices` is valid device memory of this context holding `rows · k`
    /// int32 (or int64 with `indices_i64`) values.
    pub unsafe fn validate_topk_raw(
        &self,
        stream: &CudaStream,
        indices: u64,
        indices_i64: bool,
        rows: usize,
        k: usize,
        cols: usize,
    ) -> Result<()> {
        if cols == 0 || cols > i32::MAX as usize {
            return invalid(
                "cols",
                format!("V must be in [1, {}], got {cols}", i32::MAX),
            );
        }
        if k == 0 || k > cols {
            return invalid("k", format!("must be in [1, V = {cols}], got {k}"));
        }
        if indices == 0 {
            return invalid("indices", "must be non-null");
        }
        if rows == 0 {
            return Ok(());
        }
        let name = if indices_i64 {
            "kd_topk_validate_i64"
        } else {
            "kd_topk_validate_i32"
        };
        let f = self.function(name)?;
        let smem = self.bitmap_bytes(&f, cols)?;
        let mut first = self.stream().clone_htod(&[rows as u64])?;
        self.stream().synchronize()?;
        {
            let (fp, _g) = first.device_ptr_mut(stream);
            let (n, k32, v32) = (rows as i64, k as i32, cols as i32);
            let mut b = stream.launch_builder(&f);
            b.arg(&indices).arg(&n).arg(&k32).arg(&v32).arg(&fp);
            // SAFETY: the caller's contract; the kernel reads rows · k indices.
            unsafe {
                b.launch(LaunchConfig {
                    grid_dim: (rows.min(1 << 16) as u32, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: smem,
                })
            }?;
        }
        stream.synchronize()?;
        let bad = self.stream().clone_dtoh(&first)?[0] as usize;
        if bad >= rows {
            return Ok(());
        }
        // The bad row's indices, for a message that says what is wrong.
        let width = if indices_i64 { 8 } else { 4 };
        let mut host = vec![0u8; k * width];
        // SAFETY: row `bad` < rows lies inside the caller's buffer.
        unsafe {
            cudarc::driver::result::memcpy_dtoh_sync(&mut host, indices + (bad * k * width) as u64)
        }?;
        let row: Vec<i64> = host
            .chunks_exact(width)
            .map(|c| {
                if indices_i64 {
                    i64::from_le_bytes(c.try_into().expect("8 bytes"))
                } else {
                    i32::from_le_bytes(c.try_into().expect("4 bytes")) as i64
                }
            })
            .collect();
        let msg = crate::tensor::first_bad_topk_row(&TopkIndices::I64(&row), 1, k, cols)
            .map_or_else(|| "invalid indices".to_string(), |(_, m)| m);
        invalid("teacher_topk_indices", format!("row {bad}: {msg}"))
    }

    /// With labels, enqueues the valid-row count into `valid_rows` and
    /// returns that pointer (the kernels' `valid_count`); without, 0.
    ///
    /// # Safety
    /// As [`CudaBackend::launch_count_valid`] when `labels` ≠ 0.
    unsafe fn count_valid_rows(
        &self,
        stream: &CudaStream,
        labels: u64,
        n: i64,
        spec: &LossSpec,
        valid_rows: u64,
    ) -> Result<u64> {
        if labels == 0 {
            return Ok(0);
        }
        // SAFETY: the caller's contract.
        unsafe { self.launch_count_valid(stream, labels, n, spec.ignore_index, valid_rows) }?;
        Ok(valid_rows)
    }

    /// Enqueues `kd_count_valid`: the rows of `labels` (N) that are not
    /// `ignore_index`, into `out` (one i32), on the device.
    ///
    /// # Safety
    /// Valid device pointers of this context: `labels` N i64, `out` one i32.
    pub(crate) unsafe fn launch_count_valid(
        &self,
        stream: &CudaStream,
        labels: u64,
        n: i64,
        ignore_index: i64,
        out: u64,
    ) -> Result<()> {
        let f = self.function("kd_count_valid")?;
        let mut b = stream.launch_builder(&f);
        b.arg(&labels).arg(&n).arg(&ignore_index).arg(&out);
        // SAFETY: the caller's contract.
        unsafe { b.launch(ONE_BLOCK) }?;
        Ok(())
    }

    /// Enqueues `kd_reduce_loss`: the reduced loss of `row_losses` (N) into
    /// `loss` (one f32), with the valid-row count at `valid` (0 = all rows).
    ///
    /// # Safety
    /// Valid device pointers of this context: `row_losses` N f32, `loss` one
    /// f32, `valid` one i32 or 0.
    pub(crate) unsafe fn launch_reduce_loss(
        &self,
        stream: &CudaStream,
        row_losses: u64,
        n: i64,
        valid: u64,
        p: &KernelParams,
        loss: u64,
    ) -> Result<()> {
        let f = self.function("kd_reduce_loss")?;
        let mut b = stream.launch_builder(&f);
        b.arg(&row_losses).arg(&n).arg(&valid).arg(p).arg(&loss);
        // SAFETY: the caller's contract.
        unsafe { b.launch(ONE_BLOCK) }?;
        Ok(())
    }

    /// Loss and gradient on device buffers, enqueued on `stream` (a stream of
    /// this backend's context); returns without waiting. `grad` = `None`
    /// computes the loss only. Results land in `out`.
    #[allow(clippy::too_many_arguments)]
    pub fn fused<T: KdElement, G: KdElement>(
        &self,
        stream: &CudaStream,
        student: &CudaView<'_, T>,
        teacher: &CudaView<'_, T>,
        labels: Option<&CudaView<'_, i64>>,
        grad: Option<&mut CudaViewMut<'_, G>>,
        layout: RowLayout,
        out: &mut LossBuffers,
        spec: &LossSpec,
    ) -> Result<()> {
        check_buffers(
            &layout,
            student.len(),
            teacher.len(),
            labels.map(|l| l.len()),
            out,
        )?;
        let (sp, _g1) = student.device_ptr(stream);
        let (tp, _g2) = teacher.device_ptr(stream);
        let (lp, _g3) = match labels {
            Some(l) => {
                let (p, g) = l.device_ptr(stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        let (gp, _g4) = match grad {
            Some(g) => {
                check_len("grad", g.len(), layout.needed(layout.grad_stride))?;
                let (p, guard) = g.device_ptr_mut(stream);
                (p, Some(guard))
            }
            None => (0, None),
        };
        let (rp, _g5) = out.row_losses.device_ptr_mut(stream);
        let (op, _g6) = out.loss.device_ptr_mut(stream);
        let (vp, _g7) = out.valid_rows.device_ptr_mut(stream);
        let raw = RawFusedArgs {
            dtype: T::DTYPE,
            grad_dtype: G::DTYPE,
            student: sp,
            teacher: tp,
            labels: lp,
            grad: gp,
            row_losses: rp,
            loss: op,
            valid_rows: vp,
            row_weights: 0,
            grad_teacher: 0,
            layout,
        };
        // SAFETY: lengths checked above; the guards keep the buffers' events
        // ordered with this stream.
        unsafe { self.launch_raw(stream, &raw, spec) }
    }

    /// As [`CudaBackend::fused`], with the gradient overwriting the student
    /// logits (same dtype, `grad_stride` = `student_stride`).
    #[allow(clippy::too_many_arguments)]
    pub fn fused_in_place<T: KdElement>(
        &self,
        stream: &CudaStream,
        student: &mut CudaViewMut<'_, T>,
        teacher: &CudaView<'_, T>,
        labels: Option<&CudaView<'_, i64>>,
        layout: RowLayout,
        out: &mut LossBuffers,
        spec: &LossSpec,
    ) -> Result<()> {
        let layout = RowLayout {
            grad_stride: layout.student_stride,
            ..layout
        };
        check_buffers(
            &layout,
            student.len(),
            teacher.len(),
            labels.map(|l| l.len()),
            out,
        )?;
        let (sp, _g1) = student.device_ptr_mut(stream);
        let (tp, _g2) = teacher.device_ptr(stream);
        let (lp, _g3) = match labels {
            Some(l) => {
                let (p, g) = l.device_ptr(stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        let (rp, _g5) = out.row_losses.device_ptr_mut(stream);
        let (op, _g6) = out.loss.device_ptr_mut(stream);
        let (vp, _g7) = out.valid_rows.device_ptr_mut(stream);
        let raw = RawFusedArgs {
            dtype: T::DTYPE,
            grad_dtype: T::DTYPE,
            student: sp,
            teacher: tp,
            labels: lp,
            grad: sp,
            row_losses: rp,
            loss: op,
            valid_rows: vp,
            row_weights: 0,
            grad_teacher: 0,
            layout,
        };
        // SAFETY: as in `fused`.
        unsafe { self.launch_raw(stream, &raw, spec) }
    }
}

/// Checks shared by the dense and the top-k launches: the gradient's dtype,
/// the valid-row scratch that labels need, and an in-place gradient's
/// dtype and stride (`ptrs`: student, gradient; `labels`: labels, scratch).
fn check_outputs(
    dtype: Dtype,
    grad_dtype: Dtype,
    labels: (u64, u64),
    ptrs: (u64, u64),
    layout: &RowLayout,
) -> Result<()> {
    if grad_dtype != dtype && grad_dtype != Dtype::F32 {
        return invalid(
            "grad_dtype",
            format!("must be {dtype} or f32, got {grad_dtype}"),
        );
    }
    if labels.0 != 0 && labels.1 == 0 {
        return invalid("valid_rows", "labels need the valid-row scratch buffer");
    }
    let (student, grad) = ptrs;
    if grad != 0
        && grad == student
        && (grad_dtype != dtype || layout.grad_stride != layout.student_stride)
    {
        return invalid(
            "grad",
            "an in-place gradient needs the student's dtype and row stride",
        );
    }
    Ok(())
}

/// V, as the stride of the top-k kernels' unused dense-teacher fields.
fn l_cols(l: &RowLayout) -> usize {
    l.cols
}

/// A device buffer of `have` elements holds the `need` a layout asks for.
pub(super) fn check_len(arg: &'static str, have: usize, need: usize) -> Result<()> {
    if have < need {
        return invalid(
            arg,
            format!("device buffer holds {have} elements, the layout needs {need}"),
        );
    }
    Ok(())
}

/// Checks the layout and that every buffer holds what it needs.
fn check_buffers(
    layout: &RowLayout,
    student_len: usize,
    teacher_len: usize,
    labels_len: Option<usize>,
    out: &LossBuffers,
) -> Result<()> {
    layout.validate()?;
    check_len("student", student_len, layout.needed(layout.student_stride))?;
    check_len("teacher", teacher_len, layout.needed(layout.teacher_stride))?;
    check_len("out.row_losses", out.row_losses.len(), layout.rows)?;
    if let Some(n) = labels_len {
        check_len("labels", n, layout.rows)?;
    }
    Ok(())
}
