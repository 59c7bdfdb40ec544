//! The f64 oracle's options (docs/DESIGN.md §1 "Options", §2 teacher gradients,
//! §4 top-k teacher) against finite differences, against each other, and
//! their validation.

use half::bf16;
use kdfuse::oracle::{log_softmax, row, row_detailed, topk_row, RowResult, TAIL_MASS_FLOOR};
use kdfuse::{
    Backend, Divergence, GradDtype, HostData, KdError, KdInputs, KdOutput, Logits, LossSpec,
    Oracle, Reduction, TopkIndices, TopkInputs, TopkMode, TopkTeacher,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const H: f64 = 1e-6;

/// f32 or f64.
trait Real: Copy + PartialEq + std::fmt::Debug + std::ops::AddAssign + std::ops::SubAssign {
    const ZERO: Self;
    fn finite(self) -> bool;
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    fn finite(self) -> bool {
        self.is_finite()
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    fn finite(self) -> bool {
        self.is_finite()
    }
}

/// Entry by entry: where `x` is −inf the gradient `g` must be zero; at the
/// other entries `j`, `check(j, xp, xm)` with `x[j]` moved by +h and by −h.
fn each_nudge<T: Real>(what: &str, x: &[T], g: &[T], h: T, check: impl Fn(usize, &[T], &[T])) {
    assert_eq!(x.len(), g.len());
    for j in 0..x.len() {
        if !x[j].finite() {
            assert_eq!(g[j], T::ZERO, "{what}: masked entry {j} has a gradient");
            continue;
        }
        let (mut xp, mut xm) = (x.to_vec(), x.to_vec());
        xp[j] += h;
        xm[j] -= h;
        check(j, &xp, &xm);
    }
}

/// Central differences of `f` at `x` against `g`; entries where `x` is −inf
/// must have a zero gradient.
pub(crate) fn fd_vs(what: &str, x: &[f64], g: &[f64], f: impl Fn(&[f64]) -> f64) {
    each_nudge(what, x, g, H, |j, xp, xm| {
        let fd = (f(xp) - f(xm)) / (2.0 * H);
        assert!(
            (fd - g[j]).abs() <= 1e-7 + 1e-6 * fd.abs(),
            "{what} V={} j={j}: analytic {} vs finite difference {fd}",
            x.len(),
            g[j]
        );
    });
}

/// Two rows' losses (relative to max(|loss|, 1)) and both gradients
/// (absolute) agree to `tol`.
fn assert_rows_close(a: &RowResult, b: &RowResult, tol: f64, what: &str) {
    assert!(
        (a.loss - b.loss).abs() <= tol * a.loss.abs().max(1.0),
        "{what}: loss {} vs {}",
        a.loss,
        b.loss
    );
    for (x, y) in a
        .grad_s
        .iter()
        .zip(&b.grad_s)
        .chain(a.grad_t.iter().zip(&b.grad_t))
    {
        assert!((x - y).abs() <= tol, "{what}: {x} vs {y}");
    }
}

/// An odd vocabulary size in [3, 31].
fn odd_v(rng: &mut StdRng) -> usize {
    2 * rng.random_range(1..16) + 1
}

fn uniform_row(rng: &mut StdRng, v: usize, r: f64) -> Vec<f64> {
    (0..v).map(|_| rng.random_range(-r..r)).collect()
}

/// A random student/teacher pair; with `mask`, one index is −inf in both.
fn dense_pair(rng: &mut StdRng, v: usize, mask: bool) -> (Vec<f64>, Vec<f64>) {
    let mut s = uniform_row(rng, v, 4.0);
    let mut t = uniform_row(rng, v, 4.0);
    if mask {
        let j = rng.random_range(0..v);
        s[j] = f64::NEG_INFINITY;
        t[j] = f64::NEG_INFINITY;
    }
    (s, t)
}

fn specs_for(divergence: Divergence) -> Vec<LossSpec> {
    let betas: &[f64] = if divergence == Divergence::Jsd {
        &[0.0, 0.3, 0.8, 1.0]
    } else {
        &[0.5]
    };
    let mut out = vec![];
    for &beta in betas {
        for alpha in [0.0, 0.4] {
            for temperature in [1.0, 0.7, 2.5] {
                out.push(LossSpec {
                    divergence,
                    beta,
                    alpha,
                    temperature,
                    t2_scaling: temperature != 0.7,
                    ..Default::default()
                });
            }
        }
    }
    out
}

#[test]
fn student_gradient_with_softcap_matches_finite_differences() {
    let mut rng = StdRng::seed_from_u64(1);
    for divergence in Divergence::ALL {
        for base in specs_for(divergence) {
            for cap in [2.0, 5.0, 30.0] {
                let spec = LossSpec {
                    softcap: Some(cap),
                    ..base.clone()
                };
                let v = odd_v(&mut rng);
                let mask = rng.random_bool(0.4);
                let (s, t) = dense_pair(&mut rng, v, mask);
                let label = (spec.alpha > 0.0)
                    .then(|| (0..v).rfind(|&j| s[j].is_finite()).expect("finite entry"));
                let (_, g) = row(&s, &t, label, &spec);
                fd_vs(&format!("{spec:?} student"), &s, &g, |x| {
                    row(x, &t, label, &spec).0
                });
            }
        }
    }
}

#[test]
fn softcap_bends_the_logits_before_everything() {
    // The capped row is what every term sees: the result with a cap equals
    // the uncapped result on cap·tanh(x/cap), gradients times 1 − tanh².
    let mut rng = StdRng::seed_from_u64(2);
    for divergence in Divergence::ALL {
        for cap in [0.5, 2.0, 9.0] {
            let v = odd_v(&mut rng);
            let (s, t) = dense_pair(&mut rng, v, true);
            let spec = LossSpec {
                divergence,
                alpha: 0.3,
                temperature: 1.3,
                ..Default::default()
            };
            let capped = LossSpec {
                softcap: Some(cap),
                ..spec.clone()
            };
            let cs: Vec<f64> = s.iter().map(|&x| kdfuse::oracle::softcap(x, cap)).collect();
            let ct: Vec<f64> = t.iter().map(|&x| kdfuse::oracle::softcap(x, cap)).collect();
            assert!(cs.iter().all(|&x| x == f64::NEG_INFINITY || x.abs() < cap));
            assert_eq!(
                cs.iter().filter(|x| x.is_infinite()).count(),
                1,
                "−inf stays −inf"
            );
            let y = (0..v).find(|&j| s[j].is_finite());
            let a = row_detailed(&s, &t, y, &capped, None);
            let b = row_detailed(&cs, &ct, y, &spec, None);
            assert!((a.loss - b.loss).abs() <= 1e-13 * b.loss.abs().max(1.0));
            for j in 0..v {
                let ds = 1.0 - (s[j] / cap).tanh().powi(2);
                let dt = 1.0 - (t[j] / cap).tanh().powi(2);
                let ws = if s[j].is_finite() {
                    b.grad_s[j] * ds
                } else {
                    0.0
                };
                let wt = if t[j].is_finite() {
                    b.grad_t[j] * dt
                } else {
                    0.0
                };
                assert!((a.grad_s[j] - ws).abs() < 1e-14, "{divergence} j={j}");
                assert!((a.grad_t[j] - wt).abs() < 1e-14, "{divergence} j={j}");
            }
        }
    }
}

#[test]
fn teacher_gradient_matches_finite_differences() {
    let mut rng = StdRng::seed_from_u64(3);
    for divergence in Divergence::ALL {
        for base in specs_for(divergence) {
            for softcap in [None, Some(2.0), Some(6.0)] {
                let spec = LossSpec {
                    softcap,
                    grad_teacher: true,
                    ..base.clone()
                };
                let v = odd_v(&mut rng);
                let mask = rng.random_bool(0.4);
                let (s, t) = dense_pair(&mut rng, v, mask);
                let label = (spec.alpha > 0.0).then(|| (0..v).find(|&j| s[j].is_finite()).unwrap());
                let r = row_detailed(&s, &t, label, &spec, None);
                fd_vs(&format!("{spec:?} teacher"), &t, &r.grad_t, |x| {
                    row(&s, x, label, &spec).0
                });
            }
        }
    }
}

#[test]
fn teacher_gradient_where_the_teacher_is_masked_alone() {
    // Teacher −inf where the student has mass (the loss stays finite for
    // forward KL, JSD, TVD and soft-CE): the masked entry gets 0.
    let mut rng = StdRng::seed_from_u64(4);
    let finite = Divergence::ALL
        .into_iter()
        .filter(|&d| d != Divergence::ReverseKl);
    for divergence in finite {
        for softcap in [None, Some(3.0)] {
            let v = odd_v(&mut rng);
            let s = uniform_row(&mut rng, v, 3.0);
            let mut t = uniform_row(&mut rng, v, 3.0);
            t[v / 2] = f64::NEG_INFINITY;
            let spec = LossSpec {
                divergence,
                softcap,
                temperature: 1.5,
                ..Default::default()
            };
            let r = row_detailed(&s, &t, None, &spec, None);
            assert!(r.loss.is_finite(), "{divergence}");
            fd_vs(
                &format!("{divergence} masked teacher"),
                &t,
                &r.grad_t,
                |x| row(&s, x, None, &spec).0,
            );
        }
    }
}

#[test]
fn tvd_teacher_gradient_is_exactly_zero_when_the_teacher_is_above_wherever_it_has_mass() {
    // Where the teacher is above the student wherever it has mass, h = ½ on
    // its whole support and ∂D/∂t = p (h − ⟨p, h⟩) = 0 exactly (not a
    // rounding of ½ − ½·Σp).
    let s = [1.0, 2.0, 0.5, -1.0, 3.0];
    let t = [f64::NEG_INFINITY, 2.0, f64::NEG_INFINITY, -1.0, 3.0];
    let spec = LossSpec {
        divergence: Divergence::Tvd,
        ..Default::default()
    };
    // t is s with two entries masked: p > q on the rest.
    let r = row_detailed(&s, &t, None, &spec, None);
    assert!(r.grad_t.iter().all(|&x| x == 0.0), "{:?}", r.grad_t);
    assert!(r.loss > 0.0);
}

#[test]
fn huge_softcap_equals_no_softcap() {
    let mut rng = StdRng::seed_from_u64(5);
    for divergence in Divergence::ALL {
        for spec in specs_for(divergence) {
            let v = odd_v(&mut rng);
            let mask = rng.random_bool(0.5);
            let (s, t) = dense_pair(&mut rng, v, mask);
            let label = (spec.alpha > 0.0).then(|| (0..v).find(|&j| s[j].is_finite()).unwrap());
            let capped = LossSpec {
                softcap: Some(1e7),
                ..spec.clone()
            };
            let a = row_detailed(&s, &t, label, &spec, None);
            let b = row_detailed(&s, &t, label, &capped, None);
            assert_rows_close(&a, &b, 1e-9, &format!("{spec:?}"));
        }
    }
}

#[test]
fn soft_ce_student_gradient_is_forward_kls() {
    let mut rng = StdRng::seed_from_u64(6);
    for softcap in [None, Some(2.0)] {
        for fkl in specs_for(Divergence::ForwardKl) {
            let fkl = LossSpec { softcap, ..fkl };
            let sce = LossSpec {
                divergence: Divergence::SoftCe,
                ..fkl.clone()
            };
            let v = odd_v(&mut rng);
            let (s, t) = dense_pair(&mut rng, v, true);
            let label = (fkl.alpha > 0.0).then(|| (0..v).find(|&j| s[j].is_finite()).unwrap());
            let a = row_detailed(&s, &t, label, &fkl, None);
            let b = row_detailed(&s, &t, label, &sce, None);
            for (x, y) in a.grad_s.iter().zip(&b.grad_s) {
                assert!((x - y).abs() <= 1e-15, "{x} vs {y}");
            }
            // The teacher sides differ (soft-CE's carries the entropy).
            assert!(a
                .grad_t
                .iter()
                .zip(&b.grad_t)
                .any(|(x, y)| (x - y).abs() > 1e-6));
        }
    }
}

#[test]
fn reverse_kl_teacher_gradient_is_forward_kl_student_gradient_swapped() {
    // KL(q‖p) as a function of t is KL(p'‖q') of the swapped pair as a
    // function of its student: ∂/∂t of one is ∂/∂s of the other.
    let mut rng = StdRng::seed_from_u64(7);
    for temperature in [1.0, 0.6, 3.0] {
        for softcap in [None, Some(2.5)] {
            let v = odd_v(&mut rng);
            let (s, t) = dense_pair(&mut rng, v, true);
            let rkl = LossSpec {
                divergence: Divergence::ReverseKl,
                temperature,
                softcap,
                ..Default::default()
            };
            let fkl = LossSpec {
                divergence: Divergence::ForwardKl,
                ..rkl.clone()
            };
            let a = row_detailed(&s, &t, None, &rkl, None);
            let b = row_detailed(&t, &s, None, &fkl, None);
            assert!((a.loss - b.loss).abs() <= 1e-13 * a.loss.max(1.0));
            for j in 0..v {
                assert!((a.grad_t[j] - b.grad_s[j]).abs() <= 1e-15, "j={j}");
                assert!((a.grad_s[j] - b.grad_t[j]).abs() <= 1e-14, "j={j}");
            }
        }
    }
}

#[test]
fn jsd_endpoints_teacher_gradients_are_the_kl_divergences() {
    let mut rng = StdRng::seed_from_u64(8);
    for (beta, div) in [(0.0, Divergence::ForwardKl), (1.0, Divergence::ReverseKl)] {
        let v = odd_v(&mut rng);
        let (s, t) = dense_pair(&mut rng, v, true);
        let jsd = LossSpec {
            divergence: Divergence::Jsd,
            beta,
            temperature: 1.7,
            softcap: Some(3.0),
            ..Default::default()
        };
        let kl = LossSpec {
            divergence: div,
            ..jsd.clone()
        };
        assert_eq!(
            row_detailed(&s, &t, None, &jsd, None),
            row_detailed(&s, &t, None, &kl, None)
        );
    }
}

#[test]
fn teacher_log_probs_on_a_dense_row_is_the_same_teacher() {
    let mut rng = StdRng::seed_from_u64(9);
    for divergence in Divergence::ALL {
        for spec in specs_for(divergence) {
            let v = odd_v(&mut rng);
            let (s, t) = dense_pair(&mut rng, v, true);
            let lp = log_softmax(&t, 1.0);
            let label = (spec.alpha > 0.0).then(|| (0..v).find(|&j| s[j].is_finite()).unwrap());
            let with = LossSpec {
                teacher_log_probs: true,
                ..spec.clone()
            };
            let a = row_detailed(&s, &t, label, &spec, None);
            let b = row_detailed(&s, &lp, label, &with, None);
            assert_rows_close(&a, &b, 1e-12, &format!("{spec:?}"));
        }
    }
}

// ---------------------------------------------------------------- batches

/// f32 logits on a grid of 1/64 in (−4, 4): `x ± 2⁻¹²` is exact in f32, so
/// finite differences can run through `compute` itself.
fn grid_row(rng: &mut StdRng, v: usize) -> Vec<f32> {
    (0..v)
        .map(|_| rng.random_range(-255..=255) as f32 / 64.0)
        .collect()
}

/// Central differences (step 2⁻¹²) of `loss(x)` against `grad` (f32).
fn fd_batch(what: &str, x: &[f32], grad: &[f32], loss: impl Fn(&[f32]) -> f64) {
    let h = 2f32.powi(-12);
    each_nudge(what, x, grad, h, |j, xp, xm| {
        assert_eq!((xp[j] - x[j], x[j] - xm[j]), (h, h));
        let fd = (loss(xp) - loss(xm)) / (2.0 * h as f64);
        let g = grad[j] as f64;
        assert!(
            (fd - g).abs() <= 1e-6 + 1e-5 * fd.abs(),
            "{what} element {j}: analytic {g} vs finite difference {fd}"
        );
    });
}

struct Batch {
    n: usize,
    v: usize,
    s: Vec<f32>,
    t: Vec<f32>,
    labels: Vec<i64>,
    weights: Vec<f32>,
}

/// A batch with an ignored row, a zero-weight row (whose ℓ is +inf: the
/// teacher has mass where its student is −inf), negative and > 1 weights,
/// and masked entries.
fn random_batch(rng: &mut StdRng) -> Batch {
    let n = rng.random_range(4..7);
    let v = odd_v(rng);
    let mut s = vec![];
    let mut t = vec![];
    for _ in 0..n {
        let mut sr = grid_row(rng, v);
        let mut tr = grid_row(rng, v);
        let j = rng.random_range(0..v);
        sr[j] = f32::NEG_INFINITY;
        tr[j] = f32::NEG_INFINITY;
        s.extend(sr);
        t.extend(tr);
    }
    let mut labels: Vec<i64> = (0..n)
        .map(|r| (0..v).find(|&j| s[r * v + j].is_finite()).unwrap() as i64)
        .collect();
    labels[1] = -100;
    let mut weights: Vec<f32> = (0..n)
        .map(|_| rng.random_range(-32..=96) as f32 / 32.0)
        .collect();
    weights[2] = 0.0;
    // Row 2: the student −inf where the teacher has mass.
    let j = (0..v).find(|&j| t[2 * v + j].is_finite()).unwrap();
    s[2 * v + j] = f32::NEG_INFINITY;
    if labels[2] == j as i64 {
        labels[2] = (0..v).find(|&j| s[2 * v + j].is_finite()).unwrap() as i64;
    }
    Batch {
        n,
        v,
        s,
        t,
        labels,
        weights,
    }
}

impl Batch {
    fn inputs<'a>(&'a self, s: &'a [f32], t: &'a [f32], weights: bool) -> KdInputs<'a> {
        KdInputs {
            student: Logits::new(HostData::F32(s), self.n, self.v),
            teacher: Logits::new(HostData::F32(t), self.n, self.v),
            labels: Some(&self.labels),
            row_weights: weights.then_some(&self.weights[..]),
        }
    }
}

fn compute(inputs: &KdInputs, spec: &LossSpec) -> KdOutput {
    Oracle
        .compute(inputs, spec, Some(GradDtype::F32))
        .expect("valid")
}

#[test]
fn weighted_batches_match_finite_differences_for_both_inputs() {
    let mut rng = StdRng::seed_from_u64(10);
    for divergence in Divergence::ALL {
        for reduction in Reduction::ALL {
            for softcap in [None, Some(2.0)] {
                let b = random_batch(&mut rng);
                let spec = LossSpec {
                    divergence,
                    // β is JSD's alone (validation refuses it otherwise).
                    beta: if divergence == Divergence::Jsd {
                        0.3
                    } else {
                        0.5
                    },
                    alpha: 0.25,
                    temperature: 1.5,
                    reduction,
                    grad_scale: 0.75,
                    softcap,
                    grad_teacher: true,
                    ..Default::default()
                };
                let out = compute(&b.inputs(&b.s, &b.t, true), &spec);
                assert!(out.loss.is_finite(), "{spec:?}: the zero-weight row counts");
                assert_eq!(out.row_losses[1], 0.0);
                assert_eq!(out.row_losses[2], 0.0);
                assert_eq!(out.valid_rows, b.n - 1);
                let g = out.grad.as_ref().unwrap();
                let gt = out.grad_teacher.as_ref().unwrap();
                for j in 0..b.v {
                    for r in [1, 2] {
                        assert_eq!(g[r * b.v + j], 0.0);
                        assert_eq!(gt[r * b.v + j], 0.0);
                    }
                }
                // ∂(grad_scale · L)/∂x over every row but the infinite one.
                let total = |s: &[f32], t: &[f32]| {
                    spec.grad_scale * compute(&b.inputs(s, t, true), &spec).loss
                };
                let what = format!("{spec:?}");
                fd_batch(&format!("{what} student"), &b.s, g, |x| total(x, &b.t));
                fd_batch(&format!("{what} teacher"), &b.t, gt, |x| total(&b.s, x));
            }
        }
    }
}

#[test]
fn row_weights_scale_rows_and_all_ones_change_nothing() {
    let mut rng = StdRng::seed_from_u64(11);
    for divergence in Divergence::ALL {
        let b = random_batch(&mut rng);
        let spec = LossSpec {
            divergence,
            grad_teacher: true,
            temperature: 0.8,
            reduction: Reduction::BatchMean,
            ..Default::default()
        };
        let mut ones = b.weights.clone();
        ones.fill(1.0);
        let plain = compute(&b.inputs(&b.s, &b.t, false), &spec);
        let all_ones = Oracle
            .compute(
                &KdInputs {
                    row_weights: Some(&ones),
                    ..b.inputs(&b.s, &b.t, false)
                },
                &spec,
                Some(GradDtype::F32),
            )
            .unwrap();
        // Bit for bit (the infinite row's teacher gradient holds NaN: the
        // forward-KL teacher gradient p (r' − KL) is inf − inf there).
        assert_eq!(format!("{plain:?}"), format!("{all_ones:?}"));
        let weighted = compute(&b.inputs(&b.s, &b.t, true), &spec);
        // Same denominators: valid rows, not Σ w.
        assert_eq!(weighted.valid_rows, plain.valid_rows);
        let w = 1.0 / plain.valid_rows as f64;
        let mut sum = 0.0;
        for r in 0..b.n {
            let wr = b.weights[r] as f64;
            if r == 2 {
                if matches!(divergence, Divergence::ForwardKl | Divergence::SoftCe) {
                    assert_eq!(plain.row_losses[r], f64::INFINITY);
                }
                assert_eq!(weighted.row_losses[r], 0.0);
                continue;
            }
            assert_eq!(weighted.row_losses[r], wr * plain.row_losses[r]);
            sum += weighted.row_losses[r];
            for j in 0..b.v {
                let i = r * b.v + j;
                for (x, y) in [
                    (&weighted.grad, &plain.grad),
                    (&weighted.grad_teacher, &plain.grad_teacher),
                ] {
                    let (x, y) = (x.as_ref().unwrap()[i] as f64, y.as_ref().unwrap()[i] as f64);
                    assert!(
                        (x - wr * y).abs() <= 2e-7 * (wr * y).abs(),
                        "{x} vs {wr}·{y}"
                    );
                }
            }
        }
        assert!((weighted.loss - w * sum).abs() <= 1e-15 * sum.abs().max(1.0));
        // Scales follow the weighted rows.
        let sp = Oracle.row_scales(&b.inputs(&b.s, &b.t, false), &spec);
        let sw = Oracle.row_scales(&b.inputs(&b.s, &b.t, true), &spec);
        for r in [0, 3] {
            assert_eq!(sw[r], (b.weights[r] as f64).abs() * sp[r]);
        }
        assert_eq!(sw[2], 0.0);
    }
}

#[test]
fn teacher_gradient_output_follows_the_spec_and_the_dtype() {
    let mut rng = StdRng::seed_from_u64(12);
    let b = random_batch(&mut rng);
    let base = LossSpec {
        divergence: Divergence::Jsd,
        softcap: Some(4.0),
        ..Default::default()
    };
    let inp = b.inputs(&b.s, &b.t, true);
    // Off unless asked for, and only with a gradient.
    assert_eq!(compute(&inp, &base).grad_teacher, None);
    let spec = LossSpec {
        grad_teacher: true,
        ..base.clone()
    };
    assert_eq!(
        Oracle.compute(&inp, &spec, None).unwrap().grad_teacher,
        None
    );
    let on = compute(&inp, &spec);
    let off = compute(&inp, &base);
    assert_eq!((on.loss, &on.grad), (off.loss, &off.grad));
    // In the input dtype: each element the f32 result rounded once.
    let sb: Vec<bf16> = b.s.iter().map(|&x| bf16::from_f32(x)).collect();
    let tb: Vec<bf16> = b.t.iter().map(|&x| bf16::from_f32(x)).collect();
    let inb = KdInputs {
        student: Logits::new(HostData::Bf16(&sb), b.n, b.v),
        teacher: Logits::new(HostData::Bf16(&tb), b.n, b.v),
        ..inp
    };
    // Grid values are exact in bf16 when they have ≤ 8 significant bits;
    // compare against the f32 run on the same (rounded) values.
    let s32: Vec<f32> = sb.iter().map(|x| x.to_f32()).collect();
    let t32: Vec<f32> = tb.iter().map(|x| x.to_f32()).collect();
    let f = compute(&b.inputs(&s32, &t32, true), &spec);
    let h = Oracle.compute(&inb, &spec, Some(GradDtype::Input)).unwrap();
    for (x, y) in h.grad_teacher.unwrap().iter().zip(f.grad_teacher.unwrap()) {
        assert_eq!(*x, bf16::from_f32(y).to_f32());
    }
    for (x, y) in h.grad.unwrap().iter().zip(f.grad.unwrap()) {
        assert_eq!(*x, bf16::from_f32(y).to_f32());
    }
}

#[test]
fn teacher_log_probs_through_compute() {
    let mut rng = StdRng::seed_from_u64(13);
    for divergence in Divergence::ALL {
        let b = random_batch(&mut rng);
        let lp: Vec<f32> =
            b.t.chunks(b.v)
                .flat_map(|row| {
                    let row: Vec<f64> = row.iter().map(|&x| x as f64).collect();
                    log_softmax(&row, 1.0).into_iter().map(|x| x as f32)
                })
                .collect();
        let spec = LossSpec {
            divergence,
            temperature: 2.0,
            grad_teacher: true,
            ..Default::default()
        };
        let a = compute(&b.inputs(&b.s, &b.t, false), &spec);
        let c = compute(
            &b.inputs(&b.s, &lp, false),
            &LossSpec {
                teacher_log_probs: true,
                ..spec.clone()
            },
        );
        for r in [0, 3] {
            let (x, y) = (a.row_losses[r], c.row_losses[r]);
            assert!(
                (x - y).abs() <= 1e-6 * x.abs().max(1e-2),
                "{divergence}: {x} vs {y}"
            );
        }
        for (x, y) in a.grad.unwrap().iter().zip(c.grad.unwrap()) {
            assert!((x - y).abs() <= 1e-6, "{divergence}: {x} vs {y}");
        }
    }
}

// ----------------------------------------------------------------- top-k

/// A random support of size k in a random order.
fn support(rng: &mut StdRng, v: usize, k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v).collect();
    idx.shuffle(rng);
    idx.truncate(k);
    idx
}

/// Top-k of a random full distribution as log-probs (what an inference
/// server returns), in a random order; the tail keeps ≥ 1e-4 of the mass.
fn topk_log_probs(rng: &mut StdRng, v: usize, k: usize) -> (Vec<usize>, Vec<f64>) {
    let z = uniform_row(rng, v, 3.0);
    let lp = log_softmax(&z, 1.0);
    let mut order: Vec<usize> = (0..v).collect();
    order.sort_by(|&a, &b| lp[b].total_cmp(&lp[a]));
    order.truncate(k);
    order.shuffle(rng);
    let vals = order.iter().map(|&j| lp[j]).collect();
    (order, vals)
}

fn topk_spec(mode: TopkMode, alpha: f64, temperature: f64, softcap: Option<f64>) -> LossSpec {
    LossSpec {
        topk_mode: mode,
        alpha,
        temperature,
        softcap,
        teacher_log_probs: mode == TopkMode::Tail,
        t2_scaling: temperature != 0.7,
        ..Default::default()
    }
}

#[test]
fn topk_student_gradients_match_finite_differences() {
    let mut rng = StdRng::seed_from_u64(14);
    for mode in TopkMode::ALL {
        let temps: &[f64] = if mode == TopkMode::Tail {
            &[1.0]
        } else {
            &[1.0, 0.7, 2.5]
        };
        let caps: &[Option<f64>] = if mode == TopkMode::Tail {
            &[None]
        } else {
            &[None, Some(2.0), Some(8.0)]
        };
        for &temperature in temps {
            for &softcap in caps {
                for alpha in [0.0, 0.4] {
                    for _ in 0..4 {
                        let spec = topk_spec(mode, alpha, temperature, softcap);
                        let v = odd_v(&mut rng);
                        let k = rng.random_range(1..=v);
                        let mut s = uniform_row(&mut rng, v, 4.0);
                        let (idx, mut vals) = if mode == TopkMode::Tail {
                            topk_log_probs(&mut rng, v, k)
                        } else {
                            let idx = support(&mut rng, v, k);
                            (idx, uniform_row(&mut rng, k, 4.0))
                        };
                        // Masks: a student −inf off the support (keeping
                        // some tail mass), a teacher −inf value on it.
                        if k + 2 <= v && rng.random_bool(0.5) {
                            let off = (0..v).find(|j| !idx.contains(j)).unwrap();
                            s[off] = f64::NEG_INFINITY;
                        }
                        if k >= 2 && mode != TopkMode::Tail && rng.random_bool(0.5) {
                            vals[0] = f64::NEG_INFINITY;
                        }
                        let label = (alpha > 0.0).then(|| idx[k - 1]);
                        let (l, g, _) = topk_row(&s, &idx, &vals, label, &spec);
                        assert!(l.is_finite(), "{spec:?}");
                        if mode == TopkMode::Support {
                            for j in (0..v).filter(|j| !idx.contains(j)) {
                                if alpha == 0.0 {
                                    assert_eq!(g[j], 0.0, "support: off-support gradient");
                                }
                            }
                        }
                        fd_vs(&format!("{spec:?} k={k}"), &s, &g, |x| {
                            topk_row(x, &idx, &vals, label, &spec).0
                        });
                    }
                }
            }
        }
    }
}

#[test]
fn topk_with_the_whole_vocabulary_is_dense_forward_kl() {
    let mut rng = StdRng::seed_from_u64(15);
    for mode in TopkMode::ALL {
        for case in 0..12 {
            let v = odd_v(&mut rng);
            let alpha = [0.0, 0.3][case % 2];
            let (temperature, softcap) = if mode == TopkMode::Tail {
                (1.0, None)
            } else {
                ([1.0, 0.6, 2.2][case % 3], [None, Some(2.0)][case / 6])
            };
            let spec = topk_spec(mode, alpha, temperature, softcap);
            let mut s = uniform_row(&mut rng, v, 4.0);
            let mut t = uniform_row(&mut rng, v, 4.0);
            if case % 4 == 3 {
                s[v / 2] = f64::NEG_INFINITY;
                t[v / 2] = f64::NEG_INFINITY;
            }
            if mode == TopkMode::Tail {
                t = log_softmax(&t, 1.0);
            }
            let idx = support(&mut rng, v, v);
            let vals: Vec<f64> = idx.iter().map(|&j| t[j]).collect();
            let label = (alpha > 0.0).then(|| (0..v).find(|&j| s[j].is_finite()).unwrap());
            let (l, g, sc) = topk_row(&s, &idx, &vals, label, &spec);
            let dense = LossSpec {
                divergence: Divergence::ForwardKl,
                ..spec.clone()
            };
            let r = row_detailed(&s, &t, label, &dense, None);
            assert!(
                (l - r.loss).abs() <= 1e-12 * r.loss.abs().max(1.0),
                "{mode}: {l} vs {}",
                r.loss
            );
            assert!((sc - r.scale).abs() <= 1e-12 * r.scale.max(1.0));
            for (j, (x, y)) in g.iter().zip(&r.grad_s).enumerate() {
                assert!((x - y).abs() <= 1e-13, "{mode} j={j}: {x} vs {y}");
            }
        }
    }
}

#[test]
fn topk_hand_computed_values() {
    let spec = |mode| LossSpec {
        topk_mode: mode,
        teacher_log_probs: mode == TopkMode::Tail,
        ..Default::default()
    };
    // Tail: q = (⅓, ⅓, ⅓), P_0 = ½, P_tail = ½; Q_tail = ⅔.
    let s = [0.0, 0.0, 0.0];
    let (l, g, _) = topk_row(&s, &[0], &[0.5f64.ln()], None, &spec(TopkMode::Tail));
    let want = 0.5 * (1.5f64).ln() + 0.5 * (0.75f64).ln();
    assert!((l - want).abs() < 1e-15, "{l} vs {want}");
    let third = 1.0 / 3.0;
    let want = [third - 0.5, third * 0.25, third * 0.25];
    for j in 0..3 {
        assert!((g[j] - want[j]).abs() < 1e-15, "{g:?}");
    }
    // Support: p = (¼, ¾) on {0, 1}; q̃ = (½, ½) whatever s_2.
    let s = [0.0, 0.0, 5.0];
    let (l, g, _) = topk_row(
        &s,
        &[0, 1],
        &[0.0, 3f64.ln()],
        None,
        &spec(TopkMode::Support),
    );
    let want = 0.25 * 0.5f64.ln() + 0.75 * 1.5f64.ln();
    assert!((l - want).abs() < 1e-15);
    assert_eq!(g[2], 0.0);
    assert!((g[0] - 0.25).abs() < 1e-15 && (g[1] + 0.25).abs() < 1e-15);
    // Full: the same teacher against q over all three.
    let lq = log_softmax(&s, 1.0);
    let (l, g, _) = topk_row(&s, &[1, 0], &[3f64.ln(), 0.0], None, &spec(TopkMode::Full));
    let want = 0.25 * (0.25f64.ln() - lq[0]) + 0.75 * (0.75f64.ln() - lq[1]);
    assert!((l - want).abs() < 1e-14);
    let q: Vec<f64> = lq.iter().map(|x| x.exp()).collect();
    let want = [q[0] - 0.25, q[1] - 0.75, q[2]];
    for j in 0..3 {
        assert!((g[j] - want[j]).abs() < 1e-15);
    }
}

#[test]
fn tail_mass_floor_and_infinite_tail() {
    let spec = LossSpec {
        topk_mode: TopkMode::Tail,
        teacher_log_probs: true,
        ..Default::default()
    };
    let s = [0.3, -0.2, 1.0, 0.5, -1.0];
    let lq = log_softmax(&s, 1.0);
    let body = |vals: &[f64], idx: &[usize]| -> f64 {
        vals.iter()
            .zip(idx)
            .map(|(&v, &j)| v.exp() * (v - lq[j]))
            .sum()
    };
    // Σ P = 1 − 5e-7: the tail is taken as exactly 0.
    let idx = [2, 0, 3];
    let short = 0.5 * TAIL_MASS_FLOOR;
    let vals = [(0.5f64).ln(), (0.3f64).ln(), (0.2 - short).ln()];
    let (l, g, _) = topk_row(&s, &idx, &vals, None, &spec);
    assert_eq!(l, body(&vals, &idx));
    assert_eq!(g[1], lq[1].exp());
    assert_eq!(g[4], lq[4].exp());
    // Σ P = 1 − 2e-6: the tail term is there.
    let vals = [(0.5f64).ln(), (0.3f64).ln(), (0.2 - 2e-6f64).ln()];
    let (l, g, _) = topk_row(&s, &idx, &vals, None, &spec);
    let q_tail = lq[1].exp() + lq[4].exp();
    assert!((l - body(&vals, &idx) - 2e-6 * (2e-6 / q_tail).ln()).abs() < 1e-13);
    assert!((g[1] - lq[1].exp() * (1.0 - 2e-6 / q_tail)).abs() < 1e-14);
    // Σ P > 1: no tail either (max(0, ·)).
    let vals = [(0.6f64).ln(), (0.3f64).ln(), (0.2f64).ln()];
    let (l, _, _) = topk_row(&s, &idx, &vals, None, &spec);
    assert_eq!(l, body(&vals, &idx));
    // A tail mass where the student has none: +inf; the gradient stays
    // finite.
    let s = [0.3, f64::NEG_INFINITY, 1.0, 0.5, f64::NEG_INFINITY];
    let vals = [(0.5f64).ln(), (0.3f64).ln(), (0.1f64).ln()];
    let (l, g, _) = topk_row(&s, &idx, &vals, None, &spec);
    assert_eq!(l, f64::INFINITY);
    assert!(g.iter().all(|x| x.is_finite()), "{g:?}");
    assert_eq!((g[1], g[4]), (0.0, 0.0));
}

struct TopkBatch {
    n: usize,
    v: usize,
    k: usize,
    s: Vec<f32>,
    idx: Vec<i64>,
    idx32: Vec<i32>,
    vals: Vec<f32>,
    labels: Vec<i64>,
    weights: Vec<f32>,
}

impl TopkBatch {
    fn new(rng: &mut StdRng, mode: TopkMode) -> Self {
        let n = rng.random_range(3..7);
        let v = odd_v(rng);
        let k = rng.random_range(1..v);
        let mut s = vec![];
        let mut idx = vec![];
        let mut vals = vec![];
        for _ in 0..n {
            s.extend(grid_row(rng, v));
            let (i, x) = if mode == TopkMode::Tail {
                topk_log_probs(rng, v, k)
            } else {
                let i = support(rng, v, k);
                let x = grid_row(rng, k).iter().map(|&x| x as f64).collect();
                (i, x)
            };
            idx.extend(i.iter().map(|&j| j as i64));
            vals.extend(x.iter().map(|&x| x as f32));
        }
        let mut labels: Vec<i64> = (0..n).map(|_| rng.random_range(0..v as i64)).collect();
        labels[1] = -100;
        let mut weights: Vec<f32> = (0..n)
            .map(|_| rng.random_range(-32..=96) as f32 / 32.0)
            .collect();
        weights[2] = 0.0;
        let idx32 = idx.iter().map(|&j| j as i32).collect();
        TopkBatch {
            n,
            v,
            k,
            s,
            idx,
            idx32,
            vals,
            labels,
            weights,
        }
    }

    fn inputs<'a>(&'a self, s: &'a [f32], wide: bool, weights: bool) -> TopkInputs<'a> {
        TopkInputs {
            student: Logits::new(HostData::F32(s), self.n, self.v),
            teacher: TopkTeacher {
                indices: if wide {
                    TopkIndices::I64(&self.idx)
                } else {
                    TopkIndices::I32(&self.idx32)
                },
                values: HostData::F32(&self.vals),
                k: self.k,
            },
            labels: Some(&self.labels),
            row_weights: weights.then_some(&self.weights[..]),
        }
    }
}

#[test]
fn topk_batches_match_finite_differences_and_rows() {
    let mut rng = StdRng::seed_from_u64(16);
    for mode in TopkMode::ALL {
        for reduction in Reduction::ALL {
            for case in 0..2 {
                let b = TopkBatch::new(&mut rng, mode);
                let temperature = if mode == TopkMode::Tail { 1.0 } else { 1.6 };
                let spec = LossSpec {
                    reduction,
                    grad_scale: 1.25,
                    alpha: 0.3,
                    softcap: (mode != TopkMode::Tail && case == 1).then_some(2.0),
                    ..topk_spec(mode, 0.3, temperature, None)
                };
                let out = Oracle
                    .compute_topk(
                        &b.inputs(&b.s, case == 0, true),
                        &spec,
                        Some(GradDtype::F32),
                    )
                    .unwrap();
                assert_eq!(out.grad_teacher, None);
                assert_eq!(out.valid_rows, b.n - 1);
                let w = reduction.row_weight(b.n - 1, b.v);
                // Each row is `topk_row`, weighted.
                for r in 0..b.n {
                    let s: Vec<f64> = b.s[r * b.v..(r + 1) * b.v]
                        .iter()
                        .map(|&x| x as f64)
                        .collect();
                    let idx: Vec<usize> = b.idx[r * b.k..(r + 1) * b.k]
                        .iter()
                        .map(|&j| j as usize)
                        .collect();
                    let vals: Vec<f64> = b.vals[r * b.k..(r + 1) * b.k]
                        .iter()
                        .map(|&x| x as f64)
                        .collect();
                    let (l, _, _) =
                        topk_row(&s, &idx, &vals, Some(b.labels[r].max(0) as usize), &spec);
                    let want = if r == 1 || r == 2 {
                        0.0
                    } else {
                        b.weights[r] as f64 * l
                    };
                    assert_eq!(out.row_losses[r], want, "{mode} row {r}");
                }
                let sum: f64 = out.row_losses.iter().sum();
                assert!((out.loss - w * sum).abs() <= 1e-15 * sum.abs().max(1.0));
                let total = |s: &[f32]| {
                    spec.grad_scale
                        * Oracle
                            .compute_topk(&b.inputs(s, true, true), &spec, None)
                            .unwrap()
                            .loss
                };
                fd_batch(
                    &format!("{spec:?}"),
                    &b.s,
                    out.grad.as_ref().unwrap(),
                    total,
                );
                // Int32 and int64 indices agree; scales follow the weights.
                let other = Oracle
                    .compute_topk(
                        &b.inputs(&b.s, case != 0, true),
                        &spec,
                        Some(GradDtype::F32),
                    )
                    .unwrap();
                assert_eq!(out, other);
                let sp = Oracle.row_scales_topk(&b.inputs(&b.s, true, false), &spec);
                let sw = Oracle.row_scales_topk(&b.inputs(&b.s, true, true), &spec);
                assert_eq!(sw[0], (b.weights[0] as f64).abs() * sp[0]);
                assert_eq!((sw[1], sw[2]), (0.0, 0.0));
            }
        }
    }
}

// ------------------------------------------------------------ validation

fn expect_arg(result: kdfuse::Result<KdOutput>, arg: &str, needle: &str) {
    match result {
        Err(KdError::InvalidArgument { arg: a, msg }) => {
            assert_eq!(a, arg, "wrong argument named ({msg})");
            assert!(msg.contains(needle), "`{msg}` does not mention `{needle}`");
        }
        other => panic!("expected an error naming `{arg}`, got {other:?}"),
    }
}

#[test]
fn topk_validation() {
    let (n, v, k) = (3, 7, 3);
    let s = vec![0.5f32; n * v];
    let vals = vec![-1.0f32; n * k];
    let good: Vec<i64> = vec![0, 3, 6, 1, 2, 4, 5, 6, 0];
    let run = |idx: &[i64], spec: &LossSpec, weights: Option<&[f32]>| {
        Oracle.compute_topk(
            &TopkInputs {
                student: Logits::new(HostData::F32(&s), n, v),
                teacher: TopkTeacher {
                    indices: TopkIndices::I64(idx),
                    values: HostData::F32(&vals),
                    k,
                },
                labels: None,
                row_weights: weights,
            },
            spec,
            Some(GradDtype::F32),
        )
    };
    let fkl = LossSpec::default();
    assert!(run(&good, &fkl, None).is_ok());
    let mut dup = good.clone();
    dup[7] = 5;
    expect_arg(run(&dup, &fkl, None), "teacher_topk_indices", "row 2");
    for bad in [7, -1] {
        let mut out = good.clone();
        out[4] = bad;
        expect_arg(run(&out, &fkl, None), "teacher_topk_indices", "row 1");
    }
    let tail = LossSpec {
        topk_mode: TopkMode::Tail,
        ..Default::default()
    };
    expect_arg(run(&good, &tail, None), "topk_mode", "log-probs");
    let tail = LossSpec {
        teacher_log_probs: true,
        ..tail
    };
    assert!(run(&good, &tail, None).is_ok());
    expect_arg(
        run(
            &good,
            &LossSpec {
                temperature: 2.0,
                ..tail.clone()
            },
            None,
        ),
        "topk_mode",
        "temperature",
    );
    for divergence in &Divergence::ALL[1..] {
        for mode in [TopkMode::Support, TopkMode::Full] {
            let spec = LossSpec {
                divergence: *divergence,
                topk_mode: mode,
                ..Default::default()
            };
            expect_arg(run(&good, &spec, None), "divergence", divergence.as_str());
        }
    }
    let gt = LossSpec {
        grad_teacher: true,
        ..Default::default()
    };
    expect_arg(run(&good, &gt, None), "grad_teacher", "dense");
    for cap in [0.0, -2.0, f64::NAN, f64::INFINITY] {
        let spec = LossSpec {
            softcap: Some(cap),
            ..Default::default()
        };
        expect_arg(run(&good, &spec, None), "softcap", "> 0");
    }
    let spec = LossSpec {
        softcap: Some(3.0),
        teacher_log_probs: true,
        ..Default::default()
    };
    expect_arg(run(&good, &spec, None), "softcap", "log-probs");
    expect_arg(
        run(&good, &fkl, Some(&[1.0, 2.0])),
        "row_weights",
        "2 entries",
    );
    expect_arg(
        run(&good, &fkl, Some(&[1.0, f32::NAN, 2.0])),
        "row_weights",
        "row_weights[1]",
    );
    assert!(run(&good, &fkl, Some(&[1.0, 0.0, -2.0])).is_ok());
}

#[test]
fn dense_option_validation() {
    let (n, v) = (3, 5);
    let s = vec![0.5f32; n * v];
    let t = vec![-0.5f32; n * v];
    let run = |spec: &LossSpec, weights: Option<&[f32]>| {
        Oracle.compute(
            &KdInputs {
                student: Logits::new(HostData::F32(&s), n, v),
                teacher: Logits::new(HostData::F32(&t), n, v),
                labels: None,
                row_weights: weights,
            },
            spec,
            Some(GradDtype::F32),
        )
    };
    for cap in [0.0, -1.0, f64::NAN, f64::NEG_INFINITY] {
        let spec = LossSpec {
            softcap: Some(cap),
            ..Default::default()
        };
        expect_arg(run(&spec, None), "softcap", "> 0");
    }
    let spec = LossSpec {
        softcap: Some(30.0),
        teacher_log_probs: true,
        ..Default::default()
    };
    expect_arg(run(&spec, None), "softcap", "log-probs");
    let fkl = LossSpec::default();
    expect_arg(run(&fkl, Some(&[1.0; 4])), "row_weights", "4 entries");
    for bad in [f32::NAN, f32::INFINITY] {
        expect_arg(
            run(&fkl, Some(&[1.0, 1.0, bad])),
            "row_weights",
            "row_weights[2]",
        );
    }
    // The valid combinations run.
    for spec in [
        LossSpec {
            softcap: Some(30.0),
            grad_teacher: true,
            ..Default::default()
        },
        LossSpec {
            teacher_log_probs: true,
            grad_teacher: true,
            ..Default::default()
        },
    ] {
        let out = run(&spec, Some(&[1.0, 0.5, 0.0])).unwrap();
        assert_eq!(out.grad_teacher.map(|g| g.len()), Some(n * v));
    }
}
