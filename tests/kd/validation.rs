//! Every invalid input is an `InvalidArgument` naming the argument, on every
//! backend; nothing panics. Without a GPU the CUDA backend is an `Err`.

use crate::common::{for_each_backend, invalid_arg, logits};

use kdfuse::cuda::CudaBackend;
use kdfuse::{Backend, Dtype, GradDtype, HostData, KdError, KdInputs, Logits, LossSpec, OwnedData};

/// Every case on `b`: an error naming the case's argument.
fn expect_args(b: &dyn Backend, cases: &[(&str, KdInputs, LossSpec)]) {
    for (i, (arg, inputs, spec)) in cases.iter().enumerate() {
        let result = b.compute(inputs, spec, Some(GradDtype::F32));
        invalid_arg(result, arg, &format!("{} case {i}", b.name()));
    }
}

fn leak<T>(x: T) -> &'static T {
    Box::leak(Box::new(x))
}

fn bad_parameters(b: &dyn Backend) {
    let (s, t) = (leak(logits(1, 2, 5, 1.0)), leak(logits(2, 2, 5, 1.0)));
    let inp = KdInputs {
        student: Logits::new(HostData::F32(s), 2, 5),
        teacher: Logits::new(HostData::F32(t), 2, 5),
        labels: Some(&[1, 2]),
        row_weights: None,
    };
    let spec = |f: &dyn Fn(&mut LossSpec)| {
        let mut s = LossSpec::default();
        f(&mut s);
        s
    };
    let mut cases = Vec::new();
    for tau in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        cases.push(("temperature", inp, spec(&|s| s.temperature = tau)));
    }
    for alpha in [-0.1, 1.5, f64::NAN] {
        cases.push(("alpha", inp, spec(&|s| s.alpha = alpha)));
    }
    for beta in [-0.5, 2.0, f64::NAN] {
        cases.push(("beta", inp, spec(&|s| s.beta = beta)));
    }
    cases.push(("grad_scale", inp, spec(&|s| s.grad_scale = f64::NAN)));
    // α > 0 needs labels.
    let no_labels = KdInputs {
        labels: None,
        ..inp
    };
    cases.push(("alpha", no_labels, spec(&|s| s.alpha = 0.5)));
    expect_args(b, &cases);
}
for_each_backend!(bad_parameters(b));

fn bad_shapes_and_labels(b: &dyn Backend) {
    let (s, t) = (leak(logits(1, 3, 6, 1.0)), leak(logits(2, 3, 6, 1.0)));
    let f = HostData::F32;
    let good = KdInputs {
        student: Logits::new(f(s), 3, 6),
        teacher: Logits::new(f(t), 3, 6),
        labels: None,
        row_weights: None,
    };
    let (student, teacher) = (good.student, good.teacher);
    let mixed = leak(OwnedData::from_f32(t, Dtype::Bf16));
    let mut cases = vec![
        ("teacher", student, Logits::new(f(t), 2, 6)),
        ("teacher", student, Logits::new(f(&t[..15]), 3, 5)),
        ("student", Logits::strided(f(s), 3, 6, 5), teacher),
        ("student", Logits::new(f(&s[..10]), 3, 6), teacher),
        ("student", Logits::new(f(s), 3, 0), Logits::new(f(t), 3, 0)),
        ("teacher", student, Logits::strided(f(t), 3, 6, 7)),
        // Dtypes differ.
        ("teacher", student, Logits::new(mixed.view(), 3, 6)),
    ]
    .into_iter()
    .map(|(arg, student, teacher)| {
        let inputs = KdInputs {
            student,
            teacher,
            ..good
        };
        (arg, inputs, LossSpec::default())
    })
    .collect::<Vec<_>>();
    for labels in [&[0i64, 1][..], &[0, 6, 1], &[-1, 0, 0], &[0, 0, -101]] {
        let inputs = KdInputs {
            labels: Some(labels),
            ..good
        };
        cases.push(("labels", inputs, LossSpec::default()));
    }
    expect_args(b, &cases);
    // ignore_index is not a label error.
    let ok = KdInputs {
        labels: Some(&[-100, 5, 0]),
        ..good
    };
    assert!(b.compute(&ok, &LossSpec::default(), None).is_ok());
}
for_each_backend!(bad_shapes_and_labels(b));

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
