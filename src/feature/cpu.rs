//! The feature losses on the fast CPU backend: rayon over rows, each row
//! through the kernels' own fp32 arithmetic (kernels/feature_math.cuh,
//! compiled for the host in kernels/feature_host.cpp).

use super::params::FeatureParams;
use super::{FeatureBackend, FeatureInputs, FeatureSpec, Outputs};
use crate::cpu::CpuBackend;
use crate::error::Result;
use crate::hostmath::out_ptr;
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

/// Per-row gradient slices (`None` for every row when that gradient is not
/// wanted).
fn row_slices(buf: Option<&mut Vec<f32>>, n: usize, len: usize) -> Vec<Option<&mut [f32]>> {
    match buf {
        Some(buf) => buf.chunks_mut(len).map(Some).collect(),
        None => (0..n).map(|_| None).collect(),
    }
}

impl FeatureBackend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn batch(&self, inputs: &FeatureInputs, spec: &FeatureSpec, out: &mut Outputs) -> Result<()> {
        let (s, t) = (&inputs.student, &inputs.teacher);
        let n = s.rows;
        let (ls, lt) = (s.row_len(), t.row_len());
        let p = FeatureParams::new(&inputs.layout(spec.kind), spec);
        let dtype = s.dtype();
        let size = dtype.size();
        let (sb, tb) = (s.data.bytes(), t.data.bytes());
        let round = out.grad_dtype;
        out.row_losses
            .par_iter_mut()
            .zip(row_slices(out.grad_student.as_mut(), n, ls))
            .zip(row_slices(out.grad_teacher.as_mut(), n, lt))
            .enumerate()
            .for_each(|(r, ((loss, mut g_s), mut g_t))| {
                let so = r * s.row_stride * size;
                let to = r * t.row_stride * size;
                let srow = &sb[so..so + ls * size];
                let trow = &tb[to..to + lt * size];
                let (gsp, gtp) = (out_ptr(g_s.as_deref_mut()), out_ptr(g_t.as_deref_mut()));
                // SAFETY: the row slices hold the row lengths the parameters
                // describe; the gradient slices are this row's, exclusively.
                let l = unsafe {
                    kd_feat_host_row(
                        dtype.code(),
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
                *loss = l as f64;
            });
        Ok(())
    }
}
