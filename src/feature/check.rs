//! Random-case sweeps of a feature backend against the f64 oracle (`kdfuse
//! check`, the tests and the GPU tests use this).
//!
//! A case draws a loss, a shape (H = 1, 2, odd, up to `max_cols`; attention
//! maps of S = 1 to 3136 and more positions with 1 to 256 channels, student
//! and teacher channels possibly different), row strides (odd paddings, NaN
//! inside, break 16-byte alignment), a dtype, a gradient dtype, the teacher's
//! gradient or not, a reduction, ε and an upstream scale, and special rows:
//! zero rows, rows of norm below ε, teacher = student, teacher = −student. The
//! oracle runs on the same rounded inputs. Errors are relative L2 (docs/DESIGN.md
//! §3 tolerances); a row's loss is judged against at least 1e-2 of its
//! magnitude ([`super::oracle::row_scales`]), the gradients (student and
//! teacher as one vector) against at least 1e-1 of the size of their terms
//! ([`super::oracle::grad_magnitude`]): where the terms cancel (parallel
//! rows, proportional maps, S = 1) fp32 resolves them to about 1e-7.

use super::oracle::{grad_magnitude, row_scales};
use super::{
    FeatureBackend, FeatureGrads, FeatureInputs, FeatureKind, FeatureOutput, FeatureSpec, Features,
};
use crate::check::{rel_l2_floor, tolerance, GroupStats, Tolerance};
use crate::error::Result;
use crate::oracle::Oracle;
use crate::spec::Reduction;
use crate::tensor::{Dtype, GradDtype, OwnedData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use serde::Serialize;
use std::collections::BTreeMap;

/// Rows given a special form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Special {
    /// None.
    None,
    /// Some rows all zero (student, teacher or both).
    ZeroRows,
    /// Some rows scaled by 1e-12 (attention: 1e-7, so that the squares of
    /// the maps stay normal fp32 numbers): norms below ε.
    TinyRows,
    /// Teacher = student on some rows (loss and gradients exactly 0; same C).
    Identical,
    /// Teacher = −student on some rows (cos = −1).
    Negated,
}

/// One generated case.
#[derive(Debug, Clone, Serialize)]
pub struct FeatureCaseConfig {
    /// The loss and its parameters.
    pub spec: FeatureSpec,
    /// Rows N.
    pub rows: usize,
    /// H (MSE, cosine) or S (attention).
    pub width: usize,
    /// C_s (1 unless attention).
    pub student_channels: usize,
    /// C_t (1 unless attention).
    pub teacher_channels: usize,
    /// Extra elements after each student row.
    pub student_pad: usize,
    /// Extra elements after each teacher row.
    pub teacher_pad: usize,
    /// Input dtype.
    pub dtype: Dtype,
    /// Gradient dtype.
    #[serde(skip)]
    pub grad_dtype: GradDtype,
    /// Whether the teacher's gradient is asked for too.
    pub teacher_grad: bool,
    /// Standard deviation of the features.
    pub scale: f32,
    /// Correlation of teacher and student features (attention: of their
    /// spatial profiles).
    pub correlation: f32,
    /// Special rows.
    pub special: Special,
    /// Seed of the data.
    pub seed: u64,
}

impl FeatureCaseConfig {
    /// One line describing the case.
    pub fn describe(&self) -> String {
        let s = &self.spec;
        format!(
            "{} N={} width={} C={}/{} pads={}/{} {} grad={:?} teacher_grad={} {} eps={:e} scale={:.2} corr={:.2} grad_scale={:.3} special={:?} seed={}",
            s.kind, self.rows, self.width, self.student_channels, self.teacher_channels,
            self.student_pad, self.teacher_pad, self.dtype, self.grad_dtype, self.teacher_grad,
            s.reduction, s.eps(), self.scale, self.correlation, s.grad_scale, self.special, self.seed
        )
    }

    /// The gradients the case asks for.
    pub fn grads(&self) -> FeatureGrads {
        FeatureGrads {
            student: true,
            teacher: self.teacher_grad,
            dtype: self.grad_dtype,
        }
    }
}

fn pick<T: Copy>(rng: &mut StdRng, xs: &[T]) -> T {
    xs[rng.random_range(0..xs.len())]
}

/// Draws a random case with H (or S) ≤ `max_cols`.
pub fn random_feature_config(rng: &mut StdRng, max_cols: usize) -> FeatureCaseConfig {
    let max_cols = max_cols.max(1);
    let kind = pick(rng, &FeatureKind::ALL);
    let (width, cs, ct) = if kind == FeatureKind::Attention {
        let s = if rng.random_bool(0.5) {
            pick(rng, &[1usize, 2, 7, 49, 196, 784, 3136])
        } else {
            rng.random_range(1..=5000usize)
        };
        let cs = pick(rng, &[1usize, 2, 3, 8, 64, 256]);
        let ct = if rng.random_bool(0.5) {
            cs
        } else {
            pick(rng, &[1usize, 3, 16, 128])
        };
        (s.min(max_cols), cs, ct)
    } else {
        let h = match rng.random_range(0..10) {
            0 => pick(rng, &[1usize, 2, 3]),
            1..=3 => rng.random_range(1..=200usize) | 1,
            4..=6 => rng.random_range(200..=5000usize),
            _ => rng.random_range(1..=max_cols),
        };
        (h.min(max_cols), 1, 1)
    };
    let budget = 400_000usize;
    let max_rows = (budget / (cs.max(ct) * width)).clamp(1, 7);
    let rows = if rng.random_bool(0.05) {
        0
    } else {
        rng.random_range(1..=max_rows)
    };
    let pad = |rng: &mut StdRng| {
        if rng.random_bool(0.5) {
            0
        } else {
            rng.random_range(1..=17usize)
        }
    };
    let eps = match kind {
        FeatureKind::Mse => None,
        _ => pick(rng, &[None, None, Some(1e-6), Some(1e-3)]),
    };
    let gs: f64 = rng.random_range(0.1..4.0);
    let correlation = match kind {
        FeatureKind::Mse => pick(rng, &[0.0, 0.9, 0.99]),
        FeatureKind::Cosine => pick(rng, &[0.0, 0.5, 0.9, 0.99, -0.9]),
        FeatureKind::Attention => pick(rng, &[0.0, 0.5, 0.9]),
    };
    let special = match rng.random_range(0..20) {
        0..=10 => Special::None,
        11..=13 => Special::ZeroRows,
        14..=15 => Special::TinyRows,
        16..=17 if cs == ct => Special::Identical,
        _ => Special::Negated,
    };
    FeatureCaseConfig {
        spec: FeatureSpec {
            kind,
            reduction: pick(rng, &Reduction::ALL),
            eps,
            grad_scale: pick(rng, &[1.0, gs]),
        },
        rows,
        width,
        student_channels: cs,
        teacher_channels: ct,
        student_pad: pad(rng),
        teacher_pad: pad(rng),
        dtype: pick(rng, &Dtype::ALL),
        grad_dtype: pick(rng, &[GradDtype::F32, GradDtype::Input]),
        teacher_grad: rng.random_bool(0.5),
        scale: rng.random_range(0.3..3.0f32),
        correlation,
        special,
        seed: rng.random(),
    }
}

/// The generated data of a case.
#[derive(Debug, Clone)]
pub struct FeatureCaseData {
    /// Student features (strided).
    pub student: OwnedData,
    /// Teacher features (strided).
    pub teacher: OwnedData,
    /// The case.
    pub config: FeatureCaseConfig,
}

impl FeatureCaseData {
    /// The backend inputs.
    pub fn inputs(&self) -> FeatureInputs<'_> {
        let c = &self.config;
        let (ls, lt) = (c.student_channels * c.width, c.teacher_channels * c.width);
        FeatureInputs {
            student: Features::maps(self.student.view(), c.rows, c.student_channels, c.width)
                .with_row_stride(ls + c.student_pad),
            teacher: Features::maps(self.teacher.view(), c.rows, c.teacher_channels, c.width)
                .with_row_stride(lt + c.teacher_pad),
        }
    }
}

/// Generates the case's data (values rounded to its dtype; padding NaN).
pub fn generate_features(config: &FeatureCaseConfig) -> FeatureCaseData {
    let c = config;
    let mut rng = StdRng::seed_from_u64(c.seed);
    let normal = |rng: &mut StdRng| -> f32 { StandardNormal.sample(rng) };
    let (ls, lt) = (c.student_channels * c.width, c.teacher_channels * c.width);
    let (ss, ts) = (ls + c.student_pad, lt + c.teacher_pad);
    let mut s = vec![f32::NAN; c.rows * ss];
    let mut t = vec![f32::NAN; c.rows * ts];
    let rho = c.correlation;
    let mix = (1.0 - rho * rho).sqrt();
    for r in 0..c.rows {
        let (srow, trow) = (&mut s[r * ss..r * ss + ls], &mut t[r * ts..r * ts + lt]);
        if c.spec.kind == FeatureKind::Attention {
            // Spatial profiles (what attention transfer compares), correlated
            // between teacher and student; channels of independent noise.
            let g: Vec<f32> = (0..c.width).map(|_| normal(&mut rng)).collect();
            let prof_s: Vec<f32> = g.iter().map(|x| (0.7 * x).exp()).collect();
            let prof_t: Vec<f32> = g
                .iter()
                .map(|x| (0.7 * (rho * x + mix * normal(&mut rng))).exp())
                .collect();
            for (i, v) in srow.iter_mut().enumerate() {
                *v = c.scale * prof_s[i % c.width] * normal(&mut rng);
            }
            for (i, v) in trow.iter_mut().enumerate() {
                *v = c.scale * prof_t[i % c.width] * normal(&mut rng) + 0.1;
            }
        } else {
            for (sv, tv) in srow.iter_mut().zip(trow.iter_mut()) {
                let (base, noise) = (normal(&mut rng), normal(&mut rng));
                *sv = c.scale * base;
                *tv = c.scale * (rho * base + mix * noise);
            }
        }
        // Every other row (the last row always) gets the special form.
        if c.special != Special::None && (r % 2 == 1 || r + 1 == c.rows) {
            match c.special {
                Special::ZeroRows => match rng.random_range(0..3) {
                    0 => srow.fill(0.0),
                    1 => trow.fill(0.0),
                    _ => {
                        srow.fill(0.0);
                        trow.fill(0.0);
                    }
                },
                Special::TinyRows => {
                    let side = rng.random_range(0..3);
                    let f = if c.spec.kind == FeatureKind::Attention {
                        1e-7
                    } else {
                        1e-12
                    };
                    if side != 1 {
                        srow.iter_mut().for_each(|x| *x *= f);
                    }
                    if side != 0 {
                        trow.iter_mut().for_each(|x| *x *= f);
                    }
                }
                Special::Identical => trow.copy_from_slice(srow),
                Special::Negated if ls == lt => {
                    trow.iter_mut().zip(srow.iter()).for_each(|(a, b)| *a = -b)
                }
                _ => {}
            }
        }
    }
    FeatureCaseData {
        student: OwnedData::from_f32(&s, c.dtype),
        teacher: OwnedData::from_f32(&t, c.dtype),
        config: c.clone(),
    }
}

/// The result of one case.
#[derive(Debug, Clone, Serialize)]
pub struct FeatureCaseReport {
    /// The case.
    pub config: FeatureCaseConfig,
    /// Relative L2 error of the losses.
    pub loss_err: f64,
    /// Relative L2 error of the gradients (student and teacher together).
    pub grad_err: f64,
    /// The tolerance applied.
    pub tolerance: Tolerance,
    /// Both errors within tolerance.
    pub passed: bool,
}

/// Relative L2 error of the gradient with respect to (student, teacher)
/// taken together (one side's gradient can vanish where the other's does
/// not: a zero teacher map makes the student's exactly 0), against at least
/// `floor`.
fn grad_err(out: &FeatureOutput, reference: &FeatureOutput, floor: f64) -> f64 {
    let both = |o: &FeatureOutput| -> Option<Vec<f64>> {
        if o.grad_student.is_none() && o.grad_teacher.is_none() {
            return None;
        }
        Some(
            [&o.grad_student, &o.grad_teacher]
                .into_iter()
                .flatten()
                .flatten()
                .map(|&x| x as f64)
                .collect(),
        )
    };
    let shapes = |o: &FeatureOutput| {
        (
            o.grad_student.as_ref().map(Vec::len),
            o.grad_teacher.as_ref().map(Vec::len),
        )
    };
    if shapes(out) != shapes(reference) {
        return f64::INFINITY;
    }
    match (both(out), both(reference)) {
        (Some(g), Some(r)) => rel_l2_floor(&g, &r, floor),
        _ => 0.0,
    }
}

/// Runs one case on `backend` and on the oracle (whose gradients are rounded
/// to the same output dtype).
pub fn run_feature_case(
    backend: &dyn FeatureBackend,
    config: &FeatureCaseConfig,
) -> Result<FeatureCaseReport> {
    let data = generate_features(config);
    let inputs = data.inputs();
    let mut spec = config.spec.clone();
    let grads = config.grads();
    if config.dtype == Dtype::F16 && config.grad_dtype == GradDtype::Input {
        // f16 gradients need loss scaling, as mixed-precision training does:
        // a power of two that brings the largest entry near 1.
        // Where the gradient is only cancellation noise (S = 1, proportional
        // maps), the size of its terms sets the scale instead.
        let both = FeatureGrads::both(GradDtype::F32);
        let probe = Oracle.feature_loss(&inputs, &spec, both)?;
        let g: Vec<f32> = [probe.grad_student, probe.grad_teacher]
            .into_iter()
            .flatten()
            .flatten()
            .collect();
        let rms_terms = grad_magnitude(&inputs, &spec, both) / (g.len().max(1) as f64).sqrt();
        let max = g
            .iter()
            .fold(0.0f32, |m, &x| m.max(x.abs()))
            .max(rms_terms as f32);
        if max > 0.0 && max.is_finite() {
            spec.grad_scale *= 2f64.powi(-(max as f64).log2().round() as i32);
        }
    }
    let out = backend.feature_loss(&inputs, &spec, grads)?;
    let reference = Oracle.feature_loss(&inputs, &spec, grads)?;
    let floors: Vec<f64> = row_scales(&inputs, &spec)
        .iter()
        .map(|s| 1e-2 * s)
        .collect();
    let row_floor = floors.iter().map(|f| f * f).sum::<f64>().sqrt();
    let weight = spec.loss_weight(&inputs.layout(spec.kind));
    let loss_err =
        rel_l2_floor(&out.row_losses, &reference.row_losses, row_floor).max(rel_l2_floor(
            &[out.loss],
            &[reference.loss],
            weight * floors.iter().sum::<f64>(),
        ));
    let grad_err = grad_err(
        &out,
        &reference,
        1e-1 * grad_magnitude(&inputs, &spec, grads),
    );
    let tolerance = tolerance(config.dtype, config.grad_dtype);
    Ok(FeatureCaseReport {
        config: config.clone(),
        loss_err,
        grad_err,
        tolerance,
        passed: loss_err <= tolerance.loss && grad_err <= tolerance.grad,
    })
}

/// A feature sweep's outcome.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FeatureSweepReport {
    /// Per "dtype/loss".
    pub groups: BTreeMap<String, GroupStats>,
    /// Every failing case.
    pub failures: Vec<FeatureCaseReport>,
    /// Cases run.
    pub cases: usize,
}

impl FeatureSweepReport {
    /// True when no case failed.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// Runs `cases` random cases (H, S ≤ `max_cols`) from `seed`; `on_case` sees
/// each report as it completes. Errors from the backend abort the sweep.
pub fn feature_sweep(
    backend: &dyn FeatureBackend,
    cases: usize,
    seed: u64,
    max_cols: usize,
    mut on_case: impl FnMut(&FeatureCaseReport),
) -> Result<FeatureSweepReport> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut report = FeatureSweepReport::default();
    for _ in 0..cases {
        let config = random_feature_config(&mut rng, max_cols);
        let r = run_feature_case(backend, &config)?;
        on_case(&r);
        report
            .groups
            .entry(format!("{}/{}", config.dtype, config.spec.kind))
            .or_default()
            .record(r.loss_err, r.grad_err, r.passed);
        if !r.passed {
            report.failures.push(r);
        }
        report.cases += 1;
    }
    Ok(report)
}
