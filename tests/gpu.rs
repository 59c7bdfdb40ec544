//! GPU tests of the CUDA backend: the oracle sweeps of the CPU tests (every
//! dtype, V up to 262144, strided and misaligned rows, −inf, ignored rows),
//! with every output poisoned before the launch (the host-array path fills
//! them with NaN bits), plus the device-buffer API: caller streams, in-place
//! gradients, bad labels.
//!
//! Own runner (harness = false): without a usable GPU every test prints
//! "skipped" with the reason; with KDFUSE_REQUIRE_GPU=1 that is a failure.

use half::bf16;
use kdfuse::check::{run_case, sweep, CaseConfig, NegInf};
use kdfuse::cuda::{CudaBackend, LossBuffers, RowLayout};
use kdfuse::{Backend, CpuBackend, Divergence, Dtype, GradDtype, KdError, LossSpec, Reduction};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::ExitCode;

type Test = fn(&CudaBackend);

fn main() -> ExitCode {
    let tests: &[(&str, Test)] = &[
        ("random_sweep_against_oracle", random_sweep_against_oracle),
        ("llm_vocabularies_every_dtype", llm_vocabularies_every_dtype),
        ("agrees_with_cpu_backend", agrees_with_cpu_backend),
        ("device_api_on_caller_stream", device_api_on_caller_stream),
        ("in_place_gradient", in_place_gradient),
        ("bad_labels_give_nan_rows", bad_labels_give_nan_rows),
        ("many_rows_and_empty_batches", many_rows_and_empty_batches),
        (
            "kernels_loaded_once_per_context",
            kernels_loaded_once_per_context,
        ),
        (
            "eager_baseline_agrees_with_fused",
            eager_baseline_agrees_with_fused,
        ),
        ("bench_runs_and_checks_itself", bench_runs_and_checks_itself),
    ];
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let selected: Vec<_> = tests
        .iter()
        .filter(|(n, _)| filter.is_empty() || filter.iter().any(|f| n.contains(f.as_str())))
        .collect();
    println!("\nrunning {} GPU tests", selected.len());
    let require = std::env::var("KDFUSE_REQUIRE_GPU").is_ok_and(|v| v == "1");
    let backend = match CudaBackend::new(0) {
        Ok(b) => b,
        Err(e) => {
            let why = match &e {
                KdError::CudaUnavailable(m) => m.clone(),
                other => other.to_string(),
            };
            for (name, _) in &selected {
                println!("test {name} ... skipped ({why})");
            }
            if require {
                println!("KDFUSE_REQUIRE_GPU=1 but no usable GPU: {why}");
                println!("0 passed, {} failed", selected.len());
                return ExitCode::FAILURE;
            }
            println!(
                "GPU tests: 0 passed, 0 failed, {} skipped (no GPU)",
                selected.len()
            );
            return ExitCode::SUCCESS;
        }
    };
    let (mut passed, mut failed) = (0, 0);
    for (name, test) in &selected {
        let t0 = std::time::Instant::now();
        match catch_unwind(AssertUnwindSafe(|| test(&backend))) {
            Ok(()) => {
                passed += 1;
                println!("test {name} ... ok ({:.1} s)", t0.elapsed().as_secs_f64());
            }
            Err(_) => {
                failed += 1;
                println!("test {name} ... FAILED");
            }
        }
    }
    println!("GPU tests: {passed} passed, {failed} failed");
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn random_sweep_against_oracle(b: &CudaBackend) {
    for seed in [1u64, 2, 3] {
        let report = sweep(b, 400, seed, 262_144, |_| {}).unwrap();
        for f in &report.failures {
            println!(
                "  FAIL loss {:.2e} grad {:.2e} {}",
                f.loss_err,
                f.grad_err,
                f.config.describe()
            );
        }
        assert!(
            report.passed(),
            "seed {seed}: {} failures",
            report.failures.len()
        );
        assert_eq!(report.groups.len(), 9);
    }
}

fn fixed_case(
    cols: usize,
    rows: usize,
    dtype: Dtype,
    grad: GradDtype,
    divergence: Divergence,
    seed: u64,
) -> CaseConfig {
    CaseConfig {
        rows,
        cols,
        student_pad: (seed % 3) as usize,
        teacher_pad: 0,
        dtype,
        grad_dtype: grad,
        spec: LossSpec {
            divergence,
            temperature: 2.0,
            alpha: 0.3,
            beta: 0.4,
            ..Default::default()
        },
        labels: true,
        ignore_frac: 0.2,
        neg_inf: if divergence == Divergence::ReverseKl {
            NegInf::StudentOnly
        } else {
            NegInf::TeacherOnly
        },
        scale: 3.0,
        correlation: 0.8,
        seed,
    }
}

fn llm_vocabularies_every_dtype(b: &CudaBackend) {
    let mut seed = 100;
    for cols in [32_000, 128_256, 151_936, 262_144] {
        for dtype in Dtype::ALL {
            for grad in [GradDtype::F32, GradDtype::Input] {
                for divergence in Divergence::ALL {
                    seed += 1;
                    let c = fixed_case(cols, 3, dtype, grad, divergence, seed);
                    let r = run_case(b, &c).unwrap();
                    assert!(
                        r.passed,
                        "loss {:.2e} grad {:.2e}: {}",
                        r.loss_err,
                        r.grad_err,
                        c.describe()
                    );
                }
            }
        }
    }
}

fn agrees_with_cpu_backend(b: &CudaBackend) {
    for (i, divergence) in Divergence::ALL.into_iter().enumerate() {
        let c = fixed_case(
            50_000,
            4,
            Dtype::Bf16,
            GradDtype::F32,
            divergence,
            7 + i as u64,
        );
        let data = kdfuse::check::generate(&c);
        let inputs = data.inputs();
        let g = b.compute(&inputs, &c.spec, Some(GradDtype::F32)).unwrap();
        let h = CpuBackend
            .compute(&inputs, &c.spec, Some(GradDtype::F32))
            .unwrap();
        let err = kdfuse::check::rel_l2(
            &g.grad
                .unwrap()
                .iter()
                .map(|&x| x as f64)
                .collect::<Vec<_>>(),
            &h.grad
                .unwrap()
                .iter()
                .map(|&x| x as f64)
                .collect::<Vec<_>>(),
        );
        assert!(err < 1e-5, "{divergence}: CUDA vs CPU gradient {err:.2e}");
        assert!(
            (g.loss - h.loss).abs() <= 1e-5 * h.loss.abs(),
            "{divergence}: {} vs {}",
            g.loss,
            h.loss
        );
    }
}

fn device_api_on_caller_stream(b: &CudaBackend) {
    let (n, v) = (8, 4099);
    let c = fixed_case(v, n, Dtype::Bf16, GradDtype::F32, Divergence::Jsd, 21);
    let c = CaseConfig {
        student_pad: 0,
        ..c
    };
    let data = kdfuse::check::generate(&c);
    let (kdfuse::OwnedData::Bf16(s), kdfuse::OwnedData::Bf16(t)) = (&data.student, &data.teacher)
    else {
        panic!()
    };
    let stream = b.context().new_stream().unwrap();
    let ds = stream.clone_htod(s).unwrap();
    let dt = stream.clone_htod(t).unwrap();
    let dl = stream.clone_htod(data.labels.as_ref().unwrap()).unwrap();
    let mut dg = stream.alloc_zeros::<f32>(n * v).unwrap();
    let mut out = LossBuffers::new(&stream, n).unwrap();
    let layout = RowLayout::dense(n, v);
    // Two specs back to back on the same stream, no host sync in between.
    let other = LossSpec {
        divergence: Divergence::ForwardKl,
        ..c.spec.clone()
    };
    b.fused(
        &stream,
        &ds.as_view(),
        &dt.as_view(),
        Some(&dl.as_view()),
        Some(&mut dg.as_view_mut()),
        layout,
        &mut out,
        &other,
    )
    .unwrap();
    let first = stream.clone_dtoh(&out.loss).unwrap()[0];
    b.fused(
        &stream,
        &ds.as_view(),
        &dt.as_view(),
        Some(&dl.as_view()),
        Some(&mut dg.as_view_mut()),
        layout,
        &mut out,
        &c.spec,
    )
    .unwrap();
    let loss = stream.clone_dtoh(&out.loss).unwrap()[0] as f64;
    let grad = stream.clone_dtoh(&dg).unwrap();
    let reference = CpuBackend
        .compute(&data.inputs(), &c.spec, Some(GradDtype::F32))
        .unwrap();
    let fkl = CpuBackend.compute(&data.inputs(), &other, None).unwrap();
    assert!((first as f64 - fkl.loss).abs() <= 1e-5 * fkl.loss.abs());
    assert!(
        (loss - reference.loss).abs() <= 1e-5 * reference.loss.abs(),
        "{loss} vs {}",
        reference.loss
    );
    let rg = reference.grad.unwrap();
    let err = kdfuse::check::rel_l2(
        &grad.iter().map(|&x| x as f64).collect::<Vec<_>>(),
        &rg.iter().map(|&x| x as f64).collect::<Vec<_>>(),
    );
    assert!(err < 1e-5, "{err}");
    // Too-short buffers are an error, not a launch.
    let short = stream.alloc_zeros::<bf16>(10).unwrap();
    assert!(b
        .fused::<bf16, f32>(
            &stream,
            &short.as_view(),
            &dt.as_view(),
            None,
            None,
            layout,
            &mut out,
            &c.spec
        )
        .is_err());
}

fn in_place_gradient(b: &CudaBackend) {
    let (n, v) = (5, 10_007);
    let c = fixed_case(
        v,
        n,
        Dtype::Bf16,
        GradDtype::Input,
        Divergence::ReverseKl,
        31,
    );
    let c = CaseConfig {
        student_pad: 0,
        ..c
    };
    let data = kdfuse::check::generate(&c);
    let (kdfuse::OwnedData::Bf16(s), kdfuse::OwnedData::Bf16(t)) = (&data.student, &data.teacher)
    else {
        panic!()
    };
    let stream = b.stream();
    let mut ds = stream.clone_htod(s).unwrap();
    let dt = stream.clone_htod(t).unwrap();
    let dl = stream.clone_htod(data.labels.as_ref().unwrap()).unwrap();
    let mut out = LossBuffers::new(stream, n).unwrap();
    b.fused_in_place(
        stream,
        &mut ds.as_view_mut(),
        &dt.as_view(),
        Some(&dl.as_view()),
        RowLayout::dense(n, v),
        &mut out,
        &c.spec,
    )
    .unwrap();
    let in_place: Vec<f32> = stream
        .clone_dtoh(&ds)
        .unwrap()
        .iter()
        .map(|x| x.to_f32())
        .collect();
    let separate = b
        .compute(&data.inputs(), &c.spec, Some(GradDtype::Input))
        .unwrap()
        .grad
        .unwrap();
    assert_eq!(
        in_place, separate,
        "in-place gradient differs from the separate one"
    );
}

fn bad_labels_give_nan_rows(b: &CudaBackend) {
    let (n, v) = (3, 257);
    let s: Vec<f32> = (0..n * v).map(|i| (i % 13) as f32 * 0.3).collect();
    let stream = b.stream();
    let ds = stream.clone_htod(&s).unwrap();
    let dl = stream.clone_htod(&[0i64, 257, -5]).unwrap();
    let mut dg = stream.alloc_zeros::<f32>(n * v).unwrap();
    let mut out = LossBuffers::new(stream, n).unwrap();
    let spec = LossSpec {
        alpha: 0.5,
        reduction: Reduction::None,
        ..Default::default()
    };
    b.fused(
        stream,
        &ds.as_view(),
        &ds.as_view(),
        Some(&dl.as_view()),
        Some(&mut dg.as_view_mut()),
        RowLayout::dense(n, v),
        &mut out,
        &spec,
    )
    .unwrap();
    let rows = stream.clone_dtoh(&out.row_losses).unwrap();
    assert!(
        rows[0].is_finite() && rows[1].is_nan() && rows[2].is_nan(),
        "{rows:?}"
    );
}

fn many_rows_and_empty_batches(b: &CudaBackend) {
    let c = CaseConfig {
        rows: 70_000,
        cols: 5,
        student_pad: 0,
        teacher_pad: 0,
        ..fixed_case(5, 1, Dtype::F32, GradDtype::F32, Divergence::ForwardKl, 41)
    };
    let r = run_case(b, &c).unwrap();
    assert!(r.passed, "{:.2e} {:.2e}", r.loss_err, r.grad_err);
    for ignore_frac in [1.0, 0.0] {
        let c = CaseConfig {
            rows: if ignore_frac == 0.0 { 0 } else { 6 },
            ignore_frac,
            ..fixed_case(300, 1, Dtype::F16, GradDtype::Input, Divergence::Jsd, 43)
        };
        let r = run_case(b, &c).unwrap();
        assert!(r.passed, "{}", c.describe());
    }
}

fn kernels_loaded_once_per_context(b: &CudaBackend) {
    let again = CudaBackend::new(0).unwrap();
    assert!(std::sync::Arc::ptr_eq(b.module(), again.module()));
    assert!(std::sync::Arc::ptr_eq(b.context(), again.context()));
}

/// kernels/eager.cu (the benchmark's baseline) computes the fused kernel's
/// loss and gradient on the benchmark's own device-made inputs.
fn eager_baseline_agrees_with_fused(b: &CudaBackend) {
    use kdfuse::bench::cuda::{DeviceCase, Variant};
    use kdfuse::bench::BenchConfig;
    for (i, (rows, cols)) in [(7usize, 1001usize), (33, 32_000), (5, 131_071)]
        .into_iter()
        .enumerate()
    {
        for divergence in Divergence::ALL {
            for dtype in Dtype::ALL {
                let c = BenchConfig {
                    alpha: if i == 1 { 0.3 } else { 0.0 },
                    temperature: 1.5,
                    ..BenchConfig::new(rows, cols, dtype, divergence)
                };
                let mut case = DeviceCase::new(b, &c, 1, true, 9 + i as u64).unwrap();
                case.enqueue(Variant::Fused, 0).unwrap();
                let (lf, gf) = (case.loss().unwrap(), case.grad_f32().unwrap().unwrap());
                case.enqueue(Variant::Eager, 0).unwrap();
                let (le, ge) = (case.loss().unwrap(), case.grad_f32().unwrap().unwrap());
                assert!(lf.is_finite() && lf != 0.0, "{c}: fused loss {lf}");
                let dl = (le - lf).abs() / lf.abs();
                let num: f64 = gf
                    .iter()
                    .zip(&ge)
                    .map(|(a, b)| ((a - b) as f64).powi(2))
                    .sum();
                let den: f64 = gf.iter().map(|a| (*a as f64).powi(2)).sum();
                let dg = (num / den).sqrt();
                let gtol = if dtype == Dtype::F32 { 2e-3 } else { 1e-2 };
                assert!(
                    dl <= 2e-3 && dg <= gtol,
                    "{c}: loss diff {dl:.2e}, grad diff {dg:.2e}"
                );
            }
        }
    }
}

/// `kdfuse bench`'s runner on small configurations: every measurement and
/// check present, the copy bandwidth measured, the checks passed.
fn bench_runs_and_checks_itself(_b: &CudaBackend) {
    use kdfuse::bench::{BenchConfig, BenchOptions};
    let configs = [
        BenchConfig::new(256, 32_000, Dtype::Bf16, Divergence::ForwardKl),
        BenchConfig {
            alpha: 0.5,
            ..BenchConfig::new(64, 50_257, Dtype::F32, Divergence::Jsd)
        },
    ];
    let opts = BenchOptions {
        cpu_rows: 2,
        progress: false,
        ..Default::default()
    };
    let r = kdfuse::bench::cuda::run(&configs, &opts).unwrap();
    assert!(
        r.reference_bandwidth_gbs > 100.0,
        "{}",
        r.reference_bandwidth_gbs
    );
    assert!(r.checks_passed(), "{}", r.table());
    for res in &r.results {
        let f = res.fused.as_ref().unwrap();
        assert!(f.timing.runs >= 20 && f.gbs > 0.0);
        assert!(res.eager.is_some() && res.cpu.is_some());
        assert!(res.input_sets >= 2, "small inputs are rotated");
    }
    println!("{}", r.table());
}
