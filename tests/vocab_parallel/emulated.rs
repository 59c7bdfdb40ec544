//! The vocab-parallel kernels (kernels/vocab_parallel/vp.cu) under the CUDA
//! emulation (`kdfuse::vocab_parallel::emu`): over random uneven shards
//! against the unsharded f64 oracle (docs/DESIGN.md §3's exact tolerances,
//! `kdfuse::check`'s comparison) for every divergence, dtype pair, α > 0,
//! top-k mode, soft-capping, the teacher gradient, row weights, ignored rows,
//! −inf and NaN, with NaN in the padding columns (never read) and every
//! output poisoned before the launches (an unwritten element fails); and
//! their records against the host's, slot by slot.

use crate::fixtures::{
    assert_only_row_1_nan, assert_sweep, dense_at, for_each_topk_case, logits, TOPK_V,
};
use kdfuse::check::{generate, random_config};
use kdfuse::vocab_parallel::check::{
    columns, random_cuts, records_close, shard_of, sweep, ShardedBackend,
};
use kdfuse::vocab_parallel::emu::VpEmu;
use kdfuse::vocab_parallel::{
    collectives, round_stats, slot, Gathered, ShardInputs, ShardTeacher, VocabShard, STATS_WIDTH,
};
use kdfuse::{Divergence, GradDtype, HostData, Logits, LossSpec, Precision};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The features every sweep of the protocol must have covered.
const FEATURES: [&str; 20] = [
    "dtype f32",
    "dtype bf16",
    "dtype f16",
    "grad F32",
    "grad Input",
    "divergence forward-kl",
    "divergence reverse-kl",
    "divergence jsd",
    "divergence tvd",
    "divergence soft-ce",
    "topk support",
    "topk full",
    "topk tail",
    "alpha > 0",
    "softcap",
    "grad_teacher",
    "row weights",
    "ignored rows",
    "-inf",
    "strided rows",
];

#[test]
fn emulated_random_shards_match_the_unsharded_oracle() {
    let emu = VpEmu::default();
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for seed in [7u64, 2025] {
        // The kernels' arithmetic is held to the exact tolerances.
        let backend = ShardedBackend::new(
            seed ^ 0xe3,
            Some(Precision::Exact),
            Box::new(move |shards, spec, grad| emu.run_in_process(shards, spec, grad)),
        );
        let s = sweep(&backend, seed, 100, 1000).unwrap();
        assert_sweep(&s, &format!("seed {seed}"));
        for (k, v) in s.features {
            *seen.entry(k).or_default() += v;
        }
    }
    for f in FEATURES {
        assert!(
            seen.get(f).is_some_and(|&n| n > 0),
            "the sweeps never ran {f}: {seen:?}"
        );
    }
}

fn assert_records_close(what: &str, emu: &[f64], host: &[f64]) {
    if let Err(e) = records_close(emu, host) {
        panic!("{what}: {e}");
    }
}

/// The emulated kernels' records equal the host's to f32 arithmetic, in
/// both rounds, for every case of a random sweep (dense and top-k).
#[test]
fn emulated_records_equal_the_host_records() {
    let mut rng = StdRng::seed_from_u64(99);
    let mut checked = [0usize; 2];
    for case in 0..80 {
        let mut config = random_config(&mut rng, 800);
        config.rows = config.rows.max(1);
        let data = generate(&config);
        let spec = &config.spec;
        let dense = data.inputs();
        let topk = data.topk_inputs();
        let v = config.cols;
        let (cs, _) = random_cuts(&mut rng, v, config.student_pad.min(config.teacher_pad));
        let shards: Vec<ShardInputs> = cs
            .iter()
            .map(|&cut| ShardInputs {
                student: columns(&dense.student, cut),
                teacher: match &topk {
                    Some(t) => ShardTeacher::Topk(t.teacher),
                    None => ShardTeacher::Dense(columns(&dense.teacher, cut)),
                },
                labels: dense.labels,
                row_weights: dense.row_weights,
                shard: shard_of(v, cut),
            })
            .collect();
        let world = shards.len();
        let what = format!("case {case} ({})", config.describe());
        let mut host1 = Vec::new();
        for s in &shards {
            let h = round_stats(s, spec, 1, None).unwrap();
            let e = VpEmu::default().round_stats(s, spec, 1, None).unwrap();
            assert_records_close(&format!("{what} round 1"), &e, &h);
            host1.extend(h);
        }
        checked[0] += 1;
        if collectives(spec) == 2 {
            let g1 = Gathered {
                stats: &host1,
                world,
            };
            for s in &shards {
                let h = round_stats(s, spec, 2, Some(&g1)).unwrap();
                let e = VpEmu::default().round_stats(s, spec, 2, Some(&g1)).unwrap();
                assert_records_close(&format!("{what} round 2"), &e, &h);
            }
            checked[1] += 1;
        }
    }
    println!("records compared: {checked:?} (round 1, round 2 cases)");
    assert!(checked[1] > 0);
}

/// A NaN in one shard makes the whole row NaN on every rank, its gradient
/// included; the other rows stay finite. Also through a block of one warp
/// and a grid of one block (grid-stride rows).
#[test]
fn emulated_nan_in_one_shard_poisons_the_row_everywhere() {
    let (n, v) = (3, 70);
    let mut s: Vec<f32> = (0..n * v).map(|i| (i % 7) as f32 * 0.3).collect();
    let t: Vec<f32> = (0..n * v).map(|i| (i % 5) as f32 * 0.2).collect();
    s[v + 58] = f32::NAN;
    for emu in [VpEmu::default(), VpEmu { grid: 1, block: 32 }] {
        for divergence in Divergence::ALL {
            let spec = LossSpec {
                divergence,
                ..LossSpec::default()
            };
            let shards = dense_at(&s, &t, n, v, &[0, 40, v]);
            let outs = emu
                .run_in_process(&shards, &spec, Some(GradDtype::F32))
                .unwrap();
            assert_only_row_1_nan(&outs, n, &divergence.to_string());
        }
    }
}

/// The emulated protocol equals the host protocol on a top-k teacher whose
/// support spans every shard or falls in one, in every mode.
#[test]
fn emulated_topk_matches_the_host_protocol() {
    let s = logits(3, 2 * TOPK_V);
    for_each_topk_case(&s, |mode, spec, _, shards| {
        let host =
            kdfuse::vocab_parallel::run_in_process(shards, spec, Some(GradDtype::F32)).unwrap();
        let emu = VpEmu::default()
            .run_in_process(shards, spec, Some(GradDtype::F32))
            .unwrap();
        for (h, e) in host.iter().zip(&emu) {
            assert!(
                (h.loss - e.loss).abs() <= 1e-6 * h.loss.abs(),
                "{mode}: loss {} vs {}",
                e.loss,
                h.loss
            );
            let (hg, eg) = (h.grad.as_ref().unwrap(), e.grad.as_ref().unwrap());
            for (a, b) in eg.iter().zip(hg) {
                assert!(
                    (a - b).abs() <= 1e-6 * b.abs().max(1e-3),
                    "{mode}: {a} vs {b}"
                );
            }
        }
    });
}

/// Rows that do not count (ignored label, weight 0) get a zero gradient and
/// loss and a header-only record; padding columns get 0, even in a NaN row.
#[test]
fn emulated_ignored_rows_and_padding() {
    let (n, v, stride) = (4, 50, 56);
    let mut rng = StdRng::seed_from_u64(5);
    let mut s: Vec<f32> = (0..n * stride)
        .map(|_| rng.random_range(-3.0..3.0f32))
        .collect();
    let mut t: Vec<f32> = (0..n * stride)
        .map(|_| rng.random_range(-3.0..3.0f32))
        .collect();
    for r in 0..n {
        for c in v..stride {
            s[r * stride + c] = f32::NAN;
            t[r * stride + c] = f32::NAN;
        }
    }
    s[3 * stride + 7] = f32::NAN; // row 3 is NaN
    let labels = [3i64, -100, 40, 9];
    let weights = [1.0f32, 1.0, 0.0, 0.5];
    let spec = LossSpec {
        divergence: Divergence::Tvd,
        alpha: 0.3,
        grad_teacher: true,
        ..LossSpec::default()
    };
    // Rank 1 holds columns [30, 56): 20 real, 6 padding.
    let shards: Vec<ShardInputs> = [(0usize, 30usize), (30, 26)]
        .iter()
        .map(|&(start, cols)| ShardInputs {
            student: Logits::strided(HostData::F32(&s).offset(start), n, cols, stride),
            teacher: ShardTeacher::Dense(Logits::strided(
                HostData::F32(&t).offset(start),
                n,
                cols,
                stride,
            )),
            labels: Some(&labels),
            row_weights: Some(&weights),
            shard: VocabShard {
                vocab_start: start,
                vocab_size: v,
            },
        })
        .collect();
    let emu = VpEmu::default();
    let outs = emu
        .run_in_process(&shards, &spec, Some(GradDtype::F32))
        .unwrap();
    let host =
        kdfuse::vocab_parallel::run_in_process(&shards, &spec, Some(GradDtype::F32)).unwrap();
    for (k, (o, h)) in outs.iter().zip(&host).enumerate() {
        assert_eq!(o.valid_rows, 3);
        assert_eq!(o.row_losses[1], 0.0);
        assert_eq!(o.row_losses[2], 0.0);
        assert!(o.row_losses[3].is_nan() && o.loss.is_nan());
        assert!((o.row_losses[0] - h.row_losses[0]).abs() <= 1e-6 * h.row_losses[0].abs());
        let w = shards[k].student.cols;
        for g in [o.grad.as_ref().unwrap(), o.grad_teacher.as_ref().unwrap()] {
            assert!(
                g[w..3 * w].iter().all(|&x| x == 0.0),
                "rank {k}: ignored rows"
            );
            let real = shards[k].shard.real_columns(w);
            for r in 0..n {
                assert!(g[r * w + real..(r + 1) * w].iter().all(|&x| x == 0.0));
            }
            assert!(g[3 * w..3 * w + real].iter().all(|x| x.is_nan()));
        }
        let rec = emu.round_stats(&shards[k], &spec, 1, None).unwrap();
        for r in [1, 2] {
            assert!(rec[r * STATS_WIDTH + slot::BAD..(r + 1) * STATS_WIDTH]
                .iter()
                .all(|&x| x == 0.0));
        }
    }
}

/// The GPU sweep's vocabularies (V up to 40000) under the emulation; slow,
/// run with `--ignored`.
#[test]
#[ignore]
fn emulated_large_vocabularies() {
    let emu = VpEmu::default();
    for seed in [17u64, 18, 19] {
        let backend = ShardedBackend::new(
            seed,
            Some(Precision::Exact),
            Box::new(move |shards, spec, grad| emu.run_in_process(shards, spec, grad)),
        );
        let s = sweep(&backend, seed, 150, 40_000).unwrap();
        assert_sweep(&s, &format!("seed {seed}, V ≤ 40000"));
    }
}
