//! The fast CPU backend (the kernels' fp32 arithmetic) against the f64 oracle.

use crate::common;

use common::{inputs, logits};
use kdfuse::check::{random_config, run_case, sweep};
use kdfuse::{
    Backend, CpuBackend, Divergence, Dtype, GradDtype, HostData, KdInputs, Logits, LossSpec,
    Oracle, OwnedData, Precision, Reduction,
};

common::cpu_random_cases_within_tolerance!(random_config, run_case, 70_000);

#[test]
fn sweep_with_large_vocabularies() {
    let report = sweep(&CpuBackend, 300, 42, 262_144, |_| {}).unwrap();
    assert!(report.passed(), "{:#?}", report.failures);
    assert_eq!(report.cases, 300);
    common::assert_all_groups(&report);
}

fn both(inputs: &KdInputs, spec: &LossSpec) -> (kdfuse::KdOutput, kdfuse::KdOutput) {
    (
        CpuBackend
            .compute(inputs, spec, Some(GradDtype::F32))
            .unwrap(),
        Oracle.compute(inputs, spec, Some(GradDtype::F32)).unwrap(),
    )
}

#[test]
fn tiny_vocabularies() {
    for v in [1, 2, 3] {
        let s = logits(v as u64, 3, v, 2.0);
        let t = logits(v as u64 + 10, 3, v, 2.0);
        for divergence in Divergence::ALL {
            let spec = LossSpec {
                divergence,
                temperature: 1.5,
                ..Default::default()
            };
            let (a, b) = both(&inputs(&s, &t, 3, v, None), &spec);
            assert!(
                (a.loss - b.loss).abs() < 1e-6,
                "V={v} {divergence}: {} vs {}",
                a.loss,
                b.loss
            );
            if v == 1 {
                assert!(a.grad.unwrap().iter().all(|&g| g.abs() < 1e-6));
            }
        }
    }
}

#[test]
fn empty_batch_and_all_rows_ignored() {
    let out = CpuBackend
        .compute(
            &inputs(&[], &[], 0, 5, None),
            &LossSpec::default(),
            Some(GradDtype::F32),
        )
        .unwrap();
    assert_eq!(
        (out.loss, out.valid_rows, out.grad.unwrap().len()),
        (0.0, 0, 0)
    );
    let s = logits(1, 4, 9, 1.0);
    let t = logits(2, 4, 9, 1.0);
    let labels = [-100i64; 4];
    for reduction in Reduction::ALL {
        let spec = LossSpec {
            alpha: 0.5,
            reduction,
            ..Default::default()
        };
        let out = CpuBackend
            .compute(
                &inputs(&s, &t, 4, 9, Some(&labels)),
                &spec,
                Some(GradDtype::F32),
            )
            .unwrap();
        assert_eq!(out.loss, 0.0);
        assert_eq!(out.valid_rows, 0);
        assert!(
            out.grad.unwrap().iter().all(|&g| g == 0.0),
            "ignored rows get a zero gradient row"
        );
    }
}

#[test]
fn reductions_are_consistent() {
    let (n, v) = (5, 300);
    let s = logits(3, n, v, 2.0);
    let t = logits(4, n, v, 2.0);
    let labels = [3i64, -100, 7, 299, 0];
    for precision in Precision::ALL {
        let run = |reduction, grad_scale| {
            let spec = LossSpec {
                alpha: 0.3,
                reduction,
                grad_scale,
                precision,
                ..Default::default()
            };
            CpuBackend
                .compute(
                    &inputs(&s, &t, n, v, Some(&labels)),
                    &spec,
                    Some(GradDtype::F32),
                )
                .unwrap()
        };
        let (bm, sum, mean, none) = (
            run(Reduction::BatchMean, 1.0),
            run(Reduction::Sum, 1.0),
            run(Reduction::Mean, 1.0),
            run(Reduction::None, 1.0),
        );
        assert_eq!(bm.valid_rows, 4);
        assert!((sum.loss - 4.0 * bm.loss).abs() < 1e-9 * sum.loss.abs());
        assert!((mean.loss - bm.loss / v as f64).abs() < 1e-12);
        assert_eq!(none.row_losses[1], 0.0);
        assert!((none.row_losses.iter().sum::<f64>() - sum.loss).abs() < 1e-9);
        let scaled = run(Reduction::BatchMean, 3.0);
        let b = bm.grad.unwrap();
        // Exact scales each entry's final product; fast folds the scale into
        // the weights of the soft and the hard-CE parts, so an entry where
        // they cancel is exact only to the gradient's scale.
        let scale = match precision {
            Precision::Exact => 0.0,
            Precision::Fast => b.iter().fold(0.0f32, |m, x| m.max(x.abs())),
        };
        for (a, b) in scaled.grad.unwrap().iter().zip(&b) {
            assert!(
                (a - 3.0 * b).abs() <= 1e-6 * b.abs().max(scale) + 1e-12,
                "{precision}"
            );
        }
    }
}

#[test]
fn strided_rows_and_padded_teacher() {
    // A teacher with a wider (padded) vocabulary, rows read through strides.
    let (n, v, ts) = (3, 151_936, 152_064);
    let s = logits(5, n, v, 2.0);
    let mut t = logits(6, n, ts, 2.0);
    for r in 0..n {
        for c in v..ts {
            t[r * ts + c] = f32::NAN; // padding must never be read
        }
    }
    let strided = KdInputs {
        student: Logits::new(HostData::F32(&s), n, v),
        teacher: Logits::strided(HostData::F32(&t), n, v, ts),
        labels: None,
        row_weights: None,
    };
    let dense_t: Vec<f32> = (0..n)
        .flat_map(|r| t[r * ts..r * ts + v].to_vec())
        .collect();
    let spec = LossSpec {
        divergence: Divergence::Jsd,
        temperature: 2.0,
        ..Default::default()
    };
    let a = CpuBackend
        .compute(&strided, &spec, Some(GradDtype::F32))
        .unwrap();
    let b = CpuBackend
        .compute(
            &inputs(&s, &dense_t, n, v, None),
            &spec,
            Some(GradDtype::F32),
        )
        .unwrap();
    assert_eq!(a, b);
    assert!(a.loss.is_finite());
}

#[test]
fn gradient_in_the_input_dtype_is_the_rounded_f32_gradient() {
    let (n, v) = (2, 1000);
    let s = OwnedData::from_f32(&logits(7, n, v, 2.0), Dtype::Bf16);
    let t = OwnedData::from_f32(&logits(8, n, v, 2.0), Dtype::Bf16);
    let inp = common::inputs_of(s.view(), t.view(), n, v);
    let spec = LossSpec::default();
    let g32 = CpuBackend
        .compute(&inp, &spec, Some(GradDtype::F32))
        .unwrap()
        .grad
        .unwrap();
    let g16 = CpuBackend
        .compute(&inp, &spec, Some(GradDtype::Input))
        .unwrap()
        .grad
        .unwrap();
    for (a, b) in g16.iter().zip(&g32) {
        assert_eq!(*a, Dtype::Bf16.round(*b));
    }
}

#[test]
fn nan_inputs_give_nan_rows() {
    let mut s = logits(9, 2, 10, 1.0);
    let t = logits(10, 2, 10, 1.0);
    s[3] = f32::NAN;
    let out = CpuBackend
        .compute(
            &inputs(&s, &t, 2, 10, None),
            &LossSpec {
                reduction: Reduction::None,
                ..Default::default()
            },
            None,
        )
        .unwrap();
    assert!(out.row_losses[0].is_nan());
    assert!(out.row_losses[1].is_finite());
}

/// Soft CE is forward KL plus the teacher entropy: the same kernel pass, the
/// same gradient bit for bit, and a row loss that differs by c·(1−α)·H(p).
#[test]
fn soft_ce_is_forward_kl_plus_teacher_entropy() {
    for (v, alpha, temperature, neg_inf) in [
        (1usize, 0.0, 1.0, false),
        (7, 0.4, 2.0, true),
        (301, 0.0, 0.7, true),
        (40_001, 0.25, 1.5, false),
    ] {
        let n = 4;
        let s = logits(20 + v as u64, n, v, 3.0);
        let mut t = logits(30 + v as u64, n, v, 3.0);
        if neg_inf && v > 2 {
            // Teacher −inf: p = 0 there, finite for both.
            for r in 0..n {
                t[r * v + 1] = f32::NEG_INFINITY;
            }
        }
        let labels: Vec<i64> = (0..n as i64)
            .map(|r| if r == 2 { -100 } else { r % v as i64 })
            .collect();
        let fkl = LossSpec {
            alpha,
            temperature,
            reduction: Reduction::None,
            ..Default::default()
        };
        let sce = LossSpec {
            divergence: Divergence::SoftCe,
            ..fkl.clone()
        };
        let inp = inputs(&s, &t, n, v, Some(&labels));
        let a = CpuBackend
            .compute(&inp, &fkl, Some(GradDtype::F32))
            .unwrap();
        let b = CpuBackend
            .compute(&inp, &sce, Some(GradDtype::F32))
            .unwrap();
        assert_eq!(a.grad, b.grad, "V={v}: soft CE's gradient is forward KL's");
        for r in 0..n {
            let row: Vec<f64> = (0..v).map(|j| t[r * v + j] as f64).collect();
            let lp = kdfuse::oracle::log_softmax(&row, temperature);
            let h: f64 = -lp
                .iter()
                .filter(|x| x.is_finite())
                .map(|&x| x.exp() * x)
                .sum::<f64>();
            let want = if labels[r] == -100 {
                0.0
            } else {
                fkl.soft_coef() * h
            };
            let diff = b.row_losses[r] - a.row_losses[r];
            assert!(
                (diff - want).abs() <= 2e-6 * (1.0 + b.row_losses[r].abs()),
                "V={v} row {r}: {diff} vs c·(1−α)·H = {want}"
            );
        }
    }
}

/// Soft CE with teacher mass where the student is −inf is +inf.
#[test]
fn soft_ce_infinite_where_the_student_is_masked() {
    let v = 50;
    let mut s = logits(41, 2, v, 2.0);
    let t = logits(42, 2, v, 2.0);
    s[3] = f32::NEG_INFINITY;
    let spec = LossSpec {
        divergence: Divergence::SoftCe,
        reduction: Reduction::None,
        ..Default::default()
    };
    let (a, b) = both(&inputs(&s, &t, 2, v, None), &spec);
    assert_eq!(a.row_losses[0], f64::INFINITY);
    assert_eq!(b.row_losses[0], f64::INFINITY);
    assert!((a.row_losses[1] - b.row_losses[1]).abs() < 1e-5 * b.row_losses[1]);
}

/// TVD unscaled (c = 1), row by row.
fn tvd(temperature: f64) -> LossSpec {
    LossSpec {
        divergence: Divergence::Tvd,
        temperature,
        t2_scaling: false,
        reduction: Reduction::None,
        ..Default::default()
    }
}

/// TVD is in [0, 1] (times c), 0 with a zero gradient for identical rows, and
/// finite whichever side is masked.
#[test]
fn tvd_bounds_identical_rows_and_masks() {
    for v in [1usize, 2, 3, 17, 1001, 70_001] {
        let n = 3;
        let spec = tvd(1.3);
        let s = logits(50 + v as u64, n, v, 4.0);
        let mut t = logits(60 + v as u64, n, v, 4.0);
        let cpu = |s: &[f32], t: &[f32]| {
            CpuBackend
                .compute(&inputs(s, t, n, v, None), &spec, Some(GradDtype::F32))
                .unwrap()
        };
        let out = cpu(&s, &t);
        assert!(
            out.row_losses.iter().all(|l| (0.0..=1.0).contains(l)),
            "V={v}: {:?}",
            out.row_losses
        );
        // Identical rows (with a shared mask): exactly 0, zero gradient.
        let mut same = s.clone();
        if v > 2 {
            same[1] = f32::NEG_INFINITY;
        }
        let out = cpu(&same, &same);
        assert!(
            out.row_losses.iter().all(|&l| l == 0.0),
            "V={v}: {:?}",
            out.row_losses
        );
        assert!(out.grad.unwrap().iter().all(|&g| g == 0.0), "V={v}");
        // A student shifted by a constant is the same distribution.
        let shifted: Vec<f32> = s.iter().map(|x| x + 3.0).collect();
        let out = cpu(&shifted, &s);
        assert!(
            out.row_losses.iter().all(|&l| l.abs() < 1e-6),
            "V={v}: {:?}",
            out.row_losses
        );
        // One-sided masks stay finite and match the oracle.
        if v > 2 {
            let mut sm = s.clone();
            sm[2] = f32::NEG_INFINITY;
            t[v + 2] = f32::NEG_INFINITY;
            let inp = inputs(&sm, &t, n, v, None);
            let (a, b) = both(&inp, &spec);
            for r in 0..n {
                assert!(a.row_losses[r].is_finite());
                assert!(
                    (a.row_losses[r] - b.row_losses[r]).abs() < 1e-6,
                    "V={v} row {r}"
                );
            }
        }
    }
    // A student equal to the teacher but masked on some entries is above the
    // teacher wherever it has mass: TVD = the masked teacher mass, locally
    // constant, so the gradient is exactly 0 (oracle and CPU alike; a
    // rounding of ½ − ½·Σq would be amplified by f16 loss scaling).
    let v = 301;
    let t = logits(77, 2, v, 2.0);
    let mut s = t.clone();
    for j in (0..2 * v).step_by(3) {
        s[j] = f32::NEG_INFINITY;
    }
    let spec = tvd(6.0);
    let (a, b) = both(&inputs(&s, &t, 2, v, None), &spec);
    assert!(a.grad.unwrap().iter().all(|&g| g == 0.0));
    assert!(b.grad.unwrap().iter().all(|&g| g == 0.0));
    for r in 0..2 {
        let row: Vec<f64> = (0..v).map(|j| t[r * v + j] as f64).collect();
        let lp = kdfuse::oracle::log_softmax(&row, 6.0);
        let masked: f64 = (0..v)
            .filter(|&j| s[r * v + j] == f32::NEG_INFINITY)
            .map(|j| lp[j].exp())
            .sum();
        assert!(
            (a.row_losses[r] - masked).abs() < 1e-6,
            "{} vs {masked}",
            a.row_losses[r]
        );
        assert!((b.row_losses[r] - masked).abs() < 1e-12);
    }
    // Disjoint supports: TVD = 1.
    let s = [0.0f32, f32::NEG_INFINITY];
    let t = [f32::NEG_INFINITY, 0.0f32];
    let spec = LossSpec {
        divergence: Divergence::Tvd,
        ..Default::default()
    };
    let (a, _) = both(&inputs(&s, &t, 1, 2, None), &spec);
    assert_eq!(a.loss, 1.0);
}
