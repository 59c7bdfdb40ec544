//! Cross-checks of the loss-family options on the fast CPU backend and on
//! the CUDA kernels under emulation: where two definitions must coincide
//! (a top-k teacher with k = V and the dense loss, a huge soft-cap and none,
//! soft CE's gradient and forward KL's), and the top-k validation pass.

use crate::common::{for_each_backend, inputs, topk_inputs};
use kdfuse::check::rel_l2;
use kdfuse::emu::emu_validate_topk;
use kdfuse::{Backend, Divergence, GradDtype, KdInputs, KdOutput, LossSpec, TopkIndices, TopkMode};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn random(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

fn assert_close(a: &KdOutput, b: &KdOutput, tol: f64, what: &str) {
    let le = rel_l2(&a.row_losses, &b.row_losses);
    let ge = rel_l2(
        &f64s(a.grad.as_ref().unwrap()),
        &f64s(b.grad.as_ref().unwrap()),
    );
    assert!(
        le <= tol && ge <= tol,
        "{what}: loss err {le:.2e}, grad err {ge:.2e}"
    );
}

/// Log-softmax rows of `t` (f32), for a teacher given as log-probs.
fn log_softmax_rows(t: &[f32], v: usize) -> Vec<f32> {
    t.chunks(v)
        .flat_map(|r| {
            let x: Vec<f64> = r.iter().map(|&a| a as f64).collect();
            kdfuse::oracle::log_softmax(&x, 1.0)
                .into_iter()
                .map(|a| a as f32)
        })
        .collect()
}

fn topk_with_every_index_equals_the_dense_loss(b: &dyn Backend) {
    let (n, v) = (5, 301);
    let s = random(1, n * v, 4.0);
    let logits = random(2, n * v, 4.0);
    let mut rng = StdRng::seed_from_u64(3);
    for mode in TopkMode::ALL {
        let tail = mode == TopkMode::Tail;
        let t = if tail {
            log_softmax_rows(&logits, v)
        } else {
            logits.clone()
        };
        // Every row's indices a permutation of the vocabulary.
        let mut idx = Vec::new();
        let mut vals = Vec::new();
        for r in 0..n {
            let mut perm: Vec<usize> = (0..v).collect();
            for i in (1..v).rev() {
                perm.swap(i, rng.random_range(0..=i));
            }
            for j in perm {
                idx.push(j as i32);
                vals.push(t[r * v + j]);
            }
        }
        let labels: Vec<i64> = (0..n as i64).map(|r| r * 7).collect();
        let spec = LossSpec {
            temperature: if tail { 1.0 } else { 2.0 },
            alpha: 0.3,
            teacher_log_probs: tail,
            topk_mode: mode,
            ..Default::default()
        };
        let dense = inputs(&s, &t, n, v, Some(&labels));
        let sparse = topk_inputs(&s, n, v, TopkIndices::I32(&idx), &vals, v, Some(&labels));
        let d = b.compute(&dense, &spec, Some(GradDtype::F32)).unwrap();
        let k = b
            .compute_topk(&sparse, &spec, Some(GradDtype::F32))
            .unwrap();
        assert_close(&k, &d, 2e-5, &format!("{} {mode}", b.name()));
    }
}
for_each_backend!([cpu, emu, cuda] topk_with_every_index_equals_the_dense_loss(b));

fn a_huge_softcap_is_no_softcap(b: &dyn Backend) {
    let (n, v) = (4, 517);
    let s = random(4, n * v, 3.0);
    let t = random(5, n * v, 3.0);
    for divergence in Divergence::ALL {
        let plain = LossSpec {
            divergence,
            temperature: 1.5,
            grad_teacher: true,
            ..Default::default()
        };
        let capped = LossSpec {
            softcap: Some(1e7),
            ..plain.clone()
        };
        let inputs = inputs(&s, &t, n, v, None);
        let a = b.compute(&inputs, &plain, Some(GradDtype::F32)).unwrap();
        let c = b.compute(&inputs, &capped, Some(GradDtype::F32)).unwrap();
        assert_close(&c, &a, 1e-5, &format!("{} {divergence}", b.name()));
        let ge = rel_l2(
            &f64s(a.grad_teacher.as_ref().unwrap()),
            &f64s(c.grad_teacher.as_ref().unwrap()),
        );
        assert!(
            ge <= 1e-5,
            "{} {divergence}: teacher grad err {ge:.2e}",
            b.name()
        );
    }
}
for_each_backend!([cpu, emu, cuda] a_huge_softcap_is_no_softcap(b));

fn soft_ce_has_forward_kl_student_gradient(b: &dyn Backend) {
    let (n, v) = (3, 1000);
    let s = random(6, n * v, 3.0);
    let t = random(7, n * v, 3.0);
    let inputs = inputs(&s, &t, n, v, None);
    let spec = |divergence| LossSpec {
        divergence,
        temperature: 3.0,
        softcap: Some(5.0),
        ..Default::default()
    };
    let f = b
        .compute(&inputs, &spec(Divergence::ForwardKl), Some(GradDtype::F32))
        .unwrap();
    let c = b
        .compute(&inputs, &spec(Divergence::SoftCe), Some(GradDtype::F32))
        .unwrap();
    let ge = rel_l2(
        &f64s(c.grad.as_ref().unwrap()),
        &f64s(f.grad.as_ref().unwrap()),
    );
    assert!(ge <= 1e-6, "{}: {ge:.2e}", b.name());
    assert!(c.loss > f.loss, "soft CE adds the teacher entropy");
}
for_each_backend!([cpu, emu, cuda] soft_ce_has_forward_kl_student_gradient(b));

fn row_weights_scale_rows_and_zero_skips(b: &dyn Backend) {
    let (n, v) = (4, 333);
    let s = random(8, n * v, 3.0);
    let t = random(9, n * v, 3.0);
    let w = [1.0f32, 0.0, 2.5, 0.5];
    let spec = LossSpec {
        divergence: Divergence::Jsd,
        grad_teacher: true,
        ..Default::default()
    };
    let base = inputs(&s, &t, n, v, None);
    let weighted = KdInputs {
        row_weights: Some(&w),
        ..base
    };
    let a = b.compute(&base, &spec, Some(GradDtype::F32)).unwrap();
    let c = b.compute(&weighted, &spec, Some(GradDtype::F32)).unwrap();
    for r in 0..n {
        let want = w[r] as f64 * a.row_losses[r];
        assert!((c.row_losses[r] - want).abs() <= 1e-6 * want.abs().max(1e-3));
        for (gw, ga) in [(&c.grad, &a.grad), (&c.grad_teacher, &a.grad_teacher)] {
            let (gw, ga) = (gw.as_ref().unwrap(), ga.as_ref().unwrap());
            for j in 0..v {
                let want = w[r] * ga[r * v + j];
                assert!((gw[r * v + j] - want).abs() <= 1e-6 * want.abs().max(1e-9));
            }
        }
    }
    // batchmean divides by the rows, not by the weights' sum.
    let want: f64 = c.row_losses.iter().sum::<f64>() / n as f64;
    assert!((c.loss - want).abs() <= 1e-6 * want.abs());
}
for_each_backend!([cpu, emu, cuda] row_weights_scale_rows_and_zero_skips(b));

#[test]
fn validation_pass_reports_the_first_bad_row() {
    let (n, k, v) = (6, 4, 50);
    let mut idx: Vec<i64> = (0..n * k).map(|i| (i % k) as i64 * 3).collect();
    assert_eq!(emu_validate_topk(&TopkIndices::I64(&idx), n, k, v), None);
    idx[4 * k + 2] = idx[4 * k]; // row 4 repeats an index
    idx[5 * k + 1] = v as i64; // row 5 leaves the vocabulary
    assert_eq!(emu_validate_topk(&TopkIndices::I64(&idx), n, k, v), Some(4));
    let idx32: Vec<i32> = idx.iter().map(|&j| j as i32).collect();
    assert_eq!(
        emu_validate_topk(&TopkIndices::I32(&idx32), n, k, v),
        Some(4)
    );
    idx[4 * k + 2] = 40;
    assert_eq!(emu_validate_topk(&TopkIndices::I64(&idx), n, k, v), Some(5));
    idx[2 * k] = -1;
    assert_eq!(emu_validate_topk(&TopkIndices::I64(&idx), n, k, v), Some(2));
}
