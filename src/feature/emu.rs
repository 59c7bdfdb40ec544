//! Test support: kernels/feature.cu run on the CPU under the CUDA emulation
//! (kernels/emu/feature_emu.cpp). [`FeatureEmuBackend`] makes the launches of
//! the CUDA backend (the kernel with the same block size and dtypes, then
//! `kd_reduce_loss`) with every output poisoned, so the kernels' parallel code
//! is tested against the oracle on machines without a GPU. Slow; not for real
//! use.

use super::params::{self, FeatureArgs, FeatureParams};
use super::{FeatureBackend, FeatureInputs, FeatureSpec, Outputs};
use crate::error::{invalid, Result};
use crate::params::KernelParams;
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

impl FeatureBackend for FeatureEmuBackend {
    fn name(&self) -> &'static str {
        "cuda-emulated"
    }

    fn batch(&self, inputs: &FeatureInputs, spec: &FeatureSpec, out: &mut Outputs) -> Result<()> {
        let layout = inputs.layout(spec.kind);
        let n = layout.rows;
        let dtype = inputs.student.dtype();
        let out_dtype = out.grad_dtype;
        let p = FeatureParams::new(&layout, spec);
        let rp = params::reduce_params(spec, &layout);
        let grid = if self.grid > 0 {
            self.grid.min(params::grid(spec.kind, n))
        } else {
            n.clamp(1, 3) as u32
        };
        // Outputs poisoned with all bits set (NaN in every dtype); the
        // workspace too, so a read before its write shows.
        let poisoned =
            |g: &Option<Vec<f32>>| vec![0xffu8; g.as_ref().map_or(0, Vec::len) * out_dtype.size()];
        let mut gs = poisoned(&out.grad_student);
        let mut gt = poisoned(&out.grad_teacher);
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
                grad_student: ptr(&mut gs, out.grad_student.is_some()) as u64,
                grad_teacher: ptr(&mut gt, out.grad_teacher.is_some()) as u64,
                row_loss: row_loss.as_mut_ptr() as u64,
                workspace: work.as_mut_ptr() as u64,
                params: p,
            };
            kd_emu_feature_run(
                dtype.code(),
                out_dtype.code(),
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
        for (dst, x) in out.row_losses.iter_mut().zip(row_loss) {
            *dst = f64::from(x);
        }
        out.loss = Some(loss as f64);
        for (dst, src) in [
            (out.grad_student.as_mut(), gs),
            (out.grad_teacher.as_mut(), gt),
        ] {
            if let Some(dst) = dst {
                dst.copy_from_slice(&out_dtype.decode(&src));
            }
        }
        Ok(())
    }
}
