//! Test support: kernels/kd_fused.cu run on the CPU under a CUDA emulation
//! (kernels/emu/cuda_emu.h: every CUDA thread a std::thread, real barriers and
//! warp shuffles). `EmuBackend` drives the same three launches as the CUDA
//! backend with the same block size, so the kernels' parallel code is tested
//! against the oracle on machines without a GPU, and plans the single-read
//! kernels (kernels/kd/kd_single.cu, thread-block clusters emulated) as the
//! CUDA backend does for the device it emulates. Each launch counts the bytes
//! its loss kernel loads and stores per buffer ([`ByteCounts`]), which the
//! tests hold to the byte model. `EagerEmuBackend` does the same for the
//! eager baseline of `kdfuse bench` (kernels/eager.cu). Slow; not for real
//! use.

use crate::cuda::threads_for;
use crate::driver::{Backend, Outputs};
use crate::error::{invalid, Result};
use crate::params::{FusedArgs, KernelParams, TopkArgs, TopkValidateArgs};
use crate::single_read::{plan, plan_staged, DeviceCaps, KernelChoice, KernelPlan, Staged};
use crate::spec::{LossSpec, Precision};
use crate::tensor::{Dtype, KdInputs, Logits, TopkIndices, TopkInputs};
use std::ffi::c_void;

/// The buffers whose bytes a launch counts, and the counts (KdEmuTrack in
/// kernels/emu/cuda_emu.h).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct EmuTrack {
    base: [u64; 4],
    len: [u64; 4],
    loaded: [u64; 5],
    stored: [u64; 5],
}

impl EmuTrack {
    /// Tracks the student, teacher, gradient and teacher-gradient buffers
    /// (an empty slice or a zero address: not tracked).
    fn new(bufs: [(u64, usize); 4]) -> Self {
        let mut t = EmuTrack::default();
        for (i, (base, len)) in bufs.into_iter().enumerate() {
            t.base[i] = base;
            t.len[i] = if base == 0 { 0 } else { len as u64 };
        }
        t
    }

    fn counts(&self) -> ByteCounts {
        ByteCounts {
            student_loaded: self.loaded[0],
            teacher_loaded: self.loaded[1],
            grad_stored: self.stored[2],
            grad_teacher_stored: self.stored[3],
            student_stored: self.stored[0],
            teacher_stored: self.stored[1],
            grad_loaded: self.loaded[2] + self.loaded[3],
            other_loaded: self.loaded[4],
            other_stored: self.stored[4],
        }
    }
}

/// Bytes the loss kernel of one emulated launch moved through its row loads
/// and stores (kernels/common/global.cuh), per buffer. The count and
/// reduction launches, and the per-row label, weight and loss accesses, are
/// not counted. For a top-k teacher, `teacher_loaded` counts the k values
/// and `other_loaded` the indices.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ByteCounts {
    /// Loaded from the student logits.
    pub student_loaded: u64,
    /// Loaded from the teacher logits (top-k: its values).
    pub teacher_loaded: u64,
    /// Stored to ∂L/∂s.
    pub grad_stored: u64,
    /// Stored to ∂L/∂t.
    pub grad_teacher_stored: u64,
    /// Stored over the student (none unless the gradient is in place: then
    /// the gradient's stores count here).
    pub student_stored: u64,
    /// Stored over the teacher (an in-place teacher gradient).
    pub teacher_stored: u64,
    /// Loaded from a gradient buffer (never, for a correct kernel).
    pub grad_loaded: u64,
    /// Loaded from anywhere else (top-k indices).
    pub other_loaded: u64,
    /// Stored anywhere else (never, for a correct kernel).
    pub other_stored: u64,
}

/// What an emulated dense launch ran and moved.
#[derive(Debug, Clone)]
pub struct EmuRun {
    /// The kernel planned (as the CUDA backend would on `EmuBackend::caps`).
    pub plan: KernelPlan,
    /// The loss kernel's bytes.
    pub bytes: ByteCounts,
}

extern "C" {
    pub(crate) fn kd_emu_run(
        div: i32,
        variant: i32,
        in_dtype: i32,
        out_dtype: i32,
        args: *const FusedArgs,
        loss: *mut f32,
        grid: u32,
        block: u32,
        track: *mut EmuTrack,
    ) -> i32;
    fn kd_emu_single_run(
        div: i32,
        variant: i32,
        in_dtype: i32,
        out_dtype: i32,
        args: *const FusedArgs,
        loss: *mut f32,
        clusters: u32,
        cluster: u32,
        block: u32,
        smem: u64,
        track: *mut EmuTrack,
        race: *mut u8,
        race_cap: u64,
    ) -> i32;
    pub(crate) fn kd_emu_topk_run(
        in_dtype: i32,
        out_dtype: i32,
        idx64: i32,
        args: *const TopkArgs,
        loss: *mut f32,
        grid: u32,
        block: u32,
        track: *mut EmuTrack,
    ) -> i32;
    fn kd_emu_single_topk_run(
        in_dtype: i32,
        out_dtype: i32,
        idx64: i32,
        args: *const TopkArgs,
        loss: *mut f32,
        clusters: u32,
        cluster: u32,
        block: u32,
        smem: u64,
        track: *mut EmuTrack,
        race: *mut u8,
        race_cap: u64,
    ) -> i32;
    fn kd_emu_cluster_probe(mode: i32, race: *mut u8, race_cap: u64) -> i32;
    fn kd_emu_topk_validate(a: *const TopkValidateArgs, idx64: i32, grid: u32, block: u32);
}

/// The top-k validation pass (`kd_topk_validate`) under the emulation: the
/// first row whose indices leave `[0, v)` or repeat, or `None`.
pub fn emu_validate_topk(indices: &TopkIndices<'_>, n: usize, k: usize, v: usize) -> Option<usize> {
    let (ptr, i64s) = match indices {
        TopkIndices::I32(i) => (i.as_ptr() as *const c_void, 0),
        TopkIndices::I64(i) => (i.as_ptr() as *const c_void, 1),
    };
    assert!(indices.len() >= n * k, "indices hold N·k entries");
    let mut first = n as u64;
    let args = TopkValidateArgs {
        indices: ptr as u64,
        n_rows: n as i64,
        k: k as i32,
        vocab: v as i32,
        first_bad: &mut first as *mut u64 as u64,
    };
    // SAFETY: N·k indices (checked above); the kernel guards every access
    // and writes `first`.
    unsafe { kd_emu_topk_validate(&args, i64s, n.clamp(1, 3) as u32, 64) };
    (first < n as u64).then_some(first as usize)
}

extern "C" {
    fn kd_emu_eager_run(
        div: i32,
        in_dtype: i32,
        out_dtype: i32,
        s: *const c_void,
        ss: i64,
        t: *const c_void,
        ts: i64,
        labels: *const i64,
        grad: *mut c_void,
        gs: i64,
        row_loss: *mut f32,
        valid: *mut i32,
        loss: *mut f32,
        n: i64,
        p: *const KernelParams,
        ls: *mut f32,
        lt: *mut f32,
        e: *mut f32,
        lm: *mut f32,
        ls1: *mut f32,
    ) -> i32;
}

/// The race checker's own test (`kd_emu_cluster_probe`): a cluster of four
/// CTAs exchanging values through distributed shared memory, `mode` 0
/// correctly, 1 loading before the cluster barrier, 2 storing again while
/// others may still load, 3 leaving without the last barrier. `Ok(None)`:
/// no race reported; `Ok(Some(what))`: the race reported; `Err`: a wrong
/// value was read and no race was reported.
pub fn cluster_race_probe(mode: i32) -> std::result::Result<Option<String>, String> {
    let mut msg = [0u8; 512];
    // SAFETY: `msg` holds 512 bytes.
    let rc = unsafe { kd_emu_cluster_probe(mode, msg.as_mut_ptr(), msg.len() as u64) };
    match rc {
        0 => Ok(None),
        1 => Ok(Some(c_message(&msg))),
        _ => Err("a wrong value was read and no race was reported".into()),
    }
}

/// An emulated single-read launch's shape: `grid` clusters of `cluster`
/// CTAs of `threads` threads, `smem` bytes of dynamic shared memory each.
#[derive(Debug, Clone, Copy)]
struct ClusterLaunch {
    grid: u32,
    cluster: u32,
    threads: u32,
    smem: u64,
}

/// The driver's call around one emulated launch that reports what ran.
fn drive_run(
    inputs: &impl crate::driver::CallInputs,
    spec: &LossSpec,
    grad: Option<crate::tensor::GradDtype>,
    launch: impl FnOnce(&mut Outputs) -> Result<EmuRun>,
) -> Result<(crate::driver::KdOutput, EmuRun)> {
    let mut run = None;
    let out = crate::driver::drive(inputs, spec, grad, |out| {
        run = Some(launch(out)?);
        Ok(())
    })?;
    let run = run.ok_or_else(|| crate::error::KdError::Cuda("nothing was launched".into()))?;
    Ok((out, run))
}

/// A launch's result, or the race the cluster emulation described in `race`.
fn race_or(result: Result<()>, race: &[u8]) -> Result<()> {
    match result {
        Err(e) => {
            let what = c_message(race);
            if what.is_empty() {
                return Err(e);
            }
            Err(crate::error::KdError::Cuda(format!(
                "the cluster emulation found a race: {what}"
            )))
        }
        ok => ok,
    }
}

fn c_message(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// The emulated CUDA backend (tests only).
#[derive(Debug, Clone, Copy)]
pub struct EmuBackend {
    /// Write the gradient over a copy of the student logits (in place), as
    /// `CudaBackend::fused_in_place` does; needs `GradDtype::Input`.
    pub in_place: bool,
    /// Blocks in the grid (rows are grid-strided over them); 0 = min(N, 3).
    /// Single-read: clusters in the grid.
    pub grid: u32,
    /// Which loss kernel to run, dense or top-k (planned as on `caps`). Default v1: the
    /// single-read kernels are tested on purpose (tests/kd/single_read.rs),
    /// the rest of the suite keeps v1 covered.
    pub kernel: KernelChoice,
    /// The device emulated for the plan (default: an sm_90 GPU). A small
    /// `smem_per_block` brings the cluster thresholds down to small V.
    pub caps: DeviceCaps,
    /// Threads per CTA of the single-read kernels (a multiple of 32, at most
    /// 256; 0: as v1 would take for the CTA's slice). Fewer than the GPU's
    /// 256 keeps the emulated thread count down.
    pub single_threads: u32,
}

impl Default for EmuBackend {
    fn default() -> Self {
        EmuBackend {
            in_place: false,
            grid: 0,
            kernel: KernelChoice::V1,
            caps: DeviceCaps::SM90,
            single_threads: 0,
        }
    }
}

/// What one emulated launch writes besides the gradients, poisoned: the row
/// losses, the valid-row count and the loss.
struct LaunchOutputs {
    row_loss: Vec<f32>,
    valid: i32,
    loss: f32,
}

impl LaunchOutputs {
    fn new(n: usize) -> Self {
        LaunchOutputs {
            row_loss: vec![f32::NAN; n.max(1)],
            valid: -1,
            loss: f32::NAN,
        }
    }

    /// Where the valid-row count goes: `valid` when there are labels, else
    /// none (the kernels then count every row).
    fn valid_addr(&mut self, labels: bool) -> u64 {
        if labels {
            &mut self.valid as *mut i32 as u64
        } else {
            0
        }
    }

    /// The results into `out`: the row losses, the kernels' reduced loss
    /// and, with labels, their valid-row count.
    fn finish(self, out: &mut Outputs, labels: bool) {
        let n = out.row_losses.len();
        for (dst, &x) in out.row_losses.iter_mut().zip(&self.row_loss[..n]) {
            *dst = f64::from(x);
        }
        out.loss = Some(self.loss as f64);
        if labels {
            out.valid_rows = self.valid.max(0) as usize;
        }
    }
}

impl EmuBackend {
    fn grid_for(&self, n: usize) -> u32 {
        if self.grid > 0 {
            self.grid
        } else {
            n.clamp(1, 3) as u32
        }
    }

    /// One emulated launch, dense or top-k: the student's gradient buffer
    /// and the outputs for `launch`, whose status must be 0, then its
    /// results into `out`.
    fn run(
        &self,
        student: &Logits<'_>,
        labels: bool,
        out: &mut Outputs,
        launch: impl FnOnce(&mut GradBuffers, &mut LaunchOutputs) -> i32,
    ) -> Result<()> {
        if self.in_place && out.grad_dtype != Some(student.dtype()) {
            return invalid("grad", "the in-place emulation needs GradDtype::Input");
        }
        let mut bufs = GradBuffers::new(student, self.in_place, out.grad_dtype);
        let mut outs = LaunchOutputs::new(student.rows);
        let rc = launch(&mut bufs, &mut outs);
        assert_ne!(rc, -1, "dtype pair and launch shape supported");
        if rc != 0 {
            return Err(crate::error::KdError::Cuda(format!(
                "the emulated launch reported status {rc}"
            )));
        }
        if let Some(g) = out.grad.as_mut() {
            bufs.write_grad(g, student.rows, student.cols);
        }
        outs.finish(out, labels);
        Ok(())
    }
}

/// The gradient's buffer of one emulated launch: poisoned (all bits set,
/// NaN in every dtype), or a copy of the student for an in-place run.
struct GradBuffers {
    in_place: bool,
    dtype: Dtype,
    buf: Vec<u8>,
    grad_stride: usize,
}

impl GradBuffers {
    fn new(student: &Logits<'_>, in_place: bool, grad: Option<Dtype>) -> Self {
        let (n, v) = (student.rows, student.cols);
        match grad {
            Some(dtype) if in_place => GradBuffers {
                in_place,
                dtype,
                buf: student.data.bytes().to_vec(),
                grad_stride: student.row_stride,
            },
            Some(dtype) => GradBuffers {
                in_place,
                dtype,
                buf: poisoned(n * v, dtype),
                grad_stride: v,
            },
            None => GradBuffers {
                in_place,
                dtype: Dtype::F32,
                buf: Vec::new(),
                grad_stride: v,
            },
        }
    }

    /// The student the launch reads: the copy when in place.
    fn student_ptr(&self, student: &Logits<'_>) -> *const c_void {
        if self.in_place {
            self.buf.as_ptr().cast()
        } else {
            student.data.bytes().as_ptr().cast()
        }
    }

    fn grad_ptr(&mut self) -> *mut c_void {
        if self.buf.is_empty() {
            std::ptr::null_mut()
        } else {
            self.buf.as_mut_ptr().cast()
        }
    }

    /// The gradient into `dst`, dense `[n, v]`.
    fn write_grad(&self, dst: &mut [f32], n: usize, v: usize) {
        let all = self.dtype.decode(&self.buf);
        for r in 0..n {
            dst[r * v..(r + 1) * v]
                .copy_from_slice(&all[r * self.grad_stride..r * self.grad_stride + v]);
        }
    }
}

/// A dense output buffer of `len` elements of `dtype` (at least one),
/// poisoned: all bits set, NaN in every dtype.
fn poisoned(len: usize, dtype: Dtype) -> Vec<u8> {
    vec![0xffu8; len.max(1) * dtype.size()]
}

/// The address of an optional host slice (0: none), as the launch contract
/// holds pointers.
fn addr<T>(x: Option<&[T]>) -> u64 {
    x.map_or(0, |x| x.as_ptr() as u64)
}

/// The pointer of a buffer when `want`, else null.
fn ptr_if(buf: &mut [u8], want: bool) -> *mut c_void {
    if want {
        buf.as_mut_ptr().cast()
    } else {
        std::ptr::null_mut()
    }
}

impl Backend for EmuBackend {
    fn name(&self) -> &'static str {
        "cuda-emulated"
    }

    fn topk(&self, inputs: &TopkInputs, spec: &LossSpec, out: &mut Outputs) -> Result<()> {
        self.topk_run(inputs, spec, out).map(|_| ())
    }

    fn dense(&self, inputs: &KdInputs, spec: &LossSpec, out: &mut Outputs) -> Result<()> {
        self.dense_run(inputs, spec, out).map(|_| ())
    }
}

impl EmuBackend {
    /// The plan for rows of `v` elements of `dtype` (as the CUDA backend
    /// makes it, on `self.caps`).
    pub fn plan(&self, v: usize, dtype: Dtype) -> Result<KernelPlan> {
        plan(self.kernel, &self.caps, v, dtype.size())
    }

    /// [`Backend::compute`], and what ran (see [`EmuBackend::dense_run`]).
    pub fn compute_run(
        &self,
        inputs: &KdInputs,
        spec: &LossSpec,
        grad: Option<crate::tensor::GradDtype>,
    ) -> Result<(crate::driver::KdOutput, EmuRun)> {
        drive_run(inputs, spec, grad, |out| self.dense_run(inputs, spec, out))
    }

    /// [`Backend::compute_topk`], and what ran (see [`EmuBackend::topk_run`]).
    pub fn compute_topk_run(
        &self,
        inputs: &TopkInputs,
        spec: &LossSpec,
        grad: Option<crate::tensor::GradDtype>,
    ) -> Result<(crate::driver::KdOutput, EmuRun)> {
        drive_run(inputs, spec, grad, |out| self.topk_run(inputs, spec, out))
    }

    /// [`Backend::topk`], and what ran: the kernel planned (v1 `kd_topk_*`
    /// or single-read `kd_single_topk_*`, on `self.caps`) and the bytes its
    /// loss kernel moved (`teacher_loaded`: the values, `other_loaded`: the
    /// indices). A race found by the cluster emulation is an error.
    pub fn topk_run(
        &self,
        inputs: &TopkInputs,
        spec: &LossSpec,
        out: &mut Outputs,
    ) -> Result<EmuRun> {
        let (n, v, k) = (inputs.student.rows, inputs.student.cols, inputs.teacher.k);
        let dtype = inputs.student.dtype();
        let out_dtype = out.grad_dtype.unwrap_or(Dtype::F32);
        let mut p = KernelParams::new(spec, v);
        p.topk_k = k as i32;
        let (ip, i64s) = match inputs.teacher.indices {
            TopkIndices::I32(i) => (i.as_ptr() as *const c_void, 0),
            TopkIndices::I64(i) => (i.as_ptr() as *const c_void, 1),
        };
        let plan = plan_staged(self.kernel, &self.caps, v, dtype.size(), Staged::Topk)?;
        let labels = inputs.labels.is_some();
        let mut track = EmuTrack::default();
        let mut race = [0u8; 512];
        let result = self.run(&inputs.student, labels, out, |bufs, outs| {
            let student = bufs.student_ptr(&inputs.student) as u64;
            let grad_len = bufs.buf.len();
            let grad = bufs.grad_ptr() as u64;
            let values = inputs.teacher.values.bytes();
            track = EmuTrack::new([
                (student, inputs.student.data.bytes().len()),
                (values.as_ptr() as u64, values.len()),
                (grad, grad_len),
                (0, 0),
            ]);
            let args = TopkArgs {
                student,
                student_stride: inputs.student.row_stride as i64,
                indices: ip as u64,
                values: values.as_ptr() as u64,
                labels: addr(inputs.labels),
                row_weights: addr(inputs.row_weights),
                grad,
                grad_stride: bufs.grad_stride as i64,
                row_loss: outs.row_loss.as_mut_ptr() as u64,
                valid_count: outs.valid_addr(labels),
                n_rows: n as i64,
                params: p,
            };
            let io = (dtype.code(), out_dtype.code());
            let loss: *mut f32 = &mut outs.loss;
            // SAFETY (both): every buffer holds what the launch reads or
            // writes (inputs validated, outputs sized for them); `race`
            // holds its length.
            self.launch(
                &plan,
                (n, v, dtype),
                &mut track,
                &mut race,
                |grid, block, track| unsafe {
                    kd_emu_topk_run(io.0, io.1, i64s, &args, loss, grid, block, track)
                },
                |l, track, race| unsafe {
                    kd_emu_single_topk_run(
                        io.0, io.1, i64s, &args, loss, l.grid, l.cluster, l.threads, l.smem, track,
                        race.0, race.1,
                    )
                },
            )
        });
        race_or(result, &race)?;
        Ok(EmuRun {
            plan,
            bytes: track.counts(),
        })
    }

    /// The launch `plan` says, for `n` rows of `v` elements of `dtype`:
    /// `v1(grid, block, track)` or `single(shape, track, (race, race_len))`,
    /// each returning the emulation's status.
    fn launch(
        &self,
        plan: &KernelPlan,
        (n, v, dtype): (usize, usize, Dtype),
        track: &mut EmuTrack,
        race: &mut [u8],
        v1: impl FnOnce(u32, u32, *mut EmuTrack) -> i32,
        single: impl FnOnce(ClusterLaunch, *mut EmuTrack, (*mut u8, u64)) -> i32,
    ) -> i32 {
        match *plan {
            KernelPlan::V1 { .. } => v1(self.grid_for(n), threads_for(v, dtype), track),
            KernelPlan::SingleRead {
                cluster,
                smem_bytes,
            } => {
                let threads = match self.single_threads {
                    0 => threads_for(v.div_ceil(cluster as usize), dtype),
                    t => t,
                };
                let l = ClusterLaunch {
                    grid: self.grid_for(n),
                    cluster,
                    threads,
                    smem: smem_bytes as u64,
                };
                single(l, track, (race.as_mut_ptr(), race.len() as u64))
            }
        }
    }

    /// [`Backend::dense`], and what ran: the kernel planned and the bytes
    /// its loss kernel moved. A race found by the cluster emulation is an
    /// error (`KdError::Cuda`, naming it).
    pub fn dense_run(
        &self,
        inputs: &KdInputs,
        spec: &LossSpec,
        out: &mut Outputs,
    ) -> Result<EmuRun> {
        let (n, v) = (inputs.student.rows, inputs.student.cols);
        let dtype = inputs.student.dtype();
        let out_dtype = out.grad_dtype.unwrap_or(Dtype::F32);
        let p = KernelParams::new(spec, v);
        let plan = self.plan(v, dtype)?;
        // The teacher gradient, poisoned like the student's.
        let want_gt = out.grad_teacher.is_some();
        let mut gt = if want_gt {
            poisoned(n * v, out_dtype)
        } else {
            Vec::new()
        };
        let labels = inputs.labels.is_some();
        let mut track = EmuTrack::default();
        let mut race = [0u8; 512];
        let result = self.run(&inputs.student, labels, out, |bufs, outs| {
            let student = bufs.student_ptr(&inputs.student) as u64;
            let grad_len = bufs.buf.len();
            let grad = bufs.grad_ptr() as u64;
            let gt_ptr = ptr_if(&mut gt, want_gt) as u64;
            let teacher = inputs.teacher.data.bytes();
            // In place, the student is the gradient's buffer: its stores
            // count as the student's.
            track = EmuTrack::new([
                (student, inputs.student.data.bytes().len()),
                (teacher.as_ptr() as u64, teacher.len()),
                (grad, grad_len),
                (gt_ptr, gt.len()),
            ]);
            let args = FusedArgs {
                student,
                student_stride: inputs.student.row_stride as i64,
                teacher: teacher.as_ptr() as u64,
                teacher_stride: inputs.teacher.row_stride as i64,
                labels: addr(inputs.labels),
                row_weights: addr(inputs.row_weights),
                grad,
                grad_stride: bufs.grad_stride as i64,
                grad_teacher: gt_ptr,
                grad_teacher_stride: v as i64,
                row_loss: outs.row_loss.as_mut_ptr() as u64,
                valid_count: outs.valid_addr(labels),
                n_rows: n as i64,
                params: p,
            };
            let div = spec.kernel_divergence().id();
            let variant = spec.kernel_variant();
            let io = (dtype.code(), out_dtype.code());
            let loss: *mut f32 = &mut outs.loss;
            // SAFETY (both): as in `topk_run`.
            self.launch(
                &plan,
                (n, v, dtype),
                &mut track,
                &mut race,
                |grid, block, track| unsafe {
                    kd_emu_run(div, variant, io.0, io.1, &args, loss, grid, block, track)
                },
                |l, track, race| unsafe {
                    kd_emu_single_run(
                        div, variant, io.0, io.1, &args, loss, l.grid, l.cluster, l.threads,
                        l.smem, track, race.0, race.1,
                    )
                },
            )
        });
        race_or(result, &race)?;
        if let Some(g) = out.grad_teacher.as_mut() {
            g.copy_from_slice(&out_dtype.decode(&gt)[..n * v]);
        }
        Ok(EmuRun {
            plan,
            bytes: track.counts(),
        })
    }
}

/// The eager baseline (kernels/eager.cu) under the emulation (tests only):
/// the launch sequence of `CudaBackend::eager_raw`, dense gradient.
#[derive(Debug, Clone, Copy, Default)]
pub struct EagerEmuBackend;

impl Backend for EagerEmuBackend {
    fn name(&self) -> &'static str {
        "eager-emulated"
    }

    fn precision(&self, _: &LossSpec) -> Precision {
        Precision::Exact
    }

    fn topk(&self, _: &TopkInputs, _: &LossSpec, _: &mut Outputs) -> Result<()> {
        invalid("teacher", "top-k teacher: not implemented yet")
    }

    fn dense(&self, inputs: &KdInputs, spec: &LossSpec, out: &mut Outputs) -> Result<()> {
        spec.validate_eager()?;
        if inputs.row_weights.is_some() {
            return invalid(
                "row_weights",
                "the eager baseline does not implement row weights",
            );
        }
        let (n, v) = (inputs.student.rows, inputs.student.cols);
        let dtype = inputs.student.dtype();
        let out_dtype = out.grad_dtype.unwrap_or(Dtype::F32);
        let p = KernelParams::new(spec, v);
        let scratch = || vec![f32::NAN; (n * v).max(1)];
        let (mut ls, mut lt, mut e, mut lm, mut ls1) =
            (scratch(), scratch(), scratch(), scratch(), scratch());
        let want_grad = out.grad.is_some();
        let mut g = if want_grad {
            poisoned(n * v, out_dtype)
        } else {
            Vec::new()
        };
        let mut outs = LaunchOutputs::new(n);
        // SAFETY: every buffer holds what the launch sequence touches.
        let rc = unsafe {
            kd_emu_eager_run(
                spec.kernel_divergence().id(),
                dtype.code(),
                out_dtype.code(),
                inputs.student.data.bytes().as_ptr().cast(),
                inputs.student.row_stride as i64,
                inputs.teacher.data.bytes().as_ptr().cast(),
                inputs.teacher.row_stride as i64,
                inputs.labels.map_or(std::ptr::null(), |l| l.as_ptr()),
                ptr_if(&mut g, want_grad),
                v as i64,
                outs.row_loss.as_mut_ptr(),
                &mut outs.valid,
                &mut outs.loss,
                n as i64,
                &p,
                ls.as_mut_ptr(),
                lt.as_mut_ptr(),
                e.as_mut_ptr(),
                lm.as_mut_ptr(),
                ls1.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return invalid("grad", "unsupported dtype pair");
        }
        if let Some(dst) = out.grad.as_mut() {
            dst.copy_from_slice(&out_dtype.decode(&g)[..n * v]);
        }
        outs.finish(out, inputs.labels.is_some());
        Ok(())
    }
}
