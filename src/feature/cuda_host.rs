//! The host-array [`FeatureBackend`] on CUDA: upload, one feature call,
//! download. Outputs (row losses, loss, gradients) are poisoned (all bits
//! set: NaN in every dtype) before the launch, so an element the kernel
//! failed to write cannot pass as a value.

use super::cuda::FeatureBuffers;
use crate::cuda::{by_dtype, download, output, poison, upload, CudaBackend, ToF32};
use crate::error::Result;
use crate::feature::{FeatureBackend, FeatureInputs, FeatureSpec, Outputs};
use crate::tensor::{Dtype, HostData};
use half::{bf16, f16};

impl CudaBackend {
    fn run_feature<T: ToF32, G: ToF32>(
        &self,
        s: &[T],
        t: &[T],
        inputs: &FeatureInputs,
        spec: &FeatureSpec,
        out: &mut Outputs,
    ) -> Result<()> {
        let stream = &self.stream;
        let layout = inputs.layout(spec.kind);
        let n = layout.rows;
        let ds = upload(stream, s)?;
        let dt = upload(stream, t)?;
        let mut bufs = FeatureBuffers::new(stream, &layout, spec.kind)?;
        poison(stream, &mut bufs.row_losses)?;
        poison(stream, &mut bufs.loss)?;
        let mut gs = output::<G>(stream, out.grad_student.is_some(), n * layout.student_len())?;
        let mut gt = output::<G>(stream, out.grad_teacher.is_some(), n * layout.teacher_len())?;
        {
            let mut gs_view = gs.as_mut().map(|g| g.as_view_mut());
            let mut gt_view = gt.as_mut().map(|g| g.as_view_mut());
            self.feature(
                stream,
                &ds.as_view(),
                &dt.as_view(),
                gs_view.as_mut(),
                gt_view.as_mut(),
                layout,
                &mut bufs,
                spec,
            )?;
        }
        out.loss = Some(stream.clone_dtoh(&bufs.loss)?[0] as f64);
        let rows = stream.clone_dtoh(&bufs.row_losses)?;
        for (d, x) in out.row_losses.iter_mut().zip(rows) {
            *d = f64::from(x);
        }
        download(stream, gs, out.grad_student.as_mut())?;
        download(stream, gt, out.grad_teacher.as_mut())?;
        stream.synchronize()?;
        Ok(())
    }
}

impl FeatureBackend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn batch(&self, inputs: &FeatureInputs, spec: &FeatureSpec, out: &mut Outputs) -> Result<()> {
        let data = (inputs.student.data, inputs.teacher.data);
        let f32_grad = out.grad_dtype == Dtype::F32;
        by_dtype!(self.run_feature, data, f32_grad, inputs, spec, out)
    }
}
