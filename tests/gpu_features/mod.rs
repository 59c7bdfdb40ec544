//! GPU tests of the feature losses (kernels/feature.cu), run by tests/gpu.rs's
//! runner: the oracle sweeps of the CPU tests on the CUDA backend (outputs
//! poisoned before the launch), large rows and maps in every dtype pair,
//! grids beyond the attention kernel's block cap, agreement with the CPU
//! backend, and the device-buffer API on a caller stream.

use half::bf16;
use kdfuse::cuda::CudaBackend;
use kdfuse::feature::check::{feature_sweep, run_feature_case, FeatureCaseConfig, Special};
use kdfuse::feature::FeatureBuffers;
use kdfuse::{
    CpuBackend, Dtype, FeatureBackend, FeatureGrads, FeatureKind, FeatureLayout, FeatureSpec,
    GradDtype, Reduction,
};

pub fn feature_sweep_against_oracle(b: &CudaBackend) {
    for seed in [1u64, 2, 3] {
        let report = feature_sweep(b, 300, seed, 262_144, |_| {}).unwrap();
        crate::common::assert_sweep_passed!(report, format!("seed {seed}"));
        assert_eq!(report.groups.len(), 9);
    }
}

fn case(
    kind: FeatureKind,
    rows: usize,
    width: usize,
    channels: (usize, usize),
    dtype: Dtype,
    grad: GradDtype,
) -> FeatureCaseConfig {
    FeatureCaseConfig {
        spec: FeatureSpec::new(kind),
        rows,
        width,
        student_channels: channels.0,
        teacher_channels: channels.1,
        student_pad: rows % 3,
        teacher_pad: 0,
        dtype,
        grad_dtype: grad,
        teacher_grad: true,
        scale: 1.5,
        correlation: 0.5,
        special: Special::ZeroRows,
        seed: (rows * 31 + width) as u64,
    }
}

fn assert_passes(b: &CudaBackend, c: &FeatureCaseConfig) {
    crate::common::assert_passed!(run_feature_case(b, c).unwrap(), c);
}

pub fn feature_large_rows_and_maps_every_dtype(b: &CudaBackend) {
    for dtype in Dtype::ALL {
        for grad in [GradDtype::F32, GradDtype::Input] {
            for kind in [FeatureKind::Mse, FeatureKind::Cosine] {
                assert_passes(b, &case(kind, 3, 1 << 20, (1, 1), dtype, grad));
            }
            // ResNet-style maps: 56×56 with 256/512 channels, 224×224 with 64.
            let at = FeatureKind::Attention;
            assert_passes(b, &case(at, 3, 3136, (256, 512), dtype, grad));
            assert_passes(b, &case(at, 2, 50_176, (64, 64), dtype, grad));
            assert_passes(b, &case(at, 4, 49, (2048, 1024), dtype, grad));
        }
    }
}

pub fn feature_many_rows_and_empty_batches(b: &CudaBackend) {
    // More samples than the attention kernel's blocks (1024): blocks reuse
    // their workspace across rows.
    let c = case(
        FeatureKind::Attention,
        3000,
        37,
        (3, 2),
        Dtype::F32,
        GradDtype::F32,
    );
    assert_passes(b, &c);
    assert_passes(
        b,
        &case(
            FeatureKind::Cosine,
            70_000,
            5,
            (1, 1),
            Dtype::Bf16,
            GradDtype::F32,
        ),
    );
    for kind in FeatureKind::ALL {
        assert_passes(b, &case(kind, 0, 16, (1, 1), Dtype::F16, GradDtype::Input));
    }
}

pub fn feature_agrees_with_cpu_backend(b: &CudaBackend) {
    for kind in FeatureKind::ALL {
        let c = case(kind, 4, 20_000, (1, 1), Dtype::Bf16, GradDtype::F32);
        let c = if kind == FeatureKind::Attention {
            FeatureCaseConfig {
                width: 784,
                student_channels: 32,
                teacher_channels: 16,
                ..c
            }
        } else {
            c
        };
        let data = kdfuse::feature::check::generate_features(&c);
        let grads = FeatureGrads::both(GradDtype::F32);
        let g = b.feature_loss(&data.inputs(), &c.spec, grads).unwrap();
        let h = CpuBackend
            .feature_loss(&data.inputs(), &c.spec, grads)
            .unwrap();
        let flat = |o: &kdfuse::FeatureOutput| -> Vec<f64> {
            [&o.grad_student, &o.grad_teacher]
                .into_iter()
                .flatten()
                .flatten()
                .map(|&x| x as f64)
                .collect()
        };
        let err = kdfuse::check::rel_l2(&flat(&g), &flat(&h));
        assert!(err < 1e-5, "{kind}: CUDA vs CPU gradients {err:.2e}");
        assert!(
            (g.loss - h.loss).abs() <= 1e-5 * h.loss.abs(),
            "{kind}: {} vs {}",
            g.loss,
            h.loss
        );
    }
}

pub fn feature_device_api_on_caller_stream(b: &CudaBackend) {
    let (n, cs, ct, width) = (6, 8, 4, 1000);
    let c = FeatureCaseConfig {
        student_pad: 0,
        teacher_pad: 0,
        ..case(
            FeatureKind::Attention,
            n,
            width,
            (cs, ct),
            Dtype::Bf16,
            GradDtype::F32,
        )
    };
    let data = kdfuse::feature::check::generate_features(&c);
    let (s, t) = crate::bf16_pair(&data.student, &data.teacher);
    let stream = b.context().new_stream().unwrap();
    let ds = stream.clone_htod(s).unwrap();
    let dt = stream.clone_htod(t).unwrap();
    let mut gs = stream.alloc_zeros::<f32>(n * cs * width).unwrap();
    let mut gt = stream.alloc_zeros::<f32>(n * ct * width).unwrap();
    let layout = FeatureLayout::maps(n, cs, ct, width);
    let kind = FeatureKind::Attention;
    let mut out = FeatureBuffers::new(&stream, &layout, kind).unwrap();
    // Two specs back to back on the same stream, no host sync in between.
    let sum = FeatureSpec {
        reduction: Reduction::Sum,
        ..c.spec.clone()
    };
    b.feature(
        &stream,
        &ds.as_view(),
        &dt.as_view(),
        None::<&mut cudarc::driver::CudaViewMut<'_, f32>>,
        None,
        layout,
        &mut out,
        &sum,
    )
    .unwrap();
    let first = stream.clone_dtoh(&out.loss).unwrap()[0] as f64;
    b.feature(
        &stream,
        &ds.as_view(),
        &dt.as_view(),
        Some(&mut gs.as_view_mut()),
        Some(&mut gt.as_view_mut()),
        layout,
        &mut out,
        &c.spec,
    )
    .unwrap();
    let loss = stream.clone_dtoh(&out.loss).unwrap()[0] as f64;
    let grad_s = stream.clone_dtoh(&gs).unwrap();
    let grads = FeatureGrads::both(GradDtype::F32);
    let reference = CpuBackend
        .feature_loss(&data.inputs(), &c.spec, grads)
        .unwrap();
    let summed = CpuBackend
        .feature_loss(&data.inputs(), &sum, FeatureGrads::NONE)
        .unwrap();
    assert!((first - summed.loss).abs() <= 1e-5 * summed.loss.abs());
    assert!(
        (loss - reference.loss).abs() <= 1e-5 * reference.loss.abs(),
        "{loss} vs {}",
        reference.loss
    );
    let err = crate::rel_l2_f32(&grad_s, &reference.grad_student.unwrap());
    assert!(err < 1e-5, "{err}");
    // Too-short buffers are an error, not a launch.
    let loss_only = |student: &cudarc::driver::CudaSlice<bf16>, out: &mut FeatureBuffers| {
        let student = student.as_view();
        b.feature::<bf16, f32>(
            &stream,
            &student,
            &dt.as_view(),
            None,
            None,
            layout,
            out,
            &c.spec,
        )
    };
    let short = stream.alloc_zeros::<bf16>(10).unwrap();
    assert!(loss_only(&short, &mut out).is_err());
    let mut small =
        FeatureBuffers::new(&stream, &FeatureLayout::maps(1, cs, ct, 10), kind).unwrap();
    assert!(loss_only(&ds, &mut small).is_err());
}
