//! Regressions of the fuzzing pass that found NaN hidden and +inf turned into
//! −inf (issue 18): each reported input, on the oracle, the CPU backend and
//! the CUDA kernels under the emulation (through `kdfuse loss`:
//! cli/tests/cli/nan.rs).

use crate::common::{self, for_each_backend, On};

use kdfuse::{
    Backend, Divergence, GradDtype, HostData, KdOutput, Logits, LossSpec, TopkIndices, TopkInputs,
    TopkMode, TopkTeacher,
};

/// One row through `b`.
fn dense(b: &dyn Backend, s: &[f32], t: &[f32], spec: &LossSpec) -> KdOutput {
    let inputs = common::inputs(s, t, 1, s.len(), None);
    b.compute(&inputs, spec, Some(GradDtype::F32)).unwrap()
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

/// Was: forward KL 0 and soft CE 0.3653.
fn teacher_nan_forward_kl_and_soft_ce(b: &dyn Backend, on: On) {
    for divergence in [Divergence::ForwardKl, Divergence::SoftCe] {
        let spec = LossSpec {
            divergence,
            ..Default::default()
        };
        let out = dense(b, &[1.0, 2.0, 0.5], &[1.0, f32::NAN, 3.0], &spec);
        assert_nan_row(&format!("{on} {divergence}"), &out);
    }
}
for_each_backend!(teacher_nan_forward_kl_and_soft_ce(b, on));

fn student_nan_reverse_kl(b: &dyn Backend, on: On) {
    let spec = LossSpec {
        divergence: Divergence::ReverseKl,
        ..Default::default()
    };
    let out = dense(b, &[1.0, f32::NAN, 3.0], &[0.5, 2.0, 1.0], &spec);
    assert_nan_row(&on.to_string(), &out);
}
for_each_backend!(student_nan_reverse_kl(b, on));

/// Was: one NaN entry in an otherwise finite gradient row.
fn the_whole_gradient_row_is_nan(b: &dyn Backend, on: On) {
    for divergence in Divergence::ALL {
        let spec = LossSpec {
            divergence,
            grad_teacher: true,
            ..Default::default()
        };
        let out = dense(b, &[1.0, f32::NAN, 3.0, -1.0], &[0.5, 2.0, 1.0, 0.0], &spec);
        assert_nan_row(&format!("{on} {divergence}"), &out);
    }
}
for_each_backend!(the_whole_gradient_row_is_nan(b, on));

fn student_plus_inf_is_nan_not_minus_inf(b: &dyn Backend, on: On) {
    for divergence in Divergence::ALL {
        let spec = LossSpec {
            divergence,
            ..Default::default()
        };
        let out = dense(b, &[1.0, f32::INFINITY, 3.0], &[0.5, 2.0, 1.0], &spec);
        assert_nan_row(&format!("{on} {divergence}"), &out);
    }
}
for_each_backend!(student_plus_inf_is_nan_not_minus_inf(b, on));

fn topk_value_nan_in_full_and_support(b: &dyn Backend, on: On) {
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
        let out = b
            .compute_topk(&inputs, &spec, Some(GradDtype::F32))
            .unwrap();
        assert_nan_row(&format!("{on} topk-{mode}"), &out);
    }
}
for_each_backend!(topk_value_nan_in_full_and_support(b, on));
