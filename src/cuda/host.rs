//! The host-array [`Backend`] on CUDA: upload, one fused call, download.
//! Outputs are poisoned (all bits set: NaN in every dtype) before the launch,
//! so an element the kernel failed to write cannot pass as a value.

use super::launch::{KdElement, LossBuffers, RawFusedArgs, RawTopkArgs, RowLayout};
use super::CudaBackend;
use crate::driver::{Backend, Outputs};
use crate::error::Result;
use crate::spec::LossSpec;
use crate::tensor::{HostData, KdInputs, TopkIndices, TopkInputs};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtrMut, DeviceRepr};
use half::{bf16, f16};
use std::sync::Arc;

pub(crate) fn upload<T: DeviceRepr + Copy + Default>(
    stream: &Arc<CudaStream>,
    data: &[T],
) -> Result<CudaSlice<T>> {
    if data.is_empty() {
        return Ok(stream.clone_htod(&[T::default()])?);
    }
    Ok(stream.clone_htod(data)?)
}

pub(crate) fn poison<T>(stream: &Arc<CudaStream>, buf: &mut CudaSlice<T>) -> Result<()> {
    let bytes = buf.num_bytes();
    let (ptr, _guard) = buf.device_ptr_mut(stream);
    // SAFETY: `bytes` bytes of a live allocation, on its stream.
    unsafe { cudarc::driver::result::memset_d8_async(ptr, 0xff, bytes, stream.cu_stream()) }?;
    Ok(())
}

/// An element type of the host-array path: a kernel element, read back as
/// f32.
pub(crate) trait ToF32: KdElement + Default {
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

/// Device pointer of a buffer (the buffers live until the stream is synced).
fn ptr<T>(stream: &Arc<CudaStream>, buf: &mut CudaSlice<T>) -> u64 {
    buf.device_ptr_mut(stream).0
}

/// A poisoned output buffer of `len` elements, or none.
pub(crate) fn output<G: DeviceRepr>(
    stream: &Arc<CudaStream>,
    want: bool,
    len: usize,
) -> Result<Option<CudaSlice<G>>> {
    if !want {
        return Ok(None);
    }
    // SAFETY: poisoned right after, before any read.
    let mut g = unsafe { stream.alloc::<G>(len.max(1)) }?;
    poison(stream, &mut g)?;
    Ok(Some(g))
}

/// The first `dst.len()` elements of a device buffer into `dst`, as f32 values.
fn download_into<G: ToF32>(
    stream: &Arc<CudaStream>,
    buf: &CudaSlice<G>,
    dst: &mut [f32],
) -> Result<()> {
    for (d, x) in dst.iter_mut().zip(stream.clone_dtoh(buf)?) {
        *d = x.f();
    }
    Ok(())
}

/// A gradient buffer, when asked for, into the driver's output.
pub(crate) fn download<G: ToF32>(
    stream: &Arc<CudaStream>,
    buf: Option<CudaSlice<G>>,
    dst: Option<&mut Vec<f32>>,
) -> Result<()> {
    match (buf, dst) {
        (Some(buf), Some(dst)) => download_into(stream, &buf, dst),
        _ => Ok(()),
    }
}

/// What one host call uploads besides the logits.
struct Common {
    labels: Option<CudaSlice<i64>>,
    weights: Option<CudaSlice<f32>>,
    out: LossBuffers,
}

impl Common {
    fn new(
        stream: &Arc<CudaStream>,
        n: usize,
        labels: Option<&[i64]>,
        weights: Option<&[f32]>,
    ) -> Result<Self> {
        let mut out = LossBuffers::new(stream, n)?;
        poison(stream, &mut out.row_losses)?;
        poison(stream, &mut out.loss)?;
        Ok(Common {
            labels: labels.map(|l| upload(stream, l)).transpose()?,
            weights: weights.map(|w| upload(stream, w)).transpose()?,
            out,
        })
    }

    /// (labels, row weights, row losses, loss, valid rows) pointers.
    fn ptrs(&mut self, stream: &Arc<CudaStream>) -> (u64, u64, u64, u64, u64) {
        (
            self.labels.as_mut().map_or(0, |l| ptr(stream, l)),
            self.weights.as_mut().map_or(0, |w| ptr(stream, w)),
            ptr(stream, &mut self.out.row_losses),
            ptr(stream, &mut self.out.loss),
            ptr(stream, &mut self.out.valid_rows),
        )
    }

    /// The loss and row losses into `out`, after the stream ran the work.
    fn finish(self, stream: &Arc<CudaStream>, out: &mut Outputs) -> Result<()> {
        out.loss = Some(stream.clone_dtoh(&self.out.loss)?[0] as f64);
        let rows = stream.clone_dtoh(&self.out.row_losses)?;
        for (d, x) in out.row_losses.iter_mut().zip(rows) {
            *d = f64::from(x);
        }
        Ok(())
    }
}

impl CudaBackend {
    fn run<T: ToF32, G: ToF32>(
        &self,
        s: &[T],
        t: &[T],
        inputs: &KdInputs,
        spec: &LossSpec,
        out: &mut Outputs,
    ) -> Result<()> {
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
        let mut ds = upload(stream, s)?;
        let mut dt = upload(stream, t)?;
        let mut common = Common::new(stream, n, inputs.labels, inputs.row_weights)?;
        let mut dg = output::<G>(stream, out.grad.is_some(), n * v)?;
        let mut dgt = output::<G>(stream, out.grad_teacher.is_some(), n * v)?;
        let (labels, row_weights, row_losses, loss, valid_rows) = common.ptrs(stream);
        let raw = RawFusedArgs {
            dtype: T::DTYPE,
            grad_dtype: G::DTYPE,
            student: ptr(stream, &mut ds),
            teacher: ptr(stream, &mut dt),
            labels,
            grad: dg.as_mut().map_or(0, |g| ptr(stream, g)),
            row_losses,
            loss,
            valid_rows,
            row_weights,
            grad_teacher: dgt.as_mut().map_or(0, |g| ptr(stream, g)),
            layout,
        };
        // SAFETY: every buffer was sized for this layout above and lives
        // until the stream is synchronised below.
        unsafe { self.launch_raw(stream, &raw, spec) }?;
        common.finish(stream, out)?;
        download(stream, dg, out.grad.as_mut())?;
        download(stream, dgt, out.grad_teacher.as_mut())?;
        stream.synchronize()?;
        Ok(())
    }

    fn run_topk<T: ToF32, G: ToF32>(
        &self,
        s: &[T],
        vals: &[T],
        inputs: &TopkInputs,
        spec: &LossSpec,
        out: &mut Outputs,
    ) -> Result<()> {
        let stream = &self.stream;
        let (n, v, k) = (inputs.student.rows, inputs.student.cols, inputs.teacher.k);
        let layout = RowLayout {
            rows: n,
            cols: v,
            student_stride: inputs.student.row_stride,
            teacher_stride: v,
            grad_stride: v,
            grad_teacher_stride: v,
        };
        let mut ds = upload(stream, s)?;
        let mut dv = upload(stream, vals)?;
        let (mut di32, mut di64) = match inputs.teacher.indices {
            TopkIndices::I32(i) => (Some(upload(stream, i)?), None),
            TopkIndices::I64(i) => (None, Some(upload(stream, i)?)),
        };
        let indices = match (&mut di32, &mut di64) {
            (Some(i), _) => ptr(stream, i),
            (_, Some(i)) => ptr(stream, i),
            _ => unreachable!("one index buffer"),
        };
        let mut common = Common::new(stream, n, inputs.labels, inputs.row_weights)?;
        let mut dg = output::<G>(stream, out.grad.is_some(), n * v)?;
        let (labels, row_weights, row_losses, loss, valid_rows) = common.ptrs(stream);
        let raw = RawTopkArgs {
            dtype: T::DTYPE,
            grad_dtype: G::DTYPE,
            student: ptr(stream, &mut ds),
            indices,
            indices_i64: di64.is_some(),
            values: ptr(stream, &mut dv),
            k,
            labels,
            row_weights,
            grad: dg.as_mut().map_or(0, |g| ptr(stream, g)),
            row_losses,
            loss,
            valid_rows,
            layout,
        };
        // SAFETY: as in `run`.
        unsafe { self.launch_topk_raw(stream, &raw, spec) }?;
        common.finish(stream, out)?;
        download(stream, dg, out.grad.as_mut())?;
        stream.synchronize()?;
        Ok(())
    }
}

/// Calls `$self.$run::<T, G>(s, t, $args…)` with `T` the element type of
/// the (validated, equal) input dtypes of `$data` (a pair of [`HostData`])
/// and `G` the gradient's: f32 when `$f32_grad`, else `T`.
macro_rules! by_dtype {
    ($self:ident . $run:ident, $data:expr, $f32_grad:expr, $($arg:expr),*) => {{
        let f32_grad = $f32_grad;
        match $data {
            (HostData::F32(s), HostData::F32(t)) => $self.$run::<f32, f32>(s, t, $($arg),*),
            (HostData::Bf16(s), HostData::Bf16(t)) if f32_grad => {
                $self.$run::<bf16, f32>(s, t, $($arg),*)
            }
            (HostData::Bf16(s), HostData::Bf16(t)) => $self.$run::<bf16, bf16>(s, t, $($arg),*),
            (HostData::F16(s), HostData::F16(t)) if f32_grad => {
                $self.$run::<f16, f32>(s, t, $($arg),*)
            }
            (HostData::F16(s), HostData::F16(t)) => $self.$run::<f16, f16>(s, t, $($arg),*),
            _ => unreachable!("dtypes checked by validation"),
        }
    }};
}
pub(crate) use by_dtype;

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn topk(&self, inputs: &TopkInputs, spec: &LossSpec, out: &mut Outputs) -> Result<()> {
        let data = (inputs.student.data, inputs.teacher.values);
        let f32_grad = out.grad_dtype != Some(inputs.student.dtype());
        by_dtype!(self.run_topk, data, f32_grad, inputs, spec, out)
    }

    fn dense(&self, inputs: &KdInputs, spec: &LossSpec, out: &mut Outputs) -> Result<()> {
        let data = (inputs.student.data, inputs.teacher.data);
        let f32_grad = out.grad_dtype != Some(inputs.student.dtype());
        by_dtype!(self.run, data, f32_grad, inputs, spec, out)
    }
}
