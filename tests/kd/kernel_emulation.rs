//! The CUDA kernels' own code (kernels/kd_fused.cu: vector sweeps with heads
//! and tails, warp shuffles, block merges, grid-stride rows, the count and
//! reduce kernels) run on the CPU under kernels/emu/cuda_emu.h, against the
//! f64 oracle. On a machine without a GPU this is what checks the parallel
//! decomposition; tests/gpu.rs checks the same on hardware.

use crate::common::{self, assert_passed, assert_sweep_passed};

use kdfuse::check::{random_config, run_case, sweep, CaseConfig};
use kdfuse::emu::EmuBackend;
use kdfuse::{Backend, Divergence, Dtype, GradDtype};
use rand::rngs::StdRng;
use rand::SeedableRng;

#[test]
fn random_cases_against_oracle() {
    let report = sweep(&EmuBackend::default(), 120, 77, 6000, |_| {}).unwrap();
    assert_sweep_passed!(report);
    common::assert_all_groups(&report);
}

#[test]
fn random_cases_against_oracle_single_read() {
    // The single-read kernels as an sm_90 plans them (one CTA at these V).
    let emu = EmuBackend {
        kernel: kdfuse::single_read::KernelChoice::Auto,
        ..Default::default()
    };
    let report = sweep(&emu, 60, 78, 6000, |_| {}).unwrap();
    assert_sweep_passed!(report);
}

#[test]
fn large_vocabulary_rows_and_grid_stride() {
    let mut rng = StdRng::seed_from_u64(5);
    for (i, divergence) in Divergence::ALL.into_iter().enumerate() {
        for dtype in Dtype::ALL {
            let base = random_config(&mut rng, 10);
            let c = CaseConfig {
                rows: 5,
                cols: 40_000 + 7 * i,
                student_pad: i,
                teacher_pad: 4 - i,
                dtype,
                grad_dtype: GradDtype::Input,
                labels: true,
                ignore_frac: 0.2,
                topk: None,
                spec: kdfuse::LossSpec {
                    divergence,
                    // β is JSD's alone (validation refuses it otherwise).
                    beta: if divergence == Divergence::Jsd {
                        base.spec.beta
                    } else {
                        0.5
                    },
                    alpha: 0.2,
                    temperature: 2.0,
                    ..base.spec
                },
                ..base
            };
            // Two blocks for five rows: the grid-stride loop runs.
            let emu = EmuBackend {
                grid: 2,
                ..Default::default()
            };
            assert_passed!(run_case(&emu, &c).unwrap(), c);
        }
    }
}

#[test]
fn in_place_gradient_equals_separate_gradient() {
    let mut rng = StdRng::seed_from_u64(11);
    for _ in 0..12 {
        let c = CaseConfig {
            grad_dtype: GradDtype::Input,
            ..random_config(&mut rng, 3000)
        };
        let data = kdfuse::check::generate(&c);
        let a = EmuBackend {
            in_place: true,
            ..Default::default()
        }
        .compute(&data.inputs(), &c.spec, Some(GradDtype::Input))
        .unwrap();
        let b = EmuBackend::default()
            .compute(&data.inputs(), &c.spec, Some(GradDtype::Input))
            .unwrap();
        assert_eq!(a.grad, b.grad, "{}", c.describe());
        assert_eq!(a.row_losses, b.row_losses);
    }
}

#[test]
fn in_place_topk_gradient_equals_separate_gradient() {
    let mut rng = StdRng::seed_from_u64(12);
    let mut seen = 0;
    while seen < 8 {
        let c = CaseConfig {
            grad_dtype: GradDtype::Input,
            ..random_config(&mut rng, 3000)
        };
        let data = kdfuse::check::generate(&c);
        let Some(inputs) = data.topk_inputs() else {
            continue;
        };
        seen += 1;
        let run = |in_place| {
            EmuBackend {
                in_place,
                ..Default::default()
            }
            .compute_topk(&inputs, &c.spec, Some(GradDtype::Input))
            .unwrap()
        };
        let (a, b) = (run(true), run(false));
        assert_eq!(a.grad, b.grad, "{}", c.describe());
        assert_eq!(a.row_losses, b.row_losses);
    }
}

/// The eager baseline of `kdfuse bench` (kernels/eager.cu) computes the same
/// loss and gradient as the oracle: its speed-ups are against real work. Its
/// naive fp32 formulas are held to 2e-3 (5e-3 for 16-bit gradients), not to
/// the fused kernel's tolerances.
#[test]
fn eager_baseline_against_oracle() {
    use kdfuse::emu::EagerEmuBackend;
    let mut rng = StdRng::seed_from_u64(23);
    let mut worst = (0.0f64, 0.0f64);
    for i in 0..60 {
        let mut c = random_config(&mut rng, 2500);
        // The baseline implements the plain loss only.
        c.spec.softcap = None;
        c.spec.grad_teacher = false;
        c.row_weights = false;
        c.topk = None;
        if i % 3 == 0 {
            c.labels = true;
            c.spec.alpha = 0.3;
        }
        let r = run_case(&EagerEmuBackend, &c).unwrap();
        let grad_tol = if r.tolerance.grad > 1e-4 { 5e-3 } else { 2e-3 };
        assert!(
            r.loss_err <= 2e-3 && r.grad_err <= grad_tol,
            "eager: loss {:.2e} grad {:.2e}: {}",
            r.loss_err,
            r.grad_err,
            c.describe()
        );
        worst = (worst.0.max(r.loss_err), worst.1.max(r.grad_err));
    }
    eprintln!(
        "eager baseline vs oracle: worst loss {:.2e}, grad {:.2e}",
        worst.0, worst.1
    );
}
