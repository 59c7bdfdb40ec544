//! The chunk loop on the host: GEMMs on the CPU, the loss on any backend.

use super::gemm;
use super::{
    chunk_rows, LinearGrads, LinearInputs, LinearOutput, LinearSpec, LinearTeacher, TeacherGrads,
};
use crate::driver::Backend;
use crate::error::Result;
use crate::spec::Reduction;
use crate::tensor::{
    valid_rows, Dtype, GradDtype, HostData, KdInputs, Logits, OwnedData, TopkIndices, TopkInputs,
    TopkTeacher,
};
use std::borrow::Cow;

/// The loss and gradients of `inputs` chunk by chunk: the logits by host
/// GEMMs, the loss and its logit gradient by `backend` (the CPU backend, the
/// oracle, the emulated kernels), the gradients folded into the hidden,
/// weight and bias gradients chunk by chunk.
///
/// Equals the loss of the materialised logits `hidden · Wᵀ + b` (rounded to
/// the operands' dtype, as a GEMM with a bf16 output rounds them) up to the
/// order of the fp32 sums. bf16/f16 heads are widened to f32 once per call
/// (V × H × 4 bytes; matrixmultiply multiplies f32).
pub fn compute(
    backend: &dyn Backend,
    inputs: &LinearInputs,
    spec: &LinearSpec,
) -> Result<LinearOutput> {
    let loss_spec = &spec.loss;
    loss_spec.validate(inputs.labels.is_some())?;
    if matches!(inputs.teacher, LinearTeacher::Topk(_)) {
        loss_spec.validate_topk()?;
    }
    inputs.validate(loss_spec.ignore_index)?;
    let chunk = chunk_rows(inputs, spec)?;
    let (n, v, dtype) = (inputs.rows(), inputs.vocab(), inputs.dtype());
    let valid = valid_rows(inputs.labels, n, loss_spec.ignore_index);
    // The whole batch's reduction weight, folded into every chunk's
    // gradient scale; the chunks sum.
    let weight = loss_spec.reduction.row_weight(valid, v);
    let mut chunk_spec = loss_spec.clone();
    if chunk_spec.reduction != Reduction::None {
        chunk_spec.reduction = Reduction::Sum;
    }
    chunk_spec.grad_scale *= weight;
    let grad = spec.grads.then_some(GradDtype::F32);
    let mutual = spec.grads && loss_spec.grad_teacher;

    let student = Head::new(
        &inputs.student.hidden.data,
        inputs.student.hidden.cols,
        v,
        &inputs.student.weight.data,
        inputs.student.bias,
    );
    let mut s_grads = spec.grads.then(|| student.zero_grads(n, v));
    let teacher = match inputs.teacher {
        LinearTeacher::Linear(t) => Some(Head::new(
            &t.hidden.data,
            t.hidden.cols,
            v,
            &t.weight.data,
            t.bias,
        )),
        _ => None,
    };
    let mut t_grads = match (&inputs.teacher, &teacher) {
        (LinearTeacher::Linear(t), Some(head)) if mutual => {
            Some(TeacherGrads::Linear(head.zero_grads(n, t.weight.rows)))
        }
        (LinearTeacher::Logits(_), _) if mutual => {
            Some(TeacherGrads::Logits(vec![f32::NAN; n * v]))
        }
        _ => None,
    };

    let mut row_losses = vec![f64::NAN; n];
    let mut s_buf = ChunkLogits::new(chunk, v, dtype);
    let mut t_buf = teacher.as_ref().map(|_| ChunkLogits::new(chunk, v, dtype));
    for r0 in (0..n).step_by(chunk) {
        let r1 = (r0 + chunk).min(n);
        let c = r1 - r0;
        let hs = student.hidden_rows(r0, r1);
        let s_logits = s_buf.compute(&student, &hs, c);
        let t_hidden = teacher.as_ref().map(|t| t.hidden_rows(r0, r1));
        let t_logits = match (&teacher, &mut t_buf, &t_hidden) {
            (Some(t), Some(buf), Some(th)) => Some(buf.compute(t, th, c)),
            _ => None,
        };
        let labels = inputs.labels.map(|l| &l[r0..r1]);
        let row_weights = inputs.row_weights.map(|w| &w[r0..r1]);
        let out = match inputs.teacher {
            LinearTeacher::Topk(t) => backend.compute_topk(
                &TopkInputs {
                    student: s_logits,
                    teacher: topk_rows(&t, r0, r1),
                    labels,
                    row_weights,
                },
                &chunk_spec,
                grad,
            )?,
            LinearTeacher::Logits(t) => backend.compute(
                &KdInputs {
                    student: s_logits,
                    teacher: Logits::strided(t.data.offset(r0 * t.row_stride), c, v, t.row_stride),
                    labels,
                    row_weights,
                },
                &chunk_spec,
                grad,
            )?,
            LinearTeacher::Linear(_) => backend.compute(
                &KdInputs {
                    student: s_logits,
                    teacher: t_logits.expect("teacher logits computed above"),
                    labels,
                    row_weights,
                },
                &chunk_spec,
                grad,
            )?,
        };
        row_losses[r0..r1].copy_from_slice(&out.row_losses);
        if let (Some(g), Some(acc)) = (out.grad.as_deref(), s_grads.as_mut()) {
            student.fold(g, c, &hs, r0, acc);
        }
        match (out.grad_teacher.as_deref(), t_grads.as_mut()) {
            (Some(g), Some(TeacherGrads::Linear(acc))) => {
                let (t, th) = (
                    teacher.as_ref().expect("linear teacher"),
                    t_hidden.as_ref().expect("linear teacher"),
                );
                t.fold(g, c, th, r0, acc);
            }
            (Some(g), Some(TeacherGrads::Logits(acc))) => acc[r0 * v..r1 * v].copy_from_slice(g),
            _ => {}
        }
    }
    Ok(LinearOutput {
        loss: weight * crate::sum(&row_losses),
        row_losses,
        valid_rows: valid,
        chunk_rows: chunk,
        student: s_grads,
        teacher: t_grads,
        device_peak_bytes: None,
    })
}

/// One head, its operands widened to f32: the head's first `v` rows (a
/// wider teacher head uses those) and their bias.
struct Head<'a> {
    hidden: HostData<'a>,
    h: usize,
    v: usize,
    weight: Cow<'a, [f32]>,
    bias: Option<Cow<'a, [f32]>>,
}

impl<'a> Head<'a> {
    fn new(
        hidden: &HostData<'a>,
        h: usize,
        v: usize,
        weight: &HostData<'a>,
        bias: Option<HostData<'a>>,
    ) -> Self {
        Head {
            hidden: *hidden,
            h,
            v,
            weight: gemm::widen(weight, 0, v * h),
            bias: bias.map(|b| gemm::widen(&b, 0, v)),
        }
    }

    /// Zeroed gradients for `n` rows and a head of `rows` rows.
    fn zero_grads(&self, n: usize, rows: usize) -> LinearGrads {
        LinearGrads {
            hidden: vec![0.0; n * self.h],
            weight: vec![0.0; rows * self.h],
            bias: self.bias.as_ref().map(|_| vec![0.0; rows]),
        }
    }

    /// Hidden rows `[r0, r1)` as f32.
    fn hidden_rows(&self, r0: usize, r1: usize) -> Cow<'a, [f32]> {
        gemm::widen(&self.hidden, r0 * self.h, (r1 - r0) * self.h)
    }

    /// Folds a chunk's logit gradient `g` (`[c, V]`, rows from `r0`) into
    /// the head's gradients.
    fn fold(&self, g: &[f32], c: usize, hidden: &[f32], r0: usize, acc: &mut LinearGrads) {
        let (h, v) = (self.h, self.v);
        gemm::grad_hidden(
            g,
            c,
            v,
            &self.weight,
            h,
            &mut acc.hidden[r0 * h..(r0 + c) * h],
        );
        gemm::grad_weight(g, c, v, hidden, h, &mut acc.weight[..v * h]);
        if let Some(b) = acc.bias.as_mut() {
            gemm::grad_bias(g, c, v, &mut b[..v]);
        }
    }
}

/// The reusable buffers of one side's logits chunk: the f32 GEMM output and
/// its copy rounded to the operands' dtype.
struct ChunkLogits {
    f32s: Vec<f32>,
    rounded: Option<OwnedData>,
    v: usize,
    dtype: Dtype,
}

impl ChunkLogits {
    fn new(rows: usize, v: usize, dtype: Dtype) -> Self {
        ChunkLogits {
            f32s: vec![0.0; rows * v],
            rounded: None,
            v,
            dtype,
        }
    }

    /// The logits of `c` hidden rows through `head`, in the operands'
    /// dtype (rounded from the f32 accumulation, as a GEMM with a bf16
    /// output does).
    fn compute(&mut self, head: &Head, hidden: &[f32], c: usize) -> Logits<'_> {
        let v = self.v;
        let out = &mut self.f32s[..c * v];
        gemm::logits(
            hidden,
            c,
            head.h,
            &head.weight,
            v,
            head.bias.as_deref(),
            out,
        );
        let data = match (self.dtype, &mut self.rounded) {
            (Dtype::F32, _) => HostData::F32(out),
            // Rounded into the buffer of the previous chunk when there is one.
            (_, Some(OwnedData::Bf16(b))) => {
                b.clear();
                b.extend(out.iter().map(|&x| half::bf16::from_f32(x)));
                HostData::Bf16(b)
            }
            (_, Some(OwnedData::F16(b))) => {
                b.clear();
                b.extend(out.iter().map(|&x| half::f16::from_f32(x)));
                HostData::F16(b)
            }
            (dtype, rounded) => rounded.insert(OwnedData::from_f32(out, dtype)).view(),
        };
        Logits::new(data, c, v)
    }
}

/// Rows `[r0, r1)` of a top-k teacher.
fn topk_rows<'a>(t: &TopkTeacher<'a>, r0: usize, r1: usize) -> TopkTeacher<'a> {
    let (a, b) = (r0 * t.k, r1 * t.k);
    let values = match t.values {
        HostData::F32(d) => HostData::F32(&d[a..b]),
        HostData::Bf16(d) => HostData::Bf16(&d[a..b]),
        HostData::F16(d) => HostData::F16(&d[a..b]),
    };
    let indices = match t.indices {
        TopkIndices::I32(d) => TopkIndices::I32(&d[a..b]),
        TopkIndices::I64(d) => TopkIndices::I64(&d[a..b]),
    };
    TopkTeacher {
        indices,
        values,
        k: t.k,
    }
}
