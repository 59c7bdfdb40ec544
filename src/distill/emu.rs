//! Test support: kernels/mlp.cu run on the CPU under the CUDA emulation
//! (kernels/emu/mlp_emu.cpp), next to the CPU engine's own versions of the
//! same operations, so tests can hold one against the other. Slow; not for
//! real use.

use super::dropout::Dropout;
use super::optim::{Optimizer, Update};

extern "C" {
    fn mlp_emu_bias_act(
        z: *mut f32,
        b: *const f32,
        rows: i64,
        cols: i32,
        relu: i32,
        dropout: i32,
        key: u32,
        threshold: u32,
        scale: f32,
        grid: u32,
        block: u32,
    );
    fn mlp_emu_relu_back(
        dh: *const f32,
        h: *const f32,
        scale: f32,
        dz: *mut f32,
        n: i64,
        grid: u32,
        block: u32,
    );
    fn mlp_emu_bias_grad(dz: *const f32, rows: i64, cols: i32, db: *mut f32, grid: u32, block: u32);
    fn mlp_emu_sgd(
        p: *mut f32,
        g: *const f32,
        v: *mut f32,
        n: i64,
        lr: f32,
        mu: f32,
        wd: f32,
        grid: u32,
        block: u32,
    );
    fn mlp_emu_adam(
        p: *mut f32,
        g: *const f32,
        m: *mut f32,
        v: *mut f32,
        n: i64,
        lr: f32,
        beta1: f32,
        beta2: f32,
        eps: f32,
        wd: f32,
        c1: f32,
        c2: f32,
        grid: u32,
        block: u32,
    );
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
    let d = dropout.unwrap_or(Dropout {
        key: 0,
        threshold: 0,
        scale: 1.0,
    });
    // SAFETY: z holds rows × cols, b cols.
    unsafe {
        mlp_emu_bias_act(
            z.as_mut_ptr(),
            b.as_ptr(),
            (z.len() / cols) as i64,
            cols as i32,
            relu as i32,
            dropout.is_some() as i32,
            d.key,
            d.threshold,
            d.scale,
            l.grid,
            l.block,
        )
    }
}

/// `mlp_relu_back`.
pub fn relu_back(dh: &[f32], h: &[f32], scale: f32, dz: &mut [f32], l: Launch) {
    assert!(dh.len() == dz.len() && h.len() == dz.len());
    // SAFETY: all three hold n.
    unsafe {
        mlp_emu_relu_back(
            dh.as_ptr(),
            h.as_ptr(),
            scale,
            dz.as_mut_ptr(),
            dz.len() as i64,
            l.grid,
            l.block,
        )
    }
}

/// `mlp_bias_grad` of `dz` `[rows × db.len()]`.
pub fn bias_grad(dz: &[f32], db: &mut [f32], l: Launch) {
    let cols = db.len();
    assert_eq!(dz.len() % cols, 0);
    // SAFETY: dz holds rows × cols, db cols.
    unsafe {
        mlp_emu_bias_grad(
            dz.as_ptr(),
            (dz.len() / cols) as i64,
            cols as i32,
            db.as_mut_ptr(),
            l.grid,
            l.block,
        )
    }
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
    // SAFETY: all four hold n.
    match opt.at(t, decay) {
        Update::Sgd { lr, momentum, wd } => unsafe {
            mlp_emu_sgd(
                p.as_mut_ptr(),
                g.as_ptr(),
                s1.as_mut_ptr(),
                n as i64,
                lr,
                momentum,
                wd,
                l.grid,
                l.block,
            )
        },
        Update::Adam(h) => unsafe {
            mlp_emu_adam(
                p.as_mut_ptr(),
                g.as_ptr(),
                s1.as_mut_ptr(),
                s2.as_mut_ptr(),
                n as i64,
                h.lr,
                h.beta1,
                h.beta2,
                h.eps,
                h.wd,
                h.c1,
                h.c2,
                l.grid,
                l.block,
            )
        },
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
