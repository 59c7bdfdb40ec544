//! GPU tests of the CUDA backend: the oracle sweeps of the CPU tests (every
//! dtype, V up to 262144, strided and misaligned rows, −inf, ignored rows),
//! with every output poisoned before the launch (the host-array path fills
//! them with NaN bits), plus the device-buffer API: caller streams, in-place
//! gradients, bad labels.
//!
//! The feature losses' GPU tests are in gpu_features/, the loss-family
//! options' (top-k teacher, soft-capping, row weights, teacher gradient) in
//! gpu_loss_family/, the vocab-parallel kernels' in gpu_vocab_parallel/, the
//! top-k selection kernel's in gpu_topk_select/, the fused linear path's in
//! gpu_fused_linear/.
//!
//! Own runner (harness = false, tests/common/gpu_runner.rs): without a
//! usable GPU every test prints "skipped" with the reason; with
//! KDFUSE_REQUIRE_GPU=1 that is a failure. The benchmark's and the demo's GPU
//! tests are the CLI crate's (cli/tests/gpu.rs).

mod gpu_features;
mod gpu_fused_linear;
mod gpu_loss_family;
mod gpu_topk_select;
mod gpu_vocab_parallel;

mod common;
#[path = "common/gpu_runner.rs"]
mod gpu_runner;

use half::bf16;
use kdfuse::check::{run_case, sweep, CaseConfig, NegInf};
use kdfuse::cuda::{CudaBackend, LossBuffers, RowLayout};
use kdfuse::{Backend, CpuBackend, Divergence, Dtype, GradDtype, LossSpec, OwnedData, Reduction};
use std::process::ExitCode;

use gpu_runner::Test;

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
        ("distill_step_cpu_vs_cuda", distill_step_cpu_vs_cuda),
        (
            "fused_linear_chunkings_f32_bf16",
            gpu_fused_linear::fused_linear_chunkings_f32_bf16,
        ),
        (
            "fused_linear_topk_mutual_budget",
            gpu_fused_linear::fused_linear_topk_mutual_budget,
        ),
        (
            "topk_v1_and_single_read",
            gpu_loss_family::topk_v1_and_single_read,
        ),
        (
            "topk_llm_vocabularies_every_mode",
            gpu_loss_family::topk_llm_vocabularies_every_mode,
        ),
        (
            "options_every_divergence",
            gpu_loss_family::options_every_divergence,
        ),
        (
            "topk_validation_pass",
            gpu_loss_family::topk_validation_pass,
        ),
        (
            "feature_sweep_against_oracle",
            gpu_features::feature_sweep_against_oracle,
        ),
        (
            "feature_large_rows_and_maps_every_dtype",
            gpu_features::feature_large_rows_and_maps_every_dtype,
        ),
        (
            "feature_many_rows_and_empty_batches",
            gpu_features::feature_many_rows_and_empty_batches,
        ),
        (
            "feature_agrees_with_cpu_backend",
            gpu_features::feature_agrees_with_cpu_backend,
        ),
        (
            "feature_device_api_on_caller_stream",
            gpu_features::feature_device_api_on_caller_stream,
        ),
        (
            "vp_sweep_against_oracle",
            gpu_vocab_parallel::vp_sweep_against_oracle,
        ),
        (
            "vp_records_equal_the_host_records",
            gpu_vocab_parallel::vp_records_equal_the_host_records,
        ),
        (
            "vp_cpu_and_gpu_ranks_mix",
            gpu_vocab_parallel::vp_cpu_and_gpu_ranks_mix,
        ),
        (
            "vp_raw_api_on_caller_stream",
            gpu_vocab_parallel::vp_raw_api_on_caller_stream,
        ),
        (
            "select_sweep_against_oracle",
            gpu_topk_select::select_sweep_against_oracle,
        ),
        (
            "select_llm_vocabularies_every_dtype",
            gpu_topk_select::select_llm_vocabularies_every_dtype,
        ),
        (
            "select_raw_api_on_caller_stream",
            gpu_topk_select::select_raw_api_on_caller_stream,
        ),
        (
            "select_c_abi_device_entry",
            gpu_topk_select::select_c_abi_device_entry,
        ),
    ];
    gpu_runner::run(tests)
}

fn random_sweep_against_oracle(b: &CudaBackend) {
    for seed in [1u64, 2, 3] {
        let report = sweep(b, 400, seed, 262_144, |_| {}).unwrap();
        common::assert_sweep_passed!(report, format!("seed {seed}"));
        common::assert_all_groups(&report);
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
            // β is JSD's alone (validation refuses it with another divergence).
            beta: if divergence == Divergence::Jsd {
                0.4
            } else {
                0.5
            },
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
        row_weights: false,
        topk: None,
    }
}

/// [`fixed_case`] in bf16 without student padding (for the device-buffer
/// API, which takes dense rows).
fn unpadded_bf16(
    cols: usize,
    rows: usize,
    grad: GradDtype,
    divergence: Divergence,
    seed: u64,
) -> CaseConfig {
    CaseConfig {
        student_pad: 0,
        ..fixed_case(cols, rows, Dtype::Bf16, grad, divergence, seed)
    }
}

/// The bf16 student and teacher of a generated case.
pub fn bf16_pair<'a>(student: &'a OwnedData, teacher: &'a OwnedData) -> (&'a [bf16], &'a [bf16]) {
    let (OwnedData::Bf16(s), OwnedData::Bf16(t)) = (student, teacher) else {
        panic!("not a bf16 case")
    };
    (s, t)
}

/// [`kdfuse::check::rel_l2`] of f32 values.
pub fn rel_l2_f32(a: &[f32], b: &[f32]) -> f64 {
    let wide = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<_>>();
    kdfuse::check::rel_l2(&wide(a), &wide(b))
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
        let err = rel_l2_f32(&g.grad.unwrap(), &h.grad.unwrap());
        // TVD's gradient jumps at q = p: an element at a near-tie (below
        // fp32's resolution) may fall on either side in the two backends'
        // different summation orders. Both are held to the oracle with
        // near-ties resolved (llm_vocabularies_every_dtype).
        let tol = if divergence == Divergence::Tvd {
            1e-3
        } else {
            1e-5
        };
        assert!(err < tol, "{divergence}: CUDA vs CPU gradient {err:.2e}");
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
    let c = unpadded_bf16(v, n, GradDtype::F32, Divergence::Jsd, 21);
    let data = kdfuse::check::generate(&c);
    let (s, t) = bf16_pair(&data.student, &data.teacher);
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
        beta: 0.5, // JSD's alone
        ..c.spec.clone()
    };
    let mut launch = |spec: &LossSpec, out: &mut LossBuffers| {
        let (student, teacher, labels) = (ds.as_view(), dt.as_view(), dl.as_view());
        let mut grad = dg.as_view_mut();
        let (labels, grad) = (Some(&labels), Some(&mut grad));
        b.fused(&stream, &student, &teacher, labels, grad, layout, out, spec)
            .unwrap()
    };
    launch(&other, &mut out);
    let first = stream.clone_dtoh(&out.loss).unwrap()[0];
    launch(&c.spec, &mut out);
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
    let err = rel_l2_f32(&grad, &rg);
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
    let c = unpadded_bf16(v, n, GradDtype::Input, Divergence::ReverseKl, 31);
    let data = kdfuse::check::generate(&c);
    let (s, t) = bf16_pair(&data.student, &data.teacher);
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

/// `DistillStep` on CUDA (cuBLAS, kernels/mlp.cu, the fused kernel) against
/// the CPU engine: the same steps from the same start agree within f32
/// rounding (GEMM summation orders and FMA contraction differ).
fn distill_step_cpu_vs_cuda(_: &CudaBackend) {
    use kdfuse::distill::{Device, DistillConfig, DistillStep, Mlp, Optimizer};
    let rel = rel_l2_f32;
    let (rows, inputs, classes) = (48, 64, 10);
    let x: Vec<f32> = (0..rows * inputs)
        .map(|i| ((i * 7919) % 17) as f32 / 16.0)
        .collect();
    let y: Vec<i64> = (0..rows).map(|i| (i * 3 % classes) as i64).collect();
    let teacher = Mlp::new(&[inputs, 300, 200, classes], 1).unwrap();
    for (divergence, optimizer, dropout) in [
        (
            Divergence::ForwardKl,
            Optimizer::adam(1e-3).with_weight_decay(0.01),
            0.0,
        ),
        (
            Divergence::Jsd,
            Optimizer::sgd(0.05, 0.9).with_weight_decay(1e-3),
            0.3,
        ),
    ] {
        let student = Mlp::new(&[inputs, 32, 16, classes], 2).unwrap();
        let cfg = DistillConfig {
            loss: LossSpec {
                divergence,
                alpha: 0.4,
                temperature: 3.0,
                ..Default::default()
            },
            optimizer,
            dropout,
            seed: 5,
        };
        let mut cpu = DistillStep::new(&student, Some(&teacher), cfg.clone(), Device::Cpu).unwrap();
        let mut gpu = DistillStep::new(&student, Some(&teacher), cfg, Device::Cuda).unwrap();
        assert_eq!(gpu.device(), Device::Cuda);
        let tc = cpu.teacher_predict(&x).unwrap();
        let tg = gpu.teacher_predict(&x).unwrap();
        assert!(rel(&tg, &tc) < 1e-5, "teacher logits {:.2e}", rel(&tg, &tc));
        let (lc, gc) = cpu.gradients(&x, Some(&y), None).unwrap();
        let (lg, gg) = gpu.gradients(&x, Some(&y), None).unwrap();
        assert!((lc - lg).abs() <= 1e-5 * lc.abs(), "loss {lc} vs {lg}");
        assert!(rel(&gg, &gc) < 1e-4, "gradients {:.2e}", rel(&gg, &gc));
        for step in 0..5 {
            let (a, b) = if step % 2 == 0 {
                (
                    cpu.step(&x, Some(&y)).unwrap(),
                    gpu.step(&x, Some(&y)).unwrap(),
                )
            } else {
                // A smaller batch, the teacher's logits given.
                let (xs, ys, ts) = (&x[..20 * inputs], &y[..20], &tc[..20 * classes]);
                (
                    cpu.step_with_teacher_logits(xs, Some(ys), ts).unwrap(),
                    gpu.step_with_teacher_logits(xs, Some(ys), ts).unwrap(),
                )
            };
            assert!(
                (a - b).abs() <= 1e-4 * a.abs(),
                "step {step}: loss {a} vs {b}"
            );
        }
        let (pc, pg) = (cpu.student().unwrap(), gpu.student().unwrap());
        let err = rel(pg.params(), pc.params());
        println!("  {divergence}: parameters after 5 steps differ by {err:.2e} (rel. L2)");
        // Adam divides by √v: rounding differences in small gradients are
        // amplified, hence the looser bound; a wrong GEMM is off by O(1).
        assert!(err < 1e-3, "parameters after 5 steps: {err:.2e}");
        let (oc, og) = (cpu.predict(&x).unwrap(), gpu.predict(&x).unwrap());
        assert!(rel(&og, &oc) < 1e-3);
        // A batch wider than the buffers so far: they grow.
        let big: Vec<f32> = x.iter().cycle().take(300 * inputs).copied().collect();
        assert_eq!(gpu.predict(&big).unwrap().len(), 300 * classes);
    }
}
