//! The feature losses on the fast CPU backend: rayon over rows, each row
//! through the kernels' own fp32 arithmetic (kernels/feature_math.cuh,
//! compiled for the host in kernels/feature_host.cpp).

use super::params::FeatureParams;
use super::{validate, FeatureBackend, FeatureGrads, FeatureInputs, FeatureOutput, FeatureSpec};
use crate::cpu::CpuBackend;
use crate::error::Result;
use crate::tensor::Dtype;
use rayon::prelude::*;
use std::ffi::c_void;
use std::os::raw::c_int;

extern "C" {
    fn kd_feat_host_row(
        dtype: c_int,
        s: *const c_void,
        t: *const c_void,
        gs: *mut f32,
        gt: *mut f32,
        p: *const FeatureParams,
    ) -> f32;
}

fn dtype_code(d: Dtype) -> c_int {
    match d {
        Dtype::F32 => 0,
        Dtype::Bf16 => 1,
        Dtype::F16 => 2,
    }
}

/// Per-row gradient slices (`None` when that gradient is not wanted).
fn row_slices(buf: &mut [f32], want: bool, n: usize, len: usize) -> Vec<Option<&mut [f32]>> {
    if want {
        buf.chunks_mut(len).map(Some).collect()
    } else {
        (0..n).map(|_| None).collect()
    }
}

impl FeatureBackend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn feature_loss(
        &self,
        inputs: &FeatureInputs,
        spec: &FeatureSpec,
        grads: FeatureGrads,
    ) -> Result<FeatureOutput> {
        validate(inputs, spec)?;
        let (s, t) = (&inputs.student, &inputs.teacher);
        let n = s.rows;
        let (ls, lt) = (s.row_len(), t.row_len());
        let layout = inputs.layout(spec.kind);
        let p = FeatureParams::new(&layout, spec);
        let dtype = s.dtype();
        let size = dtype.size();
        let (sb, tb) = (s.data.bytes(), t.data.bytes());
        // Poisoned, so an element the row code skipped cannot pass as a value.
        let mut gs = vec![f32::NAN; if grads.student { n * ls } else { 0 }];
        let mut gt = vec![f32::NAN; if grads.teacher { n * lt } else { 0 }];
        let round = grads.out_dtype(dtype);
        let row_losses: Vec<f64> = row_slices(&mut gs, grads.student, n, ls)
            .into_par_iter()
            .zip(row_slices(&mut gt, grads.teacher, n, lt))
            .enumerate()
            .map(|(r, (mut g_s, mut g_t))| {
                let so = r * s.row_stride * size;
                let to = r * t.row_stride * size;
                let srow = &sb[so..so + ls * size];
                let trow = &tb[to..to + lt * size];
                let gsp = g_s
                    .as_mut()
                    .map_or(std::ptr::null_mut(), |g| g.as_mut_ptr());
                let gtp = g_t
                    .as_mut()
                    .map_or(std::ptr::null_mut(), |g| g.as_mut_ptr());
                // SAFETY: the row slices hold the row lengths the parameters
                // describe; the gradient slices are this row's, exclusively.
                let l = unsafe {
                    kd_feat_host_row(
                        dtype_code(dtype),
                        srow.as_ptr().cast(),
                        trow.as_ptr().cast(),
                        gsp,
                        gtp,
                        &p,
                    )
                };
                if round != Dtype::F32 {
                    for g in [g_s, g_t].into_iter().flatten() {
                        g.iter_mut().for_each(|x| *x = round.round(*x));
                    }
                }
                l as f64
            })
            .collect();
        Ok(FeatureOutput {
            loss: spec.loss_weight(&layout) * crate::sum(&row_losses),
            row_losses,
            grad_student: grads.student.then_some(gs),
            grad_teacher: grads.teacher.then_some(gt),
        })
    }
}
