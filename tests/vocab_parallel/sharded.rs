//! The protocol over random uneven shards equals the unsharded oracle
//! (docs/DESIGN.md §3 tolerances, `kdfuse::check`'s comparison), for every
//! divergence, α > 0, top-k teachers, soft-capping, the teacher gradient,
//! row weights, ignored rows, −inf and NaN.

use crate::fixtures::{
    assert_only_row_1_nan, assert_sweep, dense, dense_at, for_each_topk_case, logits, topk,
    TOPK_BOUNDS, TOPK_V,
};
use kdfuse::driver::Backend;
use kdfuse::vocab_parallel::check::{sweep, ShardedBackend};
use kdfuse::vocab_parallel::{collectives, run_in_process};
use kdfuse::{Divergence, GradDtype, LossSpec, Oracle, Precision};

/// Random cases (`kdfuse check`'s generator, V ≤ 3000) through random
/// uneven shards (some padded into the rows' stride, whose NaN must not be
/// read; some with a rank of padding only) against the oracle, at the exact
/// tolerances (the host protocol is f64).
fn random_sweep(seed: u64, cases: usize) {
    let backend = ShardedBackend::new(
        seed ^ 0x5eed,
        Some(Precision::Exact),
        Box::new(run_in_process),
    );
    let s = sweep(&backend, seed, cases, 3000).unwrap();
    assert_sweep(&s, &format!("{cases} cases, seed {seed}"));
}

#[test]
fn random_shards_match_the_unsharded_oracle() {
    random_sweep(1, 400);
}

#[test]
fn random_shards_match_the_unsharded_oracle_second_seed() {
    random_sweep(2024, 400);
}

/// A NaN in one shard makes the whole row NaN on every rank, its gradient
/// included; the other rows stay finite.
#[test]
fn nan_in_one_shard_poisons_the_row_everywhere() {
    let (n, v) = (3, 10);
    let mut s: Vec<f32> = (0..n * v).map(|i| (i % 7) as f32 * 0.3).collect();
    let t: Vec<f32> = (0..n * v).map(|i| (i % 5) as f32 * 0.2).collect();
    s[v + 8] = f32::NAN;
    for divergence in Divergence::ALL {
        let spec = LossSpec {
            divergence,
            ..LossSpec::default()
        };
        let shards = dense_at(&s, &t, n, v, &[0, 4, v]);
        let outs = run_in_process(&shards, &spec, Some(GradDtype::F32)).unwrap();
        assert_only_row_1_nan(&outs, n, &divergence.to_string());
    }
}

/// Forward KL, reverse KL and soft CE need one all-gather; JSD and TVD two
/// (one when α = 1 or at JSD's endpoints).
#[test]
fn collectives_per_divergence() {
    let with = |divergence, beta, alpha| LossSpec {
        divergence,
        beta,
        alpha,
        ..LossSpec::default()
    };
    assert_eq!(collectives(&with(Divergence::ForwardKl, 0.5, 0.0)), 1);
    assert_eq!(collectives(&with(Divergence::ReverseKl, 0.5, 0.0)), 1);
    assert_eq!(collectives(&with(Divergence::SoftCe, 0.5, 0.3)), 1);
    assert_eq!(collectives(&with(Divergence::Jsd, 0.3, 0.0)), 2);
    assert_eq!(collectives(&with(Divergence::Jsd, 0.0, 0.0)), 1);
    assert_eq!(collectives(&with(Divergence::Tvd, 0.5, 0.5)), 2);
    assert_eq!(collectives(&with(Divergence::Tvd, 0.5, 1.0)), 1);
}

/// The sharded result does not depend on where the cuts fall: two cuttings
/// of the same batch agree to f64 rounding (not bitwise: the sums are split
/// differently).
#[test]
fn different_cuts_agree() {
    let (n, v) = (4, 257);
    let s = logits(1, n * v);
    let t = logits(2, n * v);
    let spec = LossSpec {
        divergence: Divergence::Jsd,
        beta: 0.3,
        temperature: 2.0,
        ..LossSpec::default()
    };
    let run = |bounds: &[usize]| {
        run_in_process(&dense_at(&s, &t, n, v, bounds), &spec, None)
            .unwrap()
            .remove(0)
    };
    let a = run(&[0, v]);
    let b = run(&[0, 1, 100, 200, v]);
    let reference = Oracle.compute(&dense(&s, &t, n, v), &spec, None).unwrap();
    for o in [&a, &b] {
        assert!((o.loss - reference.loss).abs() <= 1e-12 * reference.loss.abs());
    }
}

/// A top-k teacher whose support spans every shard, or falls in one shard
/// only (the others hold none of it), in every mode.
#[test]
fn topk_support_in_one_shard_or_across() {
    let (n, v) = (2, TOPK_V);
    let s = logits(3, n * v);
    for_each_topk_case(&s, |mode, spec, teacher, shards| {
        let outs = run_in_process(shards, spec, Some(GradDtype::F32)).unwrap();
        let reference = Oracle
            .compute_topk(&topk(&s, teacher, n, v), spec, Some(GradDtype::F32))
            .unwrap();
        let rel = (outs[0].loss - reference.loss).abs() / reference.loss.abs();
        assert!(
            rel < 1e-10,
            "{mode}: loss {} vs {}",
            outs[0].loss,
            reference.loss
        );
        let rg = reference.grad.unwrap();
        for (o, w) in outs.iter().zip(TOPK_BOUNDS.windows(2)) {
            let g = o.grad.as_ref().unwrap();
            let width = w[1] - w[0];
            for r in 0..n {
                for c in 0..width {
                    let (a, b) = (g[r * width + c], rg[r * v + w[0] + c]);
                    assert!(
                        (a - b).abs() <= 1e-6 * b.abs().max(1e-3),
                        "{mode} r{r} c{}",
                        w[0] + c
                    );
                }
            }
        }
    });
}

/// −inf columns that fill a whole shard (a masked slice of the vocabulary):
/// that rank contributes nothing, and the loss is the unsharded one.
#[test]
fn a_shard_entirely_masked() {
    let (n, v) = (2, 30);
    let mut s = logits(4, n * v);
    let mut t = logits(5, n * v);
    for r in 0..n {
        for c in 10..20 {
            s[r * v + c] = f32::NEG_INFINITY;
            t[r * v + c] = f32::NEG_INFINITY;
        }
    }
    for divergence in Divergence::ALL {
        let spec = LossSpec {
            divergence,
            ..LossSpec::default()
        };
        let shards = dense_at(&s, &t, n, v, &[0, 10, 20, v]);
        let outs = run_in_process(&shards, &spec, Some(GradDtype::F32)).unwrap();
        let reference = Oracle
            .compute(&dense(&s, &t, n, v), &spec, Some(GradDtype::F32))
            .unwrap();
        assert!(
            (outs[1].loss - reference.loss).abs() <= 1e-10 * reference.loss.abs().max(1e-3),
            "{divergence}"
        );
        assert!(outs[1].grad.as_ref().unwrap().iter().all(|&x| x == 0.0));
    }
}
