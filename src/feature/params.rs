//! The parameter block shared with the feature kernels (`KdFeatParams` in
//! kernels/feature_math.cuh: same fields, same order, `#[repr(C)]`), the
//! launch shape, and a test of the layout against the C struct.

use super::{FeatureKind, FeatureLayout, FeatureSpec};
use crate::params::KernelParams;
use crate::spec::LossSpec;
use crate::tensor::Dtype;

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct FeatureParams {
    pub s_stride: i64,
    pub t_stride: i64,
    pub gs_stride: i64,
    pub gt_stride: i64,
    pub n_rows: i64,
    pub cols: i32,
    pub s_channels: i32,
    pub t_channels: i32,
    pub kind: i32,
    pub w: f32,
    pub eps: f32,
}

// SAFETY: plain-old-data with the C layout the kernels expect.
unsafe impl cudarc::driver::DeviceRepr for FeatureParams {}

/// The feature kernels' launch contract (`KdFeatArgs` in
/// kernels/feature_args.h): same fields, same order, passed by value to
/// every `kd_feat_*` kernel and by pointer to the emulator. Device pointers
/// on the GPU, host addresses under emulation; 0 is null.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct FeatureArgs {
    pub student: u64,
    pub teacher: u64,
    pub grad_student: u64,
    pub grad_teacher: u64,
    pub row_loss: u64,
    /// Attention: grid·2·S floats; 0 otherwise.
    pub workspace: u64,
    pub params: FeatureParams,
}

// SAFETY: as FeatureParams (checked by `args_layout_matches_rust`).
unsafe impl cudarc::driver::DeviceRepr for FeatureArgs {}

/// Blocks of the attention kernel at most: each holds a workspace of 2·S
/// floats.
pub(crate) const ATTENTION_MAX_GRID: usize = 1024;

impl FeatureParams {
    /// The block for a validated layout and spec.
    pub fn new(layout: &FeatureLayout, spec: &FeatureSpec) -> Self {
        let l = layout;
        let (cols, cs, ct) = match spec.kind {
            FeatureKind::Attention => (l.width, l.student_channels, l.teacher_channels),
            _ => (l.student_len(), 1, 1),
        };
        FeatureParams {
            s_stride: l.student_stride as i64,
            t_stride: l.teacher_stride as i64,
            gs_stride: l.grad_student_stride as i64,
            gt_stride: l.grad_teacher_stride as i64,
            n_rows: l.rows as i64,
            cols: cols as i32,
            s_channels: cs as i32,
            t_channels: ct as i32,
            kind: spec.kind.id(),
            w: spec.grad_weight(layout) as f32,
            eps: spec.eps() as f32,
        }
    }
}

/// Threads per block: rows of `cols` elements (MSE, cosine; as the fused
/// kernel, by 16-byte vectors) or maps of S = `cols` positions (attention,
/// one thread per position).
pub(crate) fn threads(kind: FeatureKind, cols: usize, dtype: Dtype) -> u32 {
    match kind {
        FeatureKind::Attention => match cols {
            c if c >= 1024 => 256,
            c if c >= 256 => 128,
            c if c >= 64 => 64,
            _ => 32,
        },
        _ => crate::cuda::threads_for(cols, dtype),
    }
}

/// Blocks for `rows` rows (grid-stride beyond).
pub(crate) fn grid(kind: FeatureKind, rows: usize) -> u32 {
    let cap = match kind {
        FeatureKind::Attention => ATTENTION_MAX_GRID,
        _ => 1 << 20,
    };
    rows.clamp(1, cap) as u32
}

/// The parameters `kd_reduce_loss` (kernels/kd_fused.cu) reads: the
/// reduction, and the count `mean` divides by per row as its `vocab`.
pub(crate) fn reduce_params(spec: &FeatureSpec, layout: &FeatureLayout) -> KernelParams {
    let loss = LossSpec {
        reduction: spec.reduction,
        ..Default::default()
    };
    KernelParams::new(&loss, spec.mean_count(layout))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    extern "C" {
        fn kd_feat_host_params_layout(out: *mut i64);
        fn kd_feat_host_args_layout(out: *mut i64);
    }

    /// `[sizeof, offset of n_rows, cols, kind, w, eps]` of the C struct.
    fn params_layout() -> [i64; 6] {
        let mut out = [0i64; 6];
        // SAFETY: writes six values.
        unsafe { kd_feat_host_params_layout(out.as_mut_ptr()) };
        out
    }

    #[test]
    fn params_layout_matches_rust() {
        let l = params_layout();
        assert_eq!(l[0] as usize, size_of::<FeatureParams>());
        assert_eq!(l[1] as usize, offset_of!(FeatureParams, n_rows));
        assert_eq!(l[2] as usize, offset_of!(FeatureParams, cols));
        assert_eq!(l[3] as usize, offset_of!(FeatureParams, kind));
        assert_eq!(l[4] as usize, offset_of!(FeatureParams, w));
        assert_eq!(l[5] as usize, offset_of!(FeatureParams, eps));
    }

    #[test]
    fn args_layout_matches_rust() {
        let mut l = [0i64; 7];
        // SAFETY: writes seven values.
        unsafe { kd_feat_host_args_layout(l.as_mut_ptr()) };
        let want = [
            size_of::<FeatureArgs>(),
            offset_of!(FeatureArgs, teacher),
            offset_of!(FeatureArgs, grad_student),
            offset_of!(FeatureArgs, grad_teacher),
            offset_of!(FeatureArgs, row_loss),
            offset_of!(FeatureArgs, workspace),
            offset_of!(FeatureArgs, params),
        ];
        assert_eq!(l.map(|x| x as usize), want);
    }
}
