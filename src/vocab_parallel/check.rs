//! Checking an implementation of the protocol against the unsharded oracle
//! (`kdfuse::check`'s cases and comparison): [`ShardedBackend`] cuts every
//! batch into random uneven shards, runs the protocol with a given runner
//! (the host's [`super::run_in_process`], the emulated kernels', the CUDA
//! kernels') and stitches the shards' results back into one [`Backend`]
//! call; [`sweep`] runs random cases through it. Used by the tests (CPU and
//! GPU).

use super::{ShardInputs, ShardTeacher, VocabShard};
use crate::check::{random_config, run_case, CaseConfig, NegInf};
use crate::driver::{Backend, KdOutput, Outputs};
use crate::error::Result;
use crate::spec::{LossSpec, Precision};
use crate::tensor::{GradDtype, KdInputs, Logits, TopkInputs};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::sync::Mutex;

/// One rank's columns: global start, columns in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    /// The global index of its first column.
    pub start: usize,
    /// Its columns in memory (padding included).
    pub cols: usize,
}

/// Random contiguous shards of `v` columns: 1–4 uneven ones; when the rows
/// have `pad` > 0 columns of padding past V, sometimes the last shard runs
/// into them (their NaN must not be read) and sometimes one more rank holds
/// padding only. Returns the cuts and whether they pad.
pub fn random_cuts(rng: &mut StdRng, v: usize, pad: usize) -> (Vec<Cut>, bool) {
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

/// Columns `cut` of a strided matrix.
pub fn columns<'a>(x: &Logits<'a>, cut: Cut) -> Logits<'a> {
    Logits::strided(x.data.offset(cut.start), x.rows, cut.cols, x.row_stride)
}

/// The shard of `cut` in a vocabulary of `v`.
pub fn shard_of(v: usize, cut: Cut) -> VocabShard {
    VocabShard {
        vocab_start: cut.start,
        vocab_size: v,
    }
}

/// The shards of a dense batch cut at `cuts`.
pub fn dense_shards<'a>(inputs: &KdInputs<'a>, cuts: &[Cut]) -> Vec<ShardInputs<'a>> {
    let v = inputs.student.cols;
    cuts.iter()
        .map(|&cut| ShardInputs {
            student: columns(&inputs.student, cut),
            teacher: ShardTeacher::Dense(columns(&inputs.teacher, cut)),
            labels: inputs.labels,
            row_weights: inputs.row_weights,
            shard: shard_of(v, cut),
        })
        .collect()
}

/// The shards of a top-k batch cut at `cuts` (the teacher whole on each).
pub fn topk_shards<'a>(inputs: &TopkInputs<'a>, cuts: &[Cut]) -> Vec<ShardInputs<'a>> {
    let v = inputs.student.cols;
    cuts.iter()
        .map(|&cut| ShardInputs {
            student: columns(&inputs.student, cut),
            teacher: ShardTeacher::Topk(inputs.teacher),
            labels: inputs.labels,
            row_weights: inputs.row_weights,
            shard: shard_of(v, cut),
        })
        .collect()
}

/// Runs the whole protocol over shards (rank order): every rank's output.
pub type Runner<'r> = dyn Fn(&[ShardInputs], &LossSpec, Option<GradDtype>) -> Result<Vec<KdOutput>>
    + Send
    + Sync
    + 'r;

/// A [`Backend`] that cuts each batch into random shards, runs the protocol
/// with its runner and stitches the shards back; it asserts that every rank
/// got bitwise the same loss and row losses and that padding columns got a
/// zero gradient.
pub struct ShardedBackend<'r> {
    run: Box<Runner<'r>>,
    precision: Option<Precision>,
    rng: Mutex<StdRng>,
    /// (world, padded) of every call.
    pub seen: Mutex<Vec<(usize, bool)>>,
}

impl<'r> ShardedBackend<'r> {
    /// Shards cut by a generator seeded with `seed`, run by `run`; judged at
    /// `precision`'s tolerances (`None`: the spec's kernel precision).
    pub fn new(seed: u64, precision: Option<Precision>, run: Box<Runner<'r>>) -> Self {
        ShardedBackend {
            run,
            precision,
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            seen: Mutex::new(Vec::new()),
        }
    }

    fn cuts(&self, v: usize, pad: usize) -> Vec<Cut> {
        let (c, padded) = random_cuts(&mut self.rng.lock().unwrap(), v, pad);
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
        let outs = (self.run)(shards, spec, grad)?;
        let first = &outs[0];
        for (k, o) in outs.iter().enumerate() {
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

impl Backend for ShardedBackend<'_> {
    fn name(&self) -> &'static str {
        "vocab-parallel"
    }

    fn precision(&self, spec: &LossSpec) -> Precision {
        self.precision.unwrap_or_else(|| spec.kernel_precision())
    }

    fn dense(&self, inputs: &KdInputs, spec: &LossSpec, out: &mut Outputs) -> Result<()> {
        let v = inputs.student.cols;
        let pad = (inputs.student.row_stride - v).min(inputs.teacher.row_stride - v);
        let cuts = self.cuts(v, pad);
        self.stitch(&dense_shards(inputs, &cuts), &cuts, v, spec, out)
    }

    fn topk(&self, inputs: &TopkInputs, spec: &LossSpec, out: &mut Outputs) -> Result<()> {
        let v = inputs.student.cols;
        let cuts = self.cuts(v, inputs.student.row_stride - v);
        self.stitch(&topk_shards(inputs, &cuts), &cuts, v, spec, out)
    }
}

/// The features a case exercises (dtype, gradient dtype, divergence or
/// top-k mode, α > 0, soft-capping, ...), for a sweep's coverage.
pub fn features(c: &CaseConfig) -> Vec<String> {
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

/// What a [`sweep`] saw.
#[derive(Debug, Default)]
pub struct ShardedSweep {
    /// One line per failed case.
    pub failures: Vec<String>,
    /// Cases per feature ([`features`]).
    pub features: BTreeMap<String, usize>,
    /// Calls per world size 1..=5 (index 0 unused).
    pub worlds: [usize; 6],
    /// Calls whose shards ran into the padding.
    pub padded: usize,
}

/// `cases` random cases (`kdfuse check`'s generator, V ≤ `max_cols`, N ≥ 1)
/// through `backend` against the oracle.
pub fn sweep(
    backend: &ShardedBackend,
    seed: u64,
    cases: usize,
    max_cols: usize,
) -> Result<ShardedSweep> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = ShardedSweep::default();
    for _ in 0..cases {
        let mut config = random_config(&mut rng, max_cols);
        config.rows = config.rows.max(1);
        let r = run_case(backend, &config)?;
        for f in features(&config) {
            *out.features.entry(f).or_default() += 1;
        }
        if !r.passed {
            out.failures.push(format!(
                "{} loss_err {:.3e} grad_err {:.3e}",
                config.describe(),
                r.loss_err,
                r.grad_err
            ));
        }
    }
    for &(w, padded) in backend.seen.lock().unwrap().iter() {
        out.worlds[w.min(5)] += 1;
        out.padded += padded as usize;
    }
    Ok(out)
}

/// Whether two ranks' records agree slot by slot: the header exactly,
/// maxima, sums and accumulators to f32 arithmetic (2e-5 of the value plus
/// 1e-2 of the row's largest finite |slot|; the kernels' exponentials are
/// fp32, the host's f64), non-finite values exactly. `Err` names the first
/// difference.
pub fn records_close(a: &[f64], b: &[f64]) -> std::result::Result<(), String> {
    use super::{slot, STATS_WIDTH};
    if a.len() != b.len() {
        return Err(format!("{} values vs {}", a.len(), b.len()));
    }
    for (r, (a, b)) in a.chunks(STATS_WIDTH).zip(b.chunks(STATS_WIDTH)).enumerate() {
        for i in 0..=slot::BAD {
            if a[i].to_bits() != b[i].to_bits() {
                return Err(format!("row {r}: header slot {i}: {} vs {}", a[i], b[i]));
            }
        }
        let scale = b[slot::BAD + 1..]
            .iter()
            .filter(|x| x.is_finite())
            .fold(1.0f64, |m, x| m.max(x.abs()));
        for i in slot::BAD + 1..STATS_WIDTH {
            let (x, y) = (a[i], b[i]);
            let ok = if x.is_finite() && y.is_finite() {
                (x - y).abs() <= 2e-5 * (y.abs() + 1e-2 * scale)
            } else {
                x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan())
            };
            if !ok {
                return Err(format!("row {r} slot {i}: {x} vs {y} (scale {scale})"));
            }
        }
    }
    Ok(())
}
