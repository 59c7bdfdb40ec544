//! What the test modules share: shards cut at given column bounds, random
//! logits, and the top-k teachers whose support spans every shard or falls
//! in one.

use kdfuse::tensor::TopkTeacher;
use kdfuse::vocab_parallel::check::{dense_shards, topk_shards, Cut, ShardedSweep};
use kdfuse::vocab_parallel::ShardInputs;
use kdfuse::{HostData, KdInputs, KdOutput, Logits, LossSpec, TopkIndices, TopkInputs, TopkMode};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The cuts between consecutive `bounds` (rank order).
pub fn cuts(bounds: &[usize]) -> Vec<Cut> {
    bounds
        .windows(2)
        .map(|w| Cut {
            start: w[0],
            cols: w[1] - w[0],
        })
        .collect()
}

/// The dense `[n, v]` batch `s`, `t` (no labels, no weights).
pub fn dense<'a>(s: &'a [f32], t: &'a [f32], n: usize, v: usize) -> KdInputs<'a> {
    KdInputs {
        student: Logits::new(HostData::F32(s), n, v),
        teacher: Logits::new(HostData::F32(t), n, v),
        labels: None,
        row_weights: None,
    }
}

/// The student `[n, v]` `s` with a top-k teacher (no labels, no weights).
pub fn topk<'a>(s: &'a [f32], teacher: TopkTeacher<'a>, n: usize, v: usize) -> TopkInputs<'a> {
    TopkInputs {
        student: Logits::new(HostData::F32(s), n, v),
        teacher,
        labels: None,
        row_weights: None,
    }
}

/// The shards of the dense batch `s`, `t` cut at `bounds`.
pub fn dense_at<'a>(
    s: &'a [f32],
    t: &'a [f32],
    n: usize,
    v: usize,
    bounds: &[usize],
) -> Vec<ShardInputs<'a>> {
    dense_shards(&dense(s, t, n, v), &cuts(bounds))
}

/// `len` logits uniform in [−4, 4).
pub fn logits(seed: u64, len: usize) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(-4.0..4.0f32)).collect()
}

/// The shard bounds of the top-k cases over V = [`TOPK_V`].
pub const TOPK_BOUNDS: [usize; 4] = [0, 20, 45, TOPK_V];
/// The vocabulary of the top-k cases.
pub const TOPK_V: usize = 64;

/// Calls `f` with every top-k mode's spec, a 2-row, k = 5 teacher whose
/// support spans every shard of [`TOPK_BOUNDS`] (then one whose support
/// falls in the last shard only), and the shards of the student `s` (`[2,
/// TOPK_V]`) with that teacher.
pub fn for_each_topk_case(
    s: &[f32],
    mut f: impl FnMut(TopkMode, &LossSpec, TopkTeacher, &[ShardInputs]),
) {
    let (n, k) = (2, 5);
    for idx in [vec![0i64, 13, 27, 40, 63], vec![50, 51, 52, 53, 54]] {
        let idx: Vec<i64> = idx.iter().chain(idx.iter()).copied().collect();
        for mode in TopkMode::ALL {
            let tail = mode == TopkMode::Tail;
            let vals: Vec<f32> = (0..n * k)
                .map(|i| {
                    if tail {
                        -1.0 - 0.5 * i as f32
                    } else {
                        3.0 - 0.4 * i as f32
                    }
                })
                .collect();
            let spec = LossSpec {
                topk_mode: mode,
                teacher_log_probs: tail,
                ..LossSpec::default()
            };
            let teacher = TopkTeacher {
                indices: TopkIndices::I64(&idx),
                values: HostData::F32(&vals),
                k,
            };
            let shards = topk_shards(&topk(s, teacher, n, TOPK_V), &cuts(&TOPK_BOUNDS));
            f(mode, &spec, teacher, &shards);
        }
    }
}

/// Every rank's output of a batch whose row 1 (of `n`) holds a NaN: that
/// row's loss and whole gradient are NaN on every rank, the loss too, the
/// other rows finite.
pub fn assert_only_row_1_nan(outs: &[KdOutput], n: usize, what: &str) {
    for o in outs {
        assert!(o.loss.is_nan(), "{what}: the loss hides a NaN");
        assert!(o.row_losses[1].is_nan(), "{what}");
        assert!(o.row_losses[0].is_finite() && o.row_losses[2..].iter().all(|x| x.is_finite()));
        let g = o.grad.as_ref().unwrap();
        let w = g.len() / n;
        assert!(g[w..2 * w].iter().all(|x| x.is_nan()), "{what}");
        assert!(
            g[..w].iter().chain(&g[2 * w..]).all(|x| x.is_finite()),
            "{what}"
        );
    }
}

/// Checks a sweep: no failure, uneven worlds and padded shards seen.
pub fn assert_sweep(s: &ShardedSweep, what: &str) {
    println!(
        "{what}: world sizes 1..5 {:?}, {} padded; features {:?}",
        &s.worlds[1..],
        s.padded,
        s.features
    );
    assert!(s.worlds[1] > 0 && s.worlds[2] > 0 && s.worlds[3] > 0 && s.padded > 0);
    assert!(
        s.failures.is_empty(),
        "{what}: {} failures:\n{}",
        s.failures.len(),
        s.failures.join("\n")
    );
}
