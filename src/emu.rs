//! Test support: kernels/kd_fused.cu run on the CPU under a CUDA emulation
//! (kernels/emu/cuda_emu.h: every CUDA thread a std::thread, real barriers and
//! warp shuffles). `EmuBackend` drives the same three launches as the CUDA
//! backend with the same block size, so the kernels' parallel code is tested
//! against the oracle on machines without a GPU. `EagerEmuBackend` does the
//! same for the eager baseline of `kdfuse bench` (kernels/eager.cu). Slow; not
//! for real use.

use crate::cuda::threads_for;
use crate::driver::{Backend, Outputs};
use crate::error::{invalid, Result};
use crate::params::{FusedArgs, KernelParams, TopkArgs, TopkValidateArgs};
use crate::spec::{LossSpec, Precision};
use crate::tensor::{Dtype, KdInputs, Logits, TopkIndices, TopkInputs};
use std::ffi::c_void;

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
    ) -> i32;
    pub(crate) fn kd_emu_topk_run(
        in_dtype: i32,
        out_dtype: i32,
        idx64: i32,
        args: *const TopkArgs,
        loss: *mut f32,
        grid: u32,
        block: u32,
    ) -> i32;
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

/// The emulated CUDA backend (tests only).
#[derive(Debug, Clone, Copy, Default)]
pub struct EmuBackend {
    /// Write the gradient over a copy of the student logits (in place), as
    /// `CudaBackend::fused_in_place` does; needs `GradDtype::Input`.
    pub in_place: bool,
    /// Blocks in the grid (rows are grid-strided over them); 0 = min(N, 3).
    pub grid: u32,
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
        assert_eq!(rc, 0, "dtype pair supported");
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
        let (n, v, k) = (inputs.student.rows, inputs.student.cols, inputs.teacher.k);
        let dtype = inputs.student.dtype();
        let out_dtype = out.grad_dtype.unwrap_or(Dtype::F32);
        let mut p = KernelParams::new(spec, v);
        p.topk_k = k as i32;
        let (ip, i64s) = match inputs.teacher.indices {
            TopkIndices::I32(i) => (i.as_ptr() as *const c_void, 0),
            TopkIndices::I64(i) => (i.as_ptr() as *const c_void, 1),
        };
        let labels = inputs.labels.is_some();
        self.run(&inputs.student, labels, out, |bufs, outs| {
            let args = TopkArgs {
                student: bufs.student_ptr(&inputs.student) as u64,
                student_stride: inputs.student.row_stride as i64,
                indices: ip as u64,
                values: inputs.teacher.values.bytes().as_ptr() as u64,
                labels: addr(inputs.labels),
                row_weights: addr(inputs.row_weights),
                grad: bufs.grad_ptr() as u64,
                grad_stride: bufs.grad_stride as i64,
                row_loss: outs.row_loss.as_mut_ptr() as u64,
                valid_count: outs.valid_addr(labels),
                n_rows: n as i64,
                params: p,
            };
            // SAFETY: every buffer holds what the launch reads or writes
            // (inputs validated, outputs sized for them).
            unsafe {
                kd_emu_topk_run(
                    dtype.code(),
                    out_dtype.code(),
                    i64s,
                    &args,
                    &mut outs.loss,
                    self.grid_for(n),
                    threads_for(v, dtype),
                )
            }
        })
    }

    fn dense(&self, inputs: &KdInputs, spec: &LossSpec, out: &mut Outputs) -> Result<()> {
        let (n, v) = (inputs.student.rows, inputs.student.cols);
        let dtype = inputs.student.dtype();
        let out_dtype = out.grad_dtype.unwrap_or(Dtype::F32);
        let p = KernelParams::new(spec, v);
        // The teacher gradient, poisoned like the student's.
        let want_gt = out.grad_teacher.is_some();
        let mut gt = if want_gt {
            poisoned(n * v, out_dtype)
        } else {
            Vec::new()
        };
        let labels = inputs.labels.is_some();
        self.run(&inputs.student, labels, out, |bufs, outs| {
            let args = FusedArgs {
                student: bufs.student_ptr(&inputs.student) as u64,
                student_stride: inputs.student.row_stride as i64,
                teacher: inputs.teacher.data.bytes().as_ptr() as u64,
                teacher_stride: inputs.teacher.row_stride as i64,
                labels: addr(inputs.labels),
                row_weights: addr(inputs.row_weights),
                grad: bufs.grad_ptr() as u64,
                grad_stride: bufs.grad_stride as i64,
                grad_teacher: ptr_if(&mut gt, want_gt) as u64,
                grad_teacher_stride: v as i64,
                row_loss: outs.row_loss.as_mut_ptr() as u64,
                valid_count: outs.valid_addr(labels),
                n_rows: n as i64,
                params: p,
            };
            // SAFETY: every buffer holds what the launch reads or writes
            // (inputs validated, outputs sized for them).
            unsafe {
                kd_emu_run(
                    spec.kernel_divergence().id(),
                    spec.kernel_variant(),
                    dtype.code(),
                    out_dtype.code(),
                    &args,
                    &mut outs.loss,
                    self.grid_for(n),
                    threads_for(v, dtype),
                )
            }
        })?;
        if let Some(g) = out.grad_teacher.as_mut() {
            g.copy_from_slice(&out_dtype.decode(&gt)[..n * v]);
        }
        Ok(())
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
