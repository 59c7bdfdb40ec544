//! The fast CPU backend: rayon over rows (and over a row's segments when
//! there are fewer rows than threads), each row through the kernels' own
//! fp32 arithmetic compiled for the host — kernels/kd_fast_math.cuh,
//! vectorized (kernels/kd_host_fast.cpp), in precision = fast;
//! kernels/kd_math.cuh (kernels/kd_host.cpp) in precision = exact — so that it
//! works everywhere and tests the kernels' math on every machine.

use crate::backend::{validate, validate_topk, Backend, KdOutput};
use crate::error::Result;
use crate::fast_segments;
use crate::hostmath::{self, RowData, TopkRow, TopkRowIndices};
use crate::params::KernelParams;
use crate::spec::{LossSpec, Precision};
use crate::tensor::{Dtype, GradDtype, HostData, KdInputs, TopkIndices, TopkInputs};
use rayon::prelude::*;

/// The fast CPU backend.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuBackend;

fn row_data<'a>(inputs: &KdInputs<'a>, r: usize) -> RowData<'a> {
    let (s, t) = (&inputs.student, &inputs.teacher);
    let v = s.cols;
    let (so, to) = (r * s.row_stride, r * t.row_stride);
    match (s.data, t.data) {
        (HostData::F32(a), HostData::F32(b)) => RowData::F32(&a[so..so + v], &b[to..to + v]),
        (HostData::Bf16(a), HostData::Bf16(b)) => RowData::Half16 {
            bf16: true,
            s: bytemuck::cast_slice(&a[so..so + v]),
            t: bytemuck::cast_slice(&b[to..to + v]),
        },
        (HostData::F16(a), HostData::F16(b)) => RowData::Half16 {
            bf16: false,
            s: bytemuck::cast_slice(&a[so..so + v]),
            t: bytemuck::cast_slice(&b[to..to + v]),
        },
        _ => unreachable!("dtypes checked by validate"),
    }
}

/// Elements `[start, start + len)` of `data` as raw bytes.
fn bytes_of<'a>(data: &HostData<'a>, start: usize, len: usize) -> &'a [u8] {
    match *data {
        HostData::F32(d) => bytemuck::cast_slice(&d[start..start + len]),
        HostData::Bf16(d) => bytemuck::cast_slice(&d[start..start + len]),
        HostData::F16(d) => bytemuck::cast_slice(&d[start..start + len]),
    }
}

/// Runs `row(r, grad, grad_teacher)` over every row in parallel, with
/// poisoned gradients (so an element the row code skipped cannot pass as
/// 0), and applies the row weights and the output rounding. A row of weight
/// 0 is skipped as the kernels skip it (loss 0, zero gradients, whatever
/// its inputs hold). Returns the weighted row losses and the gradients.
fn run_rows<F>(
    n: usize,
    v: usize,
    row_weights: Option<&[f32]>,
    grad: Option<Dtype>,
    with_teacher: bool,
    row: F,
) -> (Vec<f64>, Option<Vec<f32>>, Option<Vec<f32>>)
where
    F: Fn(usize, Option<&mut [f32]>, Option<&mut [f32]>, f32) -> f32 + Sync,
{
    let weight = |r: usize| row_weights.map_or(1.0, |w| w[r]);
    // The row's loss, or 0 with zeroed gradients for a zero weight.
    let run = |r: usize, gr: Option<&mut [f32]>, gtr: Option<&mut [f32]>| -> f32 {
        if weight(r) == 0.0 {
            for g in [gr, gtr].into_iter().flatten() {
                g.fill(0.0);
            }
            return 0.0;
        }
        row(r, gr, gtr, weight(r))
    };
    let Some(round) = grad else {
        let losses = (0..n)
            .into_par_iter()
            .map(|r| weighted(weight(r), run(r, None, None)))
            .collect();
        return (losses, None, None);
    };
    let mut g = vec![f32::NAN; n * v];
    let mut gt = with_teacher.then(|| vec![f32::NAN; n * v]);
    let finish = |gr: &mut [f32]| {
        if round != Dtype::F32 {
            gr.iter_mut().for_each(|x| *x = round.round(*x));
        }
    };
    let losses = match gt.as_mut() {
        None => g
            .par_chunks_mut(v.max(1))
            .enumerate()
            .map(|(r, gr)| {
                let l = run(r, Some(&mut *gr), None);
                finish(gr);
                weighted(weight(r), l)
            })
            .collect(),
        Some(gt) => g
            .par_chunks_mut(v.max(1))
            .zip(gt.par_chunks_mut(v.max(1)))
            .enumerate()
            .map(|(r, (gr, gtr))| {
                let l = run(r, Some(&mut *gr), Some(&mut *gtr));
                finish(gr);
                finish(gtr);
                weighted(weight(r), l)
            })
            .collect(),
    };
    (losses, Some(g), gt)
}

/// A row's ℓ times its weight; a zero weight gives 0 even for an infinite ℓ.
fn weighted(w: f32, l: f32) -> f64 {
    if w == 0.0 {
        0.0
    } else {
        w as f64 * l as f64
    }
}

fn round_of(grad: Option<GradDtype>, input: Dtype) -> Option<Dtype> {
    grad.map(|g| match g {
        GradDtype::Input => input,
        GradDtype::F32 => Dtype::F32,
    })
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn precision(&self, spec: &LossSpec) -> Precision {
        spec.kernel_precision()
    }

    fn compute(
        &self,
        inputs: &KdInputs,
        spec: &LossSpec,
        grad: Option<GradDtype>,
    ) -> Result<KdOutput> {
        validate(inputs, spec)?;
        let (n, v) = (inputs.student.rows, inputs.student.cols);
        let p = KernelParams::new(spec, v);
        let div = spec.kernel_divergence().id();
        let valid = inputs.valid_rows(spec.ignore_index);
        let w = hostmath::row_weight(&p, valid);
        let label = |r: usize| inputs.labels.map(|l| l[r]);
        let fast = self.precision(spec) == Precision::Fast;
        let ce = spec.alpha > 0.0;
        // Fewer rows than threads: each row's segments in parallel too (the
        // same result as one thread per row).
        let split = n < rayon::current_num_threads() && v >= 2 * fast_segments::segment();
        let (row_losses, g, gt) = run_rows(
            n,
            v,
            inputs.row_weights,
            round_of(grad, inputs.student.dtype()),
            spec.grad_teacher,
            |r, gr, gtr, wr| {
                let wr = if wr == 0.0 { 0.0 } else { w * wr };
                if fast && split {
                    fast_segments::fast_row_split(
                        div,
                        ce,
                        row_data(inputs, r),
                        label(r),
                        gr,
                        &p,
                        wr,
                    )
                } else if fast {
                    hostmath::fast_row(div, ce, row_data(inputs, r), label(r), gr, &p, wr)
                } else {
                    hostmath::row(div, row_data(inputs, r), label(r), gr, gtr, &p, wr)
                }
            },
        );
        let loss = spec.reduction.row_weight(valid, v) * crate::sum(&row_losses);
        Ok(KdOutput {
            loss,
            row_losses,
            valid_rows: valid,
            grad: g,
            grad_teacher: gt,
        })
    }

    fn compute_topk(
        &self,
        inputs: &TopkInputs,
        spec: &LossSpec,
        grad: Option<GradDtype>,
    ) -> Result<KdOutput> {
        validate_topk(inputs, spec)?;
        let (n, v, k) = (inputs.student.rows, inputs.student.cols, inputs.teacher.k);
        let mut p = KernelParams::new(spec, v);
        p.topk_k = k as i32;
        let valid = inputs.valid_rows(spec.ignore_index);
        let w = hostmath::row_weight(&p, valid);
        let label = |r: usize| inputs.labels.map(|l| l[r]);
        let stride = inputs.student.row_stride;
        let row_of = |r: usize| TopkRow {
            dtype: inputs.student.dtype(),
            student: bytes_of(&inputs.student.data, r * stride, v),
            indices: match inputs.teacher.indices {
                TopkIndices::I32(i) => TopkRowIndices::I32(&i[r * k..(r + 1) * k]),
                TopkIndices::I64(i) => TopkRowIndices::I64(&i[r * k..(r + 1) * k]),
            },
            values: bytes_of(&inputs.teacher.values, r * k, k),
        };
        let (row_losses, g, _) = run_rows(
            n,
            v,
            inputs.row_weights,
            round_of(grad, inputs.student.dtype()),
            false,
            |r, gr, _, wr| {
                let wr = if wr == 0.0 { 0.0 } else { w * wr };
                hostmath::topk_row(&row_of(r), label(r), gr, &p, wr)
            },
        );
        let loss = spec.reduction.row_weight(valid, v) * crate::sum(&row_losses);
        Ok(KdOutput {
            loss,
            row_losses,
            valid_rows: valid,
            grad: g,
            grad_teacher: None,
        })
    }
}
