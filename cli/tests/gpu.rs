//! GPU tests of the apps: the benchmark's runner and its eager baseline
//! (kernels/app/eager.cu) against the fused kernel, and the demo's experiment on
//! CUDA. The library's runner (harness = false): without a usable GPU every
//! test prints "skipped" with the reason; with KDFUSE_REQUIRE_GPU=1 that is a
//! failure.

#[path = "../../tests/common/gpu_runner.rs"]
mod gpu_runner;

use gpu_runner::Test;
use kdfuse::cuda::CudaBackend;
use kdfuse::{Divergence, Dtype};
use std::process::ExitCode;

fn main() -> ExitCode {
    let tests: &[(&str, Test)] = &[
        (
            "eager_baseline_agrees_with_fused",
            eager_baseline_agrees_with_fused,
        ),
        ("bench_runs_and_checks_itself", bench_runs_and_checks_itself),
        ("single_read_agrees_with_v1", single_read_agrees_with_v1),
        ("demo_on_cuda", demo_on_cuda),
    ];
    gpu_runner::run(tests)
}

/// kernels/app/eager.cu (the benchmark's baseline) computes the fused kernel's
/// loss and gradient on the benchmark's own device-made inputs.
fn eager_baseline_agrees_with_fused(b: &CudaBackend) {
    use kdfuse_cli::bench::cuda::{DeviceCase, Variant};
    use kdfuse_cli::bench::BenchConfig;
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
    use kdfuse_cli::bench::{BenchConfig, BenchOptions};
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
    let r = kdfuse_cli::bench::cuda::run(&configs, &opts).unwrap();
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
        assert!(res.kernel.is_some(), "a CUDA result names its kernel");
    }
    println!("{}", r.table());
}

/// The single-read kernels (forced) compute v1's loss and gradient on the
/// benchmark's own inputs, V large enough for clusters of several CTAs;
/// each case's plan names the kernel that ran. Below sm_90: v1 only.
fn single_read_agrees_with_v1(b: &CudaBackend) {
    use kdfuse::single_read::{KernelChoice, KernelPlan};
    use kdfuse_cli::bench::cuda::{DeviceCase, Variant};
    use kdfuse_cli::bench::BenchConfig;
    if b.device_caps().compute_capability.0 < 9 {
        println!("  single-read: needs sm_90 ({:?})", b.device_caps());
        return;
    }
    let v1 = CudaBackend::new(0).unwrap().with_kernel(KernelChoice::V1);
    let single = CudaBackend::new(0)
        .unwrap()
        .with_kernel(KernelChoice::SingleRead);
    for (rows, cols) in [(6usize, 70_000usize), (33, 32_000), (3, 262_144)] {
        for divergence in [Divergence::ForwardKl, Divergence::Jsd, Divergence::Tvd] {
            for dtype in [Dtype::Bf16, Dtype::F32] {
                let c = BenchConfig::new(rows, cols, dtype, divergence);
                let run = |backend: &CudaBackend| {
                    let mut case = DeviceCase::new(backend, &c, 1, false, 5).unwrap();
                    case.enqueue(Variant::Fused, 0).unwrap();
                    let plan = case.plan().clone();
                    (
                        plan,
                        case.loss().unwrap(),
                        case.grad_f32().unwrap().unwrap(),
                    )
                };
                let (p1, l1, g1) = run(&v1);
                let (ps, ls, gs) = run(&single);
                assert_eq!(p1.kernel(), "v1", "{c}");
                assert!(matches!(ps, KernelPlan::SingleRead { .. }), "{c}: {ps:?}");
                let dl = (ls - l1).abs() / l1.abs();
                let num: f64 = g1
                    .iter()
                    .zip(&gs)
                    .map(|(a, b)| ((a - b) as f64).powi(2))
                    .sum();
                let den: f64 = g1.iter().map(|a| (*a as f64).powi(2)).sum();
                let dg = (num / den.max(1e-300)).sqrt();
                let gtol = if dtype == Dtype::F32 { 1e-4 } else { 1e-2 };
                assert!(
                    dl <= 1e-4 && dg <= gtol,
                    "{c} ({}): loss diff {dl:.2e}, grad diff {dg:.2e}",
                    ps.describe()
                );
            }
        }
    }
}

/// The demo's experiment with its steps on CUDA (short, one seed): the
/// teacher and the students learn as on the CPU.
fn demo_on_cuda(_: &CudaBackend) {
    use kdfuse_cli::demo::{run, DemoConfig};
    let cfg = DemoConfig {
        device: kdfuse::distill::Device::Cuda,
        seeds: 1,
        student_epochs: 60,
        omit_class: Some(3),
        ..Default::default()
    };
    let t0 = std::time::Instant::now();
    let r = run(&cfg, &mut |_| {}).unwrap();
    println!(
        "  demo on CUDA in {:.1} s: teacher {:.2}%, hard {:.2}%, distilled {:.2}%, digit 3: {:?} vs {:?} of {:?}",
        t0.elapsed().as_secs_f64(),
        100.0 * r.teacher().test_acc.mean,
        100.0 * r.hard().test_acc.mean,
        100.0 * r.distilled().test_acc.mean,
        r.hard().omitted_correct,
        r.distilled().omitted_correct,
        r.omitted_test_images
    );
    assert_eq!(r.device, "cuda");
    assert!(r.teacher().test_acc.mean > 0.97);
    assert!(r.hard().test_acc.mean > 0.8 && r.distilled().test_acc.mean > r.hard().test_acc.mean);
}
