//! Optimizers: SGD with momentum, and Adam with decoupled weight decay
//! (AdamW). The same arithmetic, in the same f32 order, runs on the CPU here
//! and on CUDA in kernels/mlp.cu (`mlp_sgd`, `mlp_adam`).

use crate::error::{invalid, Result};
use rayon::prelude::*;

/// How parameters are updated from their gradients. Weight decay applies to
/// the weights only, never to the biases.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Optimizer {
    /// `v ← μ·v + (g + λ·p)`, `p ← p − lr·v`.
    Sgd {
        /// Learning rate.
        lr: f32,
        /// Momentum μ ∈ [0, 1).
        momentum: f32,
        /// L2 weight decay λ ≥ 0 (added to the gradient).
        weight_decay: f32,
    },
    /// Adam with bias correction and decoupled weight decay:
    /// `p ← p − lr·(m̂/(√v̂ + ε) + λ·p)`.
    Adam {
        /// Learning rate.
        lr: f32,
        /// First-moment decay β₁ ∈ [0, 1).
        beta1: f32,
        /// Second-moment decay β₂ ∈ [0, 1).
        beta2: f32,
        /// ε > 0.
        eps: f32,
        /// Decoupled weight decay λ ≥ 0.
        weight_decay: f32,
    },
}

impl Optimizer {
    /// Adam with β = (0.9, 0.999), ε = 1e-8, no weight decay.
    pub fn adam(lr: f32) -> Self {
        Optimizer::Adam {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }

    /// SGD with momentum, no weight decay.
    pub fn sgd(lr: f32, momentum: f32) -> Self {
        Optimizer::Sgd {
            lr,
            momentum,
            weight_decay: 0.0,
        }
    }

    /// The same optimizer with weight decay `wd`.
    pub fn with_weight_decay(self, wd: f32) -> Self {
        match self {
            Optimizer::Sgd { lr, momentum, .. } => Optimizer::Sgd {
                lr,
                momentum,
                weight_decay: wd,
            },
            Optimizer::Adam {
                lr,
                beta1,
                beta2,
                eps,
                ..
            } => Optimizer::Adam {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay: wd,
            },
        }
    }

    /// The learning rate.
    pub fn lr(&self) -> f32 {
        match *self {
            Optimizer::Sgd { lr, .. } | Optimizer::Adam { lr, .. } => lr,
        }
    }

    /// The same optimizer with learning rate `lr` (for schedules).
    pub fn with_lr(mut self, new: f32) -> Self {
        match &mut self {
            Optimizer::Sgd { lr, .. } | Optimizer::Adam { lr, .. } => *lr = new,
        }
        self
    }

    /// Checks every hyper-parameter.
    pub fn validate(&self) -> Result<()> {
        let (lr, wd) = match self.at(1, true) {
            Update::Sgd { lr, momentum, wd } => {
                if !(0.0..1.0).contains(&momentum) {
                    return invalid("momentum", format!("must be in [0, 1), got {momentum}"));
                }
                (lr, wd)
            }
            Update::Adam(h) => {
                for (arg, b) in [("beta1", h.beta1), ("beta2", h.beta2)] {
                    if !(0.0..1.0).contains(&b) {
                        return invalid(arg, format!("must be in [0, 1), got {b}"));
                    }
                }
                let eps = h.eps;
                if !(eps.is_finite() && eps > 0.0) {
                    return invalid("eps", format!("must be finite and > 0, got {eps}"));
                }
                (h.lr, h.wd)
            }
        };
        if !(lr.is_finite() && lr > 0.0) {
            return invalid("lr", format!("must be finite and > 0, got {lr}"));
        }
        if !(wd.is_finite() && wd >= 0.0) {
            return invalid("weight_decay", format!("must be finite and ≥ 0, got {wd}"));
        }
        Ok(())
    }

    /// Adam's bias corrections `1/(1 − β₁ᵗ)`, `1/(1 − β₂ᵗ)` for step `t ≥ 1`
    /// (computed in f64, passed to the kernels as f32).
    fn adam_corrections(beta1: f32, beta2: f32, t: u64) -> (f32, f32) {
        let t = t.min(i32::MAX as u64) as i32;
        (
            (1.0 / (1.0 - (beta1 as f64).powi(t))) as f32,
            (1.0 / (1.0 - (beta2 as f64).powi(t))) as f32,
        )
    }

    /// The update at step `t ≥ 1` of a range with weight decay (`decay`)
    /// or without, as the kernels take it.
    pub(crate) fn at(&self, t: u64, decay: bool) -> Update {
        let decayed = |wd: f32| if decay { wd } else { 0.0 };
        match *self {
            Optimizer::Sgd {
                lr,
                momentum,
                weight_decay,
            } => Update::Sgd {
                lr,
                momentum,
                wd: decayed(weight_decay),
            },
            Optimizer::Adam {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
            } => {
                let (c1, c2) = Self::adam_corrections(beta1, beta2, t);
                Update::Adam(AdamHyper {
                    lr,
                    beta1,
                    beta2,
                    eps,
                    wd: decayed(weight_decay),
                    c1,
                    c2,
                })
            }
        }
    }
}

/// One update's hyper-parameters (weight decay already 0 where it does not
/// apply).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Update {
    Sgd { lr: f32, momentum: f32, wd: f32 },
    Adam(AdamHyper),
}

impl Update {
    /// Applies the update to `p` from `g` on the CPU, with optimizer state
    /// `s1`, `s2` (momentum; Adam's m and v).
    pub(crate) fn apply_cpu(&self, p: &mut [f32], g: &[f32], s1: &mut [f32], s2: &mut [f32]) {
        const MIN: usize = 4096;
        match *self {
            Update::Sgd { lr, momentum, wd } => {
                p.par_iter_mut()
                    .zip(g.par_iter())
                    .zip(s1.par_iter_mut())
                    .with_min_len(MIN)
                    .for_each(|((p, &g), v)| sgd(p, g, v, lr, momentum, wd));
            }
            Update::Adam(h) => {
                p.par_iter_mut()
                    .zip(g.par_iter())
                    .zip(s1.par_iter_mut().zip(s2.par_iter_mut()))
                    .with_min_len(MIN)
                    .for_each(|((p, &g), (m, v))| adam(p, g, m, v, &h));
            }
        }
    }
}

/// One SGD element, as `mlp_sgd` in kernels/mlp.cu.
#[inline]
pub(crate) fn sgd(p: &mut f32, g: f32, v: &mut f32, lr: f32, mu: f32, wd: f32) {
    let g = g + wd * *p;
    *v = mu * *v + g;
    *p -= lr * *v;
}

/// Adam's hyper-parameters of one step: the block `mlp_adam` takes in its
/// launch contract, so the CUDA engine passes it as it is.
pub(crate) use crate::cuda::AdamHyper;

/// One Adam element, as `mlp_adam` in kernels/mlp.cu.
#[inline]
pub(crate) fn adam(p: &mut f32, g: f32, m: &mut f32, v: &mut f32, h: &AdamHyper) {
    *m = h.beta1 * *m + (1.0 - h.beta1) * g;
    *v = h.beta2 * *v + (1.0 - h.beta2) * (g * g);
    let step = (*m * h.c1) / ((*v * h.c2).sqrt() + h.eps);
    *p -= h.lr * (step + h.wd * *p);
}
