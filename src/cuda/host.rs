//! The host-array [`Backend`] on CUDA: upload, one fused call, download.
//! Outputs are poisoned (all bits set: NaN in every dtype) before the launch,
//! so an element the kernel failed to write cannot pass as a value.

use super::launch::{KdElement, LossBuffers, RowLayout};
use super::CudaBackend;
use crate::backend::{validate, Backend, KdOutput};
use crate::error::Result;
use crate::spec::LossSpec;
use crate::tensor::{GradDtype, HostData, KdInputs};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtrMut, DeviceRepr};
use half::{bf16, f16};
use std::sync::Arc;

pub(super) fn upload<T: DeviceRepr + Copy + Default>(
    stream: &Arc<CudaStream>,
    data: &[T],
) -> Result<CudaSlice<T>> {
    if data.is_empty() {
        return Ok(stream.clone_htod(&[T::default()])?);
    }
    Ok(stream.clone_htod(data)?)
}

pub(super) fn poison<T>(stream: &Arc<CudaStream>, buf: &mut CudaSlice<T>) -> Result<()> {
    let bytes = buf.num_bytes();
    let (ptr, _guard) = buf.device_ptr_mut(stream);
    // SAFETY: `bytes` bytes of a live allocation, on its stream.
    unsafe { cudarc::driver::result::memset_d8_async(ptr, 0xff, bytes, stream.cu_stream()) }?;
    Ok(())
}

pub(super) trait ToF32: Copy {
    fn f(self) -> f32;
}
impl ToF32 for f32 {
    fn f(self) -> f32 {
        self
    }
}
impl ToF32 for bf16 {
    fn f(self) -> f32 {
        self.to_f32()
    }
}
impl ToF32 for f16 {
    fn f(self) -> f32 {
        self.to_f32()
    }
}

impl CudaBackend {
    fn run<T: KdElement + Default + ToF32, G: KdElement + Default + ToF32>(
        &self,
        s: &[T],
        t: &[T],
        inputs: &KdInputs,
        spec: &LossSpec,
        want_grad: bool,
    ) -> Result<KdOutput> {
        let stream = &self.stream;
        let (n, v) = (inputs.student.rows, inputs.student.cols);
        let layout = RowLayout {
            rows: n,
            cols: v,
            student_stride: inputs.student.row_stride,
            teacher_stride: inputs.teacher.row_stride,
            grad_stride: v,
            grad_teacher_stride: v,
        };
        let ds = upload(stream, s)?;
        let dt = upload(stream, t)?;
        let dl = match inputs.labels {
            Some(l) => Some(upload(stream, l)?),
            None => None,
        };
        let mut out = LossBuffers::new(stream, n)?;
        poison(stream, &mut out.row_losses)?;
        poison(stream, &mut out.loss)?;
        let mut dg: Option<CudaSlice<G>> = if want_grad {
            // SAFETY: poisoned right after, before any read.
            let mut g = unsafe { stream.alloc::<G>((n * v).max(1)) }?;
            poison(stream, &mut g)?;
            Some(g)
        } else {
            None
        };
        {
            let labels_view = dl.as_ref().map(|l| l.as_view());
            let mut grad_view = dg.as_mut().map(|g| g.as_view_mut());
            self.fused(
                stream,
                &ds.as_view(),
                &dt.as_view(),
                labels_view.as_ref(),
                grad_view.as_mut(),
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
        let grad = match dg {
            Some(g) => {
                let mut h: Vec<f32> = stream.clone_dtoh(&g)?.into_iter().map(ToF32::f).collect();
                h.truncate(n * v);
                Some(h)
            }
            None => None,
        };
        stream.synchronize()?;
        Ok(KdOutput {
            loss,
            row_losses,
            valid_rows: inputs.valid_rows(spec.ignore_index),
            grad,
            grad_teacher: None,
        })
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
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
        let want = grad.is_some();
        let f32_grad = grad != Some(GradDtype::Input);
        match (inputs.student.data, inputs.teacher.data) {
            (HostData::F32(s), HostData::F32(t)) => self.run::<f32, f32>(s, t, inputs, spec, want),
            (HostData::Bf16(s), HostData::Bf16(t)) if f32_grad => {
                self.run::<bf16, f32>(s, t, inputs, spec, want)
            }
            (HostData::Bf16(s), HostData::Bf16(t)) => {
                self.run::<bf16, bf16>(s, t, inputs, spec, want)
            }
            (HostData::F16(s), HostData::F16(t)) if f32_grad => {
                self.run::<f16, f32>(s, t, inputs, spec, want)
            }
            (HostData::F16(s), HostData::F16(t)) => self.run::<f16, f16>(s, t, inputs, spec, want),
            _ => unreachable!("dtypes checked by validate"),
        }
    }
}
