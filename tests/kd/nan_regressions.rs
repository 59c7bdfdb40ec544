//! Regressions of the fuzzing pass that found NaN hidden and +inf turned into
//! −inf (issue 18): each reported input, on the oracle, the CPU backend and
//! the CUDA kernels under the emulation (through `kdfuse loss`:
//! cli/tests/cli/nan.rs).

use kdfuse::emu::EmuBackend;
use kdfuse::{
    Backend, CpuBackend, Divergence, GradDtype, HostData, KdInputs, KdOutput, Logits, LossSpec,
    Oracle, TopkIndices, TopkInputs, TopkMode, TopkTeacher,
};

fn backends() -> [(&'static str, Box<dyn Backend>); 3] {
    [
        ("oracle", Box::new(Oracle)),
        ("cpu", Box::new(CpuBackend)),
        ("emu", Box::new(EmuBackend::default())),
    ]
}

fn dense(s: &[f32], t: &[f32], spec: &LossSpec) -> Vec<(&'static str, KdOutput)> {
    let v = s.len();
    let inputs = KdInputs {
        student: Logits::new(HostData::F32(s), 1, v),
        teacher: Logits::new(HostData::F32(t), 1, v),
        labels: None,
        row_weights: None,
    };
    backends()
        .into_iter()
        .map(|(name, b)| {
            (
                name,
                b.compute(&inputs, spec, Some(GradDtype::F32)).unwrap(),
            )
        })
        .collect()
}

fn assert_nan_row(what: &str, out: &KdOutput) {
    assert!(out.loss.is_nan(), "{what}: loss {}", out.loss);
    assert!(
        out.row_losses[0].is_nan(),
        "{what}: row loss {}",
        out.row_losses[0]
    );
    let g = out.grad.as_ref().unwrap();
    assert!(g.iter().all(|x| x.is_nan()), "{what}: gradient {g:?}");
    if let Some(gt) = &out.grad_teacher {
        assert!(
            gt.iter().all(|x| x.is_nan()),
            "{what}: teacher gradient {gt:?}"
        );
    }
}

#[test]
fn teacher_nan_forward_kl_and_soft_ce() {
    // Was: forward KL 0 and soft CE 0.3653.
    for divergence in [Divergence::ForwardKl, Divergence::SoftCe] {
        let spec = LossSpec {
            divergence,
            ..Default::default()
        };
        for (name, out) in dense(&[1.0, 2.0, 0.5], &[1.0, f32::NAN, 3.0], &spec) {
            assert_nan_row(&format!("{name} {divergence}"), &out);
        }
    }
}

#[test]
fn student_nan_reverse_kl() {
    let spec = LossSpec {
        divergence: Divergence::ReverseKl,
        ..Default::default()
    };
    for (name, out) in dense(&[1.0, f32::NAN, 3.0], &[0.5, 2.0, 1.0], &spec) {
        assert_nan_row(name, &out);
    }
}

#[test]
fn the_whole_gradient_row_is_nan() {
    // Was: one NaN entry in an otherwise finite gradient row.
    for divergence in Divergence::ALL {
        let spec = LossSpec {
            divergence,
            grad_teacher: true,
            ..Default::default()
        };
        for (name, out) in dense(&[1.0, f32::NAN, 3.0, -1.0], &[0.5, 2.0, 1.0, 0.0], &spec) {
            assert_nan_row(&format!("{name} {divergence}"), &out);
        }
    }
}

#[test]
fn student_plus_inf_is_nan_not_minus_inf() {
    for divergence in Divergence::ALL {
        let spec = LossSpec {
            divergence,
            ..Default::default()
        };
        for (name, out) in dense(&[1.0, f32::INFINITY, 3.0], &[0.5, 2.0, 1.0], &spec) {
            assert_nan_row(&format!("{name} {divergence}"), &out);
        }
    }
}

#[test]
fn topk_value_nan_in_full_and_support() {
    let s = [0.3f32, 1.0, -0.5, 2.0, 0.1];
    let idx = [3i64, 1];
    let vals = [f32::NAN, 0.5];
    let inputs = TopkInputs {
        student: Logits::new(HostData::F32(&s), 1, 5),
        teacher: TopkTeacher {
            indices: TopkIndices::I64(&idx),
            values: HostData::F32(&vals),
            k: 2,
        },
        labels: None,
        row_weights: None,
    };
    for mode in [TopkMode::Full, TopkMode::Support] {
        let spec = LossSpec {
            topk_mode: mode,
            ..Default::default()
        };
        for (name, b) in backends() {
            let out = b
                .compute_topk(&inputs, &spec, Some(GradDtype::F32))
                .unwrap();
            assert_nan_row(&format!("{name} topk-{mode}"), &out);
        }
    }
}
