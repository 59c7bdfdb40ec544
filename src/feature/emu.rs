//! Test support: kernels/feature.cu run on the CPU under the CUDA emulation
//! (kernels/emu/feature_emu.cpp). [`FeatureEmuBackend`] makes the launches of
//! the CUDA backend (the kernel with the same block size and dtypes, then
//! `kd_reduce_loss`) with every output poisoned, so the kernels' parallel code
//! is tested against the oracle on machines without a GPU. Slow; not for real
//! use.

use super::params::{self, FeatureArgs, FeatureParams};
use super::{validate, FeatureBackend, FeatureGrads, FeatureInputs, FeatureOutput, FeatureSpec};
use crate::error::{invalid, Result};
use crate::params::KernelParams;
use crate::tensor::Dtype;
use half::{bf16, f16};
use std::ffi::c_void;

extern "C" {
    fn kd_emu_feature_run(
        in_dtype: i32,
        out_dtype: i32,
        args: *const FeatureArgs,
        loss: *mut f32,
        rp: *const KernelParams,
        grid: u32,
        block: u32,
    ) -> i32;
}

/// The emulated CUDA feature backend (tests only).
#[derive(Debug, Clone, Copy, Default)]
pub struct FeatureEmuBackend {
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
    let u16s = || {
        bytes
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
    };
    match d {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::Bf16 => u16s().map(|b| bf16::from_bits(b).to_f32()).collect(),
        Dtype::F16 => u16s().map(|b| f16::from_bits(b).to_f32()).collect(),
    }
}

impl FeatureBackend for FeatureEmuBackend {
    fn name(&self) -> &'static str {
        "cuda-emulated"
    }

    fn feature_loss(
        &self,
        inputs: &FeatureInputs,
        spec: &FeatureSpec,
        grads: FeatureGrads,
    ) -> Result<FeatureOutput> {
        validate(inputs, spec)?;
        let layout = inputs.layout(spec.kind);
        let n = layout.rows;
        let (ls, lt) = (layout.student_len(), layout.teacher_len());
        let dtype = inputs.student.dtype();
        let out_dtype = grads.out_dtype(dtype);
        let p = FeatureParams::new(&layout, spec);
        let rp = params::reduce_params(spec, &layout);
        let grid = if self.grid > 0 {
            self.grid.min(params::grid(spec.kind, n))
        } else {
            n.clamp(1, 3) as u32
        };
        // Outputs poisoned with all bits set (NaN in every dtype); the
        // workspace too, so a read before its write shows.
        let mut gs = vec![
            0xffu8;
            if grads.student {
                n * ls * out_dtype.size()
            } else {
                0
            }
        ];
        let mut gt = vec![
            0xffu8;
            if grads.teacher {
                n * lt * out_dtype.size()
            } else {
                0
            }
        ];
        let mut work = vec![f32::NAN; (grid as usize * 2 * layout.width).max(1)];
        let mut row_loss = vec![f32::NAN; n.max(1)];
        let mut loss = f32::NAN;
        let ptr = |g: &mut Vec<u8>, want: bool| {
            if want {
                g.as_mut_ptr().cast::<c_void>()
            } else {
                std::ptr::null_mut()
            }
        };
        // SAFETY: every buffer holds what the launches touch (validated
        // layout, dense gradients, grid·2·S workspace floats).
        let rc = unsafe {
            let args = FeatureArgs {
                student: inputs.student.data.bytes().as_ptr() as u64,
                teacher: inputs.teacher.data.bytes().as_ptr() as u64,
                grad_student: ptr(&mut gs, grads.student) as u64,
                grad_teacher: ptr(&mut gt, grads.teacher) as u64,
                row_loss: row_loss.as_mut_ptr() as u64,
                workspace: work.as_mut_ptr() as u64,
                params: p,
            };
            kd_emu_feature_run(
                code(dtype),
                code(out_dtype),
                &args,
                &mut loss,
                &rp,
                grid,
                params::threads(spec.kind, p.cols as usize, dtype),
            )
        };
        if rc != 0 {
            return invalid("grads", "unsupported dtype pair");
        }
        row_loss.truncate(n);
        Ok(FeatureOutput {
            loss: loss as f64,
            row_losses: row_loss.into_iter().map(f64::from).collect(),
            grad_student: grads.student.then(|| to_f32(&gs, out_dtype)),
            grad_teacher: grads.teacher.then(|| to_f32(&gt, out_dtype)),
        })
    }
}
