//! The f64 reference: the definitions of docs/DESIGN.md §1–§2 and §4 evaluated
//! directly (log-softmax, then the divergence and the closed-form gradients),
//! with no online tricks. Every other backend is tested against it.

use crate::driver::{drive, store_row, Backend, CallInputs, KdOutput, Outputs};
use crate::error::Result;
use crate::spec::{KernelDivergence, LossSpec, Precision, TopkMode};
use crate::tensor::{Dtype, GradDtype, KdInputs, TopkInputs};

/// The f64 reference backend.
#[derive(Debug, Clone, Copy, Default)]
pub struct Oracle;

/// log-softmax of `x / tau`; a row holding a NaN or a +inf, and an all −inf
/// (or empty) row, give NaN everywhere (−inf entries are masked: log-prob
/// −inf).
pub fn log_softmax(x: &[f64], tau: f64) -> Vec<f64> {
    let m = x.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b / tau));
    if m.is_infinite() || x.iter().any(|v| v.is_nan()) {
        return vec![f64::NAN; x.len()];
    }
    let z: f64 = x.iter().map(|&v| (v / tau - m).exp()).sum();
    let lse = m + z.ln();
    x.iter().map(|&v| v / tau - lse).collect()
}

pub(crate) fn logaddexp(a: f64, b: f64) -> f64 {
    let m = a.max(b);
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + (-(a - b).abs()).exp().ln_1p()
}

/// A NaN row loss makes every gradient entry of the row NaN (a masked
/// entry's zero included): the row is not defined, and no entry of it may
/// pass as a number.
fn poison_nan_row(loss: f64, grads: [Option<&mut [f64]>; 2]) {
    if loss.is_nan() {
        for g in grads.into_iter().flatten() {
            g.fill(f64::NAN);
        }
    }
}

/// x · y with 0 · anything = 0 (a zero probability contributes nothing).
pub(crate) fn xmul(x: f64, y: f64) -> f64 {
    if x == 0.0 {
        0.0
    } else {
        x * y
    }
}

/// Soft-capping `cap·tanh(x/cap)`; a −inf logit (a masked entry) stays −inf
/// (+inf becomes `cap`, NaN stays NaN).
pub fn softcap(x: f64, cap: f64) -> f64 {
    if x == f64::NEG_INFINITY {
        x
    } else {
        cap * (x / cap).tanh()
    }
}

/// d/dx of [`softcap`]: 1 − tanh²(x/cap), written as 1/cosh² so that it keeps
/// its relative accuracy far out on the flat parts; 0 at ±inf.
pub fn softcap_derivative(x: f64, cap: f64) -> f64 {
    let c = (x / cap).cosh();
    1.0 / (c * c)
}

/// The row after the optional soft-capping, and the derivative of each
/// capped value with respect to the raw one (`None` without a cap).
fn capped(x: &[f64], cap: Option<f64>) -> (Vec<f64>, Option<Vec<f64>>) {
    match cap {
        None => (x.to_vec(), None),
        Some(cap) => (
            x.iter().map(|&v| softcap(v, cap)).collect(),
            Some(x.iter().map(|&v| softcap_derivative(v, cap)).collect()),
        ),
    }
}

/// The batch paths' soft-capping; with `round`, the capped row is rounded
/// to f32, as the backends hold it (the comparison references). Returns the
/// capped row and its derivative.
fn precap(x: &[f64], cap: Option<f64>, round: bool) -> (Vec<f64>, Option<Vec<f64>>) {
    let (mut c, d) = capped(x, cap);
    if round && cap.is_some() {
        c.iter_mut().for_each(|v| *v = *v as f32 as f64);
    }
    (c, d)
}

/// `spec` without its soft-cap (applied by [`precap`] instead).
fn uncapped(spec: &LossSpec) -> LossSpec {
    LossSpec {
        softcap: None,
        ..spec.clone()
    }
}

/// Multiplies a gradient with respect to capped values by the cap's
/// derivative (the chain rule back to the raw logits); a zero derivative (a
/// −inf entry) gives 0 whatever the gradient there.
fn chain_cap(grad: &mut [f64], d: Option<&[f64]>) {
    if let Some(d) = d {
        for (g, &dj) in grad.iter_mut().zip(d) {
            *g = xmul(dj, *g);
        }
    }
}

/// Adds the hard-label term α·CE(s, y) at τ = 1 (over the whole row) to
/// `loss`, `scale` and `grad`.
fn add_hard_ce(
    s: &[f64],
    label: Option<usize>,
    alpha: f64,
    loss: &mut f64,
    scale: &mut f64,
    grad: &mut [f64],
) {
    if alpha > 0.0 {
        let y = label.expect("alpha > 0 needs a label");
        let lq1 = log_softmax(s, 1.0);
        *loss += alpha * -lq1[y];
        *scale += alpha * lq1[y].abs();
        for (j, g) in grad.iter_mut().enumerate() {
            *g += alpha * (lq1[j].exp() - if j == y { 1.0 } else { 0.0 });
        }
    }
}

/// One row: the loss ℓ and the gradient of ℓ with respect to `s` (unweighted).
/// `label` is the hard label when α > 0 (or `None`). Honours every option of
/// `spec` that acts on one row (soft-capping included); see [`row_detailed`].
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
    let r = row_detailed(s, t, label, spec, hint);
    (r.loss, r.grad_s, r.scale)
}

/// Everything the oracle computes for one dense row, unweighted (before the
/// row weight, the reduction's weight and `grad_scale`).
///
/// NaN and infinities: a row whose used inputs hold a NaN or a +inf (after
/// the optional soft-capping, which maps +inf to the cap), or whose student
/// or teacher distribution is all −inf, has ℓ = NaN and NaN in every entry
/// of both gradients. Used: the student row always, the teacher row when
/// the soft term is on (α < 1), every column of each, masked (−inf on the
/// other side) or not. −inf is a masked entry (probability 0).
#[derive(Debug, Clone, PartialEq)]
pub struct RowResult {
    /// The row loss ℓ = α·CE + (1 − α)·c·D (NaN for a row with a NaN or
    /// +inf input, see above).
    pub loss: f64,
    /// ∂ℓ/∂s, with respect to the raw (uncapped) student logits.
    pub grad_s: Vec<f64>,
    /// ∂ℓ/∂t, with respect to the raw (uncapped) teacher logits (the hard CE
    /// does not depend on t). Always computed, whatever `spec.grad_teacher`.
    /// Where ℓ is +inf (forward KL or soft-CE with teacher mass where the
    /// student is −inf) it is not defined and holds NaN/±inf entries.
    pub grad_t: Vec<f64>,
    /// The first-order magnitude of ℓ, as [`row_with_scale`].
    pub scale: f64,
}

/// One dense row with every option of `spec`: soft-capping of `s` and `t`
/// first, the hard CE at τ = 1, the soft term, and the gradients with respect
/// to both inputs (docs/DESIGN.md §1–§2). `hint` resolves TVD's near-ties as in
/// [`row_resolving_ties`]; the teacher side of TVD then uses h = −g with the
/// same resolved g.
pub fn row_detailed(
    s: &[f64],
    t: &[f64],
    label: Option<usize>,
    spec: &LossSpec,
    hint: Option<&[f64]>,
) -> RowResult {
    let v = s.len();
    let (s, ds) = capped(s, spec.softcap);
    let (t, dt) = capped(t, spec.softcap);
    let tau = spec.temperature;
    let mut loss = 0.0;
    let mut scale = 0.0;
    let mut grad = vec![0.0; v];
    let mut grad_t = vec![0.0; v];
    add_hard_ce(&s, label, spec.alpha, &mut loss, &mut scale, &mut grad);
    let c = spec.soft_coef();
    if c > 0.0 {
        let lq = log_softmax(&s, tau);
        let lp = log_softmax(&t, tau);
        let q: Vec<f64> = lq.iter().map(|x| x.exp()).collect();
        let p: Vec<f64> = lp.iter().map(|x| x.exp()).collect();
        // (D, ∂D/∂s, ∂D/∂t, Σ |summands|), all with respect to the capped
        // logits.
        let (d, dd, ddt, sc): (f64, Vec<f64>, Vec<f64>, f64) = match spec.kernel_divergence() {
            KernelDivergence::ForwardKl => {
                let r: Vec<f64> = (0..v).map(|j| lp[j] - lq[j]).collect();
                let sc = (0..v).map(|j| xmul(p[j], r[j].abs())).sum();
                let kl: f64 = (0..v).map(|j| xmul(p[j], r[j])).sum();
                (
                    kl,
                    (0..v).map(|j| (q[j] - p[j]) / tau).collect(),
                    (0..v).map(|j| xmul(p[j], r[j] - kl) / tau).collect(),
                    sc,
                )
            }
            KernelDivergence::ReverseKl => {
                let r: Vec<f64> = (0..v).map(|j| lq[j] - lp[j]).collect();
                let sc = (0..v).map(|j| xmul(q[j], r[j].abs())).sum();
                let kl: f64 = (0..v).map(|j| xmul(q[j], r[j])).sum();
                (
                    kl,
                    (0..v).map(|j| xmul(q[j], r[j] - kl) / tau).collect(),
                    (0..v).map(|j| (p[j] - q[j]) / tau).collect(),
                    sc,
                )
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
                let sc = (0..v)
                    .map(|j| {
                        beta * xmul(p[j], (lp[j] - lm[j]).abs())
                            + (1.0 - beta) * xmul(q[j], (lq[j] - lm[j]).abs())
                    })
                    .sum();
                // g = ∂D/∂q, h = ∂D/∂p.
                let g: Vec<f64> = (0..v).map(|j| (1.0 - beta) * (lq[j] - lm[j])).collect();
                let h: Vec<f64> = (0..v).map(|j| beta * (lp[j] - lm[j])).collect();
                let qg: f64 = (0..v).map(|j| xmul(q[j], g[j])).sum();
                let ph: f64 = (0..v).map(|j| xmul(p[j], h[j])).sum();
                (
                    d,
                    (0..v).map(|j| xmul(q[j], g[j] - qg) / tau).collect(),
                    (0..v).map(|j| xmul(p[j], h[j] - ph) / tau).collect(),
                    sc,
                )
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
                let sc = 0.5 * (0..v).map(|j| p[j] + q[j]).sum::<f64>();
                let d = 0.5 * (0..v).map(|j| (p[j] - q[j]).abs()).sum::<f64>();
                let mut qg: f64 = (0..v).map(|j| xmul(q[j], g[j])).sum();
                if let Some(hint) = hint {
                    for j in 0..v {
                        let dj = ds.as_ref().map_or(1.0, |d| d[j]);
                        if q[j] > 0.0 && dj > 0.0 && (lq[j] - lp[j]).abs() <= TVD_TIE_BAND {
                            // The hint's soft part, in units of ∂D/∂s_j (of
                            // the capped logit).
                            let want = (hint[j] / dj - grad[j]) / c;
                            // ⟨q, g⟩ moves with the candidate: a tie where q_j
                            // is large shifts every element.
                            let old = g[j];
                            let err =
                                |gj: f64| (q[j] * (gj - qg - q[j] * (gj - old)) / tau - want).abs();
                            g[j] = [-0.5, 0.0, 0.5].into_iter().fold(old, |b, x| {
                                if err(x) < err(b) {
                                    x
                                } else {
                                    b
                                }
                            });
                            qg += q[j] * (g[j] - old);
                        }
                    }
                }
                // x_j (σ_j − ⟨x, σ⟩) for σ ∈ {½, 0, −½}, without
                // cancellation: X₋ where σ = ½, −X₊ where σ = −½, ½(X₋ − X₊)
                // at a tie (X₊, X₋ the masses of x where σ is up and down,
                // ties half each, X₊ + X₋ = 1). A row where the student is
                // above the teacher wherever it has mass has an exactly zero
                // gradient, not a rounding of ½ − ½·Σq.
                let centred = |x: &[f64], sigma: &[f64]| -> Vec<f64> {
                    let up: f64 = (0..v).map(|j| xmul(x[j], 0.5 + sigma[j])).sum();
                    let dn: f64 = (0..v).map(|j| xmul(x[j], 0.5 - sigma[j])).sum();
                    (0..v)
                        .map(|j| {
                            let c = if sigma[j] > 0.0 {
                                dn
                            } else if sigma[j] < 0.0 {
                                -up
                            } else {
                                0.5 * (dn - up)
                            };
                            xmul(x[j], c) / tau
                        })
                        .collect()
                };
                // The teacher side: h = ∂D/∂p = ½ sign(p − q) = −g, with the
                // student side's tie resolution.
                let h: Vec<f64> = g.iter().map(|&x| -x).collect();
                (d, centred(&q, &g), centred(&p, &h), sc)
            }
            KernelDivergence::SoftCe => {
                // −Σ p log q; computed as KL(p‖q) + H(p) elsewhere, so the
                // magnitude is that of both.
                let sc = (0..v)
                    .map(|j| xmul(p[j], (lp[j] - lq[j]).abs() - lp[j]))
                    .sum();
                let d: f64 = (0..v).map(|j| xmul(p[j], -lq[j])).sum();
                // h = ∂D/∂p = −log q, ⟨p, h⟩ = D.
                (
                    d,
                    (0..v).map(|j| (q[j] - p[j]) / tau).collect(),
                    (0..v).map(|j| xmul(p[j], -lq[j] - d) / tau).collect(),
                    sc,
                )
            }
        };
        loss += c * d;
        scale += c * sc;
        for j in 0..v {
            grad[j] += c * dd[j];
            grad_t[j] = c * ddt[j];
        }
    }
    chain_cap(&mut grad, ds.as_deref());
    chain_cap(&mut grad_t, dt.as_deref());
    poison_nan_row(loss, [Some(&mut grad), Some(&mut grad_t)]);
    RowResult {
        loss,
        grad_s: grad,
        grad_t,
        scale,
    }
}

/// The teacher mass below which `tail` takes P_tail as exactly 0: the
/// rounding of a full support's Σ exp(log p) (docs/DESIGN.md §4).
pub const TAIL_MASS_FLOOR: f64 = 1e-6;

/// One row with a top-k teacher (docs/DESIGN.md §4, mode `spec.topk_mode`): the
/// loss ℓ, ∂ℓ/∂s (unweighted, over all V) and the first-order magnitude (as
/// [`row_with_scale`]). `idx` holds the k distinct support indices (each
/// < `s.len()`), `vals` the teacher's values there (logits, or log-probs);
/// soft-capping applies to `s` and to `vals`. The hard CE is over the whole
/// row at τ = 1. `tail` takes τ = 1 whatever `spec.temperature` (its
/// validation asks for τ = 1 and log-prob values).
///
/// NaN and infinities, as [`RowResult`]: a NaN or +inf in a used input
/// makes ℓ and the whole gradient row NaN. Used: the values when the soft
/// term is on (α < 1); the student on the support, and everywhere in `full`
/// and `tail` or when α > 0 (the hard CE is over the whole row). `support`
/// with α = 0 never reads the student off the support. All values −inf is
/// NaN in `support` and `full` (no teacher distribution) and an empty
/// support in `tail` (P_tail = 1).
pub fn topk_row(
    s: &[f64],
    idx: &[usize],
    vals: &[f64],
    label: Option<usize>,
    spec: &LossSpec,
) -> (f64, Vec<f64>, f64) {
    let v = s.len();
    let k = idx.len();
    let (s, ds) = capped(s, spec.softcap);
    let (vals, _) = capped(vals, spec.softcap);
    let mut loss = 0.0;
    let mut scale = 0.0;
    let mut grad = vec![0.0; v];
    add_hard_ce(&s, label, spec.alpha, &mut loss, &mut scale, &mut grad);
    let c = spec.soft_coef();
    if c > 0.0 {
        let tau = spec.temperature;
        let (d, sc) = match spec.topk_mode {
            TopkMode::Support => {
                let s_sup: Vec<f64> = idx.iter().map(|&j| s[j]).collect();
                let lq = log_softmax(&s_sup, tau);
                let lp = log_softmax(&vals, tau);
                let mut d = 0.0;
                let mut sc = 0.0;
                for i in 0..k {
                    let p = lp[i].exp();
                    d += xmul(p, lp[i] - lq[i]);
                    sc += xmul(p, (lp[i] - lq[i]).abs());
                    grad[idx[i]] += c * (lq[i].exp() - p) / tau;
                }
                (d, sc)
            }
            TopkMode::Full => {
                let lq = log_softmax(&s, tau);
                let lp = log_softmax(&vals, tau);
                for j in 0..v {
                    grad[j] += c * lq[j].exp() / tau;
                }
                let mut d = 0.0;
                let mut sc = 0.0;
                for i in 0..k {
                    let p = lp[i].exp();
                    let r = lp[i] - lq[idx[i]];
                    d += xmul(p, r);
                    sc += xmul(p, r.abs());
                    grad[idx[i]] -= c * p / tau;
                }
                (d, sc)
            }
            TopkMode::Tail if vals.iter().any(|&x| x.is_nan() || x == f64::INFINITY) => {
                // A log-prob of +inf (or NaN) is no probability.
                (f64::NAN, f64::NAN)
            }
            TopkMode::Tail => {
                let lq = log_softmax(&s, 1.0);
                let mut in_support = vec![false; v];
                let mut d = 0.0;
                let mut sc = 0.0;
                let mass: f64 = vals.iter().map(|x| x.exp()).sum();
                // The magnitude is that of the bucket KL written from the
                // support's normalised teacher p̃ = P/S (S = Σ_I P):
                // S·KL(p̃‖q) + S ln S + P_tail (ln P_tail − ln Q_tail). The
                // buckets' absolute log-probabilities (ln S, ln P_tail, and
                // the student's ln Q_I, ln Q_tail) are first-order terms of
                // any fp32 evaluation (the dense KL has no such terms).
                sc += xmul(mass, mass.ln().abs());
                for i in 0..k {
                    let p = vals[i].exp();
                    let r = vals[i] - lq[idx[i]];
                    d += xmul(p, r);
                    sc += xmul(p, (r - mass.ln()).abs());
                    in_support[idx[i]] = true;
                    grad[idx[i]] += c * (lq[idx[i]].exp() - p);
                }
                let mut p_tail = (1.0 - mass).max(0.0);
                if p_tail < TAIL_MASS_FLOOR {
                    p_tail = 0.0;
                }
                // Summed directly, not as 1 − Σ_I q: no cancellation when the
                // support holds nearly all of the student's mass.
                let q_tail: f64 = (0..v)
                    .filter(|&j| !in_support[j])
                    .map(|j| lq[j].exp())
                    .sum();
                // ln 0 = −inf: P_tail > 0 = Q_tail gives +inf.
                let r = p_tail.ln() - q_tail.ln();
                d += xmul(p_tail, r);
                // Q_tail and Q_I = 1 − Q_tail, the student's bucket masses,
                // enter as logs too.
                sc += xmul(p_tail, p_tail.ln().abs() + q_tail.ln().abs());
                sc += xmul(mass, (1.0 - q_tail).max(0.0).ln().abs());
                // P_tail = 0 means no tail term; P_tail > 0 = Q_tail leaves
                // only q_j = 0 off the support (xmul then gives 0).
                let ratio = if p_tail == 0.0 { 0.0 } else { p_tail / q_tail };
                for j in 0..v {
                    if !in_support[j] {
                        grad[j] += c * xmul(lq[j].exp(), 1.0 - ratio);
                    }
                }
                (d, sc)
            }
        };
        loss += c * d;
        scale += c * sc;
    }
    chain_cap(&mut grad, ds.as_deref());
    poison_nan_row(loss, [Some(&mut grad), None]);
    (loss, grad, scale)
}

/// A row's weight: 1 without weights.
fn row_weight_of(weights: Option<&[f32]>, r: usize) -> f64 {
    weights.map_or(1.0, |w| w[r] as f64)
}

/// One row's unweighted results for the batch loop: ℓ, ∂ℓ/∂s, ∂ℓ/∂t.
type RowOut = (f64, Vec<f64>, Option<Vec<f64>>);

/// The batch loop shared by the dense and the top-k paths: skips ignored
/// rows and rows of weight 0 (loss and gradients 0 even where ℓ = inf or
/// NaN: such a row's inputs are not used), a NaN ℓ makes the row's
/// gradients NaN and the reduced loss NaN,
/// applies the row weights, the reduction's weight and `grad_scale`, and
/// rounds the gradients. `row_fn(r, s, label, hint)` gets row `r`'s student
/// after the soft-cap ([`precap`] with `round_cap`), its label and its hint
/// (the `hint` gradient row made unweighted and taken to the capped logits,
/// when given and the weight allows it), and returns ℓ, ∂ℓ/∂s of the capped
/// student (taken back to the raw logits here), and ∂ℓ/∂t.
fn run_rows(
    inputs: &impl CallInputs,
    spec: &LossSpec,
    hint: Option<&[f32]>,
    round_cap: bool,
    out: &mut Outputs,
    mut row_fn: impl FnMut(usize, &[f64], Option<usize>, Option<Vec<f64>>) -> RowOut,
) {
    let (n, v) = (out.row_losses.len(), inputs.student().cols);
    let w = spec.reduction.row_weight(out.valid_rows, v);
    let round = out.grad_dtype.unwrap_or(Dtype::F32);
    for r in 0..n {
        let label = inputs.labels().map(|l| l[r]);
        let wr = row_weight_of(inputs.row_weights(), r);
        let grads = [out.grad.as_mut(), out.grad_teacher.as_mut()];
        if label == Some(spec.ignore_index) || wr == 0.0 {
            out.row_losses[r] = 0.0;
            for g in grads.into_iter().flatten() {
                g[r * v..(r + 1) * v].fill(0.0);
            }
            continue;
        }
        let scale = spec.grad_scale * w * wr;
        let (s, ds) = precap(&logits_row(inputs.student(), r), spec.softcap, round_cap);
        // The hint is a gradient with respect to the raw logits.
        let h: Option<Vec<f64>> = hint
            .filter(|h| h.len() == n * v && scale != 0.0 && scale.is_finite())
            .map(|h| {
                let h = &h[r * v..(r + 1) * v];
                (0..v)
                    .map(|j| {
                        let x = h[j] as f64 / scale;
                        match &ds {
                            Some(d) if d[j] > 0.0 => x / d[j],
                            _ => x,
                        }
                    })
                    .collect()
            });
        let (l, mut gs, mut gtr) = row_fn(r, &s, label.map(|y| y as usize), h);
        chain_cap(&mut gs, ds.as_deref());
        // After the soft-cap's chain rule (which zeroes masked entries).
        poison_nan_row(l, [Some(&mut gs), gtr.as_deref_mut()]);
        out.row_losses[r] = wr * l;
        for (g, src) in grads.into_iter().zip([Some(&gs), gtr.as_ref()]) {
            if let (Some(g), Some(src)) = (g, src) {
                store_row(&mut g[r * v..(r + 1) * v], src, scale, round);
            }
        }
    }
}

/// Row `r` of a logit matrix in f64.
fn logits_row(x: &crate::tensor::Logits<'_>, r: usize) -> Vec<f64> {
    (0..x.cols).map(|c| x.get(r, c) as f64).collect()
}

/// Row `r` of a top-k teacher: indices and values.
fn topk_teacher_row(inputs: &TopkInputs, r: usize) -> (Vec<usize>, Vec<f64>) {
    let k = inputs.teacher.k;
    let idx = (0..k)
        .map(|i| inputs.teacher.indices.get(r * k + i) as usize)
        .collect();
    let vals = (0..k)
        .map(|i| inputs.teacher.values.get(r * k + i) as f64)
        .collect();
    (idx, vals)
}

/// `scale(r, s, label)` of each row (`s` the student row) times the row's
/// weight in absolute value; 0 for ignored rows and rows of weight 0.
fn weighted_scales(
    inputs: &impl CallInputs,
    spec: &LossSpec,
    scale: impl Fn(usize, &[f64], Option<usize>) -> f64,
) -> Vec<f64> {
    (0..inputs.student().rows)
        .map(|r| {
            let label = inputs.labels().map(|l| l[r]);
            let wr = row_weight_of(inputs.row_weights(), r);
            if label == Some(spec.ignore_index) || wr == 0.0 {
                return 0.0;
            }
            let s = logits_row(inputs.student(), r);
            wr.abs() * scale(r, &s, label.map(|y| y as usize))
        })
        .collect()
}

impl Oracle {
    /// Each row's first-order magnitude (see [`row_with_scale`]) times the
    /// row's weight in absolute value, like the row losses; 0 for ignored
    /// rows. Inputs must be valid.
    pub fn row_scales(&self, inputs: &KdInputs, spec: &LossSpec) -> Vec<f64> {
        weighted_scales(inputs, spec, |r, s, label| {
            row_with_scale(s, &logits_row(&inputs.teacher, r), label, spec).2
        })
    }

    /// As [`Oracle::row_scales`], for a top-k teacher ([`topk_row`]).
    pub fn row_scales_topk(&self, inputs: &TopkInputs, spec: &LossSpec) -> Vec<f64> {
        weighted_scales(inputs, spec, |r, s, label| {
            let (idx, vals) = topk_teacher_row(inputs, r);
            topk_row(s, &idx, &vals, label, spec).2
        })
    }

    /// The reference a backend's output is compared with (`kdfuse check`):
    /// [`Backend::compute`] with TVD's near-ties resolved as in `other`
    /// (another backend's output for the same call, gradient in f32 or
    /// rounded, see [`row_resolving_ties`]), and soft-capped logits rounded
    /// to f32, as the backends hold them (as 16-bit inputs are compared on
    /// their rounded values). Without a cap, and for other divergences or
    /// `other` without a gradient, exactly `compute`'s result.
    pub fn compute_resolving_ties(
        &self,
        inputs: &KdInputs,
        spec: &LossSpec,
        grad: Option<GradDtype>,
        other: &KdOutput,
    ) -> Result<KdOutput> {
        drive(inputs, spec, grad, |out| {
            dense_batch(inputs, spec, other.grad.as_deref(), true, out)
        })
    }

    /// The reference for a top-k call: [`Backend::compute_topk`] with
    /// soft-capped logits and values rounded to f32, as the backends hold
    /// them (see [`Oracle::compute_resolving_ties`]).
    pub fn compute_topk_reference(
        &self,
        inputs: &TopkInputs,
        spec: &LossSpec,
        grad: Option<GradDtype>,
    ) -> Result<KdOutput> {
        drive(inputs, spec, grad, |out| {
            topk_batch(inputs, spec, true, out)
        })
    }
}

/// The top-k batch; `round_cap` as [`precap`].
fn topk_batch(
    inputs: &TopkInputs,
    spec: &LossSpec,
    round_cap: bool,
    out: &mut Outputs,
) -> Result<()> {
    run_rows(inputs, spec, None, round_cap, out, |r, s, label, _| {
        let (idx, vals) = topk_teacher_row(inputs, r);
        let (vals, _) = precap(&vals, spec.softcap, round_cap);
        let (l, g, _) = topk_row(s, &idx, &vals, label, &uncapped(spec));
        (l, g, None)
    });
    Ok(())
}

/// The dense batch; `hint` as [`run_rows`], `round_cap` as [`precap`].
fn dense_batch(
    inputs: &KdInputs,
    spec: &LossSpec,
    hint: Option<&[f32]>,
    round_cap: bool,
    out: &mut Outputs,
) -> Result<()> {
    run_rows(inputs, spec, hint, round_cap, out, |r, s, label, h| {
        let (t, dt) = precap(&logits_row(&inputs.teacher, r), spec.softcap, round_cap);
        let mut res = row_detailed(s, &t, label, &uncapped(spec), h.as_deref());
        chain_cap(&mut res.grad_t, dt.as_deref());
        (res.loss, res.grad_s, Some(res.grad_t))
    });
    Ok(())
}

impl Backend for Oracle {
    fn name(&self) -> &'static str {
        "oracle"
    }

    fn precision(&self, _: &LossSpec) -> Precision {
        Precision::Exact
    }

    fn dense(&self, inputs: &KdInputs, spec: &LossSpec, out: &mut Outputs) -> Result<()> {
        dense_batch(inputs, spec, None, false, out)
    }

    fn topk(&self, inputs: &TopkInputs, spec: &LossSpec, out: &mut Outputs) -> Result<()> {
        topk_batch(inputs, spec, false, out)
    }
}
