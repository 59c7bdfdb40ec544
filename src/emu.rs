//! Test support: kernels/kd_fused.cu run on the CPU under a CUDA emulation
//! (kernels/emu/cuda_emu.h: every CUDA thread a std::thread, real barriers and
//! warp shuffles). `EmuBackend` drives the same three launches as the CUDA
//! backend with the same block size, so the kernels' parallel code is tested
//! against the oracle on machines without a GPU. `EagerEmuBackend` does the
//! same for the eager baseline of `kdfuse bench` (kernels/eager.cu). Slow; not
//! for real use.

use crate::backend::{validate, Backend, KdOutput};
use crate::cuda::threads_for;
use crate::error::{invalid, Result};
use crate::params::KernelParams;
use crate::spec::LossSpec;
use crate::tensor::{Dtype, GradDtype, KdInputs, OwnedData};
use std::ffi::c_void;

extern "C" {
    fn kd_emu_run(
        div: i32,
        in_dtype: i32,
        out_dtype: i32,
        s: *const c_void,
        ss: i64,
        t: *const c_void,
        ts: i64,
        labels: *const i64,
        ignore_index: i64,
        grad: *mut c_void,
        gs: i64,
        row_loss: *mut f32,
        valid: *mut i32,
        loss: *mut f32,
        n: i64,
        p: *const KernelParams,
        grid: u32,
        block: u32,
    ) -> i32;
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

/// The emulated launch's results as a [`KdOutput`] (`n` rows).
fn output(
    mut row_loss: Vec<f32>,
    loss: f32,
    valid: i32,
    with_labels: bool,
    n: usize,
    grad: Option<Vec<f32>>,
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
        grad_teacher: None,
    }
}

impl Backend for EmuBackend {
    fn name(&self) -> &'static str {
        "cuda-emulated"
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
        // Outputs poisoned with all bits set (NaN in every dtype).
        let mut student_copy: Vec<u8>;
        let (sptr, gptr, gs): (*const c_void, *mut c_void, usize);
        let mut g: Vec<u8> = Vec::new();
        if self.in_place {
            student_copy = inputs.student.data.bytes().to_vec();
            sptr = student_copy.as_ptr().cast();
            gptr = student_copy.as_mut_ptr().cast();
            gs = inputs.student.row_stride;
        } else {
            student_copy = Vec::new();
            sptr = inputs.student.data.bytes().as_ptr().cast();
            if grad.is_some() {
                g = vec![0xffu8; (n * v).max(1) * out_dtype.size()];
            }
            gptr = if grad.is_some() {
                g.as_mut_ptr().cast()
            } else {
                std::ptr::null_mut()
            };
            gs = v;
        }
        let mut row_loss = vec![f32::NAN; n.max(1)];
        let mut valid = -1i32;
        let mut loss = f32::NAN;
        let grid = if self.grid > 0 {
            self.grid
        } else {
            n.clamp(1, 3) as u32
        };
        let rc = unsafe {
            kd_emu_run(
                spec.kernel_divergence().id(),
                code(dtype),
                code(out_dtype),
                sptr,
                inputs.student.row_stride as i64,
                inputs.teacher.data.bytes().as_ptr().cast(),
                inputs.teacher.row_stride as i64,
                inputs.labels.map_or(std::ptr::null(), |l| l.as_ptr()),
                spec.ignore_index,
                gptr,
                gs as i64,
                row_loss.as_mut_ptr(),
                &mut valid,
                &mut loss,
                n as i64,
                &p,
                grid,
                threads_for(v, dtype),
            )
        };
        assert_eq!(rc, 0, "dtype pair supported");
        let grad_out = grad.map(|_| {
            if self.in_place {
                let all = to_f32(&student_copy, dtype);
                (0..n)
                    .flat_map(|r| all[r * gs..r * gs + v].to_vec())
                    .collect()
            } else {
                let mut x = to_f32(&g, out_dtype);
                x.truncate(n * v);
                x
            }
        });
        Ok(output(
            row_loss,
            loss,
            valid,
            inputs.labels.is_some(),
            n,
            grad_out,
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
        let grad_out = grad.map(|_| {
            let mut x = to_f32(&g, out_dtype);
            x.truncate(n * v);
            x
        });
        Ok(output(
            row_loss,
            loss,
            valid,
            inputs.labels.is_some(),
            n,
            grad_out,
        ))
    }
}
