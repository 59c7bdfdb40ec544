//! The vocab-parallel kernels (kernels/vocab_parallel/vp.cu) under the CUDA
//! emulation (`kdfuse::vocab_parallel::emu`): over random uneven shards
//! against the unsharded f64 oracle (docs/DESIGN.md §3's exact tolerances,
//! `kdfuse::check`'s comparison) for every divergence, dtype pair, α > 0,
//! top-k mode, soft-capping, the teacher gradient, row weights, ignored rows,
//! −inf and NaN, with NaN in the padding columns (never read) and every
//! output poisoned before the launches (an unwritten element fails); and
//! their records against the host's, slot by slot.

use kdfuse::check::{generate, random_config, run_case, CaseConfig, NegInf};
use kdfuse::driver::{Backend, Outputs};
use kdfuse::tensor::TopkTeacher;
use kdfuse::vocab_parallel::emu::VpEmu;
use kdfuse::vocab_parallel::{
    collectives, round_stats, slot, Gathered, ShardInputs, ShardTeacher, VocabShard, STATS_WIDTH,
};
use kdfuse::{
    Divergence, GradDtype, HostData, KdInputs, Logits, LossSpec, Precision, Result, TopkInputs,
    TopkMode,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::sync::Mutex;

/// One rank's columns: global start, columns in memory.
#[derive(Debug, Clone, Copy)]
struct Cut {
    start: usize,
    cols: usize,
}

/// Random contiguous shards of `v` columns (uneven; sometimes the last one
/// padded into the rows' stride, whose NaN must not be read; sometimes one
/// more rank of padding only). Returns the cuts and whether they pad.
fn cuts(rng: &mut StdRng, v: usize, pad: usize) -> (Vec<Cut>, bool) {
    let world = rng.random_range(1..=4usize).min(v);
    let mut points: Vec<usize> = Vec::new();
    while points.len() + 1 < world {
        let p = rng.random_range(1..v);
        if !points.contains(&p) {
            points.push(p);
        }
    }
    points.sort();
    points.insert(0, 0);
    points.push(v);
    let mut cuts: Vec<Cut> = points
        .windows(2)
        .map(|w| Cut {
            start: w[0],
            cols: w[1] - w[0],
        })
        .collect();
    let padded = pad > 0 && rng.random_bool(0.5);
    if padded {
        let extra = rng.random_range(1..=pad);
        cuts.last_mut().unwrap().cols += extra;
        if extra < pad && rng.random_bool(0.5) {
            cuts.push(Cut {
                start: v + extra,
                cols: rng.random_range(1..=pad - extra),
            });
        }
    }
    (cuts, padded)
}

fn columns<'a>(x: &Logits<'a>, cut: Cut) -> Logits<'a> {
    Logits::strided(x.data.offset(cut.start), x.rows, cut.cols, x.row_stride)
}

fn shard(v: usize, cut: Cut) -> VocabShard {
    VocabShard {
        vocab_start: cut.start,
        vocab_size: v,
    }
}

/// A [`Backend`] that cuts each batch into random shards, runs the protocol
/// on the emulated kernels and stitches the shards' gradients back.
struct EmuSharded {
    emu: VpEmu,
    rng: Mutex<StdRng>,
    /// (world, padded) of every call.
    seen: Mutex<Vec<(usize, bool)>>,
}

impl EmuSharded {
    fn new(seed: u64) -> Self {
        EmuSharded {
            emu: VpEmu::default(),
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            seen: Mutex::new(Vec::new()),
        }
    }

    fn cuts(&self, v: usize, pad: usize) -> Vec<Cut> {
        let (c, padded) = cuts(&mut self.rng.lock().unwrap(), v, pad);
        self.seen.lock().unwrap().push((c.len(), padded));
        c
    }

    fn stitch(
        &self,
        shards: &[ShardInputs],
        cuts: &[Cut],
        v: usize,
        spec: &LossSpec,
        out: &mut Outputs,
    ) -> Result<()> {
        let grad = out.grad_dtype.map(|d| {
            if d == shards[0].student.dtype() {
                GradDtype::Input
            } else {
                GradDtype::F32
            }
        });
        let outs = self.emu.run_in_process(shards, spec, grad)?;
        let first = &outs[0];
        for (k, o) in outs.iter().enumerate() {
            // Every rank merges the same records in the same order: bitwise
            // the same loss and row losses.
            assert_eq!(o.loss.to_bits(), first.loss.to_bits(), "rank {k}'s loss");
            assert_eq!(o.valid_rows, first.valid_rows);
            for (a, b) in o.row_losses.iter().zip(&first.row_losses) {
                assert_eq!(a.to_bits(), b.to_bits(), "rank {k}'s row losses differ");
            }
        }
        out.row_losses.clone_from(&first.row_losses);
        out.loss = Some(first.loss);
        out.valid_rows = first.valid_rows;
        let n = out.row_losses.len();
        for (o, cut) in outs.iter().zip(cuts) {
            let pairs = [
                (out.grad.as_mut(), o.grad.as_ref()),
                (out.grad_teacher.as_mut(), o.grad_teacher.as_ref()),
            ];
            for (dst, src) in pairs {
                let (Some(dst), Some(src)) = (dst, src) else {
                    continue;
                };
                for r in 0..n {
                    for c in 0..cut.cols {
                        let x = src[r * cut.cols + c];
                        if cut.start + c < v {
                            dst[r * v + cut.start + c] = x;
                        } else {
                            assert_eq!(x, 0.0, "padding column {} has gradient {x}", cut.start + c);
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

impl Backend for EmuSharded {
    fn name(&self) -> &'static str {
        "vocab-parallel-emulated"
    }

    /// The kernels' arithmetic is held to the exact tolerances.
    fn precision(&self, _spec: &LossSpec) -> Precision {
        Precision::Exact
    }

    fn dense(&self, inputs: &KdInputs, spec: &LossSpec, out: &mut Outputs) -> Result<()> {
        let v = inputs.student.cols;
        let pad = (inputs.student.row_stride - v).min(inputs.teacher.row_stride - v);
        let cuts = self.cuts(v, pad);
        let shards: Vec<ShardInputs> = cuts
            .iter()
            .map(|&cut| ShardInputs {
                student: columns(&inputs.student, cut),
                teacher: ShardTeacher::Dense(columns(&inputs.teacher, cut)),
                labels: inputs.labels,
                row_weights: inputs.row_weights,
                shard: shard(v, cut),
            })
            .collect();
        self.stitch(&shards, &cuts, v, spec, out)
    }

    fn topk(&self, inputs: &TopkInputs, spec: &LossSpec, out: &mut Outputs) -> Result<()> {
        let v = inputs.student.cols;
        let cuts = self.cuts(v, inputs.student.row_stride - v);
        let shards: Vec<ShardInputs> = cuts
            .iter()
            .map(|&cut| ShardInputs {
                student: columns(&inputs.student, cut),
                teacher: ShardTeacher::Topk(inputs.teacher),
                labels: inputs.labels,
                row_weights: inputs.row_weights,
                shard: shard(v, cut),
            })
            .collect();
        self.stitch(&shards, &cuts, v, spec, out)
    }
}

/// What a sweep covered, by feature.
fn features(c: &CaseConfig) -> Vec<String> {
    let s = &c.spec;
    let mut f = vec![
        format!("dtype {}", c.dtype),
        format!("grad {:?}", c.grad_dtype),
    ];
    match c.topk {
        Some(_) => f.push(format!("topk {}", s.topk_mode)),
        None => f.push(format!("divergence {}", s.divergence)),
    }
    for (on, name) in [
        (s.alpha > 0.0, "alpha > 0"),
        (s.softcap.is_some(), "softcap"),
        (s.grad_teacher, "grad_teacher"),
        (c.row_weights, "row weights"),
        (c.labels && c.ignore_frac > 0.0, "ignored rows"),
        (c.neg_inf != NegInf::None, "-inf"),
        (c.student_pad > 0 || c.teacher_pad > 0, "strided rows"),
    ] {
        if on {
            f.push(name.into());
        }
    }
    f
}

/// Random cases (`kdfuse check`'s generator) on the emulated kernels against
/// the oracle.
fn sweep(seed: u64, cases: usize, max_cols: usize) -> BTreeMap<String, usize> {
    let backend = EmuSharded::new(seed ^ 0xe3u64);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut failures = Vec::new();
    let mut seen = BTreeMap::<String, usize>::new();
    for _ in 0..cases {
        let mut config = random_config(&mut rng, max_cols);
        if config.rows == 0 {
            config.rows = 1;
        }
        let r =
            run_case(&backend, &config).unwrap_or_else(|e| panic!("{}: {e}", config.describe()));
        for f in features(&config) {
            *seen.entry(f).or_default() += 1;
        }
        if !r.passed {
            failures.push(format!(
                "{} loss_err {:.3e} grad_err {:.3e}",
                config.describe(),
                r.loss_err,
                r.grad_err
            ));
        }
    }
    let calls = backend.seen.lock().unwrap();
    let worlds: Vec<usize> = (1..=5)
        .map(|w| calls.iter().filter(|s| s.0 == w).count())
        .collect();
    let padded = calls.iter().filter(|s| s.1).count();
    println!("{cases} cases: world sizes 1..5 {worlds:?}, {padded} padded; features {seen:?}");
    assert!(worlds[1] > 0 && worlds[2] > 0 && padded > 0);
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    seen
}

#[test]
fn emulated_random_shards_match_the_unsharded_oracle() {
    let mut seen = sweep(7, 160, 1500);
    for (k, v) in sweep(2025, 160, 1500) {
        *seen.entry(k).or_default() += v;
    }
    for f in [
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
    ] {
        assert!(
            seen.get(f).is_some_and(|&n| n > 0),
            "the sweeps never ran {f}: {seen:?}"
        );
    }
}

/// Every slot of two records agrees: the header exactly, maxima and sums to
/// f32 arithmetic (the kernels' exponentials are fp32), non-finite values
/// exactly.
fn assert_records_close(what: &str, emu: &[f64], host: &[f64]) {
    assert_eq!(emu.len(), host.len(), "{what}: lengths");
    for (r, (a, b)) in emu
        .chunks(STATS_WIDTH)
        .zip(host.chunks(STATS_WIDTH))
        .enumerate()
    {
        for i in 0..=slot::BAD {
            assert_eq!(
                a[i].to_bits(),
                b[i].to_bits(),
                "{what} row {r}: header slot {i}"
            );
        }
        // The scale of a row's sums: its largest |value|, and 1.
        let scale = b[5..]
            .iter()
            .filter(|x| x.is_finite())
            .fold(1.0f64, |m, x| m.max(x.abs()));
        for i in slot::BAD + 1..STATS_WIDTH {
            let (x, y) = (a[i], b[i]);
            if !y.is_finite() || !x.is_finite() {
                assert!(
                    x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()),
                    "{what} row {r} slot {i}: {x} vs {y}"
                );
                continue;
            }
            assert!(
                (x - y).abs() <= 2e-5 * (y.abs() + 1e-2 * scale),
                "{what} row {r} slot {i}: {x} vs {y} (scale {scale})"
            );
        }
    }
}

/// The emulated kernels' records equal the host's to f32 arithmetic, in
/// both rounds, for every case of a random sweep (dense and top-k).
#[test]
fn emulated_records_equal_the_host_records() {
    let mut rng = StdRng::seed_from_u64(99);
    let mut checked = [0usize; 2];
    for case in 0..120 {
        let mut config = random_config(&mut rng, 800);
        config.rows = config.rows.max(1);
        let data = generate(&config);
        let spec = &config.spec;
        let dense = data.inputs();
        let topk = data.topk_inputs();
        let v = config.cols;
        let (cs, _) = cuts(&mut rng, v, config.student_pad.min(config.teacher_pad));
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
                shard: shard(v, cut),
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
            let cut = |start, cols| ShardInputs {
                student: Logits::strided(HostData::F32(&s).offset(start), n, cols, v),
                teacher: ShardTeacher::Dense(Logits::strided(
                    HostData::F32(&t).offset(start),
                    n,
                    cols,
                    v,
                )),
                labels: None,
                row_weights: None,
                shard: VocabShard {
                    vocab_start: start,
                    vocab_size: v,
                },
            };
            let outs = emu
                .run_in_process(&[cut(0, 40), cut(40, 30)], &spec, Some(GradDtype::F32))
                .unwrap();
            for o in &outs {
                assert!(o.loss.is_nan(), "{divergence}: the loss hides a NaN");
                assert!(o.row_losses[1].is_nan());
                assert!(o.row_losses[0].is_finite() && o.row_losses[2].is_finite());
                let g = o.grad.as_ref().unwrap();
                let w = g.len() / n;
                assert!(g[w..2 * w].iter().all(|x| x.is_nan()), "{divergence}");
                assert!(g[..w].iter().chain(&g[2 * w..]).all(|x| x.is_finite()));
            }
        }
    }
}

/// The emulated protocol equals the host protocol on a top-k teacher whose
/// support spans every shard or falls in one, in every mode.
#[test]
fn emulated_topk_matches_the_host_protocol() {
    let (n, v, k) = (2, 64, 5);
    let mut rng = StdRng::seed_from_u64(3);
    let s: Vec<f32> = (0..n * v).map(|_| rng.random_range(-4.0..4.0f32)).collect();
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
                indices: kdfuse::TopkIndices::I64(&idx),
                values: HostData::F32(&vals),
                k,
            };
            let shards: Vec<ShardInputs> = [0usize, 20, 45, v]
                .windows(2)
                .map(|w| ShardInputs {
                    student: Logits::strided(HostData::F32(&s).offset(w[0]), n, w[1] - w[0], v),
                    teacher: ShardTeacher::Topk(teacher),
                    labels: None,
                    row_weights: None,
                    shard: VocabShard {
                        vocab_start: w[0],
                        vocab_size: v,
                    },
                })
                .collect();
            let host = kdfuse::vocab_parallel::run_in_process(&shards, &spec, Some(GradDtype::F32))
                .unwrap();
            let emu = VpEmu::default()
                .run_in_process(&shards, &spec, Some(GradDtype::F32))
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
        }
    }
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
