//! Bad inputs and mismatched statistics are errors naming the argument.

use kdfuse::vocab_parallel::{
    finish, round_stats, slot, Gathered, ShardInputs, ShardTeacher, VocabShard, STATS_WIDTH,
};
use kdfuse::{Divergence, HostData, KdError, Logits, LossSpec};

const N: usize = 2;
const V: usize = 8;

fn data() -> (Vec<f32>, Vec<f32>) {
    let s = (0..N * V).map(|i| (i % 5) as f32 * 0.5).collect();
    let t = (0..N * V).map(|i| (i % 3) as f32 * 0.7).collect();
    (s, t)
}

fn shard_of<'a>(
    s: &'a [f32],
    t: &'a [f32],
    start: usize,
    cols: usize,
    labels: Option<&'a [i64]>,
) -> ShardInputs<'a> {
    ShardInputs {
        student: Logits::strided(HostData::F32(s).offset(start), N, cols, V),
        teacher: ShardTeacher::Dense(Logits::strided(HostData::F32(t).offset(start), N, cols, V)),
        labels,
        row_weights: None,
        shard: VocabShard {
            vocab_start: start,
            vocab_size: V,
        },
    }
}

fn arg_of(e: KdError) -> (&'static str, String) {
    match e {
        KdError::InvalidArgument { arg, msg } => (arg, msg),
        e => panic!("not an argument error: {e}"),
    }
}

#[test]
fn bad_arguments_name_themselves() {
    let (s, t) = (data().0, data().1);
    let spec = LossSpec::default();
    let bad_label = [3i64, 9];
    let cases: Vec<(ShardInputs, &str, &str)> = vec![
        (
            ShardInputs {
                shard: VocabShard {
                    vocab_start: 0,
                    vocab_size: 0,
                },
                ..shard_of(&s, &t, 0, 4, None)
            },
            "vocab_size",
            "must be in [1",
        ),
        (
            shard_of(&s, &t, 0, 4, Some(&bad_label)),
            "labels",
            "outside [0, 8)",
        ),
        (
            ShardInputs {
                teacher: ShardTeacher::Dense(Logits::strided(HostData::F32(&t), N, 3, V)),
                ..shard_of(&s, &t, 0, 4, None)
            },
            "teacher",
            "the student's",
        ),
    ];
    for (inputs, arg, msg) in cases {
        let (a, m) = arg_of(round_stats(&inputs, &spec, 1, None).unwrap_err());
        assert_eq!(a, arg, "{m}");
        assert!(m.contains(msg), "{arg}: {m}");
    }
}

#[test]
fn rounds_are_checked() {
    let (s, t) = data();
    let fkl = LossSpec::default();
    let jsd = LossSpec {
        divergence: Divergence::Jsd,
        ..LossSpec::default()
    };
    let a = shard_of(&s, &t, 0, 4, None);
    let b = shard_of(&s, &t, 4, 4, None);
    // No round 2 for forward KL; round 2 needs round 1; round 3 does not exist.
    assert_eq!(
        arg_of(round_stats(&a, &fkl, 2, None).unwrap_err()).0,
        "round"
    );
    assert_eq!(
        arg_of(round_stats(&a, &jsd, 2, None).unwrap_err()).0,
        "round1"
    );
    assert_eq!(
        arg_of(round_stats(&a, &jsd, 3, None).unwrap_err()).0,
        "round"
    );
    let mut g = round_stats(&a, &jsd, 1, None).unwrap();
    g.extend(round_stats(&b, &jsd, 1, None).unwrap());
    let r1 = Gathered {
        stats: &g,
        world: 2,
    };
    // JSD's finish needs round 2.
    let (arg, msg) = arg_of(finish(&a, &jsd, &r1, None, None).unwrap_err());
    assert_eq!(arg, "round2", "{msg}");
    // Round-1 stats given as round 2.
    let (arg, msg) = arg_of(finish(&a, &jsd, &r1, Some(&r1), None).unwrap_err());
    assert_eq!(arg, "round2");
    assert!(msg.contains("expected round 2"), "{msg}");
    // The wrong world size.
    let short = Gathered {
        stats: &g,
        world: 3,
    };
    assert_eq!(
        arg_of(finish(&a, &fkl, &short, None, None).unwrap_err()).0,
        "round1"
    );
}

#[test]
fn shards_must_tile_the_vocabulary() {
    let (s, t) = data();
    let spec = LossSpec::default();
    let check = |parts: &[(usize, usize)], want: &str| {
        let mut g = Vec::new();
        for &(start, cols) in parts {
            g.extend(round_stats(&shard_of(&s, &t, start, cols, None), &spec, 1, None).unwrap());
        }
        let r1 = Gathered {
            stats: &g,
            world: parts.len(),
        };
        let a = shard_of(&s, &t, parts[0].0, parts[0].1, None);
        let (arg, msg) = arg_of(finish(&a, &spec, &r1, None, None).unwrap_err());
        assert_eq!(arg, "round1");
        assert!(msg.contains(want), "{parts:?}: {msg}");
    };
    check(&[(0, 4), (3, 5)], "expected 4");
    check(&[(4, 4), (0, 4)], "expected 0");
    check(&[(0, 4), (4, 3)], "cover columns [0, 7)");
}

#[test]
fn another_layout_version_is_refused() {
    let (s, t) = data();
    let spec = LossSpec::default();
    let a = shard_of(&s, &t, 0, V, None);
    let mut g = round_stats(&a, &spec, 1, None).unwrap();
    assert_eq!(g.len(), N * STATS_WIDTH);
    g[slot::VERSION] = 2.0;
    let r1 = Gathered {
        stats: &g,
        world: 1,
    };
    let (arg, msg) = arg_of(finish(&a, &spec, &r1, None, None).unwrap_err());
    assert_eq!(arg, "round1");
    assert!(msg.contains("layout version 2"), "{msg}");
}
