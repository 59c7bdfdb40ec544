//! The protocol over random uneven shards equals the unsharded oracle
//! (docs/DESIGN.md §3 tolerances, `kdfuse::check`'s comparison), for every
//! divergence, α > 0, top-k teachers, soft-capping, the teacher gradient,
//! row weights, ignored rows, −inf and NaN.

use kdfuse::check::{random_config, run_case, NegInf};
use kdfuse::driver::{Backend, Outputs};
use kdfuse::tensor::TopkTeacher;
use kdfuse::vocab_parallel::{collectives, run_in_process, ShardInputs, ShardTeacher, VocabShard};
use kdfuse::{
    Divergence, Dtype, GradDtype, HostData, KdInputs, KdOutput, Logits, LossSpec, Oracle, Result,
    TopkInputs,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::Mutex;

/// A [`Backend`] that cuts each batch into random contiguous shards (uneven;
/// sometimes the last one padded into the rows' stride, whose NaN must not
/// be read; sometimes one more rank holding padding only), runs the
/// protocol in process and stitches the shards' gradients back.
struct Sharded {
    rng: Mutex<StdRng>,
    /// (world, padded) of every call.
    seen: Mutex<Vec<(usize, bool)>>,
}

/// One rank's columns: global start, columns in memory.
#[derive(Debug, Clone, Copy)]
struct Cut {
    start: usize,
    cols: usize,
}

impl Sharded {
    fn new(seed: u64) -> Self {
        Sharded {
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            seen: Mutex::new(Vec::new()),
        }
    }

    /// The shards of `v` columns; `pad` extra columns exist past V in every
    /// row of every input.
    fn cuts(&self, v: usize, pad: usize) -> Vec<Cut> {
        let mut rng = self.rng.lock().unwrap();
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
                // A rank of padding only, past the vocabulary.
                cuts.push(Cut {
                    start: v + extra,
                    cols: rng.random_range(1..=pad - extra),
                });
            }
        }
        self.seen.lock().unwrap().push((cuts.len(), padded));
        cuts
    }

    /// Runs the shards and writes the stitched results into `out`.
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
        let outs = run_in_process(shards, spec, grad)?;
        let first = &outs[0];
        for (k, o) in outs.iter().enumerate() {
            // Every rank gets bitwise the same loss.
            assert_eq!(
                o.loss.to_bits(),
                first.loss.to_bits(),
                "rank {k}'s loss differs from rank 0's"
            );
            assert_eq!(o.valid_rows, first.valid_rows);
            for (a, b) in o.row_losses.iter().zip(&first.row_losses) {
                assert_eq!(a.to_bits(), b.to_bits(), "rank {k}'s row losses differ");
            }
        }
        out.row_losses.clone_from(&first.row_losses);
        out.loss = Some(first.loss);
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

/// Columns `cut` of a strided matrix.
fn columns<'a>(x: &Logits<'a>, cut: Cut) -> Logits<'a> {
    Logits::strided(x.data.offset(cut.start), x.rows, cut.cols, x.row_stride)
}

fn shard(v: usize, cut: Cut) -> VocabShard {
    VocabShard {
        vocab_start: cut.start,
        vocab_size: v,
    }
}

impl Backend for Sharded {
    fn name(&self) -> &'static str {
        "vocab-parallel"
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

/// Random cases (`kdfuse check`'s generator, V ≤ 3000) against the oracle.
fn sweep(seed: u64, cases: usize) {
    let backend = Sharded::new(seed ^ 0x5eed);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut failures = Vec::new();
    let mut groups = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..cases {
        let mut config = random_config(&mut rng, 3000);
        if config.rows == 0 {
            config.rows = 1;
        }
        let r =
            run_case(&backend, &config).unwrap_or_else(|e| panic!("{}: {e}", config.describe()));
        *groups.entry(config.group()).or_default() += 1;
        if !r.passed {
            failures.push(format!(
                "{} loss_err {:.3e} grad_err {:.3e}",
                config.describe(),
                r.loss_err,
                r.grad_err
            ));
        }
    }
    let seen = backend.seen.lock().unwrap();
    let worlds: Vec<usize> = (1..=5)
        .map(|w| seen.iter().filter(|s| s.0 == w).count())
        .collect();
    let padded = seen.iter().filter(|s| s.1).count();
    println!("{cases} cases: world sizes 1..5 {worlds:?}, {padded} padded; groups {groups:?}");
    assert!(worlds[1] > 0 && worlds[2] > 0 && worlds[3] > 0 && padded > 0);
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn random_shards_match_the_unsharded_oracle() {
    sweep(1, 400);
}

#[test]
fn random_shards_match_the_unsharded_oracle_second_seed() {
    sweep(2024, 400);
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
        let outs = run_in_process(&[cut(0, 4), cut(4, 6)], &spec, Some(GradDtype::F32)).unwrap();
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
    let s = kdfuse_test_logits(1, n * v);
    let t = kdfuse_test_logits(2, n * v);
    let spec = LossSpec {
        divergence: Divergence::Jsd,
        beta: 0.3,
        temperature: 2.0,
        ..LossSpec::default()
    };
    let run = |bounds: &[usize]| -> KdOutput {
        let shards: Vec<ShardInputs> = bounds
            .windows(2)
            .map(|w| ShardInputs {
                student: Logits::strided(HostData::F32(&s).offset(w[0]), n, w[1] - w[0], v),
                teacher: ShardTeacher::Dense(Logits::strided(
                    HostData::F32(&t).offset(w[0]),
                    n,
                    w[1] - w[0],
                    v,
                )),
                labels: None,
                row_weights: None,
                shard: VocabShard {
                    vocab_start: w[0],
                    vocab_size: v,
                },
            })
            .collect();
        run_in_process(&shards, &spec, None).unwrap().remove(0)
    };
    let a = run(&[0, v]);
    let b = run(&[0, 1, 100, 200, v]);
    let reference = Oracle.compute(
        &KdInputs {
            student: Logits::new(HostData::F32(&s), n, v),
            teacher: Logits::new(HostData::F32(&t), n, v),
            labels: None,
            row_weights: None,
        },
        &spec,
        None,
    );
    let reference = reference.unwrap();
    for o in [&a, &b] {
        assert!((o.loss - reference.loss).abs() <= 1e-12 * reference.loss.abs());
    }
}

fn kdfuse_test_logits(seed: u64, len: usize) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(-4.0..4.0f32)).collect()
}

/// A top-k teacher whose support spans every shard, or falls in one shard
/// only (the others hold none of it), in every mode.
#[test]
fn topk_support_in_one_shard_or_across() {
    let (n, v, k) = (2, 64, 5);
    let s = kdfuse_test_logits(3, n * v);
    for idx in [vec![0i64, 13, 27, 40, 63], vec![50, 51, 52, 53, 54]] {
        let idx: Vec<i64> = idx.iter().chain(idx.iter()).copied().collect();
        for mode in kdfuse::TopkMode::ALL {
            let tail = mode == kdfuse::TopkMode::Tail;
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
            let outs = run_in_process(&shards, &spec, Some(GradDtype::F32)).unwrap();
            let reference = Oracle
                .compute_topk(
                    &TopkInputs {
                        student: Logits::new(HostData::F32(&s), n, v),
                        teacher,
                        labels: None,
                        row_weights: None,
                    },
                    &spec,
                    Some(GradDtype::F32),
                )
                .unwrap();
            let rel = (outs[0].loss - reference.loss).abs() / reference.loss.abs();
            assert!(
                rel < 1e-10,
                "{mode}: loss {} vs {}",
                outs[0].loss,
                reference.loss
            );
            let rg = reference.grad.unwrap();
            for (o, w) in outs.iter().zip([0usize, 20, 45, v].windows(2)) {
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
        }
    }
}

/// −inf columns that fill a whole shard (a masked slice of the vocabulary):
/// that rank contributes nothing, and the loss is the unsharded one.
#[test]
fn a_shard_entirely_masked() {
    let (n, v) = (2, 30);
    let mut s = kdfuse_test_logits(4, n * v);
    let mut t = kdfuse_test_logits(5, n * v);
    for r in 0..n {
        for c in 10..20 {
            s[r * v + c] = f32::NEG_INFINITY;
            t[r * v + c] = f32::NEG_INFINITY;
        }
    }
    let _ = NegInf::Shared;
    for divergence in Divergence::ALL {
        let spec = LossSpec {
            divergence,
            ..LossSpec::default()
        };
        let shards: Vec<ShardInputs> = [0usize, 10, 20, v]
            .windows(2)
            .map(|w| ShardInputs {
                student: Logits::strided(HostData::F32(&s).offset(w[0]), n, w[1] - w[0], v),
                teacher: ShardTeacher::Dense(Logits::strided(
                    HostData::F32(&t).offset(w[0]),
                    n,
                    w[1] - w[0],
                    v,
                )),
                labels: None,
                row_weights: None,
                shard: VocabShard {
                    vocab_start: w[0],
                    vocab_size: v,
                },
            })
            .collect();
        let outs = run_in_process(&shards, &spec, Some(GradDtype::F32)).unwrap();
        let reference = Oracle
            .compute(
                &KdInputs {
                    student: Logits::new(HostData::F32(&s), n, v),
                    teacher: Logits::new(HostData::F32(&t), n, v),
                    labels: None,
                    row_weights: None,
                },
                &spec,
                Some(GradDtype::F32),
            )
            .unwrap();
        assert!(
            (outs[1].loss - reference.loss).abs() <= 1e-10 * reference.loss.abs().max(1e-3),
            "{divergence}"
        );
        assert!(outs[1].grad.as_ref().unwrap().iter().all(|&x| x == 0.0));
        let _ = Dtype::F32;
    }
}
