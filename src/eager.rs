//! PyTorch-style eager fp32 on the CPU: the accuracy baseline that
//! `kdfuse check` holds precision = fast to (docs/DESIGN.md §3, "fast").
//!
//! Each row as a framework computes it without fusion, every intermediate
//! fp32: `log_softmax(x/τ)` as x − max − log Σ exp(x − max), the
//! divergence's elementwise terms from the two log-probability rows, a sum
//! (pairwise, as PyTorch's reductions), and the gradient by autograd's
//! formulas — ∂D/∂ls elementwise, then log_softmax's backward g − e^ls·Σg.
//! Zero-probability entries contribute 0 (PyTorch's `kl_div`/`xlogy`).
//! Dense teachers without soft-capping or the teacher gradient (the fast
//! kernels' cases); not a backend, only a yardstick.

use crate::driver::KdOutput;
use crate::spec::{KernelDivergence, LossSpec};
use crate::tensor::{Dtype, GradDtype, KdInputs, Logits};

/// Pairwise sum in fp32 (blocks of 8 summed in order, then halves).
fn psum(x: &[f32]) -> f32 {
    if x.len() <= 8 {
        return x.iter().fold(0.0f32, |a, &b| a + b);
    }
    let h = x.len() / 2;
    psum(&x[..h]) + psum(&x[h..])
}

fn log_softmax(x: &[f32], inv_tau: f32) -> Vec<f32> {
    let xs: Vec<f32> = x.iter().map(|&v| v * inv_tau).collect();
    let m = xs.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let e: Vec<f32> = xs.iter().map(|&v| (v - m).exp()).collect();
    let lse = m + psum(&e).ln();
    xs.iter().map(|&v| v - lse).collect()
}

/// `a·b`, 0 where `a` is 0 (xlogy's convention).
fn xmul(a: f32, b: f32) -> f32 {
    if a == 0.0 {
        0.0
    } else {
        a * b
    }
}

/// The eager fp32 loss and gradient of `spec` on `inputs` (gradient rounded
/// to `grad`'s dtype as the backends round theirs).
pub fn eager_f32(inputs: &KdInputs, spec: &LossSpec, grad: GradDtype) -> KdOutput {
    let (n, v) = (inputs.student.rows, inputs.student.cols);
    let tau = spec.temperature as f32;
    let inv_tau = 1.0 / tau;
    let c = spec.soft_coef() as f32;
    let alpha = spec.alpha as f32;
    let valid = inputs.valid_rows(spec.ignore_index);
    let w = (spec.grad_scale * spec.reduction.row_weight(valid, v)) as f32;
    let out_dtype = match grad {
        GradDtype::Input => inputs.student.dtype(),
        GradDtype::F32 => Dtype::F32,
    };
    let row = |x: &Logits, r: usize| -> Vec<f32> { (0..v).map(|j| x.get(r, j)).collect() };
    let mut row_losses = vec![0.0f64; n];
    let mut g = vec![0.0f32; n * v];
    for r in 0..n {
        let y = inputs.labels.map(|l| l[r]);
        let wrow = inputs.row_weights.map_or(1.0, |w| w[r]);
        if y == Some(spec.ignore_index) || wrow == 0.0 {
            continue;
        }
        let (s, t) = (row(&inputs.student, r), row(&inputs.teacher, r));
        let ls = log_softmax(&s, inv_tau);
        let lt = log_softmax(&t, inv_tau);
        let q: Vec<f32> = ls.iter().map(|x| x.exp()).collect();
        let p: Vec<f32> = lt.iter().map(|x| x.exp()).collect();
        // (terms of D, ∂D/∂ls)
        let (terms, dls): (Vec<f32>, Vec<f32>) = match spec.kernel_divergence() {
            KernelDivergence::ForwardKl => {
                (0..v).map(|j| (xmul(p[j], lt[j] - ls[j]), -p[j])).unzip()
            }
            KernelDivergence::ReverseKl => (0..v)
                .map(|j| (xmul(q[j], ls[j] - lt[j]), xmul(q[j], ls[j] - lt[j] + 1.0)))
                .unzip(),
            KernelDivergence::SoftCe => (0..v).map(|j| (-xmul(p[j], ls[j]), -p[j])).unzip(),
            KernelDivergence::Tvd => (0..v)
                .map(|j| {
                    let d = q[j] - p[j];
                    let sign = if d > 0.0 {
                        1.0
                    } else if d < 0.0 {
                        -1.0
                    } else {
                        0.0
                    };
                    (0.5 * d.abs(), 0.5 * sign * q[j])
                })
                .unzip(),
            KernelDivergence::Jsd(beta) => {
                let b = beta as f32;
                (0..v)
                    .map(|j| {
                        let lm = (b * p[j] + (1.0 - b) * q[j]).ln();
                        (
                            b * xmul(p[j], lt[j] - lm) + (1.0 - b) * xmul(q[j], ls[j] - lm),
                            (1.0 - b) * xmul(q[j], ls[j] - lm),
                        )
                    })
                    .unzip()
            }
        };
        let d = psum(&terms);
        let sum_g = psum(&dls);
        let mut loss = 0.0f32;
        if c > 0.0 {
            loss += c * d;
        }
        let gw = w * wrow;
        let grow = &mut g[r * v..(r + 1) * v];
        for j in 0..v {
            grow[j] = if c > 0.0 {
                gw * c * inv_tau * (dls[j] - q[j] * sum_g)
            } else {
                0.0
            };
        }
        if alpha > 0.0 {
            let ls1 = log_softmax(&s, 1.0);
            let yi = y.unwrap_or(0) as usize;
            loss += alpha * -ls1[yi];
            for j in 0..v {
                let onehot = if j == yi { 1.0 } else { 0.0 };
                grow[j] += gw * alpha * (ls1[j].exp() - onehot);
            }
        }
        row_losses[r] = (wrow * loss) as f64;
    }
    let g: Vec<f32> = g.iter().map(|&x| out_dtype.round(x)).collect();
    let total: f64 = row_losses.iter().sum();
    KdOutput {
        loss: spec.reduction.row_weight(valid, v) * total,
        row_losses,
        valid_rows: valid,
        grad: Some(g),
        grad_teacher: None,
    }
}
