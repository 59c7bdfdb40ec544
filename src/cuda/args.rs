//! The apps' kernels' launch contracts (kernels/app/app_args.h): the eager
//! baseline's, the benchmark fill's and `DistillStep`'s MLP kernels'. Each is
//! the `#[repr(C)]` mirror of its C struct (same fields, same order), passed
//! by value to the kernel and by pointer to the emulation; a test holds the
//! layouts to the C ones (`kd_host_app_args_layout`). Pointers are device
//! pointers (`CUdeviceptr`) on the GPU and host addresses under emulation;
//! 0 is null.

use crate::params::KernelParams;

/// `KdEagerLsmArgs`: `kd_eager_log_softmax_<in>`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct EagerLsmArgs {
    pub x: u64,
    pub stride: i64,
    pub out: u64,
    pub n: i64,
    pub vocab: i32,
    pub inv_tau: f32,
}

/// `KdEagerEwArgs`: the eager baseline's element-wise kernels.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct EagerEwArgs {
    pub ls: u64,
    pub lt: u64,
    pub lm: u64,
    pub out: u64,
    pub count: i64,
    pub beta: f32,
}

/// `KdEagerRowLossArgs`: `kd_eager_row_loss`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct EagerRowLossArgs {
    pub e: u64,
    pub ls1: u64,
    pub labels: u64,
    pub n: i64,
    pub row_loss: u64,
    pub params: KernelParams,
}

/// `KdEagerBackArgs`: `kd_eager_lsm_back_<out>` and `kd_eager_ce_back_<out>`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct EagerBackArgs {
    pub g: u64,
    pub ls: u64,
    pub labels: u64,
    pub valid_count: u64,
    pub n: i64,
    pub grad: u64,
    pub grad_stride: i64,
    pub params: KernelParams,
}

/// `KdFillArgs`: `kd_fill_normal_<dtype>`, the benchmark's device-made
/// inputs: element i of `out` is σ·(ρ·z(shared_seed, i) + √(1−ρ²)·z(own_seed, i)).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FillArgs {
    /// `count` elements of the kernel's dtype (a device pointer).
    pub out: u64,
    /// Elements to write.
    pub count: i64,
    /// The seed shared by correlated buffers (student and teacher).
    pub shared_seed: u64,
    /// This buffer's own seed.
    pub own_seed: u64,
    /// Correlation with the shared stream.
    pub rho: f32,
    /// Standard deviation.
    pub sigma: f32,
}

/// `MlpBiasActArgs`: `mlp_bias_act`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct MlpBiasActArgs {
    pub z: u64,
    pub b: u64,
    pub rows: i64,
    pub cols: i32,
    pub relu: i32,
    pub dropout: i32,
    pub key: u32,
    pub threshold: u32,
    pub scale: f32,
}

/// `MlpReluBackArgs`: `mlp_relu_back`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct MlpReluBackArgs {
    pub dh: u64,
    pub h: u64,
    pub dz: u64,
    pub n: i64,
    pub scale: f32,
}

/// `MlpBiasGradArgs`: `mlp_bias_grad`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct MlpBiasGradArgs {
    pub dz: u64,
    pub db: u64,
    pub rows: i64,
    pub cols: i32,
}

/// `MlpSgdArgs`: `mlp_sgd`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct MlpSgdArgs {
    pub p: u64,
    pub g: u64,
    pub v: u64,
    pub n: i64,
    pub lr: f32,
    pub mu: f32,
    pub wd: f32,
}

/// `MlpAdamArgs`: `mlp_adam`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct MlpAdamArgs {
    pub p: u64,
    pub g: u64,
    pub m: u64,
    pub v: u64,
    pub n: i64,
    /// The C struct's seven floats from `lr` to `c2`, in the same order.
    pub h: AdamHyper,
}

/// Adam's hyper-parameters of one step (`distill`'s optimizer computes
/// them): the floats of `MlpAdamArgs`, in order.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdamHyper {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub wd: f32,
    pub c1: f32,
    pub c2: f32,
}

// SAFETY: plain-old-data with the C layouts the kernels expect (checked by
// the test below against kd_host_app_args_layout).
unsafe impl cudarc::driver::DeviceRepr for EagerLsmArgs {}
// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for EagerEwArgs {}
// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for EagerRowLossArgs {}
// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for EagerBackArgs {}
// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for FillArgs {}
// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for MlpBiasActArgs {}
// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for MlpReluBackArgs {}
// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for MlpBiasGradArgs {}
// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for MlpSgdArgs {}
// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for MlpAdamArgs {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    extern "C" {
        fn kd_host_app_args_layout(out: *mut i64) -> i32;
    }

    /// Every struct's size and the offsets of its last two fields (any
    /// difference before them moves those), in the order of
    /// kd_host_app_args_layout.
    fn rust_layout() -> Vec<usize> {
        macro_rules! tail {
            ($t:ty, $a:ident, $b:ident) => {
                [size_of::<$t>(), offset_of!($t, $a), offset_of!($t, $b)]
            };
        }
        let h = offset_of!(MlpAdamArgs, h);
        [
            tail!(EagerLsmArgs, vocab, inv_tau),
            tail!(EagerEwArgs, count, beta),
            tail!(EagerRowLossArgs, row_loss, params),
            tail!(EagerBackArgs, grad_stride, params),
            tail!(FillArgs, rho, sigma),
            tail!(MlpBiasActArgs, threshold, scale),
            tail!(MlpReluBackArgs, n, scale),
            tail!(MlpBiasGradArgs, rows, cols),
            tail!(MlpSgdArgs, mu, wd),
            [
                size_of::<MlpAdamArgs>(),
                h + offset_of!(AdamHyper, c1),
                h + offset_of!(AdamHyper, c2),
            ],
        ]
        .concat()
    }

    /// The launch contracts of kernels/app/app_args.h and their mirrors here
    /// agree on size and offsets.
    #[test]
    fn app_args_layout_matches_rust() {
        let want = rust_layout();
        let mut got = vec![0i64; 64];
        // SAFETY: writes at most 64 entries and returns how many.
        let len = unsafe { kd_host_app_args_layout(got.as_mut_ptr()) } as usize;
        let got: Vec<usize> = got[..len].iter().map(|&x| x as usize).collect();
        assert_eq!(got, want);
    }
}
