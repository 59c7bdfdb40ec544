//! The f64 reference: the definitions of DESIGN.md §1–§2 evaluated directly
//! (log-softmax, then the divergence and the closed-form gradients), with no
//! online tricks. Every other backend is tested against it.

use crate::backend::{validate, Backend, KdOutput};
use crate::error::Result;
use crate::spec::{KernelDivergence, LossSpec};
use crate::tensor::{Dtype, GradDtype, KdInputs};

/// The f64 reference backend.
#[derive(Debug, Clone, Copy, Default)]
pub struct Oracle;

/// log-softmax of `x / tau`; an all −inf (or empty) row gives NaN.
pub fn log_softmax(x: &[f64], tau: f64) -> Vec<f64> {
    let m = x.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b / tau));
    if m == f64::NEG_INFINITY || x.iter().any(|v| v.is_nan()) {
        return vec![f64::NAN; x.len()];
    }
    let z: f64 = x.iter().map(|&v| (v / tau - m).exp()).sum();
    let lse = m + z.ln();
    x.iter().map(|&v| v / tau - lse).collect()
}

fn logaddexp(a: f64, b: f64) -> f64 {
    let m = a.max(b);
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + (-(a - b).abs()).exp().ln_1p()
}

/// x · y with 0 · anything = 0 (a zero probability contributes nothing).
fn xmul(x: f64, y: f64) -> f64 {
    if x == 0.0 {
        0.0
    } else {
        x * y
    }
}

/// One row: the loss ℓ and the gradient of ℓ with respect to `s` (unweighted).
/// `label` is the hard label when α > 0 (or `None`).
pub fn row(s: &[f64], t: &[f64], label: Option<usize>, spec: &LossSpec) -> (f64, Vec<f64>) {
    let r = row_with_scale(s, t, label, spec);
    (r.0, r.1)
}

/// As [`row`], plus the row's first-order magnitude: α·CE + c·Σ_j P_j |log P_j − log Q_j|
/// (the divergence's summands in absolute value). An fp32 evaluation of ℓ
/// cannot resolve it better than about 1e-7 of this.
pub fn row_with_scale(
    s: &[f64],
    t: &[f64],
    label: Option<usize>,
    spec: &LossSpec,
) -> (f64, Vec<f64>, f64) {
    row_resolving_ties(s, t, label, spec, None)
}

/// TVD's gradient jumps where q = p: an element with |log q − log p| below
/// this (natural log) is a tie that fp32 cannot place on either side.
pub const TVD_TIE_BAND: f64 = 1e-5;

/// As [`row_with_scale`]; for TVD, `hint` (another backend's unweighted
/// gradient row, ∂ℓ/∂s) resolves each near-tie (|log q − log p| ≤
/// [`TVD_TIE_BAND`]): its g_j = ½ sign(q_j − p_j) is taken from {−½, 0, ½} as
/// the one nearest the hint, and ⟨q, g⟩ recomputed. The result is then still
/// an exact one-sided (sub)gradient, the one the other backend chose.
pub fn row_resolving_ties(
    s: &[f64],
    t: &[f64],
    label: Option<usize>,
    spec: &LossSpec,
    hint: Option<&[f64]>,
) -> (f64, Vec<f64>, f64) {
    let mut scale = 0.0;
    let v = s.len();
    let tau = spec.temperature;
    let mut loss = 0.0;
    let mut grad = vec![0.0; v];
    if spec.alpha > 0.0 {
        let y = label.expect("alpha > 0 needs a label");
        let lq1 = log_softmax(s, 1.0);
        loss += spec.alpha * -lq1[y];
        scale += spec.alpha * lq1[y].abs();
        for j in 0..v {
            grad[j] += spec.alpha * (lq1[j].exp() - if j == y { 1.0 } else { 0.0 });
        }
    }
    let c = spec.soft_coef();
    if c > 0.0 {
        let lq = log_softmax(s, tau);
        let lp = log_softmax(t, tau);
        let q: Vec<f64> = lq.iter().map(|x| x.exp()).collect();
        let p: Vec<f64> = lp.iter().map(|x| x.exp()).collect();
        let (d, dd): (f64, Vec<f64>) = match spec.kernel_divergence() {
            KernelDivergence::ForwardKl => {
                scale += c
                    * (0..v)
                        .map(|j| xmul(p[j], (lp[j] - lq[j]).abs()))
                        .sum::<f64>();
                let d = (0..v).map(|j| xmul(p[j], lp[j] - lq[j])).sum();
                (d, (0..v).map(|j| (q[j] - p[j]) / tau).collect())
            }
            KernelDivergence::ReverseKl => {
                let r: Vec<f64> = (0..v).map(|j| lq[j] - lp[j]).collect();
                scale += c * (0..v).map(|j| xmul(q[j], r[j].abs())).sum::<f64>();
                let kl: f64 = (0..v).map(|j| xmul(q[j], r[j])).sum();
                (kl, (0..v).map(|j| xmul(q[j], r[j] - kl) / tau).collect())
            }
            KernelDivergence::Jsd(beta) => {
                let lm: Vec<f64> = (0..v)
                    .map(|j| logaddexp(beta.ln() + lp[j], (1.0 - beta).ln() + lq[j]))
                    .collect();
                let d = (0..v)
                    .map(|j| {
                        beta * xmul(p[j], lp[j] - lm[j]) + (1.0 - beta) * xmul(q[j], lq[j] - lm[j])
                    })
                    .sum();
                scale += c
                    * (0..v)
                        .map(|j| {
                            beta * xmul(p[j], (lp[j] - lm[j]).abs())
                                + (1.0 - beta) * xmul(q[j], (lq[j] - lm[j]).abs())
                        })
                        .sum::<f64>();
                let g: Vec<f64> = (0..v).map(|j| (1.0 - beta) * (lq[j] - lm[j])).collect();
                let qg: f64 = (0..v).map(|j| xmul(q[j], g[j])).sum();
                (d, (0..v).map(|j| xmul(q[j], g[j] - qg) / tau).collect())
            }
            KernelDivergence::Tvd => {
                // g = ½ sign(q − p), with sign(0) = 0 (identical rows: zero
                // gradient).
                let mut g: Vec<f64> = (0..v)
                    .map(|j| {
                        if q[j] > p[j] {
                            0.5
                        } else if q[j] < p[j] {
                            -0.5
                        } else {
                            0.0
                        }
                    })
                    .collect();
                // fp32 resolves the terms to about 1e-7 of ½ Σ (p + q).
                scale += c * 0.5 * (0..v).map(|j| p[j] + q[j]).sum::<f64>();
                let d = 0.5 * (0..v).map(|j| (p[j] - q[j]).abs()).sum::<f64>();
                let qg: f64 = (0..v).map(|j| xmul(q[j], g[j])).sum();
                if let Some(hint) = hint {
                    for j in 0..v {
                        if q[j] > 0.0 && (lq[j] - lp[j]).abs() <= TVD_TIE_BAND {
                            // The hint's soft part, in units of ∂D/∂s_j.
                            let want = (hint[j] - grad[j]) / c;
                            let err = |gj: f64| (q[j] * (gj - qg) / tau - want).abs();
                            g[j] = [g[j], -0.5, 0.0, 0.5].into_iter().fold(g[j], |b, x| {
                                if err(x) < err(b) {
                                    x
                                } else {
                                    b
                                }
                            });
                        }
                    }
                }
                // g_j − ⟨q, g⟩ without cancellation: Q₋ where g = ½, −Q₊ where
                // g = −½, ½(Q₋ − Q₊) at a tie (Q₊, Q₋ the student masses above
                // and below the teacher, ties half each, Q₊ + Q₋ = 1). A row
                // where the student is above the teacher wherever it has mass
                // has an exactly zero gradient, not a rounding of ½ − ½·Σq.
                let up: f64 = (0..v).map(|j| xmul(q[j], 0.5 + g[j])).sum();
                let dn: f64 = (0..v).map(|j| xmul(q[j], 0.5 - g[j])).sum();
                let centred = |gj: f64| {
                    if gj > 0.0 {
                        dn
                    } else if gj < 0.0 {
                        -up
                    } else {
                        0.5 * (dn - up)
                    }
                };
                (d, (0..v).map(|j| xmul(q[j], centred(g[j])) / tau).collect())
            }
            KernelDivergence::SoftCe => {
                // −Σ p log q; computed as KL(p‖q) + H(p) elsewhere, so the
                // magnitude is that of both.
                scale += c
                    * (0..v)
                        .map(|j| xmul(p[j], (lp[j] - lq[j]).abs() - lp[j]))
                        .sum::<f64>();
                let d = (0..v).map(|j| xmul(p[j], -lq[j])).sum();
                (d, (0..v).map(|j| (q[j] - p[j]) / tau).collect())
            }
        };
        loss += c * d;
        for j in 0..v {
            grad[j] += c * dd[j];
        }
    }
    (loss, grad, scale)
}

impl Oracle {
    /// Each row's first-order magnitude (see [`row_with_scale`]); 0 for
    /// ignored rows. Inputs must be valid.
    pub fn row_scales(&self, inputs: &KdInputs, spec: &LossSpec) -> Vec<f64> {
        let (n, v) = (inputs.student.rows, inputs.student.cols);
        (0..n)
            .map(|r| {
                let label = inputs.labels.map(|l| l[r]);
                if label == Some(spec.ignore_index) {
                    return 0.0;
                }
                let s: Vec<f64> = (0..v).map(|c| inputs.student.get(r, c) as f64).collect();
                let t: Vec<f64> = (0..v).map(|c| inputs.teacher.get(r, c) as f64).collect();
                row_with_scale(&s, &t, label.map(|y| y as usize), spec).2
            })
            .collect()
    }
}

impl Oracle {
    /// As [`Backend::compute`], with TVD's near-ties resolved as in
    /// `other` (another backend's output for the same call, gradient in
    /// f32 or rounded): see [`row_resolving_ties`]. Other divergences, or
    /// `other` without a gradient, give exactly `compute`'s result.
    pub fn compute_resolving_ties(
        &self,
        inputs: &KdInputs,
        spec: &LossSpec,
        grad: Option<GradDtype>,
        other: &KdOutput,
    ) -> Result<KdOutput> {
        self.compute_impl(inputs, spec, grad, other.grad.as_deref())
    }

    fn compute_impl(
        &self,
        inputs: &KdInputs,
        spec: &LossSpec,
        grad: Option<GradDtype>,
        hint: Option<&[f32]>,
    ) -> Result<KdOutput> {
        validate(inputs, spec)?;
        let (n, v) = (inputs.student.rows, inputs.student.cols);
        let valid = inputs.valid_rows(spec.ignore_index);
        let w = spec.reduction.row_weight(valid, v);
        let mut row_losses = vec![0.0; n];
        let mut g = grad.map(|_| vec![0.0f32; n * v]);
        let round = match grad {
            Some(GradDtype::Input) => inputs.student.dtype(),
            _ => Dtype::F32,
        };
        for r in 0..n {
            let label = inputs.labels.map(|l| l[r]);
            if label == Some(spec.ignore_index) {
                continue;
            }
            let s: Vec<f64> = (0..v).map(|c| inputs.student.get(r, c) as f64).collect();
            let t: Vec<f64> = (0..v).map(|c| inputs.teacher.get(r, c) as f64).collect();
            // The hint, unweighted (when the weight allows it).
            let scale = spec.grad_scale * w;
            let h: Option<Vec<f64>> = hint
                .filter(|h| h.len() == n * v && scale != 0.0 && scale.is_finite())
                .map(|h| {
                    h[r * v..(r + 1) * v]
                        .iter()
                        .map(|&x| x as f64 / scale)
                        .collect()
                });
            let (l, gr, _) =
                row_resolving_ties(&s, &t, label.map(|y| y as usize), spec, h.as_deref());
            row_losses[r] = l;
            if let Some(g) = g.as_mut() {
                for (dst, &x) in g[r * v..(r + 1) * v].iter_mut().zip(&gr) {
                    *dst = round.round((spec.grad_scale * w * x) as f32);
                }
            }
        }
        let loss = w * row_losses.iter().sum::<f64>();
        Ok(KdOutput {
            loss,
            row_losses,
            valid_rows: valid,
            grad: g,
            grad_teacher: None,
        })
    }
}

impl Backend for Oracle {
    fn name(&self) -> &'static str {
        "oracle"
    }

    fn compute_topk(
        &self,
        _inputs: &crate::tensor::TopkInputs,
        _spec: &LossSpec,
        _grad: Option<GradDtype>,
    ) -> Result<KdOutput> {
        crate::error::invalid("teacher", "top-k teacher: not implemented yet")
    }

    fn compute(
        &self,
        inputs: &KdInputs,
        spec: &LossSpec,
        grad: Option<GradDtype>,
    ) -> Result<KdOutput> {
        self.compute_impl(inputs, spec, grad, None)
    }
}

impl Oracle {
    /// Each row's first-order magnitude of a top-k case (see
    /// [`Oracle::row_scales`]).
    pub fn topk_row_scales(&self, inputs: &crate::tensor::TopkInputs, _spec: &LossSpec) -> Vec<f64> {
        // Placeholder until the top-k oracle lands.
        vec![1.0; inputs.student.rows]
    }
}
