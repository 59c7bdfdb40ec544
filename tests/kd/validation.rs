//! Every invalid input is an `InvalidArgument` naming the argument, on every
//! backend; nothing panics. Without a GPU the CUDA backend is an `Err`.

use crate::common;

use common::logits;
use half::bf16;
use kdfuse::cuda::CudaBackend;
use kdfuse::{
    Backend, CpuBackend, Dtype, GradDtype, HostData, KdError, KdInputs, Logits, LossSpec, Oracle,
    OwnedData,
};

fn backends() -> Vec<Box<dyn Backend>> {
    let mut b: Vec<Box<dyn Backend>> = vec![Box::new(Oracle), Box::new(CpuBackend)];
    if let Ok(c) = CudaBackend::new(0) {
        b.push(Box::new(c));
    }
    b
}

fn expect_arg(inputs: &KdInputs, spec: &LossSpec, arg: &str) {
    for b in backends() {
        match b.compute(inputs, spec, Some(GradDtype::F32)) {
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

#[test]
fn bad_parameters() {
    let s = logits(1, 2, 5, 1.0);
    let t = logits(2, 2, 5, 1.0);
    let labels = [1i64, 2];
    let inp = KdInputs {
        student: Logits::new(HostData::F32(&s), 2, 5),
        teacher: Logits::new(HostData::F32(&t), 2, 5),
        labels: Some(&labels),
        row_weights: None,
    };
    let base = LossSpec::default();
    for tau in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        expect_arg(
            &inp,
            &LossSpec {
                temperature: tau,
                ..base.clone()
            },
            "temperature",
        );
    }
    for alpha in [-0.1, 1.5, f64::NAN] {
        expect_arg(
            &inp,
            &LossSpec {
                alpha,
                ..base.clone()
            },
            "alpha",
        );
    }
    for beta in [-0.5, 2.0, f64::NAN] {
        expect_arg(
            &inp,
            &LossSpec {
                beta,
                ..base.clone()
            },
            "beta",
        );
    }
    expect_arg(
        &inp,
        &LossSpec {
            grad_scale: f64::NAN,
            ..base.clone()
        },
        "grad_scale",
    );
    let no_labels = KdInputs {
        labels: None,
        ..inp
    };
    expect_arg(
        &no_labels,
        &LossSpec {
            alpha: 0.5,
            ..base.clone()
        },
        "alpha",
    );
}

#[test]
fn bad_shapes_and_labels() {
    let s = logits(1, 3, 6, 1.0);
    let t = logits(2, 3, 6, 1.0);
    let spec = LossSpec::default();
    let f = |d: &'static [f32]| HostData::F32(d);
    let s: &'static [f32] = Box::leak(s.into_boxed_slice());
    let t: &'static [f32] = Box::leak(t.into_boxed_slice());
    let good = KdInputs {
        student: Logits::new(f(s), 3, 6),
        teacher: Logits::new(f(t), 3, 6),
        labels: None,
        row_weights: None,
    };
    expect_arg(
        &KdInputs {
            teacher: Logits::new(f(t), 2, 6),
            ..good
        },
        &spec,
        "teacher",
    );
    expect_arg(
        &KdInputs {
            teacher: Logits::new(f(&t[..15]), 3, 5),
            ..good
        },
        &spec,
        "teacher",
    );
    expect_arg(
        &KdInputs {
            student: Logits::strided(f(s), 3, 6, 5),
            ..good
        },
        &spec,
        "student",
    );
    expect_arg(
        &KdInputs {
            student: Logits::new(f(&s[..10]), 3, 6),
            ..good
        },
        &spec,
        "student",
    );
    expect_arg(
        &KdInputs {
            student: Logits::new(f(s), 3, 0),
            teacher: Logits::new(f(t), 3, 0),
            ..good
        },
        &spec,
        "student",
    );
    expect_arg(
        &KdInputs {
            teacher: Logits::strided(f(t), 3, 6, 7),
            ..good
        },
        &spec,
        "teacher",
    );
    for labels in [&[0i64, 1][..], &[0, 6, 1], &[-1, 0, 0], &[0, 0, -101]] {
        expect_arg(
            &KdInputs {
                labels: Some(labels),
                ..good
            },
            &spec,
            "labels",
        );
    }
    let b = OwnedData::from_f32(t, Dtype::Bf16);
    let mixed = KdInputs {
        teacher: Logits::new(b.view(), 3, 6),
        ..good
    };
    expect_arg(&mixed, &spec, "teacher");
    // ignore_index is not a label error.
    let ok = KdInputs {
        labels: Some(&[-100, 5, 0]),
        ..good
    };
    for b in backends() {
        assert!(b.compute(&ok, &spec, None).is_ok());
    }
    let _ = bf16::ZERO;
}

#[test]
fn cuda_without_a_gpu_is_an_error_not_a_panic() {
    match CudaBackend::new(0) {
        Ok(_) => eprintln!("a CUDA device is present: nothing to check here"),
        Err(KdError::CudaUnavailable(msg)) => assert!(!msg.is_empty()),
        Err(e) => panic!("unexpected error kind: {e}"),
    }
    assert!(matches!(
        CudaBackend::new(1 << 20),
        Err(KdError::CudaUnavailable(_)) | Err(KdError::InvalidArgument { .. })
    ));
}
