//! The MLP kernels' launch contracts (kernels/app/app_args.h, mirrored in
//! `crate::cuda`) filled from a training step's values: one place for the
//! CUDA engine and the emulation. Pointers are device pointers on the GPU and
//! host addresses under emulation.

use super::dropout::Dropout;
use super::optim::Update;
use crate::cuda::{MlpAdamArgs, MlpBiasActArgs, MlpBiasGradArgs, MlpReluBackArgs, MlpSgdArgs};

/// `mlp_bias_act` on `z` `[rows × cols]` with bias `b`, ReLU when `relu`,
/// then `dropout` when given.
pub(crate) fn bias_act(
    z: u64,
    b: u64,
    (rows, cols): (usize, usize),
    relu: bool,
    dropout: Option<Dropout>,
) -> MlpBiasActArgs {
    let d = dropout.unwrap_or(Dropout {
        key: 0,
        threshold: 0,
        scale: 1.0,
    });
    MlpBiasActArgs {
        z,
        b,
        rows: rows as i64,
        cols: cols as i32,
        relu: relu as i32,
        dropout: dropout.is_some() as i32,
        key: d.key,
        threshold: d.threshold,
        scale: d.scale,
    }
}

/// `mlp_relu_back`: dz = h > 0 ? dh·scale : 0 over `n` elements.
pub(crate) fn relu_back(dh: u64, h: u64, dz: u64, n: usize, scale: f32) -> MlpReluBackArgs {
    MlpReluBackArgs {
        dh,
        h,
        dz,
        n: n as i64,
        scale,
    }
}

/// `mlp_bias_grad`: db = column sums of dz `[rows × cols]`.
pub(crate) fn bias_grad(dz: u64, db: u64, (rows, cols): (usize, usize)) -> MlpBiasGradArgs {
    MlpBiasGradArgs {
        dz,
        db,
        rows: rows as i64,
        cols: cols as i32,
    }
}

/// One optimizer step's kernel and its arguments.
pub(crate) enum UpdateArgs {
    /// `mlp_sgd`.
    Sgd(MlpSgdArgs),
    /// `mlp_adam`.
    Adam(MlpAdamArgs),
}

/// The kernel of `update` over `n` parameters `p` with gradient `g` and
/// optimizer state `s1` (momentum; Adam's m) and `s2` (Adam's v).
pub(crate) fn update(u: Update, [p, g, s1, s2]: [u64; 4], n: usize) -> UpdateArgs {
    let n = n as i64;
    match u {
        Update::Sgd { lr, momentum, wd } => UpdateArgs::Sgd(MlpSgdArgs {
            p,
            g,
            v: s1,
            n,
            lr,
            mu: momentum,
            wd,
        }),
        Update::Adam(h) => UpdateArgs::Adam(MlpAdamArgs {
            p,
            g,
            m: s1,
            v: s2,
            n,
            h,
        }),
    }
}
