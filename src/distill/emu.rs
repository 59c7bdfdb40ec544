//! Test support: kernels/mlp.cu run on the CPU under the CUDA emulation
//! (kernels/emu/mlp_emu.cpp), next to the CPU engine's own versions of the
//! same operations, so tests can hold one against the other. Slow; not for
//! real use.

use super::dropout::Dropout;
use super::kernel_args::{self, UpdateArgs};
use super::optim::Optimizer;
use crate::cuda::{MlpAdamArgs, MlpBiasActArgs, MlpBiasGradArgs, MlpReluBackArgs, MlpSgdArgs};

extern "C" {
    fn mlp_bias_act_emu(a: *const MlpBiasActArgs, grid: u32, block: u32);
    fn mlp_relu_back_emu(a: *const MlpReluBackArgs, grid: u32, block: u32);
    fn mlp_bias_grad_emu(a: *const MlpBiasGradArgs, grid: u32, block: u32);
    fn mlp_sgd_emu(a: *const MlpSgdArgs, grid: u32, block: u32);
    fn mlp_adam_emu(a: *const MlpAdamArgs, grid: u32, block: u32);
}

fn addr<T>(x: *const T) -> u64 {
    x as u64
}

/// Grid and block of an emulated launch (block a multiple of 32).
#[derive(Debug, Clone, Copy)]
pub struct Launch {
    /// Blocks.
    pub grid: u32,
    /// Threads per block.
    pub block: u32,
}

/// `mlp_bias_act` on `z` `[rows × b.len()]`.
pub fn bias_act(z: &mut [f32], b: &[f32], relu: bool, dropout: Option<Dropout>, l: Launch) {
    let cols = b.len();
    assert_eq!(z.len() % cols, 0);
    let rows = z.len() / cols;
    let a = kernel_args::bias_act(
        addr(z.as_mut_ptr()),
        addr(b.as_ptr()),
        (rows, cols),
        relu,
        dropout,
    );
    // SAFETY: z holds rows × cols, b cols.
    unsafe { mlp_bias_act_emu(&a, l.grid, l.block) }
}

/// `mlp_relu_back`.
pub fn relu_back(dh: &[f32], h: &[f32], scale: f32, dz: &mut [f32], l: Launch) {
    assert!(dh.len() == dz.len() && h.len() == dz.len());
    let n = dz.len();
    let a = kernel_args::relu_back(
        addr(dh.as_ptr()),
        addr(h.as_ptr()),
        addr(dz.as_mut_ptr()),
        n,
        scale,
    );
    // SAFETY: all three hold n.
    unsafe { mlp_relu_back_emu(&a, l.grid, l.block) }
}

/// `mlp_bias_grad` of `dz` `[rows × db.len()]`.
pub fn bias_grad(dz: &[f32], db: &mut [f32], l: Launch) {
    let cols = db.len();
    assert_eq!(dz.len() % cols, 0);
    let a = kernel_args::bias_grad(
        addr(dz.as_ptr()),
        addr(db.as_mut_ptr()),
        (dz.len() / cols, cols),
    );
    // SAFETY: dz holds rows × cols, db cols.
    unsafe { mlp_bias_grad_emu(&a, l.grid, l.block) }
}

/// `mlp_sgd` or `mlp_adam` at step `t` (`decay`: weight decay applies).
#[allow(clippy::too_many_arguments)]
pub fn update(
    opt: &Optimizer,
    t: u64,
    p: &mut [f32],
    g: &[f32],
    s1: &mut [f32],
    s2: &mut [f32],
    decay: bool,
    l: Launch,
) {
    let n = p.len();
    assert!(g.len() == n && s1.len() == n && s2.len() == n);
    let ptrs = [
        addr(p.as_mut_ptr()),
        addr(g.as_ptr()),
        addr(s1.as_mut_ptr()),
        addr(s2.as_mut_ptr()),
    ];
    // SAFETY: all four hold n.
    match kernel_args::update(opt.at(t, decay), ptrs, n) {
        UpdateArgs::Sgd(a) => unsafe { mlp_sgd_emu(&a, l.grid, l.block) },
        UpdateArgs::Adam(a) => unsafe { mlp_adam_emu(&a, l.grid, l.block) },
    }
}

/// The CPU engine's versions of the same operations.
pub mod cpu {
    use super::super::ops;
    use super::super::optim::Optimizer;
    use super::Dropout;

    /// As `mlp_bias_act`.
    pub fn bias_act(z: &mut [f32], b: &[f32], relu: bool, dropout: Option<Dropout>) {
        ops::bias_act(z, b, relu, dropout)
    }

    /// As `mlp_relu_back`.
    pub fn relu_back(dh: &[f32], h: &[f32], scale: f32, dz: &mut [f32]) {
        ops::relu_back(dh, h, scale, dz)
    }

    /// As `mlp_bias_grad`.
    pub fn bias_grad(dz: &[f32], db: &mut [f32]) {
        ops::bias_grad(dz, db)
    }

    /// As `mlp_sgd` / `mlp_adam`.
    pub fn update(
        opt: &Optimizer,
        t: u64,
        p: &mut [f32],
        g: &[f32],
        s1: &mut [f32],
        s2: &mut [f32],
        decay: bool,
    ) {
        opt.at(t, decay).apply_cpu(p, g, s1, s2)
    }
}
