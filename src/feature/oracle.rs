//! The f64 reference of the feature losses: the definitions of the module
//! docs ([`crate::feature`]) evaluated directly, with closed-form gradients
//! for student and teacher (checked against finite differences in
//! tests/feature/oracle.rs).

use super::{FeatureBackend, FeatureGrads, FeatureInputs, FeatureKind, FeatureSpec, Outputs};
use crate::driver::store_row;
use crate::error::Result;
use crate::oracle::Oracle;

/// One row's loss r and its gradients ∂r/∂s, ∂r/∂t (unweighted).
pub type RowResult = (f64, Vec<f64>, Vec<f64>);

fn dot(x: &[f64], y: &[f64]) -> f64 {
    x.iter().zip(y).map(|(a, b)| a * b).sum()
}

fn norm(x: &[f64]) -> f64 {
    dot(x, x).sqrt()
}

/// MSE: `r = Σ (s − t)²`, `∂r/∂s = 2(s − t)`, `∂r/∂t = −2(s − t)`.
pub fn mse_row(s: &[f64], t: &[f64]) -> RowResult {
    let d: Vec<f64> = s.iter().zip(t).map(|(a, b)| a - b).collect();
    let r = d.iter().map(|x| x * x).sum();
    (
        r,
        d.iter().map(|x| 2.0 * x).collect(),
        d.iter().map(|x| -2.0 * x).collect(),
    )
}

/// Cosine: `r = 1 − ⟨s, t⟩ / (n_s n_t)`, `n = max(‖x‖, ε)`;
/// `∂r/∂s = −(t/(n_s n_t) − [‖s‖ > ε] cos s/n_s²)`, the teacher's likewise.
pub fn cosine_row(s: &[f64], t: &[f64], eps: f64) -> RowResult {
    let (ss, tt) = (dot(s, s), dot(t, t));
    let (ns_raw, nt_raw) = (ss.sqrt(), tt.sqrt());
    let (ks, kt) = (ns_raw > eps, nt_raw > eps);
    let ns = if ks { ns_raw } else { eps };
    let nt = if kt { nt_raw } else { eps };
    // sqrt(Σs²·Σt²) = n_s·n_t, written so that identical rows give exactly 1.
    let cos = if ks && kt {
        dot(s, t) / (ss * tt).sqrt()
    } else {
        dot(s, t) / (ns * nt)
    };
    let gs = s
        .iter()
        .zip(t)
        .map(|(&a, &b)| -(b / (ns * nt) - if ks { cos * a / (ns * ns) } else { 0.0 }))
        .collect();
    let gt = s
        .iter()
        .zip(t)
        .map(|(&a, &b)| -(a / (ns * nt) - if kt { cos * b / (nt * nt) } else { 0.0 }))
        .collect();
    (1.0 - cos, gs, gt)
}

/// `Q_j = (1/C) Σ_c x_{c,j}²` of a `[C, S]` sample.
pub fn attention_map(x: &[f64], channels: usize, width: usize) -> Vec<f64> {
    (0..width)
        .map(|j| (0..channels).map(|c| x[c * width + j].powi(2)).sum::<f64>() / channels as f64)
        .collect()
}

/// `(Q̂, n, κ)`: `Q / max(‖Q‖, ε)`, the clamped norm, and whether it was not
/// clamped.
fn normalise(q: &[f64], eps: f64) -> (Vec<f64>, f64, bool) {
    let n_raw = norm(q);
    let k = n_raw > eps;
    let n = if k { n_raw } else { eps };
    (q.iter().map(|v| v / n).collect(), n, k)
}

/// ∂r/∂x of one side from `g` = ∂r/∂Q̂ and `proj` = ⟨Q̂, g⟩: through the
/// normalisation (`(g − κ Q̂ proj)/n`) and the map (`(2/C) x_{c,j}`).
#[allow(clippy::too_many_arguments)]
fn attention_back(
    x: &[f64],
    channels: usize,
    width: usize,
    qh: &[f64],
    n: f64,
    k: bool,
    g: &[f64],
    proj: f64,
) -> Vec<f64> {
    let proj = if k { proj } else { 0.0 };
    let gq: Vec<f64> = (0..width).map(|j| (g[j] - qh[j] * proj) / n).collect();
    (0..channels * width)
        .map(|i| 2.0 / channels as f64 * x[i] * gq[i % width])
        .collect()
}

/// Attention transfer of one sample: `s` is `[C_s, S]`, `t` is `[C_t, S]`;
/// `r = Σ_j (Q̂_s,j − Q̂_t,j)²`.
pub fn attention_row(
    s: &[f64],
    s_channels: usize,
    t: &[f64],
    t_channels: usize,
    width: usize,
    eps: f64,
) -> RowResult {
    let (ms, mt) = (
        attention_map(s, s_channels, width),
        attention_map(t, t_channels, width),
    );
    let (qs, ns, ks) = normalise(&ms, eps);
    let (qt, nt, kt) = normalise(&mt, eps);
    let u: Vec<f64> = qs.iter().zip(&qt).map(|(a, b)| a - b).collect();
    let r = u.iter().map(|x| x * x).sum();
    let g: Vec<f64> = u.iter().map(|x| 2.0 * x).collect();
    let gn: Vec<f64> = g.iter().map(|x| -x).collect();
    // ⟨Q̂_s, g⟩ = 2(1 − c) and ⟨Q̂_t, −g⟩ = 2(1 − c), c = ⟨Q̂_s, Q̂_t⟩, where
    // the norms are not clamped (‖Q̂‖ = 1); c written so that identical maps
    // give 1 and a zero map 0 exactly (constant losses, exactly zero gradients).
    let c = if ks && kt {
        dot(&ms, &mt) / (dot(&ms, &ms) * dot(&mt, &mt)).sqrt()
    } else {
        dot(&qs, &qt)
    };
    let proj = 2.0 * (1.0 - c);
    (
        r,
        attention_back(s, s_channels, width, &qs, ns, ks, &g, proj),
        attention_back(t, t_channels, width, &qt, nt, kt, &gn, proj),
    )
}

/// One sample of `inputs`, row `r`, through the definition of `spec.kind`.
pub fn feature_row(inputs: &FeatureInputs, spec: &FeatureSpec, r: usize) -> RowResult {
    let (s, t) = (inputs.student.row_f64(r), inputs.teacher.row_f64(r));
    match spec.kind {
        FeatureKind::Mse => mse_row(&s, &t),
        FeatureKind::Cosine => cosine_row(&s, &t, spec.eps()),
        FeatureKind::Attention => attention_row(
            &s,
            inputs.student.channels,
            &t,
            inputs.teacher.channels,
            inputs.student.width,
            spec.eps(),
        ),
    }
}

/// Each row's loss magnitude, the scale an fp32 evaluation of r_i resolves to
/// about 1e-7 of: 0 for MSE (a sum of squares, accurate relative to itself),
/// 1 for cosine (|cos| ≤ 1), ‖Q̂_s‖² + ‖Q̂_t‖² for attention. Inputs must be
/// valid.
pub fn row_scales(inputs: &FeatureInputs, spec: &FeatureSpec) -> Vec<f64> {
    (0..inputs.student.rows)
        .map(|r| match spec.kind {
            FeatureKind::Mse => 0.0,
            FeatureKind::Cosine => 1.0,
            FeatureKind::Attention => {
                let (s, t) = (inputs.student, inputs.teacher);
                let n2 = |x: &[f64], c: usize| {
                    let (q, _, _) = normalise(&attention_map(x, c, s.width), spec.eps());
                    q.iter().map(|v| v * v).sum::<f64>()
                };
                n2(&s.row_f64(r), s.channels) + n2(&t.row_f64(r), t.channels)
            }
        })
        .collect()
}

/// One side of a row for [`grad_magnitude`]: the factor of each element, the
/// positions per channel, this side's normalised vector (or map) and norm,
/// and the other side's.
struct Side {
    factor: Vec<f64>,
    width: usize,
    own: Vec<f64>,
    norm: f64,
    other: Vec<f64>,
}

impl Side {
    /// Σ_i (factor_i (|own_j| + |other_j|) / norm)², j = i mod width.
    fn terms2(&self) -> f64 {
        self.factor
            .iter()
            .enumerate()
            .map(|(i, &f)| {
                let j = i % self.width;
                (f * (self.own[j].abs() + self.other[j].abs()) / self.norm).powi(2)
            })
            .sum()
    }
}

/// The size of the gradients' terms before they cancel: the L2 norm, over
/// the gradients `grads` asks for (weight and scale included), of
/// `(|b| + |a|)/n_s` (cosine, student; the teacher's likewise) and
/// `(2/C)·|x|·2(|Q̂_s| + |Q̂_t|)/n` (attention, each side); 0 for MSE, whose
/// gradient `2(s − t)` has no cancellation. Where the terms cancel (parallel
/// rows, proportional maps, S = 1) an fp32 gradient is noise of about 1e-7
/// of this. Inputs must be valid.
pub fn grad_magnitude(inputs: &FeatureInputs, spec: &FeatureSpec, grads: FeatureGrads) -> f64 {
    if spec.kind == FeatureKind::Mse {
        return 0.0;
    }
    let w = spec.grad_weight(&inputs.layout(spec.kind)).abs();
    let (st, tt) = (inputs.student, inputs.teacher);
    let eps = spec.eps();
    let mut sum = 0.0;
    for r in 0..st.rows {
        let (s, t) = (st.row_f64(r), tt.row_f64(r));
        let (student, teacher) = if spec.kind == FeatureKind::Cosine {
            let clamp = |x: f64| if x > eps { x } else { eps };
            let (ns, nt) = (clamp(norm(&s)), clamp(norm(&t)));
            let a: Vec<f64> = s.iter().map(|v| v / ns).collect();
            let b: Vec<f64> = t.iter().map(|v| v / nt).collect();
            let side = |own: &[f64], norm: f64, other: &[f64]| Side {
                factor: vec![1.0; own.len()],
                width: own.len(),
                own: own.to_vec(),
                norm,
                other: other.to_vec(),
            };
            (side(&a, ns, &b), side(&b, nt, &a))
        } else {
            let width = st.width;
            let (qs, ns, _) = normalise(&attention_map(&s, st.channels, width), eps);
            let (qt, nt, _) = normalise(&attention_map(&t, tt.channels, width), eps);
            let side = |x: &[f64], c: usize, own: &[f64], norm: f64, other: &[f64]| Side {
                factor: x.iter().map(|v| 4.0 * v.abs() / c as f64).collect(),
                width,
                own: own.to_vec(),
                norm,
                other: other.to_vec(),
            };
            (
                side(&s, st.channels, &qs, ns, &qt),
                side(&t, tt.channels, &qt, nt, &qs),
            )
        };
        if grads.student {
            sum += student.terms2();
        }
        if grads.teacher {
            sum += teacher.terms2();
        }
    }
    w * sum.sqrt()
}

impl FeatureBackend for Oracle {
    fn name(&self) -> &'static str {
        "oracle"
    }

    fn batch(&self, inputs: &FeatureInputs, spec: &FeatureSpec, out: &mut Outputs) -> Result<()> {
        let (ls, lt) = (inputs.student.row_len(), inputs.teacher.row_len());
        let w = spec.grad_weight(&inputs.layout(spec.kind));
        for r in 0..out.row_losses.len() {
            let (l, ds, dt) = feature_row(inputs, spec, r);
            out.row_losses[r] = l;
            if let Some(g) = out.grad_student.as_mut() {
                store_row(&mut g[r * ls..(r + 1) * ls], &ds, w, out.grad_dtype);
            }
            if let Some(g) = out.grad_teacher.as_mut() {
                store_row(&mut g[r * lt..(r + 1) * lt], &dt, w, out.grad_dtype);
            }
        }
        Ok(())
    }
}
