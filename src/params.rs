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
