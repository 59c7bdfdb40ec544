//! `kdfuse loss`: the file interface.

use super::cache::cache_err;
use super::tensorfile::TensorArgs;
use super::{make_backend_with, npy, CliError, KernelArgs};
use clap::Args;
use kdfuse::{
    BackendKind, Divergence, Dtype, GradDtype, KdError, KdInputs, Logits, LossSpec, OwnedData,
    Precision, Reduction, TopkInputs, TopkMode, TopkTeacher,
};
use kdfuse_cli::teacher_cache::{CacheReader, ValuesKind};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct LossArgs {
    /// Student logits: C-order .npy or .safetensors [N, V] (or [..., V],
    /// flattened to rows), float32 or float16, bfloat16 in .safetensors
    /// (float64 is converted).
    #[arg(long, value_name = "S.npy")]
    student: PathBuf,
    /// Teacher logits (or log-probs with --teacher-logprobs): .npy or
    /// .safetensors [N, V_t] (or [..., V_t]) with V_t ≥ V; only the first V
    /// columns are used (a padded teacher vocabulary). Give either this, the
    /// top-k pair or --teacher-cache.
    #[arg(long, value_name = "T.npy")]
    teacher: Option<PathBuf>,
    /// A top-k (sparse) teacher's vocabulary indices: int32 or int64 .npy or
    /// .safetensors [N, k] (or [..., k]), 1 ≤ k ≤ V, distinct within a row;
    /// with --teacher-topk-values, instead of --teacher.
    #[arg(long, value_name = "IDX.npy")]
    teacher_topk_indices: Option<PathBuf>,
    /// The top-k teacher's values at those indices: float .npy or
    /// .safetensors [N, k] (or [..., k]), logits (or log-probs with
    /// --teacher-logprobs); rounded to --dtype.
    #[arg(long, value_name = "VAL.npy")]
    teacher_topk_values: Option<PathBuf>,
    /// A top-k teacher from a cache directory (`kdfuse teacher-cache
    /// build`), instead of --teacher or the top-k pair; a cache of log-probs
    /// implies --teacher-logprobs.
    #[arg(long, value_name = "DIR")]
    teacher_cache: Option<PathBuf>,
    /// The cache's rows START:END (END exclusive; either may be left out)
    /// that match the student's rows. [default: all]
    #[arg(long, value_name = "START:END")]
    rows: Option<String>,
    /// Per-row weights: 1-D float .npy [N], finite; each row's loss (and
    /// gradient) is multiplied by its weight, the reduction's denominator
    /// stays the same.
    #[arg(long, value_name = "W.npy")]
    row_weights: Option<PathBuf>,
    /// Hard labels: 1-D int64 or int32 .npy of length N; rows equal to
    /// --ignore-index are masked out. Needed when --alpha > 0.
    #[arg(long, value_name = "L.npy")]
    labels: Option<PathBuf>,
    /// auto = CUDA when usable, else the fast CPU backend.
    #[arg(long, default_value = "auto", value_parser = ["auto", "cpu", "cuda", "oracle"])]
    backend: String,
    /// Write ∂loss/∂student as float32 .npy of the student's shape.
    #[arg(long, value_name = "G.npy")]
    grad: Option<PathBuf>,
    /// Write ∂loss/∂teacher as float32 .npy [..., V] with the teacher's
    /// leading dimensions (mutual learning: the teacher trains too); needs a
    /// dense --teacher.
    #[arg(long, value_name = "GT.npy")]
    grad_teacher: Option<PathBuf>,
    #[command(flatten)]
    opts: LossOptions,
    #[command(flatten)]
    tensor: TensorArgs,
    #[command(flatten)]
    kernel: KernelArgs,
}

/// The loss's options, shared by `kdfuse loss` and `kdfuse linear-loss`.
#[derive(Debug, Args)]
pub(super) struct LossOptions {
    /// How a top-k teacher meets the student: support (both renormalised over
    /// the k entries), full (student softmax over all V), tail (k entries plus
    /// one tail bucket; needs --teacher-logprobs and temperature 1).
    /// [default: full]
    #[arg(long, value_parser = ["support", "full", "tail"])]
    topk_mode: Option<String>,
    /// The teacher (dense or top-k values) holds log-probabilities, not logits.
    #[arg(long)]
    teacher_logprobs: bool,
    /// Soft-capping C > 0: logits x ← C·tanh(x/C) for student and teacher
    /// before anything else (not with --teacher-logprobs).
    #[arg(long, value_name = "C", allow_negative_numbers = true)]
    softcap: Option<f64>,
    /// The divergence D(teacher ‖ student).
    #[arg(long, default_value = "forward-kl", value_parser = ["forward-kl", "reverse-kl", "jsd", "tvd", "soft-ce"])]
    divergence: String,
    /// JSD weight β in [0, 1] (0 = forward KL, 1 = reverse KL); jsd only.
    /// [default: 0.5]
    #[arg(long, allow_negative_numbers = true)]
    beta: Option<f64>,
    /// Temperature τ > 0.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    temperature: f64,
    /// Weight α in [0, 1] of the hard-label cross-entropy (at τ = 1).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    alpha: f64,
    /// Do not multiply the soft term by τ².
    #[arg(long)]
    no_t2_scaling: bool,
    /// Label value of rows to ignore.
    #[arg(long, default_value_t = -100, allow_negative_numbers = true)]
    ignore_index: i64,
    /// Reduction over rows.
    #[arg(long, default_value = "batchmean", value_parser = ["batchmean", "sum", "mean", "none"])]
    reduction: String,
    /// Precision the backend computes from; the inputs are rounded to it first.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
    dtype: String,
    /// The kernels' arithmetic (GPU and CPU backend): fast (default;
    /// docs/DESIGN.md §3's mixed bound) or exact. The oracle is exact either
    /// way; the output's "precision" says what ran.
    #[arg(long, default_value = "fast", value_parser = ["fast", "exact"])]
    precision: String,
}

impl LossOptions {
    /// The operands' dtype (`--dtype`).
    pub(super) fn dtype(&self) -> Result<Dtype, CliError> {
        self.dtype.parse().map_err(CliError::Msg)
    }

    /// Whether `--teacher-logprobs` was given.
    pub(super) fn teacher_logprobs(&self) -> bool {
        self.teacher_logprobs
    }

    /// The loss specification, checked: `topk` says whether the teacher is
    /// a top-k one, `teacher_logprobs` whether its values are log-probs
    /// (the flag, or a cache of log-probs), `grad_teacher` whether the
    /// teacher's gradient is wanted, `labels` whether labels are given.
    pub(super) fn spec(
        &self,
        topk: bool,
        teacher_logprobs: bool,
        grad_teacher: bool,
        labels: bool,
    ) -> Result<LossSpec, CliError> {
        if !topk && self.topk_mode.is_some() {
            return Err(CliError::Msg(
                "--topk-mode needs a top-k teacher (--teacher-topk-indices and --teacher-topk-values, \
                 or --teacher-cache)"
                    .into(),
            ));
        }
        let topk_mode: TopkMode = match &self.topk_mode {
            Some(m) => m.parse().map_err(CliError::Msg)?,
            None => TopkMode::default(),
        };
        if topk && topk_mode == TopkMode::Tail && !teacher_logprobs {
            return Err(CliError::Msg(
                "--topk-mode tail needs --teacher-logprobs (the top-k values as log-probs)".into(),
            ));
        }
        let divergence = self
            .divergence
            .parse::<Divergence>()
            .map_err(CliError::Msg)?;
        if self.beta.is_some() && divergence != Divergence::Jsd {
            return Err(CliError::Msg(format!(
                "--beta is the JSD weight: {divergence} does not use it (give --divergence jsd, or drop --beta)"
            )));
        }
        let spec = LossSpec {
            divergence,
            beta: self.beta.unwrap_or(LossSpec::default().beta),
            temperature: self.temperature,
            alpha: self.alpha,
            t2_scaling: !self.no_t2_scaling,
            ignore_index: self.ignore_index,
            reduction: self.reduction.parse::<Reduction>().map_err(CliError::Msg)?,
            grad_scale: 1.0,
            softcap: self.softcap,
            teacher_log_probs: teacher_logprobs,
            grad_teacher,
            topk_mode,
            precision: self.precision.parse::<Precision>().map_err(CliError::Msg)?,
        };
        self.dtype()?;
        spec.validate(labels).map_err(flagged)?;
        if topk {
            spec.validate_topk().map_err(flagged)?;
        }
        Ok(spec)
    }
}

/// Where the teacher comes from.
enum TeacherSource<'a> {
    /// Dense logits (or log-probs), `--teacher`.
    Dense(&'a PathBuf),
    /// The top-k pair: (indices, values).
    Topk(&'a PathBuf, &'a PathBuf),
    /// A teacher cache directory.
    Cache(&'a PathBuf),
}

/// Exactly one of a dense teacher or the complete top-k pair.
fn teacher_source(a: &LossArgs) -> Result<TeacherSource<'_>, CliError> {
    let msg = |m: &str| Err(CliError::Msg(m.into()));
    if let Some(dir) = &a.teacher_cache {
        return match (&a.teacher, &a.teacher_topk_indices, &a.teacher_topk_values) {
            (None, None, None) => Ok(TeacherSource::Cache(dir)),
            (Some(_), _, _) => {
                msg("--teacher-cache and --teacher exclude each other: give one teacher")
            }
            _ => msg(
                "--teacher-cache and --teacher-topk-indices/--teacher-topk-values exclude each \
                 other: give one teacher",
            ),
        };
    }
    if a.rows.is_some() {
        return msg(
            "--rows selects rows of a --teacher-cache: give --teacher-cache DIR, or drop --rows",
        );
    }
    match (&a.teacher, &a.teacher_topk_indices, &a.teacher_topk_values) {
        (Some(t), None, None) => Ok(TeacherSource::Dense(t)),
        (None, Some(i), Some(v)) => Ok(TeacherSource::Topk(i, v)),
        (Some(_), _, _) => msg(
            "--teacher and --teacher-topk-indices/--teacher-topk-values exclude each other: \
             give a dense teacher or a top-k pair",
        ),
        (None, Some(_), None) => msg("--teacher-topk-indices needs --teacher-topk-values"),
        (None, None, Some(_)) => msg("--teacher-topk-values needs --teacher-topk-indices"),
        (None, None, None) => msg(
            "a teacher is required: --teacher T.npy, --teacher-topk-indices with \
             --teacher-topk-values, or --teacher-cache DIR",
        ),
    }
}

/// The library's name of an argument, as the CLI spells the flag.
fn flag_of(arg: &str) -> Option<&'static str> {
    Some(match arg {
        "teacher_topk_indices" => "--teacher-topk-indices",
        "teacher_topk_values" => "--teacher-topk-values",
        "k" => "--teacher-topk-indices",
        "row_weights" => "--row-weights",
        "softcap" => "--softcap",
        "topk_mode" => "--topk-mode",
        "grad_teacher" => "--grad-teacher",
        _ => return None,
    })
}

/// A library error, with the argument renamed to its CLI flag where there is one.
pub(super) fn flagged(e: KdError) -> CliError {
    match e {
        KdError::InvalidArgument { arg, msg } => match flag_of(arg) {
            Some(flag) => CliError::Msg(format!("invalid argument `{flag}`: {msg}")),
            None => CliError::Kd(KdError::InvalidArgument { arg, msg }),
        },
        e => CliError::Kd(e),
    }
}

pub fn run(a: LossArgs) -> Result<ExitCode, CliError> {
    let source = teacher_source(&a)?;
    let topk = matches!(source, TeacherSource::Topk(..) | TeacherSource::Cache(_));
    let inputs = [
        ("--student", Some(&a.student)),
        ("--teacher", a.teacher.as_ref()),
        ("--teacher-topk-indices", a.teacher_topk_indices.as_ref()),
        ("--teacher-topk-values", a.teacher_topk_values.as_ref()),
        ("--labels", a.labels.as_ref()),
        ("--row-weights", a.row_weights.as_ref()),
    ];
    a.tensor.install(&inputs)?;
    // The cache is opened (its index checked against the shards) first: its
    // values kind decides --teacher-logprobs.
    let cache = match source {
        TeacherSource::Cache(dir) => Some((dir, open_cache(dir, a.opts.teacher_logprobs)?)),
        _ => None,
    };
    let teacher_logprobs = a.opts.teacher_logprobs
        || cache
            .as_ref()
            .is_some_and(|(_, r)| r.meta().values_kind == ValuesKind::Logprobs);
    if topk && a.grad_teacher.is_some() {
        return Err(CliError::Msg(
            "--grad-teacher needs a dense --teacher (a top-k teacher is fixed data)".into(),
        ));
    }
    let spec = a.opts.spec(
        topk,
        teacher_logprobs,
        a.grad_teacher.is_some(),
        a.labels.is_some(),
    )?;
    super::check_paths(
        &inputs,
        &[
            ("--grad", a.grad.as_ref()),
            ("--grad-teacher", a.grad_teacher.as_ref()),
        ],
    )?;
    let dtype = a.opts.dtype()?;
    let kind: BackendKind = a.backend.parse().map_err(CliError::Msg)?;

    let (s, n, v, s_shape) = npy::read_rows(&a.student, "--student")?;
    if v == 0 {
        return Err(CliError::Msg(
            "--student has no columns (V must be ≥ 1)".into(),
        ));
    }
    let labels = match &a.labels {
        Some(p) => {
            let l = npy::read_labels(p, "--labels")?;
            if l.len() != n {
                return Err(CliError::Msg(format!(
                    "shape mismatch: --labels has {} entries for {n} rows",
                    l.len()
                )));
            }
            Some(l)
        }
        None => None,
    };
    let row_weights = match &a.row_weights {
        Some(p) => {
            let w = npy::read_vector(p, "--row-weights")?;
            if w.len() != n {
                return Err(CliError::Msg(format!(
                    "shape mismatch: --row-weights has {} entries for {n} rows",
                    w.len()
                )));
            }
            Some(w)
        }
        None => None,
    };
    let sd = OwnedData::from_f32(&s, dtype);
    let student = Logits::new(sd.view(), n, v);
    let want_grad = (a.grad.is_some() || a.grad_teacher.is_some()).then_some(GradDtype::F32);
    let mut backend = None;
    let mut out = None;
    let mut topk_teacher = None;
    let mut grad_teacher_shape = vec![n, v];
    let mut cache_json = json!({});
    let mut teacher_json = json!({ "teacher": "dense" });
    match source {
        TeacherSource::Dense(tpath) => {
            let (t, tn, tv, t_shape) = npy::read_rows(tpath, "--teacher")?;
            // ∂loss/∂teacher has the teacher's leading dimensions and V columns.
            grad_teacher_shape = t_shape[..t_shape.len() - 1].to_vec();
            grad_teacher_shape.push(v);
            if tn != n {
                return Err(CliError::Msg(format!(
                    "shape mismatch: --student has {n} rows, --teacher {tn}"
                )));
            }
            if tv < v {
                return Err(CliError::Msg(format!(
                    "shape mismatch: --teacher has {tv} columns, fewer than the student's {v}"
                )));
            }
            let td = OwnedData::from_f32(&t, dtype);
            let inputs = KdInputs {
                student,
                teacher: Logits::strided(td.view(), n, v, tv),
                labels: labels.as_deref(),
                row_weights: row_weights.as_deref(),
            };
            inputs.validate(spec.ignore_index).map_err(flagged)?;
            let b = make_backend_with(kind, a.kernel.forced())?;
            out = Some(b.compute(&inputs, &spec, want_grad)?);
            backend = Some(b);
        }
        TeacherSource::Topk(ipath, vpath) => {
            let (idx, ni, ki) = npy::read_index_matrix(ipath, "--teacher-topk-indices")?;
            let (vals, nv, kv) = npy::read_topk_values(vpath, "--teacher-topk-values")?;
            if (nv, kv) != (ni, ki) {
                return Err(CliError::Msg(format!(
                    "shape mismatch: --teacher-topk-indices is [{ni}, {ki}], \
                     --teacher-topk-values [{nv}, {kv}]"
                )));
            }
            if ni != n {
                return Err(CliError::Msg(format!(
                    "shape mismatch: --student has {n} rows, --teacher-topk-indices {ni}"
                )));
            }
            if ki == 0 || ki > v {
                return Err(CliError::Msg(format!(
                    "--teacher-topk-indices: k = {ki} must be in [1, V = {v}]"
                )));
            }
            topk_teacher = Some((idx, vals, ki));
        }
        TeacherSource::Cache(_) => {
            let Some((dir, r)) = &cache else {
                return Err(CliError::Msg("internal: the cache was not opened".into()));
            };
            let (idx, vals, k, start, end) =
                cache_rows(dir, r, a.rows.as_deref(), "--student", n, v)?;
            topk_teacher = Some((idx, vals, k));
            cache_json = json!({
                "teacher_cache": dir.display().to_string(),
                "cache_rows": [start, end],
            });
        }
    }
    if let Some((idx, vals, ki)) = topk_teacher {
        let vd = OwnedData::from_f32(&vals, dtype);
        let inputs = TopkInputs {
            student,
            teacher: TopkTeacher {
                indices: idx.view(),
                values: vd.view(),
                k: ki,
            },
            labels: labels.as_deref(),
            row_weights: row_weights.as_deref(),
        };
        inputs
            .validate(spec.ignore_index)
            .map_err(|e| match (e, &cache) {
                (KdError::InvalidArgument { msg, .. }, Some((dir, _))) => CliError::Msg(format!(
                    "invalid argument `--teacher-cache` {}: {msg}",
                    dir.display()
                )),
                (e, _) => flagged(e),
            })?;
        let b = make_backend_with(kind, a.kernel.forced())?;
        out = Some(b.compute_topk(&inputs, &spec, want_grad)?);
        backend = Some(b);
        teacher_json = json!({
            "teacher": if cache.is_some() { "cache" } else { "topk" },
            "k": ki,
            "topk_mode": spec.topk_mode.as_str(),
        });
    }
    let (Some(backend), Some(out)) = (backend, out) else {
        return Err(CliError::Msg("internal: no loss was computed".into()));
    };
    if let Some(path) = &a.grad {
        let g = out.grad.as_ref().ok_or_else(|| {
            CliError::Msg(format!(
                "backend {} returned no gradient for --grad",
                backend.name()
            ))
        })?;
        npy::write_array(path, g, &s_shape)?;
    }
    if let Some(path) = &a.grad_teacher {
        let g = out.grad_teacher.as_ref().ok_or_else(|| {
            CliError::Msg(format!(
                "backend {} returned no teacher gradient for --grad-teacher",
                backend.name()
            ))
        })?;
        npy::write_array(path, g, &grad_teacher_shape)?;
    }
    let (loss, nonfinite) = loss_json(spec.reduction == Reduction::None, out.loss, &out.row_losses);
    let path_json = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
    let mut report = json!({
        "loss": loss,
        "rows": n,
        "cols": v,
        "valid_rows": out.valid_rows,
        "backend": backend.name(),
        // What ran: the top-k kernels are exact.
        "precision": if topk { Precision::Exact } else { backend.precision(&spec) }.as_str(),
        "dtype": dtype.as_str(),
        "divergence": spec.divergence.as_str(),
        "reduction": spec.reduction.as_str(),
        "temperature": spec.temperature,
        "alpha": spec.alpha,
        "softcap": spec.softcap,
        "teacher_logprobs": spec.teacher_log_probs,
        "row_weights": path_json(&a.row_weights),
        "grad": path_json(&a.grad),
        "grad_teacher": path_json(&a.grad_teacher),
    });
    for extra in [&teacher_json, &cache_json] {
        if let (Some(r), Some(t)) = (report.as_object_mut(), extra.as_object()) {
            r.extend(t.clone());
        }
    }
    if let (Some(r), Some(n)) = (report.as_object_mut(), nonfinite) {
        r.insert("nonfinite".into(), n);
    }
    outln!("{report}")?;
    Ok(ExitCode::SUCCESS)
}

/// Opens the teacher cache `dir` for a loss (its index checked against the
/// shards): its values must have no temperature applied, and be log-probs
/// when `--teacher-logprobs` is given.
pub(super) fn open_cache(dir: &Path, teacher_logprobs: bool) -> Result<CacheReader, CliError> {
    let r = CacheReader::open(dir).map_err(cache_err("--teacher-cache", dir))?;
    let m = r.meta();
    if let Some(t) = m.temperature {
        return Err(CliError::Msg(format!(
            "--teacher-cache {}: its values have temperature {t} applied, and the loss \
             applies --temperature to student and teacher alike: build the cache without one",
            dir.display()
        )));
    }
    if teacher_logprobs && m.values_kind == ValuesKind::Logits {
        return Err(CliError::Msg(format!(
            "--teacher-logprobs: the cache {} holds logits, not log-probs",
            dir.display()
        )));
    }
    Ok(r)
}

/// The rows `--rows` selects of the cache `r` (at `dir`), checked against a
/// student (the flag `student`) of `n` rows and vocabulary `v`: (indices, values, k, start, end).
pub(super) fn cache_rows(
    dir: &Path,
    r: &CacheReader,
    rows: Option<&str>,
    student: &str,
    n: usize,
    v: usize,
) -> Result<(npy::Indices, Vec<f32>, usize, u64, u64), CliError> {
    let m = r.meta();
    let (start, end) = parse_rows(rows, r.rows())?;
    if (end - start) as usize != n {
        return Err(CliError::Msg(format!(
            "shape mismatch: {student} has {n} rows, --teacher-cache rows {start}:{end} are {}",
            end - start
        )));
    }
    if m.vocab_size < v {
        return Err(CliError::Msg(format!(
            "shape mismatch: --teacher-cache has a vocabulary of {}, smaller than the \
             student's {v}",
            m.vocab_size
        )));
    }
    if m.k > v {
        return Err(CliError::Msg(format!(
            "--teacher-cache: k = {} must be in [1, V = {v}]",
            m.k
        )));
    }
    let rows = r
        .read_rows(start, end)
        .map_err(cache_err("--teacher-cache", dir))?;
    Ok((
        npy::Indices::I32(rows.indices),
        rows.values,
        rows.k,
        start,
        end,
    ))
}

/// `--rows START:END` of a cache with `total` rows (START defaults to 0, END
/// to `total`): (start, end), within the cache.
fn parse_rows(rows: Option<&str>, total: u64) -> Result<(u64, u64), CliError> {
    let Some(text) = rows else {
        return Ok((0, total));
    };
    let bad = |why: &str| {
        Err(CliError::Msg(format!(
            "--rows {text}: {why} (expected START:END within the cache's 0:{total})"
        )))
    };
    let Some((a, b)) = text.split_once(':') else {
        return bad("no `:`");
    };
    let num = |s: &str, default: u64| -> Option<u64> {
        if s.is_empty() {
            Some(default)
        } else {
            s.parse().ok()
        }
    };
    match (num(a, 0), num(b, total)) {
        (Some(start), Some(end)) if start <= end && end <= total => Ok((start, end)),
        (Some(_), Some(_)) => bad("out of range"),
        _ => bad("not a number"),
    }
}

/// The report's `loss`: the scalar, or the per-row vector for reduction
/// `none`. JSON has no NaN or ±inf: such a value is written `null`, and the
/// second value, the report's `nonfinite` field, maps its place (`loss`, or
/// `loss[i]`) to its spelling ("nan", "inf", "-inf"); `None` when every
/// value is finite.
pub(super) fn loss_json(
    per_row: bool,
    loss: f64,
    rows: &[f64],
) -> (serde_json::Value, Option<serde_json::Value>) {
    let mut nonfinite = serde_json::Map::new();
    let mut num = |x: f64, place: String| {
        if x.is_finite() {
            // -0.0 (an empty sum) is written 0.
            json!(x + 0.0)
        } else {
            let name = if x.is_nan() {
                "nan"
            } else if x > 0.0 {
                "inf"
            } else {
                "-inf"
            };
            nonfinite.insert(place, json!(name));
            serde_json::Value::Null
        }
    };
    let value = if per_row {
        json!(rows
            .iter()
            .enumerate()
            .map(|(i, &x)| num(x, format!("loss[{i}]")))
            .collect::<Vec<_>>())
    } else {
        num(loss, "loss".into())
    };
    let nonfinite = (!nonfinite.is_empty()).then_some(serde_json::Value::Object(nonfinite));
    (value, nonfinite)
}
