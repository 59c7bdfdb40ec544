//! precision = fast: the fast kernels (kernels/kd_fast.cu) under the
//! emulation (and, where the same body runs per backend, the CPU backend's
//! fast rows and the CUDA backend), against the f64 oracle with their mixed bound
//! (check::fast_resolution, docs/DESIGN.md §3), and the rule that picks them.
//!
//! The random sweeps of kernel_emulation.rs run them too (fast is the
//! default); here: both precisions over the same cases, rows that move the
//! statistics' references often (rising logits), masks at chunk boundaries,
//! the label's entry anywhere in the row, negative upstream scales, in-place
//! gradients and unaligned rows.

use crate::common::for_each_backend;
use kdfuse::check::{
    compare_with_grad_floor, fast_resolution, random_config, run_case, sweep_precision,
};
use kdfuse::emu::EmuBackend;
use kdfuse::{
    Backend, Divergence, Dtype, GradDtype, HostData, KdInputs, Logits, LossSpec, Oracle, Precision,
    Reduction,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const FAST_DIVS: [Divergence; 5] = Divergence::ALL;

/// (loss error, gradient error) of `b`'s fast kernel against the oracle,
/// judged as `kdfuse check` judges a fast case (f32 gradient).
fn fast_errors(b: &dyn Backend, inputs: &KdInputs, spec: &LossSpec) -> (f64, f64) {
    assert_eq!(b.precision(spec), Precision::Fast, "{spec:?}");
    let got = b.compute(inputs, spec, Some(GradDtype::F32)).unwrap();
    let want = Oracle.compute(inputs, spec, Some(GradDtype::F32)).unwrap();
    let (loss_res, grad_res) = fast_resolution(inputs, spec);
    let scales: Vec<f64> = Oracle
        .row_scales(inputs, spec)
        .iter()
        .zip(&loss_res)
        .map(|(&s, &d)| s.max(1e2 * d / 1e-5))
        .collect();
    let weight = spec
        .reduction
        .row_weight(want.valid_rows, inputs.student.cols);
    compare_with_grad_floor(&got, &want, &scales, weight, Dtype::F32, grad_res / 1e-5)
}

/// `b`'s fast kernel is within 1e-5 of the oracle (loss and gradient).
fn assert_fast_passes(b: &dyn Backend, inputs: &KdInputs, spec: &LossSpec, what: &str) {
    let (le, ge) = fast_errors(b, inputs, spec);
    assert!(
        le <= 1e-5 && ge <= 1e-5,
        "{what}: loss {le:.2e} grad {ge:.2e}"
    );
}

#[test]
fn the_rule_that_picks_the_fast_kernels() {
    let fast = |spec: LossSpec| spec.kernel_precision() == Precision::Fast;
    for divergence in FAST_DIVS {
        assert!(fast(LossSpec {
            divergence,
            ..Default::default()
        }));
        assert!(!fast(LossSpec {
            divergence,
            precision: Precision::Exact,
            ..Default::default()
        }));
        assert!(!fast(LossSpec {
            divergence,
            softcap: Some(30.0),
            ..Default::default()
        }));
        assert!(!fast(LossSpec {
            divergence,
            grad_teacher: true,
            ..Default::default()
        }));
    }
    for beta in [0.0, 0.3, 1.0] {
        assert!(fast(LossSpec {
            divergence: Divergence::Jsd,
            beta,
            ..Default::default()
        }));
    }
    // The CPU backend follows the rule; the oracle is exact whatever is asked.
    assert_eq!(
        kdfuse::CpuBackend.precision(&LossSpec::default()),
        Precision::Fast
    );
    assert_eq!(Oracle.precision(&LossSpec::default()), Precision::Exact);
}

#[test]
fn both_precisions_pass_the_same_random_cases() {
    let emu = EmuBackend::default();
    for precision in Precision::ALL {
        let report = sweep_precision(&emu, 60, 4242, 5000, precision, |r| {
            if !r.passed {
                eprintln!(
                    "{precision}: loss {:.2e} grad {:.2e} {}",
                    r.loss_err,
                    r.grad_err,
                    r.config.describe()
                );
            }
        })
        .unwrap();
        assert!(report.passed(), "{precision}");
    }
}

fn fast_and_exact_kernels_both_ran(b: &dyn Backend) {
    // Same inputs, both precisions: close, and not bit-identical (so the
    // variant switch reached the emulated kernels).
    let mut rng = StdRng::seed_from_u64(3);
    let v = 3001;
    let s: Vec<f32> = (0..2 * v)
        .map(|_| rng.random::<f32>() * 8.0 - 4.0)
        .collect();
    let t: Vec<f32> = (0..2 * v)
        .map(|_| rng.random::<f32>() * 8.0 - 4.0)
        .collect();
    let inputs = KdInputs {
        student: Logits::new(HostData::F32(&s), 2, v),
        teacher: Logits::new(HostData::F32(&t), 2, v),
        labels: None,
        row_weights: None,
    };
    for divergence in FAST_DIVS {
        let run = |precision| {
            let spec = LossSpec {
                divergence,
                temperature: 2.0,
                precision,
                ..Default::default()
            };
            b.compute(&inputs, &spec, Some(GradDtype::F32)).unwrap()
        };
        let (f, e) = (run(Precision::Fast), run(Precision::Exact));
        assert!(
            (f.loss - e.loss).abs() <= 1e-5 * e.loss.abs(),
            "{divergence}"
        );
        assert_ne!(f.grad, e.grad, "{divergence}: the fast kernel did not run");
    }
}
for_each_backend!([cpu, emu, cuda] fast_and_exact_kernels_both_ran(b));

/// Logits rising along the row (every chunk moves the references), plus noise;
/// optionally falling instead.
fn ramp(rng: &mut StdRng, v: usize, slope: f32, noise: f32) -> Vec<f32> {
    (0..v)
        .map(|j| slope * j as f32 / v as f32 + noise * (rng.random::<f32>() - 0.5))
        .collect()
}

fn references_that_move_all_along_the_row(b: &dyn Backend) {
    let mut rng = StdRng::seed_from_u64(11);
    for divergence in FAST_DIVS {
        for (v, slope) in [
            (40_000usize, 200.0f32),
            (5_003, -150.0),
            (2_048, 60.0),
            (77, 300.0),
        ] {
            for tau in [0.5, 1.0, 3.0] {
                let s = ramp(&mut rng, v, slope, 6.0);
                let t = ramp(&mut rng, v, slope * 0.9, 6.0);
                let labels = [rng.random_range(0..v as i64)];
                let inputs = KdInputs {
                    student: Logits::new(HostData::F32(&s), 1, v),
                    teacher: Logits::new(HostData::F32(&t), 1, v),
                    labels: Some(&labels),
                    row_weights: None,
                };
                for alpha in [0.0, 0.3] {
                    let spec = LossSpec {
                        divergence,
                        temperature: tau,
                        alpha,
                        ..Default::default()
                    };
                    let what = format!("{divergence} V={v} slope={slope} τ={tau} α={alpha}");
                    assert_fast_passes(b, &inputs, &spec, &what);
                }
            }
        }
    }
}
for_each_backend!([cpu, emu, cuda] references_that_move_all_along_the_row(b));

fn masks_labels_scales_strides_and_in_place(b: &dyn Backend) {
    let mut rng = StdRng::seed_from_u64(12);
    for divergence in FAST_DIVS {
        for v in [1usize, 7, 8, 9, 255, 2_057, 9_000] {
            let rows = 3;
            // Rows padded to odd strides: the rows' alignments differ, so
            // heads, tails and the unaligned fallback all run.
            let (ss, ts) = (v + 3, v + 1);
            let mut s: Vec<f32> = (0..rows * ss)
                .map(|_| rng.random::<f32>() * 10.0 - 5.0)
                .collect();
            let mut t: Vec<f32> = (0..rows * ts)
                .map(|_| rng.random::<f32>() * 10.0 - 5.0)
                .collect();
            // Masks: a whole chunk, the first entry, entries at chunk edges,
            // on both sides at once (finite divergences), and on the side
            // whose mask keeps the divergence finite.
            for r in 0..rows {
                for j in [0usize, 7, 8, 15, 16, 17, 18, 19, 20, 21, 22, 23] {
                    if j < v && v > 1 && j != v / 2 {
                        s[r * ss + j] = f32::NEG_INFINITY;
                        t[r * ts + j] = f32::NEG_INFINITY;
                    }
                }
                for j in (1..v).step_by(13) {
                    if j == v / 2 {
                        continue;
                    }
                    if divergence == Divergence::ReverseKl {
                        s[r * ss + j] = f32::NEG_INFINITY;
                    } else {
                        t[r * ts + j] = f32::NEG_INFINITY;
                    }
                }
            }
            let labels: Vec<i64> = vec![0, (v / 2) as i64, (v - 1) as i64];
            let inputs = KdInputs {
                student: Logits::strided(HostData::F32(&s), rows, v, ss),
                teacher: Logits::strided(HostData::F32(&t), rows, v, ts),
                labels: Some(&labels),
                row_weights: None,
            };
            for (alpha, grad_scale, reduction) in [
                (0.0, 1.0, Reduction::BatchMean),
                (0.5, -2.5, Reduction::Sum),
                (1.0, 1.0, Reduction::Mean),
            ] {
                let spec = LossSpec {
                    divergence,
                    alpha,
                    grad_scale,
                    reduction,
                    temperature: 1.5,
                    ..Default::default()
                };
                let what = format!("{divergence} V={v} α={alpha} scale={grad_scale}");
                assert_fast_passes(b, &inputs, &spec, &what);
            }
        }
    }
}
for_each_backend!([cpu, emu, cuda] masks_labels_scales_strides_and_in_place(b));

#[test]
fn in_place_and_16_bit_gradients() {
    for divergence in FAST_DIVS {
        for dtype in Dtype::ALL {
            for v in [9usize, 4_099] {
                let mut rng = StdRng::seed_from_u64(v as u64);
                let c = kdfuse::check::CaseConfig {
                    rows: 3,
                    cols: v,
                    dtype,
                    grad_dtype: GradDtype::Input,
                    labels: true,
                    spec: LossSpec {
                        divergence,
                        alpha: 0.25,
                        temperature: 2.0,
                        ..Default::default()
                    },
                    topk: None,
                    ..random_config(&mut rng, v)
                };
                let c = kdfuse::check::CaseConfig {
                    row_weights: false,
                    ..c
                };
                for in_place in [false, true] {
                    let emu = EmuBackend {
                        in_place,
                        grid: 2,
                        ..Default::default()
                    };
                    let r = run_case(&emu, &c).unwrap();
                    assert!(
                        r.passed,
                        "in_place={in_place}: loss {:.2e} grad {:.2e} {}",
                        r.loss_err,
                        r.grad_err,
                        c.describe()
                    );
                }
            }
        }
    }
}

fn infinite_and_poisoned_rows(b: &dyn Backend) {
    // Forward KL with a masked student entry facing a finite teacher entry
    // is +inf (also where that teacher probability underflows fp32); a NaN
    // anywhere makes the row NaN; the other rows keep their values.
    let v = 100;
    for divergence in [Divergence::ForwardKl, Divergence::ReverseKl] {
        let mut s = vec![0.5f32; 3 * v];
        let mut t = vec![0.25f32; 3 * v];
        for j in 0..v {
            s[j] = (j % 7) as f32;
            t[j] = (j % 5) as f32 - 200.0 * (j == 3) as u8 as f32;
        }
        // Row 0: the side whose mask makes the divergence infinite.
        if divergence == Divergence::ForwardKl {
            s[3] = f32::NEG_INFINITY;
        } else {
            t[3] = f32::NEG_INFINITY;
        }
        s[v + 10] = f32::NAN;
        let inputs = crate::common::inputs(&s, &t, 3, v, None);
        let spec = LossSpec {
            divergence,
            reduction: Reduction::None,
            ..Default::default()
        };
        let got = b.compute(&inputs, &spec, Some(GradDtype::F32)).unwrap();
        let want = Oracle
            .compute(&inputs, &spec, Some(GradDtype::F32))
            .unwrap();
        assert_eq!(want.row_losses[0], f64::INFINITY, "{divergence}");
        assert_eq!(got.row_losses[0], f64::INFINITY, "{divergence}");
        assert!(got.row_losses[1].is_nan(), "{divergence}");
        let g = got.grad.unwrap();
        assert!(g[v..2 * v].iter().all(|x| x.is_nan()), "{divergence}");
        assert!(
            (got.row_losses[2] - want.row_losses[2]).abs() <= 1e-6,
            "{divergence}"
        );
    }
}
for_each_backend!([cpu, emu, cuda] infinite_and_poisoned_rows(b));
