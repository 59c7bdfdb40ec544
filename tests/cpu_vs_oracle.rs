//! The fast CPU backend (the kernels' fp32 arithmetic) against the f64 oracle.

mod common;

use common::{inputs, logits};
use kdfuse::check::{random_config, run_case, sweep};
use kdfuse::{
    Backend, CpuBackend, Divergence, Dtype, GradDtype, HostData, KdInputs, Logits, LossSpec,
    Oracle, OwnedData, Reduction,
};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::SeedableRng;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]
    #[test]
    fn random_cases_within_tolerance(seed in any::<u64>()) {
        let mut rng = StdRng::seed_from_u64(seed);
        let config = random_config(&mut rng, 70_000);
        let r = run_case(&CpuBackend, &config).unwrap();
        prop_assert!(r.passed, "loss_err {:.2e} grad_err {:.2e}: {}", r.loss_err, r.grad_err, config.describe());
    }
}

#[test]
fn sweep_with_large_vocabularies() {
    let report = sweep(&CpuBackend, 300, 42, 262_144, |_| {}).unwrap();
    assert!(report.passed(), "{:#?}", report.failures);
    assert_eq!(report.cases, 300);
    assert_eq!(report.groups.len(), 9, "every dtype × divergence drawn");
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
    let run = |reduction, grad_scale| {
        let spec = LossSpec {
            alpha: 0.3,
            reduction,
            grad_scale,
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
    for (a, b) in scaled.grad.unwrap().iter().zip(bm.grad.unwrap()) {
        assert!((a - 3.0 * b).abs() <= 1e-6 * b.abs() + 1e-12);
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
    let inp = KdInputs {
        student: Logits::new(s.view(), n, v),
        teacher: Logits::new(t.view(), n, v),
        labels: None,
    };
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
