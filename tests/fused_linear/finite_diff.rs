//! Finite differences of the oracle's chunked loss: the gradients with
//! respect to the hidden states, the head and the bias are those of the
//! loss as a function of them (central differences, f64 loss, f32 inputs).

use crate::case::{Case, TeacherKind};
use kdfuse::fused_linear::{self, Chunking};
use kdfuse::{Divergence, Dtype, Oracle, OwnedData, Reduction};

fn loss_of(case: &Case) -> f64 {
    let mut spec = case.linear_spec();
    spec.grads = false;
    fused_linear::compute(&Oracle, &case.inputs(), &spec)
        .unwrap()
        .loss
}

fn bump(data: &mut OwnedData, i: usize, by: f32) {
    match data {
        OwnedData::F32(d) => d[i] += by,
        _ => unreachable!("f32 cases"),
    }
}

#[test]
fn gradients_match_central_differences() {
    for (seed, divergence, reduction, teacher) in [
        (
            1,
            Divergence::ForwardKl,
            Reduction::BatchMean,
            TeacherKind::Linear,
        ),
        (2, Divergence::Jsd, Reduction::Sum, TeacherKind::Logits),
        (
            3,
            Divergence::ReverseKl,
            Reduction::Mean,
            TeacherKind::Linear,
        ),
        (4, Divergence::SoftCe, Reduction::None, TeacherKind::Logits),
        (
            5,
            Divergence::ForwardKl,
            Reduction::BatchMean,
            TeacherKind::Topk(4, kdfuse::TopkMode::Full),
        ),
    ] {
        let mut case = Case::random_with(seed, 5, 6, 17, Dtype::F32, Some(teacher));
        case.spec.divergence = divergence;
        case.spec.beta = if divergence == Divergence::Jsd {
            0.3
        } else {
            0.5
        };
        case.spec.reduction = reduction;
        case.spec.topk_mode = kdfuse::TopkMode::Full;
        case.spec.teacher_log_probs = false;
        case.spec.temperature = 2.0;
        case.spec.softcap = None;
        case.spec.grad_teacher = false;
        case.chunking = Chunking::Rows(2);
        if case.bias.is_none() {
            case.bias = Some(OwnedData::F32(vec![0.25; 17]));
        }
        let out = fused_linear::compute(&Oracle, &case.inputs(), &case.linear_spec()).unwrap();
        let g = out.student.unwrap();
        let eps = 1e-2f32;
        let probes: [(&str, usize, &[f32]); 3] = [
            ("hidden", 5 * 6, &g.hidden),
            ("weight", 17 * 6, &g.weight),
            ("bias", 17, g.bias.as_deref().unwrap()),
        ];
        for (name, len, grad) in probes {
            let mut worst: f64 = 0.0;
            let scale = grad
                .iter()
                .fold(0f64, |m, &x| m.max(x.abs() as f64))
                .max(1e-3);
            for i in (0..len).step_by(len / 7 + 1) {
                let mut plus = case.clone();
                let mut minus = case.clone();
                let (p, m) = match name {
                    "hidden" => (&mut plus.hidden, &mut minus.hidden),
                    "weight" => (&mut plus.weight, &mut minus.weight),
                    _ => (plus.bias.as_mut().unwrap(), minus.bias.as_mut().unwrap()),
                };
                bump(p, i, eps);
                bump(m, i, -eps);
                let fd = (loss_of(&plus) - loss_of(&minus)) / (2.0 * eps as f64);
                worst = worst.max((fd - grad[i] as f64).abs() / scale);
            }
            assert!(worst < 2e-3, "seed {seed}: ∂{name} off the central differences by {worst:e} of its largest entry");
        }
    }
}
