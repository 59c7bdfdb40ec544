//! The feature kernels' own CUDA code (kernels/feature.cu: vector sweeps with
//! heads and tails, block sums, the attention workspace, grid-stride rows,
//! both gradients in every dtype pair) run on the CPU under
//! kernels/emu/cuda_emu.h, against the f64 oracle. On a machine without a GPU
//! this is what checks the parallel decomposition; tests/gpu.rs checks the
//! same on hardware.

use crate::common::{assert_passed, assert_sweep_passed, for_each_backend};
use kdfuse::feature::check::{feature_sweep, run_feature_case, FeatureCaseConfig, Special};
use kdfuse::feature::emu::FeatureEmuBackend;
use kdfuse::{
    CpuBackend, Dtype, FeatureBackend, FeatureGrads, FeatureKind, FeatureSpec, GradDtype, Reduction,
};

#[test]
fn random_cases_against_oracle() {
    let report = feature_sweep(&FeatureEmuBackend::default(), 90, 77, 6000, |_| {}).unwrap();
    assert_sweep_passed!(report);
    assert_eq!(report.groups.len(), 9, "every dtype × loss drawn");
}

fn case(kind: FeatureKind, width: usize, cs: usize, ct: usize, dtype: Dtype) -> FeatureCaseConfig {
    FeatureCaseConfig {
        spec: FeatureSpec {
            reduction: Reduction::Sum,
            ..FeatureSpec::new(kind)
        },
        rows: 5,
        width,
        student_channels: cs,
        teacher_channels: ct,
        // Odd pads: rows of every alignment, student and teacher apart.
        student_pad: 3,
        teacher_pad: 1,
        dtype,
        grad_dtype: GradDtype::Input,
        teacher_grad: true,
        scale: 1.5,
        correlation: 0.5,
        special: Special::ZeroRows,
        seed: width as u64 + cs as u64,
    }
}

#[test]
fn long_rows_and_grid_stride() {
    for dtype in Dtype::ALL {
        for c in [
            case(FeatureKind::Mse, 40_003, 1, 1, dtype),
            case(FeatureKind::Cosine, 40_003, 1, 1, dtype),
            case(FeatureKind::Attention, 3136, 4, 2, dtype),
        ] {
            // Two blocks for five rows: the grid-stride loop runs, and the
            // attention workspace of a block is reused across its rows.
            assert_passed!(
                run_feature_case(&FeatureEmuBackend { grid: 2 }, &c).unwrap(),
                c
            );
        }
    }
}

/// The kernel's 16-byte path (rows sharing their alignment) and its scalar
/// path compute the same sums as the CPU backend's lanes, up to summation
/// order.
fn aligned_and_misaligned_rows_match_the_cpu_backend(b: &dyn FeatureBackend) {
    for (sp, tp) in [(0, 0), (8, 8), (1, 0), (3, 5)] {
        let c = FeatureCaseConfig {
            student_pad: sp,
            teacher_pad: tp,
            ..case(FeatureKind::Cosine, 1027, 1, 1, Dtype::Bf16)
        };
        let data = kdfuse::feature::check::generate_features(&c);
        let g = FeatureGrads::both(GradDtype::F32);
        let a = b.feature_loss(&data.inputs(), &c.spec, g).unwrap();
        let cpu = CpuBackend.feature_loss(&data.inputs(), &c.spec, g).unwrap();
        for (x, y) in a.row_losses.iter().zip(&cpu.row_losses) {
            assert!((x - y).abs() <= 1e-6 * y.abs().max(1e-3), "{x} vs {y}");
        }
        let close = |p: &[f32], q: &[f32]| {
            p.iter()
                .zip(q)
                .all(|(x, y)| (x - y).abs() <= 1e-5 * y.abs().max(1e-2))
        };
        assert!(close(&a.grad_student.unwrap(), &cpu.grad_student.unwrap()));
        assert!(close(&a.grad_teacher.unwrap(), &cpu.grad_teacher.unwrap()));
    }
}
for_each_backend!([emu, cuda] aligned_and_misaligned_rows_match_the_cpu_backend(b));
