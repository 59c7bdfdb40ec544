//! The feature losses on the fast CPU backend (the kernels' fp32 arithmetic)
//! against the f64 oracle: property tests over random cases, shapes at the
//! edges, special rows, strides, dtypes and reductions.

use crate::common::{assert_passed, for_each_backend};
use kdfuse::feature::check::{
    feature_sweep, generate_features, random_feature_config, run_feature_case, FeatureCaseConfig,
    Special,
};
use kdfuse::{
    CpuBackend, Dtype, FeatureBackend, FeatureGrads, FeatureInputs, FeatureKind, FeatureOutput,
    FeatureSpec, Features, GradDtype, HostData, Oracle, OwnedData, Reduction,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

crate::common::cpu_random_cases_within_tolerance!(random_feature_config, run_feature_case, 70_000);

#[test]
fn sweep_with_large_rows() {
    let report = feature_sweep(&CpuBackend, 250, 42, 262_144, |_| {}).unwrap();
    assert!(report.passed(), "{:#?}", report.failures);
    assert_eq!(report.groups.len(), 9, "every dtype × loss drawn");
}

fn case(kind: FeatureKind, rows: usize, width: usize, cs: usize, ct: usize) -> FeatureCaseConfig {
    FeatureCaseConfig {
        spec: FeatureSpec::new(kind),
        rows,
        width,
        student_channels: cs,
        teacher_channels: ct,
        student_pad: 0,
        teacher_pad: 0,
        dtype: Dtype::F32,
        grad_dtype: GradDtype::F32,
        teacher_grad: true,
        scale: 1.0,
        correlation: 0.5,
        special: Special::None,
        seed: (rows * 7919 + width * 31 + cs) as u64,
    }
}

fn assert_passes(c: &FeatureCaseConfig) {
    assert_passed!(run_feature_case(&CpuBackend, c).unwrap(), c);
}

#[test]
fn shapes_at_the_edges() {
    for kind in [FeatureKind::Mse, FeatureKind::Cosine] {
        for h in [1, 2, 3, 31, 257, 4099, 262_144] {
            for dtype in Dtype::ALL {
                assert_passes(&FeatureCaseConfig {
                    dtype,
                    grad_dtype: GradDtype::Input,
                    ..case(kind, 3, h, 1, 1)
                });
            }
        }
    }
    for (s, cs, ct) in [(1, 1, 1), (1, 7, 3), (2, 1, 5), (49, 64, 256), (3136, 3, 8)] {
        assert_passes(&case(FeatureKind::Attention, 4, s, cs, ct));
    }
}

fn f32_inputs<'a>(s: &'a [f32], t: &'a [f32], n: usize, h: usize) -> FeatureInputs<'a> {
    FeatureInputs {
        student: Features::new(HostData::F32(s), n, h),
        teacher: Features::new(HostData::F32(t), n, h),
    }
}

fn random(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-2.0..2.0)).collect()
}

fn both(inputs: &FeatureInputs, spec: &FeatureSpec) -> (FeatureOutput, FeatureOutput) {
    let g = FeatureGrads::both(GradDtype::F32);
    (
        CpuBackend.feature_loss(inputs, spec, g).unwrap(),
        Oracle.feature_loss(inputs, spec, g).unwrap(),
    )
}

/// Identical rows: loss 0 and zero gradients; opposite rows (cosine): 2.
fn identical_rows_give_zero_loss_and_zero_gradients(b: &dyn FeatureBackend) {
    let g = FeatureGrads::both(GradDtype::F32);
    for kind in FeatureKind::ALL {
        for h in [1, 5, 1000] {
            let s = random(h as u64, 3 * h);
            let spec = FeatureSpec::new(kind);
            let inputs = if kind == FeatureKind::Attention {
                FeatureInputs {
                    student: Features::maps(HostData::F32(&s), 3, 1, h),
                    teacher: Features::maps(HostData::F32(&s), 3, 1, h),
                }
            } else {
                f32_inputs(&s, &s, 3, h)
            };
            let out = b.feature_loss(&inputs, &spec, g).unwrap();
            assert_eq!(out.loss, 0.0, "{kind} H={h}");
            let grads = out.grad_student.iter().chain(&out.grad_teacher).flatten();
            assert!(grads.into_iter().all(|&g| g == 0.0), "{kind} H={h}");
        }
    }
    // cos = −1 exactly for opposite rows: loss 2, zero gradients.
    let s = random(9, 64);
    let t: Vec<f32> = s.iter().map(|x| -x).collect();
    let spec = FeatureSpec::new(FeatureKind::Cosine);
    let out = b
        .feature_loss(&f32_inputs(&s, &t, 1, 64), &spec, g)
        .unwrap();
    assert!((out.loss - 2.0).abs() < 1e-6, "{}", out.loss);
    assert!(out.grad_student.unwrap().iter().all(|&g| g == 0.0));
}
for_each_backend!(identical_rows_give_zero_loss_and_zero_gradients(b));

#[test]
fn cosine_zero_rows() {
    // Row 0: zero student; row 1: zero teacher; row 2: both zero.
    let h = 6;
    let mut s = random(1, 3 * h);
    let mut t = random(2, 3 * h);
    s[..h].fill(0.0);
    t[h..2 * h].fill(0.0);
    s[2 * h..].fill(0.0);
    t[2 * h..].fill(0.0);
    let spec = FeatureSpec {
        reduction: Reduction::None,
        ..FeatureSpec::new(FeatureKind::Cosine)
    };
    let (cpu, oracle) = both(&f32_inputs(&s, &t, 3, h), &spec);
    assert_eq!(cpu.row_losses, vec![1.0; 3], "a zero row has cos = 0");
    let (gs, rs) = (cpu.grad_student.unwrap(), oracle.grad_student.unwrap());
    // The zero student's gradient: −t/(ε·‖t‖), of size 1/ε.
    let nt = t[..h].iter().map(|x| x * x).sum::<f32>().sqrt();
    for j in 0..h {
        let want = -t[j] / (1e-8 * nt);
        assert!(
            (gs[j] - want).abs() <= 1e-5 * want.abs(),
            "{} vs {want}",
            gs[j]
        );
        assert!((gs[j] - rs[j]).abs() <= 1e-5 * rs[j].abs());
    }
    // Against a zero teacher the loss is constant: exactly zero gradients.
    assert!(gs[h..].iter().all(|&g| g == 0.0));
    let gt = cpu.grad_teacher.unwrap();
    assert!(gt[..h].iter().all(|&g| g == 0.0) && gt[2 * h..].iter().all(|&g| g == 0.0));
}

#[test]
fn attention_with_one_channel_is_the_normalised_square_map() {
    let (n, width) = (2, 40);
    let s = random(3, n * width);
    let t = random(4, n * width);
    let inputs = FeatureInputs {
        student: Features::maps(HostData::F32(&s), n, 1, width),
        teacher: Features::maps(HostData::F32(&t), n, 1, width),
    };
    let spec = FeatureSpec {
        reduction: Reduction::None,
        ..FeatureSpec::new(FeatureKind::Attention)
    };
    let (cpu, _) = both(&inputs, &spec);
    for r in 0..n {
        let map = |x: &[f32]| {
            let q: Vec<f64> = x.iter().map(|&v| (v as f64).powi(2)).collect();
            let norm = q.iter().map(|v| v * v).sum::<f64>().sqrt();
            q.into_iter().map(move |v| v / norm)
        };
        let want: f64 = map(&s[r * width..(r + 1) * width])
            .zip(map(&t[r * width..(r + 1) * width]))
            .map(|(a, b)| (a - b).powi(2))
            .sum();
        assert!((cpu.row_losses[r] - want).abs() <= 1e-6 * want, "{r}");
    }
}

#[test]
fn strided_rows_equal_dense_rows() {
    let (n, h, pad) = (4, 33, 5);
    for kind in FeatureKind::ALL {
        let dense_s = random(5, n * h);
        let dense_t = random(6, n * h);
        let mut s = vec![f32::NAN; n * (h + pad)];
        let mut t = vec![f32::NAN; n * (h + 2 * pad)];
        for r in 0..n {
            s[r * (h + pad)..r * (h + pad) + h].copy_from_slice(&dense_s[r * h..(r + 1) * h]);
            t[r * (h + 2 * pad)..r * (h + 2 * pad) + h]
                .copy_from_slice(&dense_t[r * h..(r + 1) * h]);
        }
        let strided = FeatureInputs {
            student: Features::new(HostData::F32(&s), n, h).with_row_stride(h + pad),
            teacher: Features::new(HostData::F32(&t), n, h).with_row_stride(h + 2 * pad),
        };
        let spec = FeatureSpec::new(kind);
        let g = FeatureGrads::both(GradDtype::F32);
        let a = CpuBackend.feature_loss(&strided, &spec, g).unwrap();
        let b = CpuBackend
            .feature_loss(&f32_inputs(&dense_s, &dense_t, n, h), &spec, g)
            .unwrap();
        assert_eq!(a, b, "{kind}: the padding (NaN) must never be read");
    }
}

#[test]
fn gradients_in_the_input_dtype_are_the_rounded_f32_gradients() {
    for dtype in [Dtype::Bf16, Dtype::F16] {
        for kind in FeatureKind::ALL {
            let (n, h) = (3, 100);
            let s = OwnedData::from_f32(&random(7, n * h), dtype);
            let t = OwnedData::from_f32(&random(8, n * h), dtype);
            let inputs = FeatureInputs {
                student: Features::maps(s.view(), n, 4, h / 4),
                teacher: Features::maps(t.view(), n, 4, h / 4),
            };
            let spec = FeatureSpec {
                reduction: Reduction::Sum,
                ..FeatureSpec::new(kind)
            };
            let run = |d| {
                CpuBackend
                    .feature_loss(&inputs, &spec, FeatureGrads::both(d))
                    .unwrap()
            };
            let (wide, narrow) = (run(GradDtype::F32), run(GradDtype::Input));
            for (a, b) in [
                (wide.grad_student, narrow.grad_student),
                (wide.grad_teacher, narrow.grad_teacher),
            ] {
                for (x, y) in a.unwrap().iter().zip(b.unwrap()) {
                    assert_eq!(dtype.round(*x), y);
                }
            }
        }
    }
}

#[test]
fn reductions_and_scales_are_consistent() {
    let (n, c, width) = (5, 3, 20);
    let s = random(9, n * c * width);
    let t = random(10, n * c * width);
    let inputs = FeatureInputs {
        student: Features::maps(HostData::F32(&s), n, c, width),
        teacher: Features::maps(HostData::F32(&t), n, c, width),
    };
    for kind in FeatureKind::ALL {
        let run = |reduction, grad_scale| {
            let spec = FeatureSpec {
                reduction,
                grad_scale,
                ..FeatureSpec::new(kind)
            };
            CpuBackend
                .feature_loss(&inputs, &spec, FeatureGrads::student(GradDtype::F32))
                .unwrap()
        };
        let (mean, bm, sum, none) = (
            run(Reduction::Mean, 1.0),
            run(Reduction::BatchMean, 1.0),
            run(Reduction::Sum, 1.0),
            run(Reduction::None, 1.0),
        );
        let per_row = match kind {
            FeatureKind::Mse => (c * width) as f64,
            FeatureKind::Cosine => 1.0,
            FeatureKind::Attention => width as f64,
        };
        assert!((sum.loss - n as f64 * bm.loss).abs() <= 1e-12 * sum.loss);
        assert!((mean.loss - bm.loss / per_row).abs() <= 1e-12 * bm.loss);
        assert!((none.row_losses.iter().sum::<f64>() - sum.loss).abs() <= 1e-12 * sum.loss);
        let scaled = run(Reduction::Mean, 3.0);
        for (a, b) in scaled
            .grad_student
            .unwrap()
            .iter()
            .zip(mean.grad_student.unwrap())
        {
            assert!((a - 3.0 * b).abs() <= 1e-6 * b.abs(), "{kind}");
        }
    }
}

#[test]
fn empty_batch_and_loss_only() {
    for kind in FeatureKind::ALL {
        let spec = FeatureSpec::new(kind);
        let out = CpuBackend
            .feature_loss(
                &f32_inputs(&[], &[], 0, 7),
                &spec,
                FeatureGrads::both(GradDtype::F32),
            )
            .unwrap();
        assert_eq!(out.loss, 0.0);
        assert!(out.row_losses.is_empty());
        assert_eq!(out.grad_student.unwrap().len(), 0);
        let s = random(11, 14);
        let loss_only = CpuBackend
            .feature_loss(&f32_inputs(&s, &s, 2, 7), &spec, FeatureGrads::NONE)
            .unwrap();
        assert!(loss_only.grad_student.is_none() && loss_only.grad_teacher.is_none());
    }
}

#[test]
fn special_rows_of_every_kind() {
    let mut rng = StdRng::seed_from_u64(99);
    for special in [
        Special::ZeroRows,
        Special::TinyRows,
        Special::Identical,
        Special::Negated,
    ] {
        for _ in 0..8 {
            let c = FeatureCaseConfig {
                special,
                rows: 4,
                ..random_feature_config(&mut rng, 5000)
            };
            let c = FeatureCaseConfig {
                teacher_channels: c.student_channels,
                ..c
            };
            let data = generate_features(&c);
            assert_eq!(data.inputs().student.rows, 4);
            assert_passes(&c);
        }
    }
}
