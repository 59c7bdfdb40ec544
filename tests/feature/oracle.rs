//! The f64 feature-loss oracle against finite differences (student and
//! teacher gradients, clamped norms included) and hand-computed values.

use kdfuse::feature::oracle::{attention_map, attention_row, cosine_row, mse_row, RowResult};
use kdfuse::{
    FeatureBackend, FeatureGrads, FeatureInputs, FeatureKind, FeatureSpec, Features, GradDtype,
    HostData, Oracle, Reduction,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn random(seed: u64, n: usize, scale: f64) -> Vec<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| rng.random_range(-1.0..1.0) * scale)
        .collect()
}

/// Central differences of `f` at `x` against `grad`, every coordinate, with a
/// step of `h` times the largest |x|.
fn fd_check(what: &str, x: &[f64], grad: &[f64], h: f64, f: impl Fn(&[f64]) -> f64) {
    assert_eq!(x.len(), grad.len());
    let h = h * x.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    for j in 0..x.len() {
        let (mut xp, mut xm) = (x.to_vec(), x.to_vec());
        xp[j] += h;
        xm[j] -= h;
        let fd = (f(&xp) - f(&xm)) / (2.0 * h);
        assert!(
            (fd - grad[j]).abs() <= 1e-6 * (1.0 + fd.abs()),
            "{what} j={j}: analytic {} vs finite difference {fd}",
            grad[j]
        );
    }
}

/// Checks both gradients of `row(s, t)` by finite differences.
fn fd_both(what: &str, s: &[f64], t: &[f64], h: f64, row: impl Fn(&[f64], &[f64]) -> RowResult) {
    let (_, gs, gt) = row(s, t);
    fd_check(&format!("{what} student"), s, &gs, h, |x| row(x, t).0);
    fd_check(&format!("{what} teacher"), t, &gt, h, |x| row(s, x).0);
}

#[test]
fn mse_gradients_match_finite_differences() {
    for (i, h) in [1usize, 2, 7, 33].into_iter().enumerate() {
        let (s, t) = (random(i as u64, h, 2.0), random(100 + i as u64, h, 2.0));
        fd_both(&format!("mse H={h}"), &s, &t, 1e-6, mse_row);
    }
}

#[test]
fn cosine_gradients_match_finite_differences() {
    for (i, h) in [1usize, 2, 5, 17, 64].into_iter().enumerate() {
        let seed = 10 * i as u64;
        let (s, t) = (random(seed, h, 1.5), random(seed + 1, h, 1.5));
        fd_both(&format!("cosine H={h}"), &s, &t, 1e-6, |a, b| {
            cosine_row(a, b, 1e-8)
        });
        // Clamped norms (below ε): the clamped norm is a constant. One side,
        // then both; steps far below the norms.
        // In the clamped region r is linear in the clamped side: large
        // (relative) steps there, small ones on the other side.
        let tiny: Vec<f64> = s.iter().map(|x| x * 1e-10).collect();
        let row = |a: &[f64], b: &[f64]| cosine_row(a, b, 1e-8);
        let (_, gs, gt) = row(&tiny, &t);
        fd_check("cosine tiny student", &tiny, &gs, 1e-3, |x| row(x, &t).0);
        fd_check("cosine tiny student (teacher)", &t, &gt, 1e-6, |x| {
            row(&tiny, x).0
        });
        let (_, gs, gt) = row(&s, &tiny);
        fd_check("cosine tiny teacher (student)", &s, &gs, 1e-6, |x| {
            row(x, &tiny).0
        });
        fd_check("cosine tiny teacher", &tiny, &gt, 1e-3, |x| row(&s, x).0);
        // A large ε clamps ordinary rows too.
        fd_both(&format!("cosine H={h} eps=10"), &s, &t, 1e-6, |a, b| {
            cosine_row(a, b, 10.0)
        });
    }
}

#[test]
fn attention_gradients_match_finite_differences() {
    for (i, (cs, ct, width)) in [(1, 1, 1), (1, 1, 5), (3, 2, 4), (4, 4, 9), (2, 5, 16)]
        .into_iter()
        .enumerate()
    {
        let seed = 50 + 10 * i as u64;
        let s = random(seed, cs * width, 2.0);
        let t = random(seed + 1, ct * width, 2.0);
        let row = |eps: f64| move |a: &[f64], b: &[f64]| attention_row(a, cs, b, ct, width, eps);
        fd_both(
            &format!("attention {cs}/{ct}×{width}"),
            &s,
            &t,
            1e-6,
            row(1e-12),
        );
        // ‖Q‖ below ε: Q̂ = Q/ε.
        fd_both(
            &format!("attention {cs}/{ct}×{width} eps=1e3"),
            &s,
            &t,
            1e-6,
            row(1e3),
        );
    }
}

#[test]
fn hand_computed_values() {
    // mse: (1 − 0)² + (2 − 0)² = 5.
    let (r, gs, gt) = mse_row(&[1.0, 2.0], &[0.0, 0.0]);
    assert_eq!((r, gs, gt), (5.0, vec![2.0, 4.0], vec![-2.0, -4.0]));
    // cosine of (1, 0) and (1, 1): 1/√2.
    let (r, _, _) = cosine_row(&[1.0, 0.0], &[1.0, 1.0], 1e-8);
    assert!((r - (1.0 - 0.5f64.sqrt())).abs() < 1e-15);
    // A zero row: cos = 0, loss 1; its gradient is −t/(ε·‖t‖).
    let (r, gs, gt) = cosine_row(&[0.0, 0.0], &[3.0, 4.0], 1e-8);
    assert_eq!(r, 1.0);
    assert!((gs[0] + 3.0 / (5.0 * 1e-8)).abs() < 1e-6 && (gs[1] + 4.0 / (5.0 * 1e-8)).abs() < 1e-6);
    assert_eq!(gt, vec![0.0, 0.0]);
    // Identical rows: exactly 0 and zero gradients; opposite rows: 2.
    let x = [0.3, -1.7, 2.2, 0.01];
    let (r, gs, gt) = cosine_row(&x, &x, 1e-8);
    assert_eq!(r, 0.0);
    assert!(gs.iter().chain(&gt).all(|&g| g == 0.0));
    let neg: Vec<f64> = x.iter().map(|v| -v).collect();
    let (r, gs, _) = cosine_row(&x, &neg, 1e-8);
    assert_eq!(r, 2.0);
    assert!(gs.iter().all(|&g| g == 0.0));
    // Attention: maps (1, 1) and (2, 0) per position → Q = (2.5, 0.5) for the
    // student [[1, 1], [2, 0]] (C = 2, S = 2), teacher C = 1 map (1, 0).
    let q = attention_map(&[1.0, 1.0, 2.0, 0.0], 2, 2);
    assert_eq!(q, vec![2.5, 0.5]);
    let (r, _, _) = attention_row(&[1.0, 1.0, 2.0, 0.0], 2, &[1.0, 0.0], 1, 2, 1e-12);
    let n = (2.5f64 * 2.5 + 0.25).sqrt();
    let want = (2.5 / n - 1.0).powi(2) + (0.5 / n).powi(2);
    assert!((r - want).abs() < 1e-15);
}

#[test]
fn cross_checks() {
    let s = random(7, 24, 1.0);
    let t = random(8, 24, 1.0);
    // cosine is scale invariant in each argument.
    let base = cosine_row(&s, &t, 1e-8).0;
    let scaled: Vec<f64> = s.iter().map(|x| 3.5 * x).collect();
    assert!((cosine_row(&scaled, &t, 1e-8).0 - base).abs() < 1e-14);
    // Attention with C = 1 is the distance of the normalised |x|² maps.
    let (r, _, _) = attention_row(&s, 1, &t, 1, 24, 1e-12);
    let norm = |x: &[f64]| {
        let q: Vec<f64> = x.iter().map(|v| v * v).collect();
        let n = q.iter().map(|v| v * v).sum::<f64>().sqrt();
        q.into_iter().map(|v| v / n).collect::<Vec<_>>()
    };
    let (a, b) = (norm(&s), norm(&t));
    let want: f64 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum();
    assert!((r - want).abs() < 1e-14);
    // Attention is invariant to the channel count when the channels repeat
    // (a mean, not a sum) and to the sign of the features.
    let twice: Vec<f64> = s.iter().chain(s.iter()).map(|v| -v).collect();
    assert!((attention_row(&twice, 2, &t, 1, 24, 1e-12).0 - r).abs() < 1e-14);
}

#[test]
fn oracle_backend_reductions_and_weights() {
    let (n, h) = (3, 4);
    let s: Vec<f32> = (0..n * h).map(|i| i as f32 * 0.25).collect();
    let t: Vec<f32> = (0..n * h).map(|i| (i % 5) as f32 * 0.5).collect();
    let inputs = FeatureInputs {
        student: Features::new(HostData::F32(&s), n, h),
        teacher: Features::new(HostData::F32(&t), n, h),
    };
    let run = |reduction| {
        let spec = FeatureSpec {
            reduction,
            ..FeatureSpec::new(FeatureKind::Mse)
        };
        Oracle
            .feature_loss(&inputs, &spec, FeatureGrads::both(GradDtype::F32))
            .unwrap()
    };
    let mean = run(Reduction::Mean);
    let total: f64 = s
        .iter()
        .zip(&t)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    // PyTorch's mse_loss: the mean over all N·H elements.
    assert!((mean.loss - total / (n * h) as f64).abs() < 1e-12);
    assert!((run(Reduction::BatchMean).loss - total / n as f64).abs() < 1e-12);
    assert!((run(Reduction::Sum).loss - total).abs() < 1e-12);
    let none = run(Reduction::None);
    assert!((none.row_losses.iter().sum::<f64>() - none.loss).abs() < 1e-12);
    // ∂/∂s of the mean: 2(s − t)/(N·H); the teacher's is its negative.
    let (gs, gt) = (mean.grad_student.unwrap(), mean.grad_teacher.unwrap());
    for i in 0..n * h {
        let want = 2.0 * (s[i] - t[i]) / (n * h) as f32;
        assert!((gs[i] - want).abs() < 1e-7 && gt[i] == -gs[i]);
    }
}
