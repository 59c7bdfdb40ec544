//! The host-array [`FeatureBackend`] on CUDA: upload, one feature call,
//! download. Outputs (row losses, loss, gradients) are poisoned (all bits
//! set: NaN in every dtype) before the launch, so an element the kernel
//! failed to write cannot pass as a value.

use super::feature::FeatureBuffers;
use super::host::{poison, upload, ToF32};
use super::launch::KdElement;
use super::CudaBackend;
use crate::error::Result;
use crate::feature::{
    validate, FeatureBackend, FeatureGrads, FeatureInputs, FeatureOutput, FeatureSpec,
};
use crate::tensor::{GradDtype, HostData};
use cudarc::driver::CudaSlice;
use half::{bf16, f16};

impl CudaBackend {
    fn run_feature<T: KdElement + Default + ToF32, G: KdElement + Default + ToF32>(
        &self,
        s: &[T],
        t: &[T],
        inputs: &FeatureInputs,
        spec: &FeatureSpec,
        grads: FeatureGrads,
    ) -> Result<FeatureOutput> {
        let stream = &self.stream;
        let layout = inputs.layout(spec.kind);
        let n = layout.rows;
        let (ls, lt) = (layout.student_len(), layout.teacher_len());
        let ds = upload(stream, s)?;
        let dt = upload(stream, t)?;
        let mut out = FeatureBuffers::new(stream, &layout, spec.kind)?;
        poison(stream, &mut out.row_losses)?;
        poison(stream, &mut out.loss)?;
        let alloc = |want: bool, len: usize| -> Result<Option<CudaSlice<G>>> {
            if !want {
                return Ok(None);
            }
            // SAFETY: poisoned right after, before any read.
            let mut g = unsafe { stream.alloc::<G>((n * len).max(1)) }?;
            poison(stream, &mut g)?;
            Ok(Some(g))
        };
        let mut gs = alloc(grads.student, ls)?;
        let mut gt = alloc(grads.teacher, lt)?;
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
                &mut out,
                spec,
            )?;
        }
        let loss = stream.clone_dtoh(&out.loss)?[0] as f64;
        let mut row_losses: Vec<f64> = stream
            .clone_dtoh(&out.row_losses)?
            .into_iter()
            .map(f64::from)
            .collect();
        row_losses.truncate(n);
        let download = |g: Option<CudaSlice<G>>, len: usize| -> Result<Option<Vec<f32>>> {
            let Some(g) = g else { return Ok(None) };
            let mut h: Vec<f32> = stream.clone_dtoh(&g)?.into_iter().map(ToF32::f).collect();
            h.truncate(n * len);
            Ok(Some(h))
        };
        let grad_student = download(gs, ls)?;
        let grad_teacher = download(gt, lt)?;
        stream.synchronize()?;
        Ok(FeatureOutput {
            loss,
            row_losses,
            grad_student,
            grad_teacher,
        })
    }
}

impl FeatureBackend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn feature_loss(
        &self,
        inputs: &FeatureInputs,
        spec: &FeatureSpec,
        grads: FeatureGrads,
    ) -> Result<FeatureOutput> {
        validate(inputs, spec)?;
        let f32_grad = grads.dtype == GradDtype::F32;
        let (a, b, g) = (inputs.student.data, inputs.teacher.data, grads);
        match (a, b) {
            (HostData::F32(s), HostData::F32(t)) => {
                self.run_feature::<f32, f32>(s, t, inputs, spec, g)
            }
            (HostData::Bf16(s), HostData::Bf16(t)) if f32_grad => {
                self.run_feature::<bf16, f32>(s, t, inputs, spec, g)
            }
            (HostData::Bf16(s), HostData::Bf16(t)) => {
                self.run_feature::<bf16, bf16>(s, t, inputs, spec, g)
            }
            (HostData::F16(s), HostData::F16(t)) if f32_grad => {
                self.run_feature::<f16, f32>(s, t, inputs, spec, g)
            }
            (HostData::F16(s), HostData::F16(t)) => {
                self.run_feature::<f16, f16>(s, t, inputs, spec, g)
            }
            _ => unreachable!("dtypes checked by validate"),
        }
    }
}
