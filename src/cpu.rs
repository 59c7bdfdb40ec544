//! The fast CPU backend: rayon over rows, each row through the kernels' own
//! fp32 arithmetic (kernels/kd_math.cuh compiled for the host), so that it
//! works everywhere and tests the kernels' math on every machine.

use crate::backend::{validate, Backend, KdOutput};
use crate::error::Result;
use crate::hostmath::{self, RowData};
use crate::params::KernelParams;
use crate::spec::LossSpec;
use crate::tensor::{Dtype, GradDtype, HostData, KdInputs};
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

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
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
        let (n, v) = (inputs.student.rows, inputs.student.cols);
        let p = KernelParams::new(spec, v);
        let div = spec.kernel_divergence().id();
        let valid = inputs.valid_rows(spec.ignore_index);
        let w = hostmath::row_weight(&p, valid);
        let label = |r: usize| inputs.labels.map(|l| l[r]);

        let (row_losses, grad_out): (Vec<f64>, Option<Vec<f32>>) = match grad {
            None => {
                let losses = (0..n)
                    .into_par_iter()
                    .map(|r| hostmath::row(div, row_data(inputs, r), label(r), None, &p, w) as f64)
                    .collect();
                (losses, None)
            }
            Some(gd) => {
                // Poisoned, so an element the row code skipped cannot pass as 0.
                let mut g = vec![f32::NAN; n * v];
                let round = match gd {
                    GradDtype::Input => inputs.student.dtype(),
                    GradDtype::F32 => Dtype::F32,
                };
                let losses = g
                    .par_chunks_mut(v)
                    .enumerate()
                    .map(|(r, gr)| {
                        let l = hostmath::row(
                            div,
                            row_data(inputs, r),
                            label(r),
                            Some(&mut *gr),
                            &p,
                            w,
                        );
                        if round != Dtype::F32 {
                            gr.iter_mut().for_each(|x| *x = round.round(*x));
                        }
                        l as f64
                    })
                    .collect();
                (losses, Some(g))
            }
        };
        let loss = spec.reduction.row_weight(valid, v) * row_losses.iter().sum::<f64>();
        Ok(KdOutput {
            loss,
            row_losses,
            valid_rows: valid,
            grad: grad_out,
            grad_teacher: None,
        })
    }
}
