//! Launching the feature kernels (kernels/feature.cu) on device memory,
//! asynchronously, on any stream of the backend's context: one
//! `kd_feat_{mse,cos,at}_<in>_<out>` launch for the batch, then
//! `kd_reduce_loss` (the reduced loss, on the device). No host
//! synchronisation inside.

use crate::cuda::{check_len, io, CudaBackend, KdElement, Kernel};
use crate::error::{invalid, Result};
use crate::feature::params::{self, FeatureArgs, FeatureParams};
use crate::feature::{FeatureKind, FeatureLayout, FeatureSpec};
use crate::tensor::Dtype;
use cudarc::driver::{
    CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, LaunchConfig,
    PushKernelArg, SyncOnDrop,
};
use std::sync::Arc;

/// Device outputs and scratch of one feature call, reusable across calls that
/// fit them.
pub struct FeatureBuffers {
    /// Per-row losses r_i (f32).
    pub row_losses: CudaSlice<f32>,
    /// The reduced loss (one f32).
    pub loss: CudaSlice<f32>,
    /// The attention kernel's workspace (f32, [`FeatureLayout::workspace_len`]).
    pub workspace: CudaSlice<f32>,
}

impl FeatureBuffers {
    /// Allocates buffers for `layout` and `kind` on `stream`.
    pub fn new(
        stream: &Arc<CudaStream>,
        layout: &FeatureLayout,
        kind: FeatureKind,
    ) -> Result<Self> {
        Ok(FeatureBuffers {
            row_losses: stream.alloc_zeros::<f32>(layout.rows.max(1))?,
            loss: stream.alloc_zeros::<f32>(1)?,
            workspace: stream.alloc_zeros::<f32>(layout.workspace_len(kind).max(1))?,
        })
    }
}

/// Raw arguments of one feature call: device pointers (0 = absent).
#[derive(Debug, Clone, Copy)]
pub struct RawFeatureArgs {
    /// Dtype of student and teacher.
    pub dtype: Dtype,
    /// Dtype of the gradients: `dtype` or `F32`.
    pub grad_dtype: Dtype,
    /// Student features.
    pub student: u64,
    /// Teacher features.
    pub teacher: u64,
    /// ∂L/∂student output, or 0.
    pub grad_student: u64,
    /// ∂L/∂teacher output, or 0.
    pub grad_teacher: u64,
    /// Per-row losses (f32, N).
    pub row_losses: u64,
    /// Reduced loss (f32, 1).
    pub loss: u64,
    /// Workspace (f32, `layout.workspace_len(kind)`); needed by attention.
    pub workspace: u64,
    /// Shape and strides.
    pub layout: FeatureLayout,
}

impl CudaBackend {
    /// Enqueues the feature loss of `spec.kind` (and the gradients whose
    /// pointers are non-zero) on `stream`.
    ///
    /// # Safety
    /// Every non-zero pointer must be valid device memory of this context,
    /// large enough for `raw.layout` (inputs and gradients: (N−1)·stride + row
    /// length elements; row losses N; workspace `workspace_len`), not
    /// overlapping the others, and stay alive until the stream has run the
    /// work.
    pub unsafe fn feature_raw(
        &self,
        stream: &CudaStream,
        raw: &RawFeatureArgs,
        spec: &FeatureSpec,
    ) -> Result<()> {
        spec.validate()?;
        let l = raw.layout;
        l.validate(spec.kind)?;
        let io = io(raw.dtype, raw.grad_dtype)?;
        if raw.student == 0 || raw.teacher == 0 || raw.row_losses == 0 || raw.loss == 0 {
            return invalid(
                "pointers",
                "student, teacher, row_losses and loss must be non-null",
            );
        }
        if spec.kind == FeatureKind::Attention && raw.workspace == 0 {
            return invalid("workspace", "attention needs the workspace buffer");
        }
        let p = FeatureParams::new(&l, spec);
        let n = l.rows as i64;
        if l.rows > 0 {
            let f = self.kernel(Kernel::Feature {
                kind: spec.kind.id() as u8,
                io,
            })?;
            let args = FeatureArgs {
                student: raw.student,
                teacher: raw.teacher,
                grad_student: raw.grad_student,
                grad_teacher: raw.grad_teacher,
                row_loss: raw.row_losses,
                workspace: if spec.kind == FeatureKind::Attention {
                    raw.workspace
                } else {
                    0
                },
                params: p,
            };
            let mut b = stream.launch_builder(f);
            b.arg(&args);
            b.launch(LaunchConfig {
                grid_dim: (params::grid(spec.kind, l.rows), 1, 1),
                block_dim: (params::threads(spec.kind, p.cols as usize, raw.dtype), 1, 1),
                shared_mem_bytes: 0,
            })?;
        }
        let rp = params::reduce_params(spec, &l);
        // SAFETY: the caller's contract (row_losses: N, loss: 1).
        unsafe { self.launch_reduce_loss(stream, raw.row_losses, n, 0, &rp, raw.loss) }
    }

    /// The feature loss on device buffers, enqueued on `stream` (a stream of
    /// this backend's context); returns without waiting. A gradient is
    /// computed when its buffer is given. Results land in `out`.
    #[allow(clippy::too_many_arguments)]
    pub fn feature<T: KdElement, G: KdElement>(
        &self,
        stream: &CudaStream,
        student: &CudaView<'_, T>,
        teacher: &CudaView<'_, T>,
        grad_student: Option<&mut CudaViewMut<'_, G>>,
        grad_teacher: Option<&mut CudaViewMut<'_, G>>,
        layout: FeatureLayout,
        out: &mut FeatureBuffers,
        spec: &FeatureSpec,
    ) -> Result<()> {
        layout.validate(spec.kind)?;
        let l = &layout;
        check_len(
            "student",
            student.len(),
            l.needed(l.student_stride, l.student_len()),
        )?;
        check_len(
            "teacher",
            teacher.len(),
            l.needed(l.teacher_stride, l.teacher_len()),
        )?;
        check_len("out.row_losses", out.row_losses.len(), l.rows)?;
        check_len(
            "out.workspace",
            out.workspace.len(),
            l.workspace_len(spec.kind),
        )?;
        let (sp, _g1) = student.device_ptr(stream);
        let (tp, _g2) = teacher.device_ptr(stream);
        let student_grad = l.needed(l.grad_student_stride, l.student_len());
        let teacher_grad = l.needed(l.grad_teacher_stride, l.teacher_len());
        let (gsp, _g3) = grad_ptr(stream, grad_student, "grad_student", student_grad)?;
        let (gtp, _g4) = grad_ptr(stream, grad_teacher, "grad_teacher", teacher_grad)?;
        let (rp, _g5) = out.row_losses.device_ptr_mut(stream);
        let (op, _g6) = out.loss.device_ptr_mut(stream);
        let (wp, _g7) = out.workspace.device_ptr_mut(stream);
        let raw = RawFeatureArgs {
            dtype: T::DTYPE,
            grad_dtype: G::DTYPE,
            student: sp,
            teacher: tp,
            grad_student: gsp,
            grad_teacher: gtp,
            row_losses: rp,
            loss: op,
            workspace: wp,
            layout,
        };
        // SAFETY: lengths checked above; distinct buffers by Rust's borrows;
        // the guards keep the buffers' events ordered with this stream.
        unsafe { self.feature_raw(stream, &raw, spec) }
    }
}

/// An optional gradient buffer's device pointer (0: none) and its guard,
/// once it is checked to hold `needed` elements (`arg` names it).
fn grad_ptr<'a, G>(
    stream: &'a CudaStream,
    grad: Option<&'a mut CudaViewMut<'_, G>>,
    arg: &'static str,
    needed: usize,
) -> Result<(u64, Option<SyncOnDrop<'a>>)> {
    let Some(g) = grad else {
        return Ok((0, None));
    };
    check_len(arg, g.len(), needed)?;
    let (p, guard) = g.device_ptr_mut(stream);
    Ok((p, Some(guard)))
}

#[cfg(test)]
mod tests {
    use crate::cuda::FEATURE_KINDS;
    use crate::feature::FeatureKind;

    /// The kernel table names a feature kernel by `FeatureKind::id`.
    #[test]
    fn feature_kernel_ids_name_their_kernels() {
        for (kind, short) in [
            (FeatureKind::Mse, "mse"),
            (FeatureKind::Cosine, "cos"),
            (FeatureKind::Attention, "at"),
        ] {
            assert_eq!(FEATURE_KINDS[kind.id() as usize], short);
        }
    }
}
