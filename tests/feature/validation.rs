//! Every invalid feature input is an `InvalidArgument` naming the argument,
//! on every backend (the emulated kernel's included); nothing panics.

use half::bf16;
use kdfuse::cuda::CudaBackend;
use kdfuse::feature::emu::FeatureEmuBackend;
use kdfuse::{
    CpuBackend, FeatureBackend, FeatureGrads, FeatureInputs, FeatureKind, FeatureLayout,
    FeatureSpec, Features, GradDtype, HostData, KdError, Oracle,
};

fn backends() -> Vec<Box<dyn FeatureBackend>> {
    let mut b: Vec<Box<dyn FeatureBackend>> = vec![
        Box::new(Oracle),
        Box::new(CpuBackend),
        Box::new(FeatureEmuBackend::default()),
    ];
    if let Ok(c) = CudaBackend::new(0) {
        b.push(Box::new(c));
    }
    b
}

fn expect_arg(inputs: &FeatureInputs, spec: &FeatureSpec, arg: &str) {
    for b in backends() {
        match b.feature_loss(inputs, spec, FeatureGrads::both(GradDtype::F32)) {
            Err(KdError::InvalidArgument { arg: a, msg }) => {
                assert_eq!(a, arg, "{}: wrong argument named ({msg})", b.name());
                assert!(!msg.is_empty());
            }
            other => panic!(
                "{}: expected an error naming `{arg}`, got {other:?}",
                b.name()
            ),
        }
    }
}

const S: [f32; 24] = [0.5; 24];
const T: [f32; 24] = [0.25; 24];

fn rows(n: usize, h: usize, tn: usize, th: usize) -> FeatureInputs<'static> {
    FeatureInputs {
        student: Features::new(HostData::F32(&S), n, h),
        teacher: Features::new(HostData::F32(&T), tn, th),
    }
}

#[test]
fn bad_parameters() {
    for kind in FeatureKind::ALL {
        for eps in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e-300, 1e300] {
            let spec = FeatureSpec {
                eps: Some(eps),
                ..FeatureSpec::new(kind)
            };
            expect_arg(&rows(2, 4, 2, 4), &spec, "eps");
        }
        for grad_scale in [f64::NAN, f64::INFINITY] {
            let spec = FeatureSpec {
                grad_scale,
                ..FeatureSpec::new(kind)
            };
            expect_arg(&rows(2, 4, 2, 4), &spec, "grad_scale");
        }
    }
}

#[test]
fn bad_shapes() {
    for kind in FeatureKind::ALL {
        let spec = FeatureSpec::new(kind);
        // H = 0, on either side.
        expect_arg(&rows(2, 0, 2, 0), &spec, "student");
        // Different row counts; different row lengths.
        expect_arg(&rows(2, 4, 3, 4), &spec, "teacher");
        expect_arg(&rows(2, 4, 2, 5), &spec, "teacher");
        // More rows than the data holds; a stride below the row length.
        expect_arg(&rows(7, 4, 7, 4), &spec, "student");
        let short_stride = FeatureInputs {
            student: Features::new(HostData::F32(&S), 2, 4).with_row_stride(3),
            teacher: Features::new(HostData::F32(&T), 2, 4),
        };
        expect_arg(&short_stride, &spec, "student");
        // Dtypes differ.
        let b = [bf16::from_f32(0.1); 24];
        let mixed = FeatureInputs {
            student: Features::new(HostData::F32(&S), 2, 4),
            teacher: Features::new(HostData::Bf16(&b), 2, 4),
        };
        expect_arg(&mixed, &spec, "teacher");
        // No channels.
        let no_channels = FeatureInputs {
            student: Features::maps(HostData::F32(&S), 2, 0, 4),
            teacher: Features::maps(HostData::F32(&T), 2, 1, 4),
        };
        expect_arg(&no_channels, &spec, "student");
    }
    // Attention: channels may differ, positions may not.
    let maps = |cs, ct, ws, wt| FeatureInputs {
        student: Features::maps(HostData::F32(&S), 2, cs, ws),
        teacher: Features::maps(HostData::F32(&T), 2, ct, wt),
    };
    let at = FeatureSpec::new(FeatureKind::Attention);
    expect_arg(&maps(2, 3, 4, 3), &at, "teacher");
    for b in backends() {
        let out = b
            .feature_loss(&maps(3, 2, 4, 4), &at, FeatureGrads::both(GradDtype::F32))
            .unwrap();
        assert_eq!(out.grad_student.unwrap().len(), 2 * 12);
        assert_eq!(out.grad_teacher.unwrap().len(), 2 * 8);
    }
    // MSE and cosine compare rows of the same length, whatever their split.
    let flat = FeatureInputs {
        student: Features::maps(HostData::F32(&S), 2, 3, 4),
        teacher: Features::new(HostData::F32(&T), 2, 12),
    };
    for b in backends() {
        assert!(b
            .feature_loss(
                &flat,
                &FeatureSpec::new(FeatureKind::Mse),
                FeatureGrads::NONE
            )
            .is_ok());
    }
}

#[test]
fn device_layout_validation() {
    // The device API's layout checks, without a device.
    let ok = FeatureLayout::maps(4, 3, 2, 10);
    assert!(ok.validate(FeatureKind::Attention).is_ok());
    let named = |l: FeatureLayout, kind| match l.validate(kind) {
        Err(KdError::InvalidArgument { arg, .. }) => arg,
        other => panic!("expected an error, got {other:?}"),
    };
    assert_eq!(named(ok, FeatureKind::Mse), "teacher");
    assert_eq!(
        named(FeatureLayout::dense(4, 0), FeatureKind::Mse),
        "student"
    );
    let l = FeatureLayout {
        grad_teacher_stride: 5,
        ..ok
    };
    assert_eq!(named(l, FeatureKind::Attention), "grad_teacher_stride");
    let l = FeatureLayout {
        width: 1 << 30,
        ..ok
    };
    assert_eq!(named(l, FeatureKind::Attention), "student");
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
