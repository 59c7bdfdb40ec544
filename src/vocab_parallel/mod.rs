//! Vocab-parallel (tensor-parallel) distillation: each rank holds a slice of
//! the vocabulary columns of the student (and teacher) logits, and the loss
//! and each shard's gradient equal the unsharded computation.
//!
//! The split-phase protocol (docs/DESIGN.md §8), per step:
//! 1. [`round_stats`] with round 1 on the local shard: per-row partial
//!    statistics, `[N, STATS_WIDTH]` f64 (maxima and scaled sums of the
//!    teacher, the student, the student at τ = 1 when α > 0, the divergence
//!    accumulators, the label's logit where the label falls in this shard);
//! 2. the caller all-gathers them into `[world, N, STATS_WIDTH]` (rank order);
//! 3. JSD and TVD only ([`collectives`] = 2): [`round_stats`] with round 2
//!    from the gathered round 1 (the sums that need the global
//!    normalisers), all-gathered again;
//! 4. [`finish`]: the row losses and the reduced loss (the same on every
//!    rank) and the gradient of the local shard.
//!
//! Every rank merges the gathered records itself, in rank order, so the
//! result does not depend on the collective's reduction order. The
//! arithmetic is f64 on the host (`spec.precision` does not apply).
//!
//! The same steps run as CUDA kernels (kernels/vocab_parallel/vp.cu, fp32
//! per element, f64 sums, merge and loss) on device pointers and a caller's
//! stream ([`cuda`]: `CudaBackend::vp_round_stats_raw`, `vp_finish_raw`);
//! their records have the host's layout, so CPU and GPU ranks can be mixed.
//! [`check`] holds an implementation of the protocol to the unsharded
//! oracle; the tests run the kernels under the CPU emulation (`emu`).
//!
//! A top-k teacher is given whole on every rank (`[N, k]` global indices and
//! values); each rank uses the entries that fall in its shard.

pub mod check;
pub mod cuda;
#[cfg(feature = "emulation")]
pub mod emu;
pub(crate) mod params;
mod row;
pub mod stats;

use crate::driver::KdOutput;
use crate::error::{invalid, Result};
use crate::spec::{KernelDivergence, LossSpec};
use crate::tensor::{first_bad_topk_row, validate_labels, Dtype, GradDtype, Logits, TopkTeacher};
use rayon::prelude::*;
use row::{capped, Merged, ShardRow, TeacherRow};
pub use stats::{slot, Gathered, STATS_VERSION, STATS_WIDTH};

/// Where a rank's shard sits in the vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VocabShard {
    /// The global index of the shard's first column.
    pub vocab_start: usize,
    /// The real vocabulary size V: columns at global index ≥ V are padding
    /// (Megatron pads the vocabulary to a multiple of the world size); they
    /// are not read and get a zero gradient.
    pub vocab_size: usize,
}

impl VocabShard {
    /// The shard's real (unpadded) columns out of `cols`.
    pub fn real_columns(&self, cols: usize) -> usize {
        cols.min(self.vocab_size.saturating_sub(self.vocab_start))
    }
}

/// A shard's teacher: its dense columns, or a whole top-k teacher (global
/// indices).
#[derive(Debug, Clone, Copy)]
pub enum ShardTeacher<'a> {
    /// Teacher logits `[N, V_local]`, the same columns as the student's.
    Dense(Logits<'a>),
    /// A top-k teacher, `[N, k]` with global indices in `[0, V)`, the same
    /// on every rank.
    Topk(TopkTeacher<'a>),
}

/// One rank's inputs.
#[derive(Debug, Clone, Copy)]
pub struct ShardInputs<'a> {
    /// Student logits `[N, V_local]` (padding columns included).
    pub student: Logits<'a>,
    /// The teacher.
    pub teacher: ShardTeacher<'a>,
    /// Hard labels (global indices in `[0, V)` or `ignore_index`), the same
    /// on every rank.
    pub labels: Option<&'a [i64]>,
    /// Per-row weights (N, finite), the same on every rank.
    pub row_weights: Option<&'a [f32]>,
    /// The shard's place.
    pub shard: VocabShard,
}

/// The collectives (all-gathers) one step needs: 2 for JSD (0 < β < 1)
/// and TVD with a soft term (α < 1), 1 otherwise.
pub fn collectives(spec: &LossSpec) -> usize {
    match spec.kernel_divergence() {
        KernelDivergence::Jsd(_) | KernelDivergence::Tvd if spec.soft_coef() > 0.0 => 2,
        _ => 1,
    }
}

/// The spec against the labels' presence, and the shard's place (the
/// data-free head of [`validate`], shared with the device path).
pub(crate) fn validate_head(spec: &LossSpec, has_labels: bool, sh: VocabShard) -> Result<()> {
    spec.validate(has_labels)?;
    if sh.vocab_size == 0 || sh.vocab_size > i32::MAX as usize {
        return invalid(
            "vocab_size",
            format!("must be in [1, {}], got {}", i32::MAX, sh.vocab_size),
        );
    }
    if sh.vocab_start > i32::MAX as usize {
        return invalid(
            "vocab_start",
            format!("must be at most {}, got {}", i32::MAX, sh.vocab_start),
        );
    }
    Ok(())
}

/// A dense teacher of `dtype` and shape `(rows, cols)` against the
/// student's.
pub(crate) fn validate_dense_teacher(
    dtype: Dtype,
    shape: (usize, usize),
    student_dtype: Dtype,
    student_shape: (usize, usize),
) -> Result<()> {
    if dtype != student_dtype {
        return invalid(
            "teacher",
            format!("dtype {dtype} differs from the student's {student_dtype}"),
        );
    }
    if shape != student_shape {
        return invalid(
            "teacher",
            format!(
                "shard is [{}, {}], the student's [{}, {}]",
                shape.0, shape.1, student_shape.0, student_shape.1
            ),
        );
    }
    Ok(())
}

/// A top-k teacher's spec, k (against V) and dtype.
pub(crate) fn validate_topk_head(
    spec: &LossSpec,
    k: usize,
    v: usize,
    dtype: Dtype,
    student_dtype: Dtype,
) -> Result<()> {
    spec.validate_topk()?;
    if k == 0 || k > v {
        return invalid("k", format!("must be in [1, V = {v}], got {k}"));
    }
    if dtype != student_dtype {
        return invalid(
            "teacher_topk_values",
            format!("dtype {dtype} differs from the student's {student_dtype}"),
        );
    }
    Ok(())
}

/// Validates the spec and the inputs; returns whether the teacher is top-k.
pub(crate) fn validate(inputs: &ShardInputs, spec: &LossSpec) -> Result<bool> {
    let sh = inputs.shard;
    validate_head(spec, inputs.labels.is_some(), sh)?;
    inputs.student.validate("student")?;
    let (n, v) = (inputs.student.rows, sh.vocab_size);
    let topk = match inputs.teacher {
        ShardTeacher::Dense(t) => {
            t.validate("teacher")?;
            validate_dense_teacher(
                t.dtype(),
                (t.rows, t.cols),
                inputs.student.dtype(),
                (n, inputs.student.cols),
            )?;
            false
        }
        ShardTeacher::Topk(t) => {
            let k = t.k;
            validate_topk_head(spec, k, v, t.values.dtype(), inputs.student.dtype())?;
            let need = n.checked_mul(k);
            for (arg, len) in [
                ("teacher_topk_values", t.values.len()),
                ("teacher_topk_indices", t.indices.len()),
            ] {
                if need != Some(len) {
                    return invalid(
                        arg,
                        format!("has {len} entries, [N = {n}, k = {k}] needs more or fewer"),
                    );
                }
            }
            if let Some((row, msg)) = first_bad_topk_row(&t.indices, n, k, v) {
                return invalid("teacher_topk_indices", format!("row {row}: {msg}"));
            }
            true
        }
    };
    validate_labels(inputs.labels, inputs.row_weights, n, v, spec.ignore_index)?;
    Ok(topk)
}

/// Whether row `r` counts (label not ignored, weight not 0).
fn counts(inputs: &ShardInputs, spec: &LossSpec, r: usize) -> bool {
    inputs.labels.is_none_or(|l| l[r] != spec.ignore_index)
        && inputs.row_weights.is_none_or(|w| w[r] != 0.0)
}

/// Row `r` of the shard, soft-capped, over the real columns.
fn shard_row(inputs: &ShardInputs, spec: &LossSpec, r: usize) -> ShardRow {
    let sh = inputs.shard;
    let cols = sh.real_columns(inputs.student.cols);
    let raw = |x: &Logits| (0..cols).map(|c| x.get(r, c) as f64).collect::<Vec<f64>>();
    let (s, ds) = capped(raw(&inputs.student), spec.softcap);
    let teacher = match inputs.teacher {
        ShardTeacher::Dense(t) => {
            let (t, dt) = capped(raw(&t), spec.softcap);
            TeacherRow::Dense { t, dt }
        }
        ShardTeacher::Topk(t) => {
            let mut on = vec![false; cols];
            let (mut idx, mut vals) = (Vec::new(), Vec::new());
            for i in 0..t.k {
                let j = t.indices.get(r * t.k + i) as usize;
                if (sh.vocab_start..sh.vocab_start + cols).contains(&j) {
                    let c = j - sh.vocab_start;
                    on[c] = true;
                    idx.push(c);
                    vals.push(t.values.get(r * t.k + i) as f64);
                }
            }
            let (vals, _) = capped(vals, spec.softcap);
            TeacherRow::Topk {
                cols: idx,
                vals,
                on,
            }
        }
    };
    let label = inputs.labels.and_then(|l| {
        let y = l[r];
        (y != spec.ignore_index && (sh.vocab_start..sh.vocab_start + cols).contains(&(y as usize)))
            .then(|| y as usize - sh.vocab_start)
    });
    ShardRow {
        s,
        ds,
        teacher,
        label,
    }
}

/// The merged statistics of every row (`None` for rows that do not count).
fn merged(
    inputs: &ShardInputs,
    spec: &LossSpec,
    topk: bool,
    round1: &Gathered,
    round2: Option<&Gathered>,
) -> Vec<Option<Merged>> {
    let n = inputs.student.rows;
    (0..n)
        .into_par_iter()
        .map(|r| {
            if !counts(inputs, spec, r) {
                return None;
            }
            let recs: Vec<&[f64]> = (0..round1.world).map(|k| round1.record(k, r, n)).collect();
            let mut m = Merged::round1(&recs, spec, topk);
            if let Some(g2) = round2 {
                let recs: Vec<&[f64]> = (0..g2.world).map(|k| g2.record(k, r, n)).collect();
                m.round2(&recs, spec);
            }
            Some(m)
        })
        .collect()
}

/// This rank's statistics of `round` (1 or 2) for every row, `[N,
/// STATS_WIDTH]` f64 row-major, to be all-gathered in rank order. Round 2
/// (JSD and TVD, see [`collectives`]) needs the gathered round 1 as
/// `round1`; round 1 takes `None`. Rows that do not count (ignored label,
/// weight 0) carry only the header.
pub fn round_stats(
    inputs: &ShardInputs,
    spec: &LossSpec,
    round: usize,
    round1: Option<&Gathered>,
) -> Result<Vec<f64>> {
    let topk = validate_round(inputs, spec, round, round1)?;
    let n = inputs.student.rows;
    let start = inputs.shard.vocab_start;
    let cols = inputs.shard.real_columns(inputs.student.cols);
    let mut out = vec![0.0; n * STATS_WIDTH];
    let ms = round1.map(|g| merged(inputs, spec, topk, g, None));
    out.par_chunks_mut(STATS_WIDTH)
        .enumerate()
        .for_each(|(r, rec)| {
            stats::header(rec, round, start, cols);
            if !counts(inputs, spec, r) {
                return;
            }
            let row = shard_row(inputs, spec, r);
            match ms.as_ref().and_then(|m| m[r].as_ref()) {
                Some(m) => row.round2(spec, m, rec, start),
                None => row.round1(spec, rec, start),
            }
        });
    Ok(out)
}

/// [`round_stats`]'s checks (shared with the emulated kernels): the inputs,
/// and the round against the gathered round 1; returns whether the teacher
/// is top-k.
pub(crate) fn validate_round(
    inputs: &ShardInputs,
    spec: &LossSpec,
    round: usize,
    round1: Option<&Gathered>,
) -> Result<bool> {
    let topk = validate(inputs, spec)?;
    let n = inputs.student.rows;
    let sh = inputs.shard;
    check_round(spec, round, round1.is_some())?;
    if let Some(g) = round1 {
        g.check("round1", n, 1, sh.vocab_size)?;
    }
    Ok(topk)
}

/// `round` against the loss and whether the gathered round 1 is given (the
/// host's and the device's shared words).
pub(crate) fn check_round(spec: &LossSpec, round: usize, has_round1: bool) -> Result<()> {
    match (round, has_round1) {
        (1, false) => Ok(()),
        (1, true) => invalid("round1", "round 1 takes no gathered statistics"),
        (2, _) if collectives(spec) < 2 => invalid(
            "round",
            format!(
                "{} needs one collective: there is no round 2",
                spec.divergence
            ),
        ),
        (2, false) => invalid("round1", "round 2 needs the gathered round-1 statistics"),
        (2, true) => Ok(()),
        _ => invalid("round", format!("must be 1 or 2, got {round}")),
    }
}

/// The step's results from the gathered statistics of every round: the
/// reduced loss and the row losses (the same on every rank), the valid
/// rows, and, when `grad` is `Some`, the gradient of this shard `[N,
/// V_local]` (padding columns 0) and, with `spec.grad_teacher` on a dense
/// teacher, the teacher's. NaN rules as [`crate::Backend::compute`].
pub fn finish(
    inputs: &ShardInputs,
    spec: &LossSpec,
    round1: &Gathered,
    round2: Option<&Gathered>,
    grad: Option<GradDtype>,
) -> Result<KdOutput> {
    let topk = validate_finish(inputs, spec, round1, round2)?;
    let (n, vl) = (inputs.student.rows, inputs.student.cols);
    let sh = inputs.shard;
    let ms = merged(inputs, spec, topk, round1, round2);
    let valid = valid_rows(inputs.labels, n, spec.ignore_index);
    let w = spec.reduction.row_weight(valid, sh.vocab_size);
    let dtype = grad.map(|g| g.dtype_for(inputs.student.dtype()));
    let want_t = dtype.is_some() && spec.grad_teacher && !topk;
    let cols = sh.real_columns(vl);
    let rows: Vec<RowOut> = (0..n)
        .into_par_iter()
        .map(|r| {
            let mut gs = vec![0.0f32; if dtype.is_some() { vl } else { 0 }];
            let mut gt = vec![0.0f32; if want_t { vl } else { 0 }];
            let Some(m) = &ms[r] else {
                return (0.0, gs, gt);
            };
            let wr = inputs.row_weights.map_or(1.0, |w| w[r] as f64);
            let (l, g_s, g_t) = shard_row(inputs, spec, r).finish(spec, m);
            if let Some(dt) = dtype {
                let scale = spec.grad_scale * w * wr;
                store(&mut gs[..cols], &g_s, scale, dt);
                if let Some(g_t) = g_t.filter(|_| want_t) {
                    store(&mut gt[..cols], &g_t, scale, dt);
                }
            }
            (wr * l, gs, gt)
        })
        .collect();
    let row_losses: Vec<f64> = rows.iter().map(|r| r.0).collect();
    let flat = |pick: fn(&RowOut) -> &Vec<f32>| -> Vec<f32> {
        rows.iter().flat_map(|r| pick(r).iter().copied()).collect()
    };
    Ok(KdOutput {
        loss: w * crate::sum(&row_losses),
        valid_rows: valid,
        grad: dtype.map(|_| flat(|r| &r.1)),
        grad_teacher: want_t.then(|| flat(|r| &r.2)),
        row_losses,
    })
}

/// [`finish`]'s checks (shared with the emulated kernels): the inputs and
/// the gathered records of each round; returns whether the teacher is
/// top-k.
pub(crate) fn validate_finish(
    inputs: &ShardInputs,
    spec: &LossSpec,
    round1: &Gathered,
    round2: Option<&Gathered>,
) -> Result<bool> {
    let topk = validate(inputs, spec)?;
    let n = inputs.student.rows;
    let sh = inputs.shard;
    round1.check("round1", n, 1, sh.vocab_size)?;
    check_round2(spec, round2.is_some())?;
    if let Some(g) = round2 {
        g.check("round2", n, 2, sh.vocab_size)?;
    }
    Ok(topk)
}

/// Whether the finish's gathered round 2 is given as the loss needs it.
pub(crate) fn check_round2(spec: &LossSpec, has_round2: bool) -> Result<()> {
    match (collectives(spec), has_round2) {
        (2, false) => invalid(
            "round2",
            format!("{} needs the gathered round-2 statistics", spec.divergence),
        ),
        (1, true) => invalid(
            "round2",
            format!(
                "{} has one round: pass no round-2 statistics",
                spec.divergence
            ),
        ),
        _ => Ok(()),
    }
}

/// The valid rows (labels not ignored) of `n`.
pub(crate) fn valid_rows(labels: Option<&[i64]>, n: usize, ignore_index: i64) -> usize {
    match labels {
        None => n,
        Some(l) => l.iter().filter(|&&y| y != ignore_index).count(),
    }
}

/// One row's loss, student gradient and teacher gradient (shard columns).
type RowOut = (f64, Vec<f32>, Vec<f32>);

/// `scale·src` rounded to f32, then to `dtype`.
fn store(dst: &mut [f32], src: &[f64], scale: f64, dtype: Dtype) {
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = dtype.round((scale * x) as f32);
    }
}

/// The whole protocol for every shard in one process, the all-gather done
/// by concatenation: each shard's [`KdOutput`] (`shards` in rank order).
/// For tests and for checking a trainer's sharding against the unsharded
/// loss; a distributed trainer runs the rounds itself with its collective.
pub fn run_in_process(
    shards: &[ShardInputs],
    spec: &LossSpec,
    grad: Option<GradDtype>,
) -> Result<Vec<KdOutput>> {
    in_process(
        shards,
        spec,
        |s, round, prev| round_stats(s, spec, round, prev),
        |s, r1, r2| finish(s, spec, r1, r2, grad),
    )
}

/// The protocol over `shards` in one process with any implementation of its
/// steps (the host's, the emulated kernels', the device's): `round(shard,
/// round, gathered round 1)` and `finish(shard, round 1, round 2)`, the
/// all-gathers done by concatenation in rank order.
pub(crate) fn in_process(
    shards: &[ShardInputs],
    spec: &LossSpec,
    round: impl Fn(&ShardInputs, usize, Option<&Gathered>) -> Result<Vec<f64>>,
    finish: impl Fn(&ShardInputs, &Gathered, Option<&Gathered>) -> Result<KdOutput>,
) -> Result<Vec<KdOutput>> {
    let world = shards.len();
    let gather = |r: usize, prev: Option<&Gathered>| -> Result<Vec<f64>> {
        let mut all = Vec::new();
        for s in shards {
            all.extend(round(s, r, prev)?);
        }
        Ok(all)
    };
    let g1 = gather(1, None)?;
    let r1 = Gathered { stats: &g1, world };
    let g2 = if collectives(spec) == 2 {
        Some(gather(2, Some(&r1))?)
    } else {
        None
    };
    let r2 = g2.as_deref().map(|stats| Gathered { stats, world });
    shards.iter().map(|s| finish(s, &r1, r2.as_ref())).collect()
}
