//! The parameter block shared with the kernels (`KdParams` in
//! kernels/kd_math.cuh): same fields, same order, `#[repr(C)]`.

use crate::spec::{KernelDivergence, LossSpec};

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct KernelParams {
    pub scale2: f32,
    pub inv_tau: f32,
    pub alpha: f32,
    pub soft_coef: f32,
    pub beta: f32,
    pub log2_beta: f32,
    pub log2_1mbeta: f32,
    pub grad_scale: f32,
    pub ignore_index: i64,
    pub reduction: i32,
    pub vocab: i32,
    pub softcap: f32,
    pub topk_mode: i32,
    pub topk_k: i32,
}

// SAFETY: plain-old-data with the C layout the kernels expect.
unsafe impl cudarc::driver::DeviceRepr for KernelParams {}

impl KernelParams {
    /// Builds the block for a validated spec and vocabulary `vocab`.
    pub fn new(spec: &LossSpec, vocab: usize) -> Self {
        let beta = match spec.kernel_divergence() {
            KernelDivergence::Jsd(b) => b,
            _ => 0.5,
        };
        KernelParams {
            scale2: (std::f64::consts::LOG2_E / spec.temperature) as f32,
            inv_tau: (1.0 / spec.temperature) as f32,
            alpha: spec.alpha as f32,
            soft_coef: spec.soft_coef() as f32,
            beta: beta as f32,
            log2_beta: beta.log2() as f32,
            log2_1mbeta: (1.0 - beta).log2() as f32,
            grad_scale: spec.grad_scale as f32,
            ignore_index: spec.ignore_index,
            reduction: spec.reduction.kernel_id(),
            vocab: vocab as i32,
            softcap: spec.softcap.unwrap_or(0.0) as f32,
            topk_mode: spec.topk_mode.kernel_id(),
            topk_k: 0,
        }
    }
}

/// The fused kernels' launch contract (`KdFusedArgs` in kernels/kd_args.h):
/// same fields, same order, `#[repr(C)]`, passed by value to every
/// `kd_fused_*` kernel and by pointer to the emulator. Pointers are device
/// pointers (`CUdeviceptr`) on the GPU and host addresses under emulation;
/// 0 is null.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct FusedArgs {
    pub student: u64,
    pub student_stride: i64,
    pub teacher: u64,
    pub teacher_stride: i64,
    pub labels: u64,
    pub row_weights: u64,
    pub grad: u64,
    pub grad_stride: i64,
    pub grad_teacher: u64,
    pub grad_teacher_stride: i64,
    pub row_loss: u64,
    pub valid_count: u64,
    pub n_rows: i64,
    pub params: KernelParams,
}

/// The top-k kernels' launch contract (`KdTopkArgs` in kernels/kd_args.h).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct TopkArgs {
    pub student: u64,
    pub student_stride: i64,
    pub indices: u64,
    pub values: u64,
    pub labels: u64,
    pub row_weights: u64,
    pub grad: u64,
    pub grad_stride: i64,
    pub row_loss: u64,
    pub valid_count: u64,
    pub n_rows: i64,
    pub params: KernelParams,
}

/// `kd_count_valid`'s launch contract (`KdCountArgs`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct CountArgs {
    pub labels: u64,
    pub n_rows: i64,
    pub ignore_index: i64,
    pub out: u64,
}

/// `kd_reduce_loss`'s launch contract (`KdReduceArgs`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReduceArgs {
    pub row_loss: u64,
    pub n_rows: i64,
    pub valid_count: u64,
    pub out: u64,
    pub params: KernelParams,
}

/// `kd_topk_validate_*`'s launch contract (`KdTopkValidateArgs`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct TopkValidateArgs {
    pub indices: u64,
    pub n_rows: i64,
    pub k: i32,
    pub vocab: i32,
    pub first_bad: u64,
}

// SAFETY: plain-old-data with the C layout the kernels expect (checked by
// tests/kd/hostmath.rs against kd_host_args_layout).
unsafe impl cudarc::driver::DeviceRepr for FusedArgs {}
// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for TopkArgs {}
// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for CountArgs {}
// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for ReduceArgs {}
// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for TopkValidateArgs {}

/// `size_of` and the field offsets of the two launch contracts, in the order
/// of kd_host_args_layout (kernels/kd_host.cpp), for the layout test.
#[cfg(test)]
pub(crate) fn args_layout() -> Vec<usize> {
    use std::mem::{offset_of, size_of};
    vec![
        size_of::<FusedArgs>(),
        offset_of!(FusedArgs, student_stride),
        offset_of!(FusedArgs, teacher),
        offset_of!(FusedArgs, labels),
        offset_of!(FusedArgs, grad),
        offset_of!(FusedArgs, grad_teacher_stride),
        offset_of!(FusedArgs, row_loss),
        offset_of!(FusedArgs, valid_count),
        offset_of!(FusedArgs, n_rows),
        offset_of!(FusedArgs, params),
        size_of::<TopkArgs>(),
        offset_of!(TopkArgs, indices),
        offset_of!(TopkArgs, values),
        offset_of!(TopkArgs, grad_stride),
        offset_of!(TopkArgs, row_loss),
        offset_of!(TopkArgs, n_rows),
        offset_of!(TopkArgs, params),
        size_of::<CountArgs>(),
        offset_of!(CountArgs, ignore_index),
        offset_of!(CountArgs, out),
        size_of::<ReduceArgs>(),
        offset_of!(ReduceArgs, valid_count),
        offset_of!(ReduceArgs, out),
        offset_of!(ReduceArgs, params),
        size_of::<TopkValidateArgs>(),
        offset_of!(TopkValidateArgs, k),
        offset_of!(TopkValidateArgs, vocab),
        offset_of!(TopkValidateArgs, first_bad),
    ]
}
