//! Test support: kernels/kd_fused.cu run on the CPU under a CUDA emulation
//! (kernels/emu/cuda_emu.h: every CUDA thread a std::thread, real barriers and
//! warp shuffles). `EmuBackend` drives the same three launches as the CUDA
//! backend with the same block size, so the kernels' parallel code is tested
//! against the oracle on machines without a GPU. `EagerEmuBackend` does the
//! same for the eager baseline of `kdfuse bench` (kernels/eager.cu). Slow; not
//! for real use.

use crate::backend::{validate, validate_topk, Backend, KdOutput};
use crate::cuda::threads_for;
use crate::error::{invalid, Result};
use crate::params::{FusedArgs, KernelParams, TopkArgs};
use crate::spec::LossSpec;
use crate::tensor::{Dtype, GradDtype, KdInputs, Logits, OwnedData, TopkIndices, TopkInputs};
use std::ffi::c_void;

extern "C" {
    fn kd_emu_run(
        div: i32,
        variant: i32,
        in_dtype: i32,
        out_dtype: i32,
        args: *const FusedArgs,
        loss: *mut f32,
        grid: u32,
        block: u32,
    ) -> i32;
    fn kd_emu_topk_run(
        in_dtype: i32,
        out_dtype: i32,
        idx64: i32,
        args: *const TopkArgs,
        loss: *mut f32,
        grid: u32,
        block: u32,
    ) -> i32;
    fn kd_emu_topk_validate(
        idx: *const c_void,
        idx64: i32,
        n: i64,
        k: i32,
        v: i32,
        grid: u32,
        block: u32,
    ) -> i64;
}

/// The top-k validation pass (`kd_topk_validate`) under the emulation: the
/// first row whose indices leave `[0, v)` or repeat, or `None`.
pub fn emu_validate_topk(indices: &TopkIndices<'_>, n: usize, k: usize, v: usize) -> Option<usize> {
    let (ptr, i64s) = match indices {
        TopkIndices::I32(i) => (i.as_ptr() as *const c_void, 0),
        TopkIndices::I64(i) => (i.as_ptr() as *const c_void, 1),
    };
    assert!(indices.len() >= n * k, "indices hold N·k entries");
    // SAFETY: N·k indices (checked above); the kernel guards every access.
    let first = unsafe {
        kd_emu_topk_validate(
            ptr,
            i64s,
            n as i64,
            k as i32,
            v as i32,
            n.clamp(1, 3) as u32,
            64,
        )
    };
    (first < n as i64).then_some(first as usize)
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

fn code(d: Dtype) -> i32 {
    match d {
        Dtype::F32 => 0,
        Dtype::Bf16 => 1,
        Dtype::F16 => 2,
    }
}

fn to_f32(bytes: &[u8], d: Dtype) -> Vec<f32> {
    let data = OwnedData::from_bytes(bytes, d);
    let view = data.view();
    (0..view.len()).map(|i| view.get(i)).collect()
}

/// The first `len` elements of a dense output buffer, as f32.
fn dense_f32(bytes: &[u8], d: Dtype, len: usize) -> Vec<f32> {
    let mut x = to_f32(bytes, d);
    x.truncate(len);
    x
}

/// The emulated launch's results as a [`KdOutput`] (`n` rows).
fn output(
    mut row_loss: Vec<f32>,
    loss: f32,
    valid: i32,
    with_labels: bool,
    n: usize,
    grad: Option<Vec<f32>>,
    grad_teacher: Option<Vec<f32>>,
) -> KdOutput {
    row_loss.truncate(n);
    KdOutput {
        loss: loss as f64,
        row_losses: row_loss.into_iter().map(f64::from).collect(),
        valid_rows: if with_labels {
            valid.max(0) as usize
        } else {
            n
        },
        grad,
        grad_teacher,
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
                buf: vec![0xffu8; (n * v).max(1) * dtype.size()],
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

    /// The gradient as dense `[n, v]` f32 values.
    fn grad_values(&self, n: usize, v: usize) -> Vec<f32> {
        let all = to_f32(&self.buf, self.dtype);
        (0..n)
            .flat_map(|r| all[r * self.grad_stride..r * self.grad_stride + v].to_vec())
            .collect()
    }
}

/// The address of an optional host slice (0: none), as the launch contract
/// holds pointers.
fn addr<T>(x: Option<&[T]>) -> u64 {
    x.map_or(0, |x| x.as_ptr() as u64)
}

/// Where the valid-row count goes: `valid` when there are labels, else none
/// (the kernels then count every row).
fn valid_addr(labels: bool, valid: &mut i32) -> u64 {
    if labels {
        valid as *mut i32 as u64
    } else {
        0
    }
}

impl Backend for EmuBackend {
    fn precision(&self, spec: &LossSpec) -> crate::spec::Precision {
        spec.kernel_precision()
    }

    fn name(&self) -> &'static str {
        "cuda-emulated"
    }

    fn compute_topk(
        &self,
        inputs: &TopkInputs,
        spec: &LossSpec,
        grad: Option<GradDtype>,
    ) -> Result<KdOutput> {
        validate_topk(inputs, spec)?;
        let (n, v, k) = (inputs.student.rows, inputs.student.cols, inputs.teacher.k);
        let dtype = inputs.student.dtype();
        let out_dtype = match grad {
            Some(GradDtype::Input) => dtype,
            _ => Dtype::F32,
        };
        if self.in_place && (out_dtype != dtype || grad.is_none()) {
            return invalid("grad", "the in-place emulation needs GradDtype::Input");
        }
        let mut p = KernelParams::new(spec, v);
        p.topk_k = k as i32;
        let mut bufs = GradBuffers::new(&inputs.student, self.in_place, grad.map(|_| out_dtype));
        let (ip, i64s) = match inputs.teacher.indices {
            TopkIndices::I32(i) => (i.as_ptr() as *const c_void, 0),
            TopkIndices::I64(i) => (i.as_ptr() as *const c_void, 1),
        };
        let mut row_loss = vec![f32::NAN; n.max(1)];
        let mut valid = -1i32;
        let mut loss = f32::NAN;
        // SAFETY: every buffer holds what the launch reads or writes (inputs
        // validated, outputs sized above).
        let rc = unsafe {
            let args = TopkArgs {
                student: bufs.student_ptr(&inputs.student) as u64,
                student_stride: inputs.student.row_stride as i64,
                indices: ip as u64,
                values: inputs.teacher.values.bytes().as_ptr() as u64,
                labels: addr(inputs.labels),
                row_weights: addr(inputs.row_weights),
                grad: bufs.grad_ptr() as u64,
                grad_stride: bufs.grad_stride as i64,
                row_loss: row_loss.as_mut_ptr() as u64,
                valid_count: valid_addr(inputs.labels.is_some(), &mut valid),
                n_rows: n as i64,
                params: p,
            };
            kd_emu_topk_run(
                code(dtype),
                code(out_dtype),
                i64s,
                &args,
                &mut loss,
                self.grid_for(n),
                crate::cuda::threads_for(v, dtype),
            )
        };
        assert_eq!(rc, 0, "dtype pair supported");
        let grad_out = grad.map(|_| bufs.grad_values(n, v));
        Ok(output(
            row_loss,
            loss,
            valid,
            inputs.labels.is_some(),
            n,
            grad_out,
            None,
        ))
    }

    fn compute(
        &self,
        inputs: &KdInputs,
        spec: &LossSpec,
        grad: Option<GradDtype>,
    ) -> Result<KdOutput> {
        validate(inputs, spec)?;
        let (n, v) = (inputs.student.rows, inputs.student.cols);
        let dtype = inputs.student.dtype();
        let out_dtype = match grad {
            Some(GradDtype::Input) => dtype,
            _ => Dtype::F32,
        };
        if self.in_place && (out_dtype != dtype || grad.is_none()) {
            return invalid("grad", "the in-place emulation needs GradDtype::Input");
        }
        let p = KernelParams::new(spec, v);
        let mut bufs = GradBuffers::new(&inputs.student, self.in_place, grad.map(|_| out_dtype));
        // The teacher gradient, poisoned like the student's.
        let want_gt = spec.grad_teacher && grad.is_some();
        let mut gt = vec![
            0xffu8;
            if want_gt {
                (n * v).max(1) * out_dtype.size()
            } else {
                0
            }
        ];
        let mut row_loss = vec![f32::NAN; n.max(1)];
        let mut valid = -1i32;
        let mut loss = f32::NAN;
        // SAFETY: every buffer holds what the launch reads or writes (inputs
        // validated, outputs sized above).
        let rc = unsafe {
            let args = FusedArgs {
                student: bufs.student_ptr(&inputs.student) as u64,
                student_stride: inputs.student.row_stride as i64,
                teacher: inputs.teacher.data.bytes().as_ptr() as u64,
                teacher_stride: inputs.teacher.row_stride as i64,
                labels: addr(inputs.labels),
                row_weights: addr(inputs.row_weights),
                grad: bufs.grad_ptr() as u64,
                grad_stride: bufs.grad_stride as i64,
                grad_teacher: if want_gt { gt.as_mut_ptr() as u64 } else { 0 },
                grad_teacher_stride: v as i64,
                row_loss: row_loss.as_mut_ptr() as u64,
                valid_count: valid_addr(inputs.labels.is_some(), &mut valid),
                n_rows: n as i64,
                params: p,
            };
            kd_emu_run(
                spec.kernel_divergence().id(),
                spec.kernel_variant(),
                code(dtype),
                code(out_dtype),
                &args,
                &mut loss,
                self.grid_for(n),
                threads_for(v, dtype),
            )
        };
        assert_eq!(rc, 0, "dtype pair supported");
        let grad_out = grad.map(|_| bufs.grad_values(n, v));
        let gt_out = want_gt.then(|| dense_f32(&gt, out_dtype, n * v));
        Ok(output(
            row_loss,
            loss,
            valid,
            inputs.labels.is_some(),
            n,
            grad_out,
            gt_out,
        ))
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

    fn compute_topk(
        &self,
        _inputs: &crate::tensor::TopkInputs,
        _spec: &LossSpec,
        _grad: Option<GradDtype>,
    ) -> Result<KdOutput> {
        crate::error::invalid("teacher", "top-k teacher: not implemented yet")
    }

    fn compute(
        &self,
        inputs: &KdInputs,
        spec: &LossSpec,
        grad: Option<GradDtype>,
    ) -> Result<KdOutput> {
        validate(inputs, spec)?;
        spec.validate_eager()?;
        if inputs.row_weights.is_some() {
            return invalid(
                "row_weights",
                "the eager baseline does not implement row weights",
            );
        }
        let (n, v) = (inputs.student.rows, inputs.student.cols);
        let dtype = inputs.student.dtype();
        let out_dtype = match grad {
            Some(GradDtype::Input) => dtype,
            _ => Dtype::F32,
        };
        let p = KernelParams::new(spec, v);
        let nv = (n * v).max(1);
        let scratch = || vec![f32::NAN; nv];
        let (mut ls, mut lt, mut e, mut lm, mut ls1) =
            (scratch(), scratch(), scratch(), scratch(), scratch());
        let mut g = vec![
            0xffu8;
            if grad.is_some() {
                nv * out_dtype.size()
            } else {
                0
            }
        ];
        let mut row_loss = vec![f32::NAN; n.max(1)];
        let mut valid = -1i32;
        let mut loss = f32::NAN;
        // SAFETY: every buffer holds what the launch sequence touches.
        let rc = unsafe {
            kd_emu_eager_run(
                spec.kernel_divergence().id(),
                code(dtype),
                code(out_dtype),
                inputs.student.data.bytes().as_ptr().cast(),
                inputs.student.row_stride as i64,
                inputs.teacher.data.bytes().as_ptr().cast(),
                inputs.teacher.row_stride as i64,
                inputs.labels.map_or(std::ptr::null(), |l| l.as_ptr()),
                if grad.is_some() {
                    g.as_mut_ptr().cast()
                } else {
                    std::ptr::null_mut()
                },
                v as i64,
                row_loss.as_mut_ptr(),
                &mut valid,
                &mut loss,
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
        let grad_out = grad.map(|_| dense_f32(&g, out_dtype, n * v));
        Ok(output(
            row_loss,
            loss,
            valid,
            inputs.labels.is_some(),
            n,
            grad_out,
            None,
        ))
    }
}
