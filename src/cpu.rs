//! The fast CPU backend: rayon over rows (and over a row's segments when
//! there are fewer rows than threads), each row through the kernels' own
//! fp32 arithmetic compiled for the host — kernels/kd_fast_math.cuh,
//! vectorized (kernels/kd_host_fast.cpp), in precision = fast;
//! kernels/kd_math.cuh (kernels/kd_host.cpp) in precision = exact — so that it
//! works everywhere and tests the kernels' math on every machine.

use crate::driver::{Backend, Outputs};
use crate::error::Result;
use crate::fast_segments;
use crate::hostmath::{self, RowData, TopkRow, TopkRowIndices};
use crate::params::KernelParams;
use crate::spec::{LossSpec, Precision};
use crate::tensor::{Dtype, HostData, KdInputs, TopkIndices, TopkInputs};
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

/// Runs `row(r, grad, grad_teacher, weight)` over every row in parallel
/// into `out` (gradients poisoned by the driver, so an element the row code
/// skipped cannot pass as 0), and applies the row weights and the output
/// rounding. A row of weight 0 is skipped as the kernels skip it (loss 0,
/// zero gradients, whatever its inputs hold).
fn run_rows<F>(v: usize, row_weights: Option<&[f32]>, out: &mut Outputs, row: F)
where
    F: Fn(usize, Option<&mut [f32]>, Option<&mut [f32]>, f32) -> f32 + Sync,
{
    let weight = |r: usize| row_weights.map_or(1.0, |w| w[r]);
    let round = out.grad_dtype.filter(|&d| d != Dtype::F32);
    // The row's weighted loss, or 0 with zeroed gradients for a zero weight;
    // the gradients rounded.
    let run = |r: usize, mut gr: Option<&mut [f32]>, mut gtr: Option<&mut [f32]>| -> f64 {
        let l = if weight(r) == 0.0 {
            for g in [gr.as_deref_mut(), gtr.as_deref_mut()]
                .into_iter()
                .flatten()
            {
                g.fill(0.0);
            }
            0.0
        } else {
            row(r, gr.as_deref_mut(), gtr.as_deref_mut(), weight(r))
        };
        if let Some(round) = round {
            for g in [gr, gtr].into_iter().flatten() {
                g.iter_mut().for_each(|x| *x = round.round(*x));
            }
        }
        weighted(weight(r), l)
    };
    let losses = out.row_losses.par_iter_mut().enumerate();
    let v = v.max(1);
    match (out.grad.as_mut(), out.grad_teacher.as_mut()) {
        (None, _) => losses.for_each(|(r, l)| *l = run(r, None, None)),
        (Some(g), None) => losses
            .zip(g.par_chunks_mut(v))
            .for_each(|((r, l), gr)| *l = run(r, Some(gr), None)),
        (Some(g), Some(gt)) => losses
            .zip(g.par_chunks_mut(v).zip(gt.par_chunks_mut(v)))
            .for_each(|((r, l), (gr, gtr))| *l = run(r, Some(gr), Some(gtr))),
    }
}

/// A row's ℓ times its weight; a zero weight gives 0 even for an infinite ℓ.
fn weighted(w: f32, l: f32) -> f64 {
    if w == 0.0 {
        0.0
    } else {
        w as f64 * l as f64
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn dense(&self, inputs: &KdInputs, spec: &LossSpec, out: &mut Outputs) -> Result<()> {
        let (n, v) = (inputs.student.rows, inputs.student.cols);
        let p = KernelParams::new(spec, v);
        let div = spec.kernel_divergence().id();
        let w = hostmath::row_weight(&p, out.valid_rows);
        let label = |r: usize| inputs.labels.map(|l| l[r]);
        let fast = self.precision(spec) == Precision::Fast;
        let ce = spec.alpha > 0.0;
        // Fewer rows than threads: each row's segments in parallel too (the
        // same result as one thread per row).
        let split = n < rayon::current_num_threads() && v >= 2 * fast_segments::segment();
        run_rows(v, inputs.row_weights, out, |r, gr, gtr, wr| {
            let wr = if wr == 0.0 { 0.0 } else { w * wr };
            if fast && split {
                fast_segments::fast_row_split(div, ce, row_data(inputs, r), label(r), gr, &p, wr)
            } else if fast {
                hostmath::fast_row(div, ce, row_data(inputs, r), label(r), gr, &p, wr)
            } else {
                hostmath::row(div, row_data(inputs, r), label(r), gr, gtr, &p, wr)
            }
        });
        Ok(())
    }

    fn topk(&self, inputs: &TopkInputs, spec: &LossSpec, out: &mut Outputs) -> Result<()> {
        let (v, k) = (inputs.student.cols, inputs.teacher.k);
        let mut p = KernelParams::new(spec, v);
        p.topk_k = k as i32;
        let w = hostmath::row_weight(&p, out.valid_rows);
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
        run_rows(v, inputs.row_weights, out, |r, gr, _, wr| {
            let wr = if wr == 0.0 { 0.0 } else { w * wr };
            hostmath::topk_row(&row_of(r), label(r), gr, &p, wr)
        });
        Ok(())
    }
}
