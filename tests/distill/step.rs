//! `DistillStep` on the CPU: gradients against finite differences, the
//! optimizers against their formulas and validation errors (the demo's
//! effects on the digits are in cli/tests/cli/demo.rs).

use kdfuse::distill::{Device, DistillConfig, DistillStep, Mlp, Optimizer};
use kdfuse::{
    Backend, Divergence, GradDtype, HostData, KdError, KdInputs, Logits, LossSpec, Oracle,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn random(n: usize, scale: f32, rng: &mut StdRng) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

/// (α, τ, divergence) of the gradient checks.
const GRADIENT_CASES: [(f64, f64, Divergence); 4] = [
    (0.5, 4.0, Divergence::ForwardKl),
    (0.0, 2.0, Divergence::ReverseKl),
    (0.3, 1.5, Divergence::Jsd),
    (1.0, 1.0, Divergence::ForwardKl),
];

fn cfg(alpha: f64, temperature: f64, divergence: Divergence) -> DistillConfig {
    DistillConfig {
        loss: LossSpec {
            alpha,
            temperature,
            divergence,
            // β is JSD's alone (validation refuses it with another divergence).
            beta: if divergence == Divergence::Jsd {
                0.3
            } else {
                0.5
            },
            ..Default::default()
        },
        optimizer: Optimizer::sgd(0.1, 0.9),
        dropout: 0.0,
        seed: 3,
    }
}

fn loss_at(
    sizes: &[usize],
    params: Vec<f32>,
    c: &DistillConfig,
    x: &[f32],
    y: &[i64],
    t: &[f32],
) -> f64 {
    let mlp = Mlp::from_params(sizes, params).unwrap();
    let mut s = DistillStep::new(&mlp, None, c.clone(), Device::Cpu).unwrap();
    s.gradients(x, Some(y), Some(t)).unwrap().0
}

/// Central differences in f32 arithmetic: relative L2 error of the whole
/// gradient vector, which ReLU kinks crossed by ±ε would only raise.
fn fd_check(sizes: &[usize], c: DistillConfig, seed: u64) -> f64 {
    let mut rng = StdRng::seed_from_u64(seed);
    let rows = 7;
    let mlp = Mlp::new(sizes, seed).unwrap();
    // Non-zero biases, so that every unit is active on some rows.
    let mut params = mlp.params().to_vec();
    for p in params.iter_mut() {
        *p += rng.random_range(-0.2..0.2);
    }
    let v = *sizes.last().unwrap();
    let x = random(rows * sizes[0], 1.0, &mut rng);
    let y: Vec<i64> = (0..rows).map(|_| rng.random_range(0..v as i64)).collect();
    let t = random(rows * v, 3.0, &mut rng);
    let mlp = Mlp::from_params(sizes, params.clone()).unwrap();
    let mut step = DistillStep::new(&mlp, None, c.clone(), Device::Cpu).unwrap();
    let (_, g) = step.gradients(&x, Some(&y), Some(&t)).unwrap();
    let eps = 1e-2f32;
    let mut num = Vec::with_capacity(params.len());
    for i in 0..params.len() {
        let mut p = params.clone();
        p[i] += eps;
        let up = loss_at(sizes, p.clone(), &c, &x, &y, &t);
        p[i] -= 2.0 * eps;
        let down = loss_at(sizes, p, &c, &x, &y, &t);
        num.push((up - down) / (2.0 * eps as f64));
    }
    let diff: f64 = g
        .iter()
        .zip(&num)
        .map(|(&a, &b)| (a as f64 - b).powi(2))
        .sum();
    let norm: f64 = num.iter().map(|b| b * b).sum();

    (diff / norm).sqrt()
}

#[test]
fn gradients_match_finite_differences() {
    // A linear student (no ReLU kinks for ±ε to cross).
    for (i, (alpha, tau, div)) in GRADIENT_CASES.into_iter().enumerate() {
        let err = fd_check(&[5, 3], cfg(alpha, tau, div), 10 + i as u64);
        assert!(
            err < 2e-3,
            "alpha {alpha} tau {tau} {div}: gradient vs finite differences {err:.2e}"
        );
    }
}

/// Backpropagation in f64, written out here, from the oracle's f64
/// gradient of the loss with respect to the logits.
fn reference_gradients(mlp: &Mlp, x: &[f32], y: &[i64], t: &[f32], spec: &LossSpec) -> Vec<f64> {
    let sizes = mlp.sizes().to_vec();
    let layers = sizes.len() - 1;
    let rows = x.len() / sizes[0];
    let mut hs: Vec<Vec<f64>> = vec![x.iter().map(|&v| v as f64).collect()];
    for l in 0..layers {
        let (i, o) = (sizes[l], sizes[l + 1]);
        let (w, b) = (mlp.weight(l), mlp.bias(l));
        let h = &hs[l];
        let mut z = vec![0.0f64; rows * o];
        for r in 0..rows {
            for c in 0..o {
                let mut acc = b[c] as f64;
                for k in 0..i {
                    acc += h[r * i + k] * w[k * o + c] as f64;
                }
                z[r * o + c] = if l + 1 < layers { acc.max(0.0) } else { acc };
            }
        }
        hs.push(z);
    }
    let v = sizes[layers];
    let logits: Vec<f32> = hs[layers].iter().map(|&z| z as f32).collect();
    let inputs = KdInputs {
        student: Logits::new(HostData::F32(&logits), rows, v),
        teacher: Logits::new(HostData::F32(t), rows, v),
        labels: Some(y),
        row_weights: None,
    };
    let out = Oracle.compute(&inputs, spec, Some(GradDtype::F32)).unwrap();
    let mut dz: Vec<f64> = out.grad.unwrap().iter().map(|&g| g as f64).collect();
    let total = mlp.num_params();
    let mut grads = vec![0.0f64; total];
    let mut w_off = Vec::new();
    let mut off = 0;
    for l in 0..layers {
        w_off.push(off);
        off += sizes[l] * sizes[l + 1];
    }
    let mut b_off = Vec::new();
    for l in 0..layers {
        b_off.push(off);
        off += sizes[l + 1];
    }
    for l in (0..layers).rev() {
        let (i, o) = (sizes[l], sizes[l + 1]);
        let h = &hs[l];
        for r in 0..rows {
            for c in 0..o {
                grads[b_off[l] + c] += dz[r * o + c];
                for k in 0..i {
                    grads[w_off[l] + k * o + c] += h[r * i + k] * dz[r * o + c];
                }
            }
        }
        if l > 0 {
            let w = mlp.weight(l);
            let mut dh = vec![0.0f64; rows * i];
            for r in 0..rows {
                for k in 0..i {
                    let mut acc = 0.0;
                    for c in 0..o {
                        acc += dz[r * o + c] * w[k * o + c] as f64;
                    }
                    dh[r * i + k] = if h[r * i + k] > 0.0 { acc } else { 0.0 };
                }
            }
            dz = dh;
        }
    }
    grads
}

#[test]
fn gradients_match_f64_backprop_from_the_oracle() {
    let mut rng = StdRng::seed_from_u64(21);
    for (i, (alpha, tau, div)) in GRADIENT_CASES.into_iter().enumerate() {
        for sizes in [&[6usize, 8, 4][..], &[5, 7, 6, 3], &[64, 40, 30, 10]] {
            let mlp = Mlp::new(sizes, 30 + i as u64).unwrap();
            let params: Vec<f32> = mlp
                .params()
                .iter()
                .map(|&p| p + rng.random_range(-0.1..0.1))
                .collect();
            let mlp = Mlp::from_params(sizes, params).unwrap();
            let rows = 13;
            let v = *sizes.last().unwrap();
            let x = random(rows * sizes[0], 1.0, &mut rng);
            let y: Vec<i64> = (0..rows).map(|_| rng.random_range(0..v as i64)).collect();
            let t = random(rows * v, 3.0, &mut rng);
            let c = cfg(alpha, tau, div);
            let mut step = DistillStep::new(&mlp, None, c.clone(), Device::Cpu).unwrap();
            let (_, g) = step.gradients(&x, Some(&y), Some(&t)).unwrap();
            let want = reference_gradients(&mlp, &x, &y, &t, &c.loss);
            let got: Vec<f64> = g.iter().map(|&v| v as f64).collect();
            let err = kdfuse::check::rel_l2(&got, &want);
            assert!(err < 1e-5, "sizes {sizes:?} alpha {alpha} {div}: {err:.2e}");
        }
    }
}

#[test]
fn teacher_model_equals_given_teacher_logits() {
    let mut rng = StdRng::seed_from_u64(4);
    let teacher = Mlp::new(&[6, 16, 4], 1).unwrap();
    let student = Mlp::new(&[6, 5, 4], 2).unwrap();
    let x = random(9 * 6, 1.0, &mut rng);
    let y: Vec<i64> = (0..9).map(|i| i % 4).collect();
    let c = cfg(0.5, 3.0, Divergence::ForwardKl);
    let mut a = DistillStep::new(&student, Some(&teacher), c.clone(), Device::Cpu).unwrap();
    let mut b = DistillStep::new(&student, None, c, Device::Cpu).unwrap();
    let t = teacher.forward(&x).unwrap();
    assert_eq!(a.teacher_predict(&x).unwrap(), t);
    for _ in 0..3 {
        let la = a.step(&x, Some(&y)).unwrap();
        let lb = b.step_with_teacher_logits(&x, Some(&y), &t).unwrap();
        assert_eq!(la, lb);
    }
    assert_eq!(a.student().unwrap(), b.student().unwrap());
    assert_eq!(a.steps(), 3);
}

#[test]
fn optimizers_follow_their_formulas() {
    // A 1 → 2 linear model on one example: the engine's gradients fed to
    // the update formulas in f64 must give the engine's parameters.
    let mlp = Mlp::from_params(&[1, 2], vec![0.5, -0.5, 0.1, 0.2]).unwrap();
    for opt in [
        Optimizer::sgd(0.05, 0.9).with_weight_decay(0.01),
        Optimizer::adam(0.01).with_weight_decay(0.1),
    ] {
        let c = DistillConfig {
            optimizer: opt,
            ..cfg(1.0, 1.0, Divergence::ForwardKl)
        };
        let mut s = DistillStep::new(&mlp, None, c, Device::Cpu).unwrap();
        let mut p: Vec<f64> = mlp.params().iter().map(|&v| v as f64).collect();
        let (mut s1, mut s2) = (vec![0.0f64; 4], vec![0.0f64; 4]);
        for t in 1..=5u64 {
            let (_, g) = s.gradients(&[1.0], Some(&[1]), None).unwrap();
            s.step(&[1.0], Some(&[1])).unwrap();
            for i in 0..4 {
                let decay = i < 2; // weights, not biases
                let g = g[i] as f64;
                match opt {
                    Optimizer::Sgd {
                        lr,
                        momentum,
                        weight_decay,
                    } => {
                        let wd = if decay { weight_decay as f64 } else { 0.0 };
                        s1[i] = momentum as f64 * s1[i] + g + wd * p[i];
                        p[i] -= lr as f64 * s1[i];
                    }
                    Optimizer::Adam {
                        lr,
                        beta1,
                        beta2,
                        eps,
                        weight_decay,
                    } => {
                        let (b1, b2) = (beta1 as f64, beta2 as f64);
                        let wd = if decay { weight_decay as f64 } else { 0.0 };
                        s1[i] = b1 * s1[i] + (1.0 - b1) * g;
                        s2[i] = b2 * s2[i] + (1.0 - b2) * g * g;
                        let mh = s1[i] / (1.0 - b1.powi(t as i32));
                        let vh = s2[i] / (1.0 - b2.powi(t as i32));
                        p[i] -= lr as f64 * (mh / (vh.sqrt() + eps as f64) + wd * p[i]);
                    }
                }
            }
            let got = s.student().unwrap();
            for (a, b) in got.params().iter().zip(&p) {
                assert!((*a as f64 - b).abs() < 1e-5, "{opt:?} step {t}: {a} vs {b}");
            }
        }
    }
}

#[test]
fn dropout_is_seeded_scaled_and_off_at_inference() {
    let mut rng = StdRng::seed_from_u64(9);
    let mlp = Mlp::new(&[8, 64, 3], 5).unwrap();
    let x = random(16 * 8, 1.0, &mut rng);
    let y: Vec<i64> = (0..16).map(|i| i % 3).collect();
    let with = |rate: f32, seed: u64| DistillConfig {
        dropout: rate,
        seed,
        ..cfg(1.0, 1.0, Divergence::ForwardKl)
    };
    let g = |c: DistillConfig| {
        DistillStep::new(&mlp, None, c, Device::Cpu)
            .unwrap()
            .gradients(&x, Some(&y), None)
            .unwrap()
    };
    let (l0, g0) = g(with(0.0, 1));
    let (l1, g1) = g(with(0.5, 1));
    let (l1b, g1b) = g(with(0.5, 1));
    let (l2, _) = g(with(0.5, 2));
    assert_eq!((l1, &g1), (l1b, &g1b), "same seed, same masks");
    assert_ne!(l0, l1);
    assert_ne!(l1, l2, "another seed, other masks");
    // Dropped units give exact zeros in the gradient.
    assert!(g0.iter().filter(|&&v| v == 0.0).count() < g1.iter().filter(|&&v| v == 0.0).count());
    // The fraction of dropped elements is close to the rate.
    let d = kdfuse::distill::Dropout::new(0.3, 7, 11, 0).unwrap();
    let kept = (0..100_000u32).filter(|&i| d.keep(i)).count() as f64 / 1e5;
    assert!((kept - 0.7).abs() < 0.01, "{kept}");
    assert!((d.scale - 1.0 / 0.7).abs() < 1e-6);
    // Inference ignores dropout.
    let mut s = DistillStep::new(&mlp, None, with(0.5, 1), Device::Cpu).unwrap();
    assert_eq!(s.predict(&x).unwrap(), mlp.forward(&x).unwrap());
}

fn arg<T: std::fmt::Debug>(r: Result<T, KdError>) -> &'static str {
    match r {
        Err(KdError::InvalidArgument { arg, .. }) => arg,
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

#[test]
fn bad_arguments_are_errors_naming_the_argument() {
    let mlp = Mlp::new(&[4, 3, 2], 1).unwrap();
    let c = cfg(0.5, 2.0, Divergence::ForwardKl);
    assert_eq!(arg(Mlp::new(&[4], 1).map(|_| ())), "sizes");
    assert_eq!(arg(Mlp::new(&[4, 0, 2], 1).map(|_| ())), "sizes");
    assert_eq!(
        arg(Mlp::from_params(&[4, 2], vec![0.0; 3]).map(|_| ())),
        "params"
    );
    let wide = Mlp::new(&[5, 2], 1).unwrap();
    assert_eq!(
        arg(DistillStep::new(&mlp, Some(&wide), c.clone(), Device::Cpu).map(|_| ())),
        "teacher"
    );
    let bad = |f: fn(&mut DistillConfig)| {
        let mut c = c.clone();
        f(&mut c);
        arg(DistillStep::new(&mlp, None, c, Device::Cpu).map(|_| ()))
    };
    assert_eq!(bad(|c| c.dropout = 1.0), "dropout");
    assert_eq!(bad(|c| c.loss.temperature = 0.0), "temperature");
    assert_eq!(bad(|c| c.optimizer = Optimizer::adam(-1.0)), "lr");
    assert_eq!(bad(|c| c.optimizer = Optimizer::sgd(0.1, 1.0)), "momentum");
    let mut s = DistillStep::new(&mlp, None, c.clone(), Device::Cpu).unwrap();
    let x = vec![0.5f32; 8];
    assert_eq!(
        arg(s.step(&x, Some(&[0, 1]))),
        "teacher",
        "alpha < 1 without a teacher"
    );
    assert_eq!(arg(s.step(&x[..7], Some(&[0, 1]))), "x");
    assert_eq!(arg(s.step(&[], Some(&[]))), "x");
    assert_eq!(
        arg(s.step_with_teacher_logits(&x, Some(&[0]), &[0.0; 4])),
        "labels"
    );
    assert_eq!(
        arg(s.step_with_teacher_logits(&x, Some(&[0, 1]), &[0.0; 3])),
        "teacher_logits"
    );
    assert_eq!(
        arg(s.step_with_teacher_logits(&x, Some(&[0, 2]), &[0.0; 4])),
        "labels"
    );
    assert_eq!(
        arg(s.step_with_teacher_logits(&x, None, &[0.0; 4])),
        "alpha"
    );
    assert_eq!(arg(s.teacher_predict(&x)), "teacher");
    assert_eq!(s.steps(), 0, "failed steps change nothing");
    assert_eq!(s.student().unwrap(), mlp);
    // CUDA, asked for on a machine without it, is an error, not a panic.
    if let Err(e) = Device::Cuda.resolve() {
        assert!(matches!(e, KdError::CudaUnavailable(_)), "{e}");
        assert!(DistillStep::new(&mlp, None, c, Device::Cuda).is_err());
    }
}
