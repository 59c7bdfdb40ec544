//! The launch contract of the vocab-parallel kernels
//! (kernels/vocab_parallel/vp_args.h), mirrored as `#[repr(C)]` structs:
//! same fields, same order, held to the C layout by a test. Filled in one
//! place ([`VpParams::new`]) for the CUDA launcher and the emulation.

use super::VocabShard;
use crate::oracle::TAIL_MASS_FLOOR;
use crate::spec::{KernelDivergence, LossSpec};

/// `KdVpParams`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct VpParams {
    pub n_rows: i64,
    pub s_stride: i64,
    pub t_stride: i64,
    pub gs_stride: i64,
    pub gt_stride: i64,
    pub ignore_index: i64,
    pub tau: f64,
    pub inv_tau: f64,
    pub alpha: f64,
    pub soft_coef: f64,
    pub beta: f64,
    pub log_beta: f64,
    pub log_1mbeta: f64,
    pub softcap: f64,
    pub grad_scale: f64,
    pub tail_floor: f64,
    pub cols: i32,
    pub real_cols: i32,
    pub vocab_start: i32,
    pub vocab_size: i32,
    pub world: i32,
    pub div: i32,
    pub topk_k: i32,
    pub topk_mode: i32,
    pub indices_i64: i32,
    pub reduction: i32,
}

/// `KdVpStatsArgs` (round 1 and round 2). Device pointers on the GPU, host
/// addresses under emulation; 0 is null.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct VpStatsArgs {
    pub student: u64,
    pub teacher: u64,
    pub topk_indices: u64,
    pub topk_values: u64,
    pub labels: u64,
    pub row_weights: u64,
    pub round1: u64,
    pub stats: u64,
    pub params: VpParams,
}

/// `KdVpFinishArgs`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct VpFinishArgs {
    pub student: u64,
    pub teacher: u64,
    pub topk_indices: u64,
    pub topk_values: u64,
    pub labels: u64,
    pub row_weights: u64,
    pub round1: u64,
    pub round2: u64,
    pub valid_count: u64,
    pub grad: u64,
    pub grad_teacher: u64,
    pub row_loss: u64,
    pub params: VpParams,
}

/// `KdVpReduceArgs`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct VpReduceArgs {
    pub row_loss: u64,
    pub n_rows: i64,
    pub valid_count: u64,
    pub out: u64,
    pub reduction: i32,
    pub vocab_size: i32,
}

// SAFETY: plain-old-data with the C layout the kernels expect (checked by
// `layouts_match_the_c_structs`).
unsafe impl cudarc::driver::DeviceRepr for VpParams {}
// SAFETY: as VpParams.
unsafe impl cudarc::driver::DeviceRepr for VpStatsArgs {}
// SAFETY: as VpParams.
unsafe impl cudarc::driver::DeviceRepr for VpFinishArgs {}
// SAFETY: as VpParams.
unsafe impl cudarc::driver::DeviceRepr for VpReduceArgs {}

/// The shape of one rank's call, in elements.
#[derive(Debug, Clone, Copy)]
pub(crate) struct VpDims {
    pub rows: usize,
    /// Columns in memory (V_local, padding included).
    pub cols: usize,
    pub student_stride: usize,
    pub teacher_stride: usize,
    pub grad_stride: usize,
    pub grad_teacher_stride: usize,
    pub shard: VocabShard,
    /// `(k, indices are int64)` of a top-k teacher.
    pub topk: Option<(usize, bool)>,
    /// Ranks in the gathered records (0 for round 1).
    pub world: usize,
}

impl VpParams {
    /// The block for a validated spec and shape.
    pub(crate) fn new(spec: &LossSpec, d: &VpDims) -> VpParams {
        let beta = match spec.kernel_divergence() {
            KernelDivergence::Jsd(b) => b,
            _ => 0.5,
        };
        let (k, i64) = d.topk.unwrap_or((0, false));
        VpParams {
            n_rows: d.rows as i64,
            s_stride: d.student_stride as i64,
            t_stride: d.teacher_stride as i64,
            gs_stride: d.grad_stride as i64,
            gt_stride: d.grad_teacher_stride as i64,
            ignore_index: spec.ignore_index,
            tau: spec.temperature,
            inv_tau: 1.0 / spec.temperature,
            alpha: spec.alpha,
            soft_coef: spec.soft_coef(),
            beta,
            log_beta: beta.ln(),
            log_1mbeta: (1.0 - beta).ln(),
            softcap: spec.softcap.unwrap_or(0.0),
            grad_scale: spec.grad_scale,
            tail_floor: TAIL_MASS_FLOOR,
            cols: d.cols as i32,
            real_cols: d.shard.real_columns(d.cols) as i32,
            vocab_start: d.shard.vocab_start as i32,
            vocab_size: d.shard.vocab_size as i32,
            world: d.world as i32,
            div: spec.kernel_divergence().id(),
            topk_k: k as i32,
            topk_mode: spec.topk_mode.kernel_id(),
            indices_i64: i64 as i32,
            reduction: spec.reduction.kernel_id(),
        }
    }
}

/// Threads per block for a shard of `cols` columns: a warp per 32 columns
/// up to 256.
pub(crate) fn threads(cols: usize) -> u32 {
    match cols {
        c if c >= 4096 => 256,
        c if c >= 1024 => 128,
        c if c >= 256 => 64,
        _ => 32,
    }
}

/// Blocks for `rows` rows (grid-stride beyond).
pub(crate) fn grid(rows: usize) -> u32 {
    rows.clamp(1, 1 << 16) as u32
}

/// Dynamic shared memory of the round-1 and finish launches: the top-k bit
/// map of the shard's real columns (0 for a dense teacher).
pub(crate) fn bitmap_bytes(p: &VpParams) -> usize {
    if p.topk_k > 0 {
        (p.real_cols as usize).div_ceil(32) * 4
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    extern "C" {
        fn kd_vp_host_layout(which: i32, out: *mut i64) -> i32;
    }

    fn c_layout(which: i32) -> Vec<usize> {
        let mut out = [0i64; 32];
        // SAFETY: writes at most 32 values.
        let n = unsafe { kd_vp_host_layout(which, out.as_mut_ptr()) };
        out[..n as usize].iter().map(|&x| x as usize).collect()
    }

    macro_rules! layout {
        ($t:ty; $($f:ident),*) => {
            vec![size_of::<$t>(), $(offset_of!($t, $f)),*]
        };
    }

    #[test]
    fn layouts_match_the_c_structs() {
        assert_eq!(
            c_layout(0),
            layout!(VpParams; n_rows, s_stride, t_stride, gs_stride, gt_stride, ignore_index,
                tau, inv_tau, alpha, soft_coef, beta, log_beta, log_1mbeta, softcap, grad_scale,
                tail_floor, cols, real_cols, vocab_start, vocab_size, world, div, topk_k,
                topk_mode, indices_i64, reduction)
        );
        assert_eq!(
            c_layout(1),
            layout!(VpStatsArgs; student, teacher, topk_indices, topk_values, labels,
                row_weights, round1, stats, params)
        );
        assert_eq!(
            c_layout(2),
            layout!(VpFinishArgs; student, teacher, topk_indices, topk_values, labels,
                row_weights, round1, round2, valid_count, grad, grad_teacher, row_loss, params)
        );
        assert_eq!(
            c_layout(3),
            layout!(VpReduceArgs; row_loss, n_rows, valid_count, out, reduction, vocab_size)
        );
    }
}
