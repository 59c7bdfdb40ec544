//! Launching the fused kernels on device memory, asynchronously, on any
//! stream of the backend's context: no host synchronisation inside.
//!
//! Per call: `kd_count_valid` (only with labels: the valid-row count the
//! batchmean/mean weights need, kept on the device), one loss launch for the
//! whole batch, and `kd_reduce_loss` (the reduced loss, on the device).
//!
//! The dense loss launch is v1 (`kd_fused_*`, one CTA per row) or
//! single-read (`kd_single_*`, one thread-block cluster per row, launched
//! with `cuLaunchKernelEx`), as [`crate::single_read::plan`] and the
//! occupancy API decide when the loss is prepared ([`PreparedLoss::plan`]).

use super::kernels::{Io, Kernel, KernelTable};
use super::CudaBackend;
use crate::error::{invalid, Result};
use crate::params::{CountArgs, FusedArgs, KernelParams, ReduceArgs, TopkArgs, TopkValidateArgs};
use crate::single_read::{self, KernelChoice, KernelPlan, Staged};
use crate::spec::LossSpec;
use crate::tensor::{Dtype, TopkIndices};
use cudarc::driver::sys::{self, CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut,
    DeviceRepr, LaunchConfig, PushKernelArg,
};
use half::{bf16, f16};
use std::sync::{Arc, Mutex};

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
        check_cols(self.cols)?;
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

/// A loss launch prepared once for a spec, a dtype pair, a vocabulary V and
/// whether labels come: the spec validated, the kernel resolved, the
/// kernels' parameter block and the launch shape built. Each call then
/// fills in only what changes, its pointers and N
/// ([`CudaBackend::launch_prepared`], [`CudaBackend::launch_topk_prepared`],
/// [`CudaBackend::fused_prepared`]); `launch_raw`, `launch_topk_raw` and
/// `fused` prepare and launch in one. Made by [`CudaBackend::prepare`] (a
/// dense teacher) or [`CudaBackend::prepare_topk`]; a call whose dtypes, V,
/// labels or teacher kind differ from the prepared ones is an
/// `InvalidArgument`, as is a call on another device.
#[derive(Clone)]
pub struct PreparedLoss {
    spec: LossSpec,
    dtype: Dtype,
    grad_dtype: Dtype,
    cols: usize,
    labels: bool,
    /// `Some(indices are int64)` for a top-k teacher.
    topk: Option<bool>,
    params: KernelParams,
    kernel: CudaFunction,
    threads: u32,
    /// Dynamic shared memory of a launch (the top-k kernels' V-bit map, the
    /// single-read kernels' slice of the row).
    smem: u32,
    /// Which kernel runs and why (a top-k teacher: v1's top-k kernels).
    plan: KernelPlan,
    /// The backend's kernel choice it was planned under.
    choice: KernelChoice,
    /// The table of the context the kernel belongs to.
    table: Arc<KernelTable>,
}

impl std::fmt::Debug for PreparedLoss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedLoss")
            .field("spec", &self.spec)
            .field("dtype", &self.dtype)
            .field("grad_dtype", &self.grad_dtype)
            .field("cols", &self.cols)
            .field("labels", &self.labels)
            .field("topk", &self.topk)
            .field("plan", &self.plan)
            .finish()
    }
}

impl PreparedLoss {
    /// The spec it was prepared for.
    pub fn spec(&self) -> &LossSpec {
        &self.spec
    }

    /// The kernel its launches run: single-read (the cluster size and
    /// shared memory per CTA) or v1 and why; [`KernelPlan::describe`] says
    /// it in one line.
    pub fn plan(&self) -> &KernelPlan {
        &self.plan
    }

    /// Whether it was prepared for exactly these call parameters.
    pub(crate) fn is_for(
        &self,
        spec: &LossSpec,
        (dtype, grad_dtype): (Dtype, Dtype),
        cols: usize,
        labels: bool,
        topk: Option<bool>,
    ) -> bool {
        (
            self.dtype,
            self.grad_dtype,
            self.cols,
            self.labels,
            self.topk,
        ) == (dtype, grad_dtype, cols, labels, topk)
            && self.spec == *spec
    }

    fn check_call(
        &self,
        backend: &CudaBackend,
        dtypes: (Dtype, Dtype),
        cols: usize,
        labels: bool,
        topk: Option<bool>,
    ) -> Result<()> {
        if !Arc::ptr_eq(&self.table, &backend.kernels) {
            return invalid("prepared", "prepared on another device");
        }
        if !self.is_for(&self.spec, dtypes, cols, labels, topk) {
            let describe = |(d, g): (Dtype, Dtype), v: usize, l: bool, t: Option<bool>| {
                let teacher = match t {
                    None => "dense teacher",
                    Some(false) => "top-k teacher (int32)",
                    Some(true) => "top-k teacher (int64)",
                };
                let labels = if l { "with" } else { "without" };
                format!("{d} → {g}, V = {v}, {labels} labels, {teacher}")
            };
            return invalid(
                "prepared",
                format!(
                    "prepared for {}, called with {}",
                    describe(
                        (self.dtype, self.grad_dtype),
                        self.cols,
                        self.labels,
                        self.topk
                    ),
                    describe(dtypes, cols, labels, topk)
                ),
            );
        }
        Ok(())
    }
}

/// The losses a caller that repeats its calls (a training loop, the C
/// ABI's context) prepared, looked up by the call's parameters, the most
/// recent few kept.
#[derive(Default)]
pub(crate) struct PreparedCache(Mutex<Vec<Arc<PreparedLoss>>>);

impl PreparedCache {
    const KEEP: usize = 8;

    /// The loss prepared for these parameters on `backend` (`topk`: a top-k
    /// teacher, its indices int64), prepared now if none is kept.
    pub(crate) fn get(
        &self,
        backend: &CudaBackend,
        spec: &LossSpec,
        dtypes: (Dtype, Dtype),
        cols: usize,
        labels: bool,
        topk: Option<bool>,
    ) -> Result<Arc<PreparedLoss>> {
        let mut kept = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = kept.iter().find(|p| {
            p.is_for(spec, dtypes, cols, labels, topk)
                && p.choice == backend.kernel_choice
                && Arc::ptr_eq(&p.table, &backend.kernels)
        }) {
            return Ok(p.clone());
        }
        let p = Arc::new(match topk {
            None => backend.prepare(spec, dtypes, cols, labels)?,
            Some(i64) => backend.prepare_topk(spec, dtypes, cols, labels, i64)?,
        });
        if kept.len() == Self::KEEP {
            kept.remove(0);
        }
        kept.push(p.clone());
        Ok(p)
    }
}

/// The (input, gradient) dtype pair of a call, or the error naming
/// `grad_dtype`.
pub(crate) fn io(dtype: Dtype, grad_dtype: Dtype) -> Result<Io> {
    Io::new(dtype, grad_dtype).map_or_else(
        || {
            invalid(
                "grad_dtype",
                format!("must be {dtype} or f32, got {grad_dtype}"),
            )
        },
        Ok,
    )
}

/// Fails unless V fits the kernels' int32.
fn check_cols(cols: usize) -> Result<()> {
    if cols == 0 || cols > i32::MAX as usize {
        return invalid(
            "cols",
            format!("V must be in [1, {}], got {cols}", i32::MAX),
        );
    }
    Ok(())
}

impl CudaBackend {
    /// Prepares the fused loss of `spec` with a dense teacher for inputs of
    /// `dtype`, a gradient of `grad_dtype` (`dtype` or f32), rows of `cols`
    /// elements, with or without labels: see [`PreparedLoss`].
    pub fn prepare(
        &self,
        spec: &LossSpec,
        (dtype, grad_dtype): (Dtype, Dtype),
        cols: usize,
        labels: bool,
    ) -> Result<PreparedLoss> {
        spec.validate(labels)?;
        self.prepare_validated(spec, (dtype, grad_dtype), cols, labels, None)
    }

    /// The kernel a dense loss of `spec` would run for these dtypes and V
    /// under the backend's choice ([`PreparedLoss::plan`]), launching
    /// nothing; labels are assumed when `spec.alpha` > 0.
    pub fn plan_for(
        &self,
        spec: &LossSpec,
        dtypes: (Dtype, Dtype),
        cols: usize,
    ) -> Result<KernelPlan> {
        let p = self.prepare(spec, dtypes, cols, spec.alpha > 0.0)?;
        Ok(p.plan().clone())
    }

    /// As [`CudaBackend::plan_for`], for a top-k teacher (int64 indices).
    pub fn plan_topk_for(
        &self,
        spec: &LossSpec,
        dtypes: (Dtype, Dtype),
        cols: usize,
    ) -> Result<KernelPlan> {
        let p = self.prepare_topk(spec, dtypes, cols, spec.alpha > 0.0, true)?;
        Ok(p.plan().clone())
    }

    /// As [`CudaBackend::prepare`], for a top-k teacher whose indices are
    /// int64 (`indices_i64`) or int32.
    pub fn prepare_topk(
        &self,
        spec: &LossSpec,
        (dtype, grad_dtype): (Dtype, Dtype),
        cols: usize,
        labels: bool,
        indices_i64: bool,
    ) -> Result<PreparedLoss> {
        spec.validate(labels)?;
        spec.validate_topk()?;
        self.prepare_validated(spec, (dtype, grad_dtype), cols, labels, Some(indices_i64))
    }

    fn prepare_validated(
        &self,
        spec: &LossSpec,
        (dtype, grad_dtype): (Dtype, Dtype),
        cols: usize,
        labels: bool,
        topk: Option<bool>,
    ) -> Result<PreparedLoss> {
        check_cols(cols)?;
        let io = io(dtype, grad_dtype)?;
        let (kernel, plan) = match topk {
            None => self.plan_staged(
                (Kernel::fused(spec, io), Kernel::single(spec, io)),
                cols,
                dtype,
                Staged::Dense,
            )?,
            Some(indices_i64) => self.plan_staged(
                (
                    Kernel::Topk { io, indices_i64 },
                    Kernel::SingleTopk { io, indices_i64 },
                ),
                cols,
                dtype,
                Staged::Topk,
            )?,
        };
        let (threads, smem) = match (&plan, topk) {
            (KernelPlan::SingleRead { smem_bytes, .. }, _) => {
                (single_read::SINGLE_THREADS, smem_u32(*smem_bytes)?)
            }
            (KernelPlan::V1 { .. }, None) => (threads_for(cols, dtype), 0),
            (KernelPlan::V1 { .. }, Some(_)) => {
                (threads_for(cols, dtype), self.bitmap_bytes(cols)?)
            }
        };
        Ok(PreparedLoss {
            spec: spec.clone(),
            dtype,
            grad_dtype,
            cols,
            labels,
            topk,
            params: KernelParams::new(spec, cols),
            kernel,
            threads,
            smem,
            plan,
            choice: self.kernel_choice,
            table: self.kernels.clone(),
        })
    }

    /// The kernel of a loss and its plan, from its (v1, single-read)
    /// kernels: [`single_read::plan_staged`] on this device's caps under
    /// the backend's choice; a single-read plan then needs the
    /// `kd_single_*` kernel in the loaded module and a cluster the
    /// occupancy API says can be resident (the planned size, else the next
    /// larger ones), else v1 and why (an error when single-read is forced).
    fn plan_staged(
        &self,
        (v1_kernel, single_kernel): (Kernel, Kernel),
        cols: usize,
        dtype: Dtype,
        staged: Staged,
    ) -> Result<(CudaFunction, KernelPlan)> {
        let choice = self.kernel_choice;
        let v1 = |reason: String| -> Result<(CudaFunction, KernelPlan)> {
            if choice == KernelChoice::SingleRead {
                return invalid("kernel", format!("single-read cannot run here: {reason}"));
            }
            Ok((self.kernel(v1_kernel)?.clone(), KernelPlan::V1 { reason }))
        };
        let planned = single_read::plan_staged(choice, &self.caps, cols, dtype.size(), staged)?;
        let KernelPlan::SingleRead { cluster, .. } = planned else {
            return Ok((self.kernel(v1_kernel)?.clone(), planned));
        };
        let Ok(f) = self.kernel(single_kernel) else {
            return v1(
                "this GPU's module has no single-read kernels (built for sm_90 and later)".into(),
            );
        };
        let f = f.clone();
        let largest = self.caps.max_cluster.min(single_read::max_cluster());
        let mut why = format!(
            "no cluster of {cluster} to {largest} CTAs fits the {} KiB a CTA may use",
            self.caps.smem_per_block / 1024
        );
        for nc in cluster..=largest.max(cluster) {
            let smem_bytes = staged.smem_bytes(cols, dtype.size(), nc);
            if smem_bytes > self.caps.smem_per_block {
                continue;
            }
            match self.active_clusters(&f, nc, smem_bytes) {
                Ok(n) if n > 0 => {
                    return Ok((
                        f,
                        KernelPlan::SingleRead {
                            cluster: nc,
                            smem_bytes,
                        },
                    ))
                }
                Ok(_) => {
                    why = format!(
                    "no cluster of {nc} CTAs with {:.1} KiB of shared memory each can be resident",
                    smem_bytes as f64 / 1024.0
                )
                }
                Err(e) => why = format!("clusters of {nc} CTAs: {e}"),
            }
        }
        v1(why)
    }

    /// Sets `f`'s shared-memory and cluster-size attributes for clusters of
    /// `cluster` CTAs with `smem_bytes` each, and asks the occupancy API
    /// how many such clusters can be resident at once.
    fn active_clusters(&self, f: &CudaFunction, cluster: u32, smem_bytes: usize) -> Result<u32> {
        let smem = smem_u32(smem_bytes)?;
        self.ctx.bind_to_thread()?;
        allow_single(f, cluster, smem)?;
        let mut attr = cluster_attribute(cluster);
        let config = sys::CUlaunchConfig {
            gridDimX: cluster,
            gridDimY: 1,
            gridDimZ: 1,
            blockDimX: single_read::SINGLE_THREADS,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: smem,
            hStream: self.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: 1,
        };
        let mut clusters = 0i32;
        // SAFETY: `config` and its one attribute live across the call; the
        // function belongs to this (bound) context; writes one int.
        unsafe { sys::cuOccupancyMaxActiveClusters(&mut clusters, f.cu_function(), &config) }
            .result()?;
        Ok(clusters.max(0) as u32)
    }

    /// Enqueues the fused loss (and gradient, when `raw.grad` ≠ 0) on `stream`:
    /// [`CudaBackend::prepare`], then [`CudaBackend::launch_prepared`].
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
        let prepared = self.prepare(
            spec,
            (raw.dtype, raw.grad_dtype),
            raw.layout.cols,
            raw.labels != 0,
        )?;
        // SAFETY: the caller's contract.
        unsafe { self.launch_prepared(stream, &prepared, raw) }
    }

    /// Enqueues a prepared dense loss on `stream` with this call's pointers
    /// and layout.
    ///
    /// # Safety
    /// As [`CudaBackend::launch_raw`].
    pub unsafe fn launch_prepared(
        &self,
        stream: &CudaStream,
        prepared: &PreparedLoss,
        raw: &RawFusedArgs,
    ) -> Result<()> {
        let l = raw.layout;
        prepared.check_call(
            self,
            (raw.dtype, raw.grad_dtype),
            l.cols,
            raw.labels != 0,
            None,
        )?;
        l.validate()?;
        if raw.student == 0 || raw.teacher == 0 || raw.row_losses == 0 || raw.loss == 0 {
            return invalid(
                "pointers",
                "student, teacher, row_losses and loss must be non-null",
            );
        }
        check_outputs(
            prepared,
            (raw.labels, raw.valid_rows),
            (raw.student, raw.grad),
            &l,
        )?;
        if raw.grad_teacher != 0 {
            if !prepared.spec.grad_teacher {
                return invalid(
                    "grad_teacher",
                    "a teacher-gradient buffer needs LossSpec::grad_teacher",
                );
            }
            if l.grad_teacher_stride < l.cols {
                return invalid(
                    "grad_teacher_stride",
                    format!(
                        "row stride {} is below V = {}",
                        l.grad_teacher_stride, l.cols
                    ),
                );
            }
            if raw.grad_teacher == raw.teacher
                && (raw.grad_dtype != raw.dtype || l.grad_teacher_stride != l.teacher_stride)
            {
                return invalid(
                    "grad_teacher",
                    "an in-place teacher gradient needs the teacher's dtype and row stride",
                );
            }
        }
        let outputs = (raw.row_losses, raw.loss);
        // SAFETY: the caller's contract.
        unsafe {
            self.enqueue(
                stream,
                prepared,
                &prepared.params,
                l.rows,
                (raw.labels, raw.valid_rows),
                outputs,
                |valid_count| FusedArgs {
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
                    valid_count,
                    n_rows: l.rows as i64,
                    params: prepared.params,
                },
            )
        }
    }

    /// Enqueues the loss (and gradient, when `raw.grad` ≠ 0) with a top-k
    /// teacher (docs/DESIGN.md §4, mode `spec.topk_mode`) on `stream`:
    /// [`CudaBackend::prepare_topk`], then
    /// [`CudaBackend::launch_topk_prepared`]. Indices out of range or
    /// repeated within a row give NaN rows, never out-of-bounds accesses;
    /// [`CudaBackend::validate_topk_raw`] finds them.
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
        let prepared = self.prepare_topk(
            spec,
            (raw.dtype, raw.grad_dtype),
            raw.layout.cols,
            raw.labels != 0,
            raw.indices_i64,
        )?;
        // SAFETY: the caller's contract.
        unsafe { self.launch_topk_prepared(stream, &prepared, raw) }
    }

    /// Enqueues a prepared top-k loss on `stream` with this call's pointers,
    /// k and layout.
    ///
    /// # Safety
    /// As [`CudaBackend::launch_topk_raw`].
    pub unsafe fn launch_topk_prepared(
        &self,
        stream: &CudaStream,
        prepared: &PreparedLoss,
        raw: &RawTopkArgs,
    ) -> Result<()> {
        prepared.check_call(
            self,
            (raw.dtype, raw.grad_dtype),
            raw.layout.cols,
            raw.labels != 0,
            Some(raw.indices_i64),
        )?;
        // The dense-teacher strides are unused: V passes their checks.
        let l = RowLayout {
            teacher_stride: raw.layout.cols,
            grad_teacher_stride: raw.layout.cols,
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
            prepared,
            (raw.labels, raw.valid_rows),
            (raw.student, raw.grad),
            &l,
        )?;
        let params = KernelParams {
            topk_k: raw.k as i32,
            ..prepared.params
        };
        // SAFETY: the caller's contract.
        unsafe {
            self.enqueue(
                stream,
                prepared,
                &params,
                l.rows,
                (raw.labels, raw.valid_rows),
                (raw.row_losses, raw.loss),
                |valid_count| TopkArgs {
                    student: raw.student,
                    student_stride: l.student_stride as i64,
                    indices: raw.indices,
                    values: raw.values,
                    labels: raw.labels,
                    row_weights: raw.row_weights,
                    grad: raw.grad,
                    grad_stride: l.grad_stride as i64,
                    row_loss: raw.row_losses,
                    valid_count,
                    n_rows: l.rows as i64,
                    params,
                },
            )
        }
    }

    /// The launch sequence of a checked call: the valid-row count (with
    /// labels), the prepared kernel on `args(valid_count)` with one CTA per
    /// row (up to 2²⁰, grid-stride beyond), and the reduced loss.
    ///
    /// # Safety
    /// The pointers are valid for the call (as [`CudaBackend::launch_raw`]),
    /// and `args` builds the prepared kernel's argument struct.
    #[allow(clippy::too_many_arguments)]
    unsafe fn enqueue<A: DeviceRepr>(
        &self,
        stream: &CudaStream,
        prepared: &PreparedLoss,
        params: &KernelParams,
        rows: usize,
        (labels, valid_rows): (u64, u64),
        (row_losses, loss): (u64, u64),
        args: impl FnOnce(u64) -> A,
    ) -> Result<()> {
        let n = rows as i64;
        let ignore_index = prepared.spec.ignore_index;
        // SAFETY: the caller's contract (labels: N, valid_rows: 1).
        let valid_ptr =
            unsafe { self.count_valid_rows(stream, labels, n, ignore_index, valid_rows) }?;
        // SAFETY: the caller's contract; `args` matches the kernel.
        unsafe { self.launch_kernel(stream, prepared, rows, args(valid_ptr)) }?;
        // SAFETY: the caller's contract (row_losses: N, loss: 1).
        unsafe { self.launch_reduce_loss(stream, row_losses, n, valid_ptr, params, loss) }
    }

    /// Enqueues the prepared kernel alone (no count, no reduction) on
    /// `args`, one CTA per row (up to 2²⁰, grid-stride beyond); nothing
    /// for 0 rows. The kernel reads its reduction weight from
    /// `*valid_count` (the fused linear path points every chunk at the
    /// batch's count).
    ///
    /// # Safety
    /// `args` is the prepared kernel's argument struct, its pointers valid
    /// for `rows` rows (as [`CudaBackend::launch_raw`]).
    pub(crate) unsafe fn launch_kernel<A: DeviceRepr>(
        &self,
        stream: &CudaStream,
        prepared: &PreparedLoss,
        rows: usize,
        args: A,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        if !Arc::ptr_eq(&prepared.table, &self.kernels) {
            return invalid("prepared", "prepared on another device");
        }
        if let KernelPlan::SingleRead { cluster, .. } = prepared.plan {
            // SAFETY: the caller's contract.
            return unsafe { self.launch_single(stream, prepared, cluster, rows, args) };
        }
        // Per launch: a loss prepared since for a smaller V may have
        // lowered the kernel's limit.
        allow_smem(&prepared.kernel, prepared.smem)?;
        let mut b = stream.launch_builder(&prepared.kernel);
        b.arg(&args);
        // SAFETY: the caller's contract; `args` matches the kernel.
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (rows.min(1 << 20) as u32, 1, 1),
                block_dim: (prepared.threads, 1, 1),
                shared_mem_bytes: prepared.smem,
            })
        }?;
        Ok(())
    }

    /// A single-read launch: one cluster of `cluster` CTAs per row, at most
    /// 2²⁰ CTAs (rows grid-strided over the clusters), through
    /// `cuLaunchKernelEx` with the cluster dimension as a launch attribute.
    ///
    /// # Safety
    /// As [`CudaBackend::launch_kernel`]; `rows` > 0.
    unsafe fn launch_single<A: DeviceRepr>(
        &self,
        stream: &CudaStream,
        prepared: &PreparedLoss,
        cluster: u32,
        rows: usize,
        args: A,
    ) -> Result<()> {
        let f = &prepared.kernel;
        stream.context().bind_to_thread()?;
        // Per launch, as for v1: another loss may have changed the limits.
        allow_single(f, cluster, prepared.smem)?;
        let clusters = rows.min((1 << 20) / cluster as usize) as u32;
        let mut attr = cluster_attribute(cluster);
        let config = sys::CUlaunchConfig {
            gridDimX: clusters * cluster,
            gridDimY: 1,
            gridDimZ: 1,
            blockDimX: prepared.threads,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: prepared.smem,
            hStream: stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: 1,
        };
        let mut params = [(&args as *const A).cast_mut().cast::<std::ffi::c_void>()];
        // SAFETY: the caller's contract; `args` is the kernel's one
        // by-value parameter (the `KdFusedArgs` it was prepared for) and,
        // with `config` and its attribute, lives across the call, which
        // copies the parameters before it returns.
        unsafe {
            sys::cuLaunchKernelEx(
                &config,
                f.cu_function(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()?;
        Ok(())
    }

    /// Bytes of the top-k kernels' V-bit map, or the error when the
    /// device's shared memory cannot hold it.
    pub(crate) fn bitmap_bytes(&self, cols: usize) -> Result<u32> {
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
        check_cols(cols)?;
        if k == 0 || k > cols {
            return invalid("k", format!("must be in [1, V = {cols}], got {k}"));
        }
        if indices == 0 {
            return invalid("indices", "must be non-null");
        }
        if rows == 0 {
            return Ok(());
        }
        let f = self.kernel(Kernel::TopkValidate { indices_i64 })?;
        let smem = self.bitmap_bytes(cols)?;
        allow_smem(f, smem)?;
        let mut first = self.stream().clone_htod(&[rows as u64])?;
        self.stream().synchronize()?;
        {
            let (fp, _g) = first.device_ptr_mut(stream);
            let args = TopkValidateArgs {
                indices,
                n_rows: rows as i64,
                k: k as i32,
                vocab: cols as i32,
                first_bad: fp,
            };
            let mut b = stream.launch_builder(f);
            b.arg(&args);
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

    /// With labels, enqueues `kd_count_valid` (the rows of `labels` that
    /// are not `ignore_index`, into `valid_rows`, on the device) and returns
    /// that pointer (the kernels' `valid_count`); without, 0.
    ///
    /// # Safety
    /// When `labels` ≠ 0: valid device pointers of this context, `labels` N
    /// i64 and `valid_rows` one i32.
    pub(crate) unsafe fn count_valid_rows(
        &self,
        stream: &CudaStream,
        labels: u64,
        n: i64,
        ignore_index: i64,
        valid_rows: u64,
    ) -> Result<u64> {
        if labels == 0 {
            return Ok(0);
        }
        let args = CountArgs {
            labels,
            n_rows: n,
            ignore_index,
            out: valid_rows,
        };
        let mut b = stream.launch_builder(self.kernel(Kernel::CountValid)?);
        b.arg(&args);
        // SAFETY: the caller's contract.
        unsafe { b.launch(ONE_BLOCK) }?;
        Ok(valid_rows)
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
        let args = ReduceArgs {
            row_loss: row_losses,
            n_rows: n,
            valid_count: valid,
            out: loss,
            params: *p,
        };
        let mut b = stream.launch_builder(self.kernel(Kernel::ReduceLoss)?);
        b.arg(&args);
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
        let lens = (student.len(), teacher.len(), labels.map(|l| l.len()));
        check_buffers(&layout, lens, grad.as_ref().map(|g| g.len()), out)?;
        let prepared = self.prepare(spec, (T::DTYPE, G::DTYPE), layout.cols, labels.is_some())?;
        self.fused_checked(
            stream, &prepared, student, teacher, labels, grad, layout, out,
        )
    }

    /// As [`CudaBackend::fused`], with the loss prepared once
    /// ([`CudaBackend::prepare`] for `(T, G)`, `layout.cols` and whether
    /// labels are given): each call only passes its buffers.
    #[allow(clippy::too_many_arguments)]
    pub fn fused_prepared<T: KdElement, G: KdElement>(
        &self,
        stream: &CudaStream,
        prepared: &PreparedLoss,
        student: &CudaView<'_, T>,
        teacher: &CudaView<'_, T>,
        labels: Option<&CudaView<'_, i64>>,
        grad: Option<&mut CudaViewMut<'_, G>>,
        layout: RowLayout,
        out: &mut LossBuffers,
    ) -> Result<()> {
        let lens = (student.len(), teacher.len(), labels.map(|l| l.len()));
        check_buffers(&layout, lens, grad.as_ref().map(|g| g.len()), out)?;
        self.fused_checked(
            stream, prepared, student, teacher, labels, grad, layout, out,
        )
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
        let lens = (student.len(), teacher.len(), labels.map(|l| l.len()));
        check_buffers(&layout, lens, None, out)?;
        let prepared = self.prepare(spec, (T::DTYPE, T::DTYPE), layout.cols, labels.is_some())?;
        let (sp, _g1) = student.device_ptr_mut(stream);
        // SAFETY: as in `fused_checked`; the gradient is the student buffer.
        unsafe {
            self.fused_ptrs::<T, T>(stream, &prepared, (sp, sp), teacher, labels, layout, out)
        }
    }

    /// `fused` after the buffer checks.
    #[allow(clippy::too_many_arguments)]
    fn fused_checked<T: KdElement, G: KdElement>(
        &self,
        stream: &CudaStream,
        prepared: &PreparedLoss,
        student: &CudaView<'_, T>,
        teacher: &CudaView<'_, T>,
        labels: Option<&CudaView<'_, i64>>,
        grad: Option<&mut CudaViewMut<'_, G>>,
        layout: RowLayout,
        out: &mut LossBuffers,
    ) -> Result<()> {
        let (sp, _g1) = student.device_ptr(stream);
        let (gp, _g4) = grad.map(|g| g.device_ptr_mut(stream)).unzip();
        let ptrs = (sp, gp.unwrap_or(0));
        // SAFETY: lengths checked by the caller; the guards keep the
        // buffers' events ordered with this stream.
        unsafe { self.fused_ptrs::<T, G>(stream, prepared, ptrs, teacher, labels, layout, out) }
    }

    /// The typed calls' launch, from the student and gradient pointers.
    ///
    /// # Safety
    /// The buffers hold what `layout` needs, and the guards of the student
    /// and gradient pointers live until this returns.
    #[allow(clippy::too_many_arguments)]
    unsafe fn fused_ptrs<T: KdElement, G: KdElement>(
        &self,
        stream: &CudaStream,
        prepared: &PreparedLoss,
        (student, grad): (u64, u64),
        teacher: &CudaView<'_, T>,
        labels: Option<&CudaView<'_, i64>>,
        layout: RowLayout,
        out: &mut LossBuffers,
    ) -> Result<()> {
        let (tp, _g2) = teacher.device_ptr(stream);
        let (lp, _g3) = labels.map(|l| l.device_ptr(stream)).unzip();
        let (rp, _g5) = out.row_losses.device_ptr_mut(stream);
        let (op, _g6) = out.loss.device_ptr_mut(stream);
        let (vp, _g7) = out.valid_rows.device_ptr_mut(stream);
        let raw = RawFusedArgs {
            dtype: T::DTYPE,
            grad_dtype: G::DTYPE,
            student,
            teacher: tp,
            labels: lp.unwrap_or(0),
            grad,
            row_losses: rp,
            loss: op,
            valid_rows: vp,
            row_weights: 0,
            grad_teacher: 0,
            layout,
        };
        // SAFETY: the caller's contract.
        unsafe { self.launch_prepared(stream, prepared, &raw) }
    }
}

/// Checks shared by the dense and the top-k launches: the valid-row scratch
/// that labels need, and an in-place gradient's dtype and stride (`ptrs`:
/// student, gradient; `labels`: labels, scratch).
fn check_outputs(
    prepared: &PreparedLoss,
    labels: (u64, u64),
    ptrs: (u64, u64),
    layout: &RowLayout,
) -> Result<()> {
    if labels.0 != 0 && labels.1 == 0 {
        return invalid("valid_rows", "labels need the valid-row scratch buffer");
    }
    let (student, grad) = ptrs;
    if grad != 0
        && grad == student
        && (prepared.grad_dtype != prepared.dtype || layout.grad_stride != layout.student_stride)
    {
        return invalid(
            "grad",
            "an in-place gradient needs the student's dtype and row stride",
        );
    }
    Ok(())
}

/// Shared memory of a launch as the driver takes it.
fn smem_u32(bytes: usize) -> Result<u32> {
    u32::try_from(bytes).or_else(|_| {
        invalid(
            "cols",
            format!("{bytes} bytes of shared memory per CTA is beyond any device"),
        )
    })
}

/// The launch attribute of a 1-D cluster of `cluster` CTAs.
fn cluster_attribute(cluster: u32) -> sys::CUlaunchAttribute {
    // SAFETY: the value union is plain data; all zeros is valid.
    let mut value: sys::CUlaunchAttributeValue = unsafe { std::mem::zeroed() };
    value.clusterDim = sys::CUlaunchAttributeValue_union__bindgen_ty_1 {
        x: cluster,
        y: 1,
        z: 1,
    };
    sys::CUlaunchAttribute {
        id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION,
        pad: [0; 4],
        value,
    }
}

/// A single-read kernel's attributes for clusters of `cluster` CTAs with
/// `smem` bytes each: the dynamic shared-memory limit, and non-portable
/// cluster sizes above 8.
fn allow_single(f: &CudaFunction, cluster: u32, smem: u32) -> Result<()> {
    allow_smem(f, smem)?;
    if cluster > 8 {
        f.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED,
            1,
        )?;
    }
    Ok(())
}

/// Raises `f`'s dynamic shared-memory limit when a launch needs more than
/// the default 48 KiB.
pub(crate) fn allow_smem(f: &CudaFunction, bytes: u32) -> Result<()> {
    if bytes > 48 * 1024 {
        f.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            bytes as i32,
        )?;
    }
    Ok(())
}

/// A device buffer of `have` elements holds the `need` a layout asks for.
pub(crate) fn check_len(arg: &'static str, have: usize, need: usize) -> Result<()> {
    if have < need {
        return invalid(
            arg,
            format!("device buffer holds {have} elements, the layout needs {need}"),
        );
    }
    Ok(())
}

/// Checks the layout and that every buffer holds what it needs (`lens`:
/// student, teacher, labels).
fn check_buffers(
    layout: &RowLayout,
    (student_len, teacher_len, labels_len): (usize, usize, Option<usize>),
    grad_len: Option<usize>,
    out: &LossBuffers,
) -> Result<()> {
    layout.validate()?;
    check_len("student", student_len, layout.needed(layout.student_stride))?;
    check_len("teacher", teacher_len, layout.needed(layout.teacher_stride))?;
    check_len("out.row_losses", out.row_losses.len(), layout.rows)?;
    if let Some(n) = labels_len {
        check_len("labels", n, layout.rows)?;
    }
    if let Some(n) = grad_len {
        check_len("grad", n, layout.needed(layout.grad_stride))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_launch_attribute_is_one_dimensional() {
        let a = cluster_attribute(10);
        assert_eq!(
            a.id,
            sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
        );
        // SAFETY: the value was written as `clusterDim`.
        let d = unsafe { a.value.clusterDim };
        assert_eq!((d.x, d.y, d.z), (10, 1, 1));
        assert_eq!(smem_u32(53 * 1024).unwrap(), 53 * 1024);
        assert!(smem_u32(1 << 33).is_err());
    }
}
