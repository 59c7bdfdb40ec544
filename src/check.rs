//! Random-case sweeps of a backend against the f64 oracle (`kdfuse check`, the
//! property tests and the GPU tests all use this).
//!
//! A case draws a shape (V = 1, 2, odd, below and far above a CUDA block's
//! sweep), strides (odd paddings break 16-byte alignment), a dtype, every loss
//! parameter, labels with ignored rows, and −inf entries (masked vocabulary)
//! where the loss stays finite. The oracle runs on the same rounded inputs.
//! Errors are relative L2 (DESIGN.md §3); infinities must match exactly.

use crate::backend::{Backend, KdOutput};
use crate::error::Result;
use crate::oracle::Oracle;
use crate::spec::{Divergence, LossSpec, Reduction};
use crate::tensor::{Dtype, GradDtype, KdInputs, Logits, OwnedData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use serde::Serialize;
use std::collections::BTreeMap;

/// Where −inf logits go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum NegInf {
    /// None.
    None,
    /// The same entries in student and teacher (a shared vocabulary mask).
    Shared,
    /// Teacher only (finite for forward KL, soft CE, JSD and TVD).
    TeacherOnly,
    /// Student only (finite for reverse KL, JSD and TVD).
    StudentOnly,
}

/// One generated case.
#[derive(Debug, Clone, Serialize)]
pub struct CaseConfig {
    /// Rows N.
    pub rows: usize,
    /// Vocabulary V.
    pub cols: usize,
    /// Extra elements per student row (row stride = V + pad).
    pub student_pad: usize,
    /// Extra elements per teacher row.
    pub teacher_pad: usize,
    /// Input dtype.
    pub dtype: Dtype,
    /// Gradient dtype.
    #[serde(skip)]
    pub grad_dtype: GradDtype,
    /// The loss.
    #[serde(skip)]
    pub spec: LossSpec,
    /// Whether labels are given.
    pub labels: bool,
    /// Share of rows whose label is `ignore_index`.
    pub ignore_frac: f64,
    /// −inf placement.
    pub neg_inf: NegInf,
    /// Standard deviation of the logits.
    pub scale: f32,
    /// Correlation of teacher and student logits.
    pub correlation: f32,
    /// Seed of the data.
    pub seed: u64,
}

impl CaseConfig {
    /// One line describing the case.
    pub fn describe(&self) -> String {
        let s = &self.spec;
        format!(
            "N={} V={} pads={}/{} {} grad={:?} {} beta={:.3} tau={:.3} alpha={:.3} t2={} {} labels={} ignore={:.2} neginf={:?} scale={:.2} corr={:.2} seed={}",
            self.rows, self.cols, self.student_pad, self.teacher_pad, self.dtype, self.grad_dtype,
            s.divergence, s.beta, s.temperature, s.alpha, s.t2_scaling, s.reduction, self.labels,
            self.ignore_frac, self.neg_inf, self.scale, self.correlation, self.seed
        )
    }
}

/// The generated data of a case.
#[derive(Debug, Clone)]
pub struct CaseData {
    /// Student logits (strided).
    pub student: OwnedData,
    /// Teacher logits (strided).
    pub teacher: OwnedData,
    /// Labels.
    pub labels: Option<Vec<i64>>,
    /// The case.
    pub config: CaseConfig,
}

impl CaseData {
    /// The backend inputs.
    pub fn inputs(&self) -> KdInputs<'_> {
        let c = &self.config;
        KdInputs {
            student: Logits::strided(self.student.view(), c.rows, c.cols, c.cols + c.student_pad),
            teacher: Logits::strided(self.teacher.view(), c.rows, c.cols, c.cols + c.teacher_pad),
            labels: self.labels.as_deref(),
            row_weights: None,
        }
    }
}

fn pick<T: Copy>(rng: &mut StdRng, xs: &[T]) -> T {
    xs[rng.random_range(0..xs.len())]
}

/// Draws a random case with V ≤ `max_cols`.
pub fn random_config(rng: &mut StdRng, max_cols: usize) -> CaseConfig {
    let max_cols = max_cols.max(1);
    let cols = match rng.random_range(0..10) {
        0 => pick(rng, &[1usize, 2, 3]),
        1..=3 => rng.random_range(1..=200usize) | 1,
        4..=6 => rng.random_range(200..=5000usize),
        _ => rng.random_range(1..=max_cols),
    }
    .min(max_cols);
    let budget = 400_000usize;
    let max_rows = (budget / cols).clamp(1, 7);
    let rows = if rng.random_bool(0.05) {
        0
    } else {
        rng.random_range(1..=max_rows)
    };
    let divergence = pick(rng, &Divergence::ALL);
    let labels = rng.random_bool(0.7);
    let u: f64 = rng.random();
    let alpha = if labels {
        pick(rng, &[0.0, 0.0, 0.5, 1.0, u])
    } else {
        0.0
    };
    let (b, tau, gs) = (
        rng.random_range(0.05..0.95),
        rng.random_range(0.3..8.0),
        rng.random_range(0.1..4.0),
    );
    let tau_pick = pick(rng, &[1.0, 2.0, 0.5, tau]);
    let beta = pick(rng, &[0.0, 1.0, 0.5, b]);
    // One-sided masks only where the divergence stays finite (JSD's endpoints
    // are the KL divergences).
    let neg_inf = match (rng.random_range(0..3), divergence, beta) {
        (0, _, _) => NegInf::None,
        (1, _, _) => NegInf::Shared,
        (_, Divergence::ForwardKl | Divergence::SoftCe, _) | (_, Divergence::Jsd, 0.0) => {
            NegInf::TeacherOnly
        }
        (_, Divergence::ReverseKl, _) | (_, Divergence::Jsd, 1.0) => NegInf::StudentOnly,
        // TVD is bounded: any mask is finite.
        (_, Divergence::Jsd | Divergence::Tvd, _) => {
            pick(rng, &[NegInf::TeacherOnly, NegInf::StudentOnly])
        }
    };
    let pad = |rng: &mut StdRng| {
        if rng.random_bool(0.5) {
            0
        } else {
            rng.random_range(1..=17usize)
        }
    };
    CaseConfig {
        rows,
        cols,
        student_pad: pad(rng),
        teacher_pad: pad(rng),
        dtype: pick(rng, &Dtype::ALL),
        grad_dtype: pick(rng, &[GradDtype::F32, GradDtype::Input]),
        spec: LossSpec {
            divergence,
            beta,
            temperature: tau_pick,
            alpha,
            t2_scaling: rng.random_bool(0.7),
            ignore_index: pick(rng, &[-100i64, -1, 7]),
            reduction: pick(rng, &Reduction::ALL),
            grad_scale: pick(rng, &[1.0, gs]),
            ..LossSpec::default()
        },
        labels,
        ignore_frac: pick(rng, &[0.0, 0.3, 1.0]),
        neg_inf,
        // Logits of standard deviation up to 4 after the temperature (LLM
        // logits at τ ≥ 1 have 2–4): the range where fp32 resolves every
        // gradient to the 1e-5 of DESIGN.md §3. Beyond it (τ = 0.5 with σ = 2.5
        // over V = 223k) a peaked JSD gradient reached 2.4e-5.
        scale: rng.random_range(0.5..4.0f32).min(4.0 * tau_pick as f32),
        correlation: pick(rng, &[0.0, 0.8, 0.95]),
        seed: rng.random(),
    }
}

/// Generates the case's data (values rounded to its dtype).
pub fn generate(config: &CaseConfig) -> CaseData {
    let c = config;
    let mut rng = StdRng::seed_from_u64(c.seed);
    let (ss, ts) = (c.cols + c.student_pad, c.cols + c.teacher_pad);
    let normal = |rng: &mut StdRng| -> f32 { StandardNormal.sample(rng) };
    let labels: Option<Vec<i64>> = c.labels.then(|| {
        (0..c.rows)
            .map(|_| {
                if rng.random_bool(c.ignore_frac) {
                    c.spec.ignore_index
                } else {
                    // Never the ignore_index value itself (7 may be a column).
                    loop {
                        let y = rng.random_range(0..c.cols as i64);
                        if y != c.spec.ignore_index {
                            break y;
                        }
                        if c.cols == 1 {
                            break 0;
                        }
                    }
                }
            })
            .collect()
    });
    // Padding holds NaN: reading it would poison the result.
    let mut s = vec![f32::NAN; c.rows * ss];
    let mut t = vec![f32::NAN; c.rows * ts];
    let mask_p = rng.random_range(0.05..0.5);
    for r in 0..c.rows {
        // The label column (or column 0) stays finite, so no row is all −inf.
        let keep = labels.as_ref().map_or(0, |l| {
            let y = l[r];
            if (0..c.cols as i64).contains(&y) {
                y as usize
            } else {
                0
            }
        });
        for j in 0..c.cols {
            let base = normal(&mut rng) * c.scale;
            let noise = normal(&mut rng) * c.scale;
            let rho = c.correlation;
            let mut sv = base;
            let mut tv = rho * base + (1.0 - rho * rho).sqrt() * noise + 0.5;
            if j != keep && c.neg_inf != NegInf::None && rng.random_bool(mask_p) {
                match c.neg_inf {
                    NegInf::Shared => {
                        sv = f32::NEG_INFINITY;
                        tv = f32::NEG_INFINITY;
                    }
                    NegInf::TeacherOnly => tv = f32::NEG_INFINITY,
                    NegInf::StudentOnly => sv = f32::NEG_INFINITY,
                    NegInf::None => {}
                }
            }
            s[r * ss + j] = sv;
            t[r * ts + j] = tv;
        }
    }
    CaseData {
        student: OwnedData::from_f32(&s, c.dtype),
        teacher: OwnedData::from_f32(&t, c.dtype),
        labels,
        config: c.clone(),
    }
}

/// DESIGN.md §3 tolerances (relative L2).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Tolerance {
    /// Loss.
    pub loss: f64,
    /// Gradient.
    pub grad: f64,
}

/// Tolerance for inputs of `dtype` and a gradient written as `grad_dtype`.
pub fn tolerance(dtype: Dtype, grad_dtype: GradDtype) -> Tolerance {
    let out = match grad_dtype {
        GradDtype::F32 => Dtype::F32,
        GradDtype::Input => dtype,
    };
    Tolerance {
        loss: 1e-5,
        grad: match out {
            Dtype::F32 => 1e-5,
            Dtype::Bf16 => 4e-3,
            Dtype::F16 => 1e-3,
        },
    }
}

/// ‖x − r‖₂ / max(‖r‖₂, floor) over the finite entries of `r`.
/// Non-finite entries must match exactly (same infinity, NaN for NaN); a
/// mismatch gives +inf. With a zero floor and ‖r‖ = 0 it is the absolute norm.
pub fn rel_l2_floor(x: &[f64], r: &[f64], floor: f64) -> f64 {
    if x.len() != r.len() {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0.0, 0.0);
    for (&a, &b) in x.iter().zip(r) {
        if b.is_nan() {
            if !a.is_nan() {
                return f64::INFINITY;
            }
        } else if b.is_infinite() {
            if a != b {
                return f64::INFINITY;
            }
        } else if !a.is_finite() {
            return f64::INFINITY;
        } else {
            num += (a - b) * (a - b);
            den += b * b;
        }
    }
    let den = den.sqrt().max(floor);
    if den == 0.0 {
        num.sqrt()
    } else {
        num.sqrt() / den
    }
}

/// [`rel_l2_floor`] without a floor.
pub fn rel_l2(x: &[f64], r: &[f64]) -> f64 {
    rel_l2_floor(x, r, 0.0)
}

/// Per-row loss floors: a row's loss is compared relative to at least 1e-2 of
/// its first-order magnitude (`Oracle::row_scales`) and of 1. fp32 resolves
/// about 1e-7 of the magnitudes it sums, so tolerance 1e-5 then asks for
/// 1e-7 of them: a divergence that is tiny next to its own summands, or a
/// loss that is 0 in exact arithmetic (V = 1), is judged at the resolution
/// fp32 has.
pub fn loss_floors(scales: &[f64]) -> Vec<f64> {
    scales
        .iter()
        .map(|&s| 1e-2 * if s.is_finite() { s.max(1.0) } else { 1.0 })
        .collect()
}

/// Errors of one output against the oracle's (`scales` from
/// `Oracle::row_scales`, `weight` the reduction's row weight).
pub fn compare(out: &KdOutput, reference: &KdOutput, scales: &[f64], weight: f64) -> (f64, f64) {
    let floors = loss_floors(scales);
    let row_floor = l2(&floors);
    let total_floor = weight * floors.iter().sum::<f64>();
    let loss_err = rel_l2_floor(&out.row_losses, &reference.row_losses, row_floor)
        .max(rel_l2_floor(&[out.loss], &[reference.loss], total_floor));
    let grad_err = match (&out.grad, &reference.grad) {
        (Some(g), Some(r)) => {
            let g: Vec<f64> = g.iter().map(|&x| x as f64).collect();
            let r: Vec<f64> = r.iter().map(|&x| x as f64).collect();
            rel_l2(&g, &r)
        }
        (None, None) => 0.0,
        _ => f64::INFINITY,
    };
    let valid_mismatch = out.valid_rows != reference.valid_rows;
    (
        if valid_mismatch {
            f64::INFINITY
        } else {
            loss_err
        },
        grad_err,
    )
}

fn l2(x: &[f64]) -> f64 {
    x.iter()
        .filter(|v| v.is_finite())
        .map(|v| v * v)
        .sum::<f64>()
        .sqrt()
}

/// The result of one case.
#[derive(Debug, Clone, Serialize)]
pub struct CaseReport {
    /// The case.
    pub config: CaseConfig,
    /// Relative L2 error of the losses.
    pub loss_err: f64,
    /// Relative L2 error of the gradient.
    pub grad_err: f64,
    /// The tolerance applied.
    pub tolerance: Tolerance,
    /// Both errors within tolerance.
    pub passed: bool,
}

/// Runs one case on `backend` and on the oracle (the oracle's gradient is
/// rounded to the same output dtype).
pub fn run_case(backend: &dyn Backend, config: &CaseConfig) -> Result<CaseReport> {
    let data = generate(config);
    let inputs = data.inputs();
    let mut spec = config.spec.clone();
    if config.dtype == Dtype::F16 && config.grad_dtype == GradDtype::Input {
        // f16 gradients need loss scaling, as mixed-precision training does:
        // scale by a power of two so the largest entry is near 1.
        let probe = Oracle.compute(&inputs, &spec, Some(GradDtype::F32))?;
        let max = probe
            .grad
            .unwrap_or_default()
            .iter()
            .fold(0.0f32, |m, &x| m.max(x.abs()));
        if max > 0.0 && max.is_finite() {
            spec.grad_scale *= 2f64.powi(-(max as f64).log2().round() as i32);
        }
    }
    let out = backend.compute(&inputs, &spec, Some(config.grad_dtype))?;
    // TVD's near-ties (q = p to fp32's resolution) are taken on the side the
    // backend took them; everything else is the oracle's own.
    let reference = Oracle.compute_resolving_ties(&inputs, &spec, Some(config.grad_dtype), &out)?;
    let scales = Oracle.row_scales(&inputs, &spec);
    let weight = spec.reduction.row_weight(reference.valid_rows, config.cols);
    let (loss_err, grad_err) = compare(&out, &reference, &scales, weight);
    let tolerance = tolerance(config.dtype, config.grad_dtype);
    Ok(CaseReport {
        config: config.clone(),
        loss_err,
        grad_err,
        tolerance,
        passed: loss_err <= tolerance.loss && grad_err <= tolerance.grad,
    })
}

/// Worst errors of one (dtype, divergence) group.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GroupStats {
    /// Cases run.
    pub cases: usize,
    /// Cases past tolerance.
    pub failed: usize,
    /// Largest loss error.
    pub max_loss_err: f64,
    /// Largest gradient error.
    pub max_grad_err: f64,
}

impl GroupStats {
    /// Counts one case with these errors.
    pub fn record(&mut self, loss_err: f64, grad_err: f64, passed: bool) {
        self.cases += 1;
        self.max_loss_err = self.max_loss_err.max(loss_err);
        self.max_grad_err = self.max_grad_err.max(grad_err);
        if !passed {
            self.failed += 1;
        }
    }
}

/// A sweep's outcome.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SweepReport {
    /// Per "dtype/divergence".
    pub groups: BTreeMap<String, GroupStats>,
    /// Every failing case.
    pub failures: Vec<CaseReport>,
    /// Cases run.
    pub cases: usize,
}

impl SweepReport {
    /// True when no case failed.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// Runs `cases` random cases (V ≤ `max_cols`) from `seed`; `on_case` sees
/// each report as it completes. Errors from the backend abort the sweep.
pub fn sweep(
    backend: &dyn Backend,
    cases: usize,
    seed: u64,
    max_cols: usize,
    mut on_case: impl FnMut(&CaseReport),
) -> Result<SweepReport> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut report = SweepReport::default();
    for _ in 0..cases {
        let config = random_config(&mut rng, max_cols);
        let r = run_case(backend, &config)?;
        on_case(&r);
        report
            .groups
            .entry(format!("{}/{}", config.dtype, config.spec.divergence))
            .or_default()
            .record(r.loss_err, r.grad_err, r.passed);
        if !r.passed {
            report.failures.push(r);
        }
        report.cases += 1;
    }
    Ok(report)
}
