//! Bad input through the library: every kernel parameter is checked in the
//! precision the kernels use it in (fp32), parameters a divergence or loss
//! does not use are refused rather than ignored, shapes multiply without
//! wrapping, and an empty batch has a loss of +0.

use crate::common::invalid_arg;
use kdfuse::{
    Backend, CpuBackend, Divergence, FeatureBackend, FeatureInputs, FeatureKind, FeatureSpec,
    Features, GradDtype, HostData, KdError, KdInputs, Logits, LossSpec, Oracle, Reduction,
};

const N: usize = 3;
const V: usize = 4;
const S: [f32; N * V] = [
    0.5, -1.0, 2.0, 0.25, 1.5, 0.0, -0.5, 3.0, -2.0, 1.0, 0.75, 0.1,
];
const T: [f32; N * V] = [
    1.0, 0.5, -1.5, 0.0, 0.25, 2.5, -1.0, 1.0, 0.5, -0.25, 1.25, 2.0,
];

fn inputs(rows: usize) -> KdInputs<'static> {
    KdInputs {
        student: Logits::new(HostData::F32(&S[..rows * V]), rows, V),
        teacher: Logits::new(HostData::F32(&T[..rows * V]), rows, V),
        labels: None,
        row_weights: None,
    }
}

fn backends() -> [Box<dyn Backend>; 2] {
    [Box::new(Oracle), Box::new(CpuBackend)]
}

/// Every backend (and the spec's own validation) refuses `spec`, naming `arg`.
fn refused(spec: &LossSpec, arg: &str, what: &str) {
    let e = spec.validate(false).expect_err(what);
    assert!(
        matches!(&e, KdError::InvalidArgument { arg: a, .. } if *a == arg),
        "{what}: {e}"
    );
    for b in backends() {
        let result = b.compute(&inputs(N), spec, Some(GradDtype::F32));
        invalid_arg(result, arg, &format!("{what} on {}", b.name()));
    }
}

/// The default spec with one change.
fn spec(change: impl FnOnce(&mut LossSpec)) -> LossSpec {
    let mut spec = LossSpec::default();
    change(&mut spec);
    spec
}

#[test]
fn temperature_out_of_fp32_range_is_refused() {
    // 1e19: τ² fits fp32 but 1/τ² does not (the loss came out 9e10);
    // 1e20: τ² overflows (the loss came out −inf); 1e-20: τ² underflows.
    for tau in [1e19, 1e20, 1e39, 1e-20, 1e-39, 1e-46] {
        let spec = spec(|s| s.temperature = tau);
        refused(&spec, "temperature", &format!("temperature {tau:e}"));
    }
    let e = spec(|s| s.temperature = 1e20).validate(false).unwrap_err();
    assert!(e.to_string().contains("overflows fp32"), "{e}");
    for tau in [1e-18, 0.05, 1.0, 4.0, 1e3, 1e18] {
        spec(|s| s.temperature = tau).validate(false).unwrap();
    }
}

#[test]
fn softcap_out_of_fp32_range_is_refused() {
    // 1e-50 rounded to fp32 0, which the kernels read as "off"; 1e39 to inf
    // (a NaN loss); 3e38 fits, its reciprocal does not.
    for cap in [1e-50, 1e-39, 1e39, 3e38] {
        let spec = spec(|s| s.softcap = Some(cap));
        refused(&spec, "softcap", &format!("softcap {cap:e}"));
    }
    for cap in [1e-30, 1e30] {
        let spec = spec(|s| s.softcap = Some(cap));
        spec.validate(false).unwrap();
        for b in backends() {
            let out = b.compute(&inputs(N), &spec, None).unwrap();
            assert!(out.loss.is_finite(), "softcap {cap:e} on {}", b.name());
        }
    }
}

#[test]
fn other_parameters_out_of_fp32_range_are_refused() {
    let jsd = |beta| {
        spec(|s| {
            s.divergence = Divergence::Jsd;
            s.beta = beta;
        })
    };
    let mut cases = Vec::new();
    for gs in [1e39, -1e39, 1e-50] {
        cases.push((
            "grad_scale",
            spec(|s| s.grad_scale = gs),
            format!("grad_scale {gs:e}"),
        ));
    }
    // A JSD β strictly inside (0, 1) that fp32 rounds to an endpoint.
    for beta in [1e-50, 1.0 - 1e-10] {
        cases.push(("beta", jsd(beta), format!("beta {beta:e}")));
    }
    for (arg, spec, what) in &cases {
        refused(spec, arg, what);
    }
    // α > 0 that fp32 flushes to 0 (labels: α > 0 needs them).
    let e = spec(|s| s.alpha = 1e-50).validate(true).unwrap_err();
    let e = e.to_string();
    assert!(e.contains("alpha") && e.contains("underflows"), "{e}");
    // The endpoints themselves are exact.
    for beta in [0.0, 1.0] {
        jsd(beta).validate(false).unwrap();
    }
    let fs = FeatureSpec {
        grad_scale: 1e39,
        ..FeatureSpec::new(FeatureKind::Cosine)
    };
    let e = fs.validate().unwrap_err().to_string();
    assert!(e.contains("grad_scale"), "{e}");
}

#[test]
fn beta_with_another_divergence_is_refused() {
    for d in Divergence::ALL {
        let with_beta = spec(|s| {
            s.divergence = d;
            s.beta = 0.3;
        });
        if d == Divergence::Jsd {
            with_beta.validate(false).unwrap();
        } else {
            refused(&with_beta, "beta", &format!("beta 0.3 with {d}"));
        }
        // The default β is every divergence's.
        spec(|s| s.divergence = d).validate(false).unwrap();
    }
}

#[test]
fn eps_with_mse_is_refused() {
    let spec = FeatureSpec {
        eps: Some(1e-6),
        ..FeatureSpec::new(FeatureKind::Mse)
    };
    let e = spec.validate().unwrap_err();
    assert!(
        matches!(&e, KdError::InvalidArgument { arg: "eps", .. }),
        "{e}"
    );
    let data = [1.0f32, 2.0, 3.0, 4.0];
    let inputs = FeatureInputs {
        student: Features::new(HostData::F32(&data), 2, 2),
        teacher: Features::new(HostData::F32(&data), 2, 2),
    };
    let e = CpuBackend
        .feature_loss(&inputs, &spec, kdfuse::FeatureGrads::NONE)
        .unwrap_err();
    assert!(e.to_string().contains("eps"), "{e}");
    for kind in [FeatureKind::Cosine, FeatureKind::Attention] {
        FeatureSpec {
            eps: Some(1e-6),
            ..FeatureSpec::new(kind)
        }
        .validate()
        .unwrap();
    }
}

#[test]
fn an_empty_batch_has_a_loss_of_plus_zero() {
    for b in backends() {
        for reduction in Reduction::ALL {
            for d in Divergence::ALL {
                let spec = LossSpec {
                    divergence: d,
                    reduction,
                    ..Default::default()
                };
                let out = b.compute(&inputs(0), &spec, Some(GradDtype::F32)).unwrap();
                assert!(
                    out.loss == 0.0 && out.loss.is_sign_positive(),
                    "{} {reduction} {d}: loss {:?}",
                    b.name(),
                    out.loss
                );
                assert_eq!(out.valid_rows, 0);
            }
        }
    }
    let empty: [f32; 0] = [];
    let inputs = FeatureInputs {
        student: Features::new(HostData::F32(&empty), 0, 2),
        teacher: Features::new(HostData::F32(&empty), 0, 2),
    };
    for kind in FeatureKind::ALL {
        for reduction in Reduction::ALL {
            let spec = FeatureSpec {
                reduction,
                ..FeatureSpec::new(kind)
            };
            let backends: [&dyn FeatureBackend; 2] = [&Oracle, &CpuBackend];
            for b in backends {
                let out = b
                    .feature_loss(&inputs, &spec, kdfuse::FeatureGrads::NONE)
                    .unwrap();
                assert!(
                    out.loss == 0.0 && out.loss.is_sign_positive(),
                    "{} {kind} {reduction}: loss {:?}",
                    b.name(),
                    out.loss
                );
            }
        }
    }
}
