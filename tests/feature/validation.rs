//! Every invalid feature input is an `InvalidArgument` naming the argument,
//! on every backend (the emulated kernel's included); nothing panics.

use crate::common::{for_each_backend, invalid_arg};
use half::bf16;
use kdfuse::cuda::CudaBackend;
use kdfuse::{
    FeatureBackend, FeatureGrads, FeatureInputs, FeatureKind, FeatureLayout, FeatureSpec, Features,
    GradDtype, HostData, KdError,
};

/// Every case on `b`: an error naming the case's argument.
fn expect_args(b: &dyn FeatureBackend, cases: &[(&str, FeatureInputs, FeatureSpec)]) {
    for (arg, inputs, spec) in cases {
        let result = b.feature_loss(inputs, spec, FeatureGrads::both(GradDtype::F32));
        invalid_arg(result, arg, &format!("{} {}", b.name(), spec.kind));
    }
}

const S: [f32; 24] = [0.5; 24];
const T: [f32; 24] = [0.25; 24];
const B: [bf16; 24] = [bf16::from_f32_const(0.1); 24];

fn rows(n: usize, h: usize, tn: usize, th: usize) -> FeatureInputs<'static> {
    FeatureInputs {
        student: Features::new(HostData::F32(&S), n, h),
        teacher: Features::new(HostData::F32(&T), tn, th),
    }
}

/// Attention maps: channels and positions of the student and the teacher.
fn maps(cs: usize, ct: usize, ws: usize, wt: usize) -> FeatureInputs<'static> {
    FeatureInputs {
        student: Features::maps(HostData::F32(&S), 2, cs, ws),
        teacher: Features::maps(HostData::F32(&T), 2, ct, wt),
    }
}

fn bad_parameters(b: &dyn FeatureBackend) {
    let mut cases = Vec::new();
    for kind in FeatureKind::ALL {
        for eps in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e-300, 1e300] {
            let spec = FeatureSpec {
                eps: Some(eps),
                ..FeatureSpec::new(kind)
            };
            cases.push(("eps", rows(2, 4, 2, 4), spec));
        }
        for grad_scale in [f64::NAN, f64::INFINITY] {
            let spec = FeatureSpec {
                grad_scale,
                ..FeatureSpec::new(kind)
            };
            cases.push(("grad_scale", rows(2, 4, 2, 4), spec));
        }
    }
    expect_args(b, &cases);
}
for_each_backend!(bad_parameters(b));

fn bad_shapes(b: &dyn FeatureBackend) {
    let mut cases = Vec::new();
    for kind in FeatureKind::ALL {
        let spec = FeatureSpec::new(kind);
        for (arg, inputs) in [
            // H = 0, on either side.
            ("student", rows(2, 0, 2, 0)),
            // Different row counts; different row lengths.
            ("teacher", rows(2, 4, 3, 4)),
            ("teacher", rows(2, 4, 2, 5)),
            // More rows than the data holds; a stride below the row length.
            ("student", rows(7, 4, 7, 4)),
            (
                "student",
                FeatureInputs {
                    student: Features::new(HostData::F32(&S), 2, 4).with_row_stride(3),
                    teacher: Features::new(HostData::F32(&T), 2, 4),
                },
            ),
            // Dtypes differ.
            (
                "teacher",
                FeatureInputs {
                    student: Features::new(HostData::F32(&S), 2, 4),
                    teacher: Features::new(HostData::Bf16(&B), 2, 4),
                },
            ),
            // No channels.
            (
                "student",
                FeatureInputs {
                    student: Features::maps(HostData::F32(&S), 2, 0, 4),
                    teacher: Features::maps(HostData::F32(&T), 2, 1, 4),
                },
            ),
        ] {
            cases.push((arg, inputs, spec.clone()));
        }
    }
    // Attention: channels may differ, positions may not.
    let at = FeatureSpec::new(FeatureKind::Attention);
    cases.push(("teacher", maps(2, 3, 4, 3), at.clone()));
    expect_args(b, &cases);
    let out = b
        .feature_loss(&maps(3, 2, 4, 4), &at, FeatureGrads::both(GradDtype::F32))
        .unwrap();
    assert_eq!(out.grad_student.unwrap().len(), 2 * 12);
    assert_eq!(out.grad_teacher.unwrap().len(), 2 * 8);
    // MSE and cosine compare rows of the same length, whatever their split.
    let flat = FeatureInputs {
        student: Features::maps(HostData::F32(&S), 2, 3, 4),
        teacher: Features::new(HostData::F32(&T), 2, 12),
    };
    assert!(b
        .feature_loss(
            &flat,
            &FeatureSpec::new(FeatureKind::Mse),
            FeatureGrads::NONE
        )
        .is_ok());
}
for_each_backend!(bad_shapes(b));

#[test]
fn device_layout_validation() {
    // The device API's layout checks, without a device.
    let ok = FeatureLayout::maps(4, 3, 2, 10);
    assert!(ok.validate(FeatureKind::Attention).is_ok());
    for (layout, kind, arg) in [
        (ok, FeatureKind::Mse, "teacher"),
        (FeatureLayout::dense(4, 0), FeatureKind::Mse, "student"),
        (
            FeatureLayout {
                grad_teacher_stride: 5,
                ..ok
            },
            FeatureKind::Attention,
            "grad_teacher_stride",
        ),
        (
            FeatureLayout {
                width: 1 << 30,
                ..ok
            },
            FeatureKind::Attention,
            "student",
        ),
    ] {
        invalid_arg(layout.validate(kind), arg, &format!("{layout:?} {kind}"));
    }
    assert_eq!(ok.workspace_len(FeatureKind::Attention), 4 * 2 * 10);
    assert_eq!(ok.workspace_len(FeatureKind::Cosine), 0);
}

#[test]
fn without_a_gpu_the_cuda_backend_is_an_error() {
    if CudaBackend::new(0).is_ok() {
        return;
    }
    match kdfuse::feature::create(kdfuse::BackendKind::Cuda) {
        Err(KdError::CudaUnavailable(_)) => {}
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("CUDA backend without a GPU"),
    }
    let auto = kdfuse::feature::create(kdfuse::BackendKind::Auto).unwrap();
    assert_eq!(auto.name(), "cpu");
}
