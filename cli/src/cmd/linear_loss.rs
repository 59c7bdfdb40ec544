//! `kdfuse linear-loss`: the fused linear + distillation loss
//! ([`kdfuse::fused_linear`]) from hidden states and heads in files.

use super::loss::{cache_rows, flagged, loss_json, open_cache, LossOptions};
use super::tensorfile::TensorArgs;
use super::{npy, CliError, KernelArgs};
use clap::Args;
use kdfuse::fused_linear::{
    self, Chunking, Linear, LinearInputs, LinearSpec, LinearTeacher, Matrix, TeacherGrads,
};
use kdfuse::{Backend, Dtype, KdError, Logits, OwnedData, Reduction, TopkTeacher};
use kdfuse_cli::teacher_cache::ValuesKind;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct LinearLossArgs {
    /// The student's hidden states: float .npy or .safetensors [N, H] (or
    /// [..., H], flattened to rows).
    #[arg(long, value_name = "H.npy")]
    student_hidden: PathBuf,
    /// The student's head [V, H] (nn.Linear's layout): logits = hidden · Wᵀ + b.
    #[arg(long, value_name = "W.npy")]
    student_weight: PathBuf,
    /// The student head's bias [V].
    #[arg(long, value_name = "B.npy")]
    student_bias: Option<PathBuf>,
    /// A teacher given as hidden states [N, H_t] (or [..., H_t]), with
    /// --teacher-weight.
    #[arg(long, value_name = "HT.npy")]
    teacher_hidden: Option<PathBuf>,
    /// The teacher's head [V_t, H_t], V_t ≥ V (its first V rows are used).
    #[arg(long, value_name = "WT.npy")]
    teacher_weight: Option<PathBuf>,
    /// The teacher head's bias [V_t].
    #[arg(long, value_name = "BT.npy")]
    teacher_bias: Option<PathBuf>,
    /// A teacher given as logits (or log-probs with --teacher-logprobs)
    /// [N, V_t] (or [..., V_t]), V_t ≥ V (the first V columns are used).
    #[arg(long, value_name = "T.npy")]
    teacher_logits: Option<PathBuf>,
    /// A top-k teacher's vocabulary indices: int32 or int64 [N, k], with
    /// --topk-values.
    #[arg(long, value_name = "IDX.npy")]
    topk_indices: Option<PathBuf>,
    /// The top-k teacher's values [N, k] (logits, or log-probs with
    /// --teacher-logprobs).
    #[arg(long, value_name = "VAL.npy")]
    topk_values: Option<PathBuf>,
    /// A top-k teacher from a cache directory (`kdfuse teacher-cache build`);
    /// a cache of log-probs implies --teacher-logprobs.
    #[arg(long, value_name = "DIR")]
    teacher_cache: Option<PathBuf>,
    /// The cache's rows START:END (END exclusive; either may be left out)
    /// that match the student's rows. [default: all]
    #[arg(long, value_name = "START:END")]
    rows: Option<String>,
    /// Hard labels: 1-D int64 or int32 [N]; rows equal to --ignore-index are
    /// masked out. Needed when --alpha > 0.
    #[arg(long, value_name = "L.npy")]
    labels: Option<PathBuf>,
    /// Per-row weights: 1-D float [N], finite.
    #[arg(long, value_name = "W.npy")]
    row_weights: Option<PathBuf>,
    /// Rows per chunk (instead of --memory-budget).
    #[arg(long, value_name = "N")]
    chunk_rows: Option<usize>,
    /// Bytes of per-chunk buffers (logits and logit gradients): a number
    /// with an optional unit (B, KB, MB, GB, KiB, MiB, GiB), e.g. 512MiB.
    /// [default: 1GiB]
    #[arg(long, value_name = "SIZE")]
    memory_budget: Option<String>,
    /// Mutual learning: the teacher's gradients too (a teacher given as a
    /// head or as logits); needs --grad-out.
    #[arg(long)]
    mutual: bool,
    /// cpu (the fast CPU backend), oracle (f64 reference) or cuda.
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "oracle", "cuda"])]
    backend: String,
    /// Write the gradients into this directory (created if missing):
    /// grad_hidden.npy (the hidden states' shape), grad_weight.npy [V, H],
    /// grad_bias.npy [V] (with a bias); with --mutual also
    /// teacher_grad_hidden.npy, teacher_grad_weight.npy [V_t, H_t],
    /// teacher_grad_bias.npy, or teacher_grad_logits.npy [..., V].
    #[arg(long, value_name = "DIR")]
    grad_out: Option<PathBuf>,
    #[command(flatten)]
    opts: LossOptions,
    #[command(flatten)]
    tensor: TensorArgs,
    #[command(flatten)]
    kernel: KernelArgs,
}

/// Where the teacher comes from.
enum Teacher<'a> {
    Linear(&'a PathBuf, &'a PathBuf, Option<&'a PathBuf>),
    Logits(&'a PathBuf),
    Topk(&'a PathBuf, &'a PathBuf),
    Cache(&'a PathBuf),
}

impl Teacher<'_> {
    fn name(&self) -> &'static str {
        match self {
            Teacher::Linear(..) => "linear",
            Teacher::Logits(_) => "logits",
            Teacher::Topk(..) => "topk",
            Teacher::Cache(_) => "cache",
        }
    }
}

/// Exactly one teacher, complete.
fn teacher_source(a: &LinearLossArgs) -> Result<Teacher<'_>, CliError> {
    let given: Vec<&str> = [
        (a.teacher_hidden.is_some() || a.teacher_weight.is_some() || a.teacher_bias.is_some())
            .then_some("--teacher-hidden/--teacher-weight"),
        a.teacher_logits.as_ref().map(|_| "--teacher-logits"),
        (a.topk_indices.is_some() || a.topk_values.is_some())
            .then_some("--topk-indices/--topk-values"),
        a.teacher_cache.as_ref().map(|_| "--teacher-cache"),
    ]
    .into_iter()
    .flatten()
    .collect();
    let msg = |m: String| Err(CliError::Msg(m));
    if given.len() > 1 {
        return msg(format!(
            "{} exclude each other: give one teacher",
            given.join(" and ")
        ));
    }
    if a.rows.is_some() && a.teacher_cache.is_none() {
        return msg(
            "--rows selects rows of a --teacher-cache: give --teacher-cache DIR, or drop --rows"
                .into(),
        );
    }
    match (
        &a.teacher_hidden,
        &a.teacher_weight,
        &a.teacher_logits,
        &a.topk_indices,
        &a.topk_values,
        &a.teacher_cache,
    ) {
        (Some(h), Some(w), ..) => Ok(Teacher::Linear(h, w, a.teacher_bias.as_ref())),
        (Some(_), None, ..) => msg("--teacher-hidden needs --teacher-weight".into()),
        (None, Some(_), ..) => msg("--teacher-weight needs --teacher-hidden".into()),
        (None, None, Some(t), ..) => Ok(Teacher::Logits(t)),
        (_, _, _, Some(i), Some(v), _) => Ok(Teacher::Topk(i, v)),
        (_, _, _, Some(_), None, _) => msg("--topk-indices needs --topk-values".into()),
        (_, _, _, None, Some(_), _) => msg("--topk-values needs --topk-indices".into()),
        (_, _, _, _, _, Some(d)) => Ok(Teacher::Cache(d)),
        _ if a.teacher_bias.is_some() => {
            msg("--teacher-bias needs --teacher-hidden and --teacher-weight".into())
        }
        _ => msg(
            "a teacher is required: --teacher-hidden with --teacher-weight, --teacher-logits, \
             --topk-indices with --topk-values, or --teacher-cache DIR"
                .into(),
        ),
    }
}

/// The chunking from `--chunk-rows` or `--memory-budget` (at most one).
pub(super) fn chunking(
    chunk_rows: Option<usize>,
    memory_budget: Option<&str>,
) -> Result<Chunking, CliError> {
    match (chunk_rows, memory_budget) {
        (Some(_), Some(_)) => Err(CliError::Msg(
            "--chunk-rows and --memory-budget exclude each other: give one".into(),
        )),
        (Some(0), None) => Err(CliError::Msg("--chunk-rows must be ≥ 1, got 0".into())),
        (Some(r), None) => Ok(Chunking::Rows(r)),
        (None, Some(b)) => kdfuse_cli::bench::linear::parse_size(b)
            .map(Chunking::MemoryBudget)
            .map_err(|e| CliError::Msg(format!("--memory-budget {e}"))),
        (None, None) => Ok(Chunking::default()),
    }
}

/// A library error, with the argument renamed to this command's flag.
fn linear_flagged(e: KdError) -> CliError {
    let flag = match &e {
        KdError::InvalidArgument { arg, .. } => match *arg {
            "student_hidden" => Some("--student-hidden"),
            "student_weight" => Some("--student-weight"),
            "student_bias" => Some("--student-bias"),
            "teacher_hidden" => Some("--teacher-hidden"),
            "teacher_weight" => Some("--teacher-weight"),
            "teacher_bias" => Some("--teacher-bias"),
            "teacher_logits" => Some("--teacher-logits"),
            "topk_indices" | "teacher_topk_indices" | "topk_k" | "k" => Some("--topk-indices"),
            "topk_values" | "teacher_topk_values" => Some("--topk-values"),
            "labels" => Some("--labels"),
            "chunk_rows" => Some("--chunk-rows"),
            "memory_budget" => Some("--memory-budget"),
            "grad_teacher" => Some("--mutual"),
            _ => None,
        },
        _ => None,
    };
    match (flag, e) {
        (Some(flag), KdError::InvalidArgument { msg, .. }) => {
            CliError::Msg(format!("invalid argument `{flag}`: {msg}"))
        }
        (_, e) => flagged(e),
    }
}

/// A 2-D float array `[rows, cols]` exactly (a head).
fn read_head(path: &Path, arg: &str) -> Result<(Vec<f32>, usize, usize), CliError> {
    let (data, rows, cols, shape) = npy::read_rows(path, arg)?;
    if shape.len() != 2 {
        return Err(CliError::Msg(format!(
            "{arg} must be 2-D [V, H] (nn.Linear's weight), got shape {shape:?}"
        )));
    }
    Ok((data, rows, cols))
}

/// A 1-D float array of `len` entries (a bias).
fn read_bias(path: &Path, arg: &str, len: usize) -> Result<Vec<f32>, CliError> {
    let b = npy::read_vector(path, arg)?;
    if b.len() != len {
        return Err(CliError::Msg(format!(
            "shape mismatch: {arg} has {} entries, the head {len} rows",
            b.len()
        )));
    }
    Ok(b)
}

/// What runs the call: a loss backend under the host chunk loop (cpu,
/// oracle), or the device chunk loop on the GPU (cuda: cuBLAS GEMMs and the
/// fused kernels, `fused_linear::compute_cuda`).
enum Engine {
    Host(Box<dyn Backend>),
    Cuda(kdfuse::cuda::CudaBackend),
}

impl Engine {
    fn name(&self) -> &'static str {
        match self {
            Engine::Host(b) => b.name(),
            Engine::Cuda(_) => "cuda",
        }
    }

    fn compute(
        &self,
        inputs: &fused_linear::LinearInputs,
        spec: &LinearSpec,
    ) -> kdfuse::Result<fused_linear::LinearOutput> {
        match self {
            Engine::Host(b) => fused_linear::compute(b.as_ref(), inputs, spec),
            Engine::Cuda(b) => fused_linear::compute_cuda(b, inputs, spec),
        }
    }
}

/// The engine of `--backend`; no GPU for `cuda` is an error, never a
/// silent fallback.
fn make_backend(name: &str, kernel: &KernelArgs) -> Result<Engine, CliError> {
    match name {
        "cpu" => Ok(Engine::Host(Box::new(kdfuse::CpuBackend))),
        "oracle" => Ok(Engine::Host(kdfuse::create(kdfuse::BackendKind::Oracle)?)),
        "cuda" => match kdfuse::backend::select_cuda_for(0, kernel.forced())? {
            kdfuse::CudaChoice::Usable(b) => Ok(Engine::Cuda(b)),
            kdfuse::CudaChoice::Unavailable(why) => Err(CliError::Msg(format!(
                "invalid argument `--backend`: cuda is not usable here ({why}); use --backend cpu or oracle"
            ))),
        },
        other => Err(CliError::Msg(format!(
            "invalid argument `--backend`: unknown backend `{other}` (expected cpu, oracle or cuda)"
        ))),
    }
}

/// The row count of a 1-D input, checked against the student's `n`.
fn check_len(arg: &str, len: usize, n: usize) -> Result<(), CliError> {
    if len == n {
        Ok(())
    } else {
        Err(CliError::Msg(format!(
            "shape mismatch: {arg} has {len} entries for {n} rows"
        )))
    }
}

pub fn run(a: LinearLossArgs) -> Result<ExitCode, CliError> {
    let source = teacher_source(&a)?;
    let topk = matches!(source, Teacher::Topk(..) | Teacher::Cache(_));
    let inputs = [
        ("--student-hidden", Some(&a.student_hidden)),
        ("--student-weight", Some(&a.student_weight)),
        ("--student-bias", a.student_bias.as_ref()),
        ("--teacher-hidden", a.teacher_hidden.as_ref()),
        ("--teacher-weight", a.teacher_weight.as_ref()),
        ("--teacher-bias", a.teacher_bias.as_ref()),
        ("--teacher-logits", a.teacher_logits.as_ref()),
        ("--topk-indices", a.topk_indices.as_ref()),
        ("--topk-values", a.topk_values.as_ref()),
        ("--labels", a.labels.as_ref()),
        ("--row-weights", a.row_weights.as_ref()),
    ];
    a.tensor.install(&inputs)?;
    let chunking = chunking(a.chunk_rows, a.memory_budget.as_deref())?;
    if a.mutual && topk {
        return Err(CliError::Msg(
            "--mutual needs a teacher given as a head or as logits (a top-k teacher is fixed data)"
                .into(),
        ));
    }
    if a.mutual && a.grad_out.is_none() {
        return Err(CliError::Msg(
            "--mutual writes the teacher's gradients: give --grad-out DIR".into(),
        ));
    }
    let cache = match source {
        Teacher::Cache(dir) => Some((dir, open_cache(dir, a.opts.teacher_logprobs())?)),
        _ => None,
    };
    let teacher_logprobs = a.opts.teacher_logprobs()
        || cache
            .as_ref()
            .is_some_and(|(_, r)| r.meta().values_kind == ValuesKind::Logprobs);
    let loss = a
        .opts
        .spec(topk, teacher_logprobs, a.mutual, a.labels.is_some())?;
    let dtype: Dtype = a.opts.dtype()?;
    let backend = make_backend(&a.backend, &a.kernel)?;

    // Outputs: the files under --grad-out must not be inputs.
    let out_names: Vec<PathBuf> = match &a.grad_out {
        Some(dir) => {
            let mut names = vec!["grad_hidden.npy", "grad_weight.npy"];
            if a.student_bias.is_some() {
                names.push("grad_bias.npy");
            }
            if a.mutual {
                match source {
                    Teacher::Linear(_, _, bias) => {
                        names.extend(["teacher_grad_hidden.npy", "teacher_grad_weight.npy"]);
                        if bias.is_some() {
                            names.push("teacher_grad_bias.npy");
                        }
                    }
                    _ => names.push("teacher_grad_logits.npy"),
                }
            }
            names.into_iter().map(|n| dir.join(n)).collect()
        }
        None => Vec::new(),
    };
    let outputs: Vec<(&str, Option<&PathBuf>)> =
        out_names.iter().map(|p| ("--grad-out", Some(p))).collect();
    super::check_paths(&inputs, &outputs)?;

    let (hs, n, h, h_shape) = npy::read_rows(&a.student_hidden, "--student-hidden")?;
    let (ws, v, wh) = read_head(&a.student_weight, "--student-weight")?;
    if wh != h {
        return Err(CliError::Msg(format!(
            "shape mismatch: --student-weight has {wh} columns, --student-hidden H = {h}"
        )));
    }
    if v == 0 || h == 0 {
        return Err(CliError::Msg(format!(
            "--student-weight is [{v}, {h}]: V and H must be ≥ 1"
        )));
    }
    let bs = match &a.student_bias {
        Some(p) => Some(read_bias(p, "--student-bias", v)?),
        None => None,
    };
    let labels = match &a.labels {
        Some(p) => {
            let l = npy::read_labels(p, "--labels")?;
            check_len("--labels", l.len(), n)?;
            Some(l)
        }
        None => None,
    };
    let row_weights = match &a.row_weights {
        Some(p) => {
            let w = npy::read_vector(p, "--row-weights")?;
            check_len("--row-weights", w.len(), n)?;
            Some(w)
        }
        None => None,
    };
    let (hd, wd) = (
        OwnedData::from_f32(&hs, dtype),
        OwnedData::from_f32(&ws, dtype),
    );
    drop((hs, ws));
    let bd = bs.map(|b| OwnedData::from_f32(&b, dtype));
    let student = Linear::new(
        Matrix::new(hd.view(), n, h),
        Matrix::new(wd.view(), v, h),
        bd.as_ref().map(|b| b.view()),
    );

    // The teacher's data, owned here; `LinearTeacher` borrows it below.
    let mut t_lead = h_shape[..h_shape.len() - 1].to_vec();
    let mut teacher_json = json!({ "teacher": source.name() });
    let (mut t_hidden, mut t_weight, mut t_bias) = (None, None, None);
    let (mut t_logits, mut t_topk) = (None, None);
    let (mut t_shape_h, mut t_v) = (Vec::new(), v);
    match source {
        Teacher::Linear(hp, wp, bp) => {
            let (th, tn, thh, shape) = npy::read_rows(hp, "--teacher-hidden")?;
            if tn != n {
                return Err(CliError::Msg(format!(
                    "shape mismatch: --student-hidden has {n} rows, --teacher-hidden {tn}"
                )));
            }
            let (tw, tv, twh) = read_head(wp, "--teacher-weight")?;
            if twh != thh {
                return Err(CliError::Msg(format!(
                    "shape mismatch: --teacher-weight has {twh} columns, --teacher-hidden H = {thh}"
                )));
            }
            if tv < v {
                return Err(CliError::Msg(format!(
                    "shape mismatch: --teacher-weight has {tv} rows, fewer than the student's V = {v}"
                )));
            }
            let tb = match bp {
                Some(p) => Some(read_bias(p, "--teacher-bias", tv)?),
                None => None,
            };
            t_hidden = Some((OwnedData::from_f32(&th, dtype), thh));
            t_weight = Some(OwnedData::from_f32(&tw, dtype));
            t_bias = tb.map(|b| OwnedData::from_f32(&b, dtype));
            t_shape_h = shape;
            t_v = tv;
            teacher_json["teacher_hidden_size"] = json!(thh);
            teacher_json["teacher_vocab"] = json!(tv);
        }
        Teacher::Logits(p) => {
            let (t, tn, tv, shape) = npy::read_rows(p, "--teacher-logits")?;
            if tn != n {
                return Err(CliError::Msg(format!(
                    "shape mismatch: --student-hidden has {n} rows, --teacher-logits {tn}"
                )));
            }
            if tv < v {
                return Err(CliError::Msg(format!(
                    "shape mismatch: --teacher-logits has {tv} columns, fewer than the student's V = {v}"
                )));
            }
            t_lead = shape[..shape.len() - 1].to_vec();
            t_logits = Some((OwnedData::from_f32(&t, dtype), tv));
        }
        Teacher::Topk(ip, vp) => {
            let (idx, ni, ki) = npy::read_index_matrix(ip, "--topk-indices")?;
            let (vals, nv, kv) = npy::read_topk_values(vp, "--topk-values")?;
            if (nv, kv) != (ni, ki) {
                return Err(CliError::Msg(format!(
                    "shape mismatch: --topk-indices is [{ni}, {ki}], --topk-values [{nv}, {kv}]"
                )));
            }
            if ni != n {
                return Err(CliError::Msg(format!(
                    "shape mismatch: --student-hidden has {n} rows, --topk-indices {ni}"
                )));
            }
            if ki == 0 || ki > v {
                return Err(CliError::Msg(format!(
                    "--topk-indices: k = {ki} must be in [1, V = {v}]"
                )));
            }
            teacher_json["k"] = json!(ki);
            teacher_json["topk_mode"] = json!(loss.topk_mode.as_str());
            t_topk = Some((idx, OwnedData::from_f32(&vals, dtype), ki));
        }
        Teacher::Cache(_) => {
            let Some((dir, r)) = &cache else {
                return Err(CliError::Msg("internal: the cache was not opened".into()));
            };
            let (idx, vals, k, start, end) =
                cache_rows(dir, r, a.rows.as_deref(), "--student-hidden", n, v)?;
            teacher_json["k"] = json!(k);
            teacher_json["topk_mode"] = json!(loss.topk_mode.as_str());
            teacher_json["teacher_cache"] = json!(dir.display().to_string());
            teacher_json["cache_rows"] = json!([start, end]);
            t_topk = Some((idx, OwnedData::from_f32(&vals, dtype), k));
        }
    }
    let teacher = if let (Some((th, thh)), Some(tw)) = (&t_hidden, &t_weight) {
        LinearTeacher::Linear(Linear::new(
            Matrix::new(th.view(), n, *thh),
            Matrix::new(tw.view(), t_v, *thh),
            t_bias.as_ref().map(|b| b.view()),
        ))
    } else if let Some((t, tv)) = &t_logits {
        LinearTeacher::Logits(Logits::strided(t.view(), n, v, *tv))
    } else if let Some((idx, vals, k)) = &t_topk {
        LinearTeacher::Topk(TopkTeacher {
            indices: idx.view(),
            values: vals.view(),
            k: *k,
        })
    } else {
        return Err(CliError::Msg("internal: no teacher was read".into()));
    };
    let inputs = LinearInputs {
        student,
        teacher,
        labels: labels.as_deref(),
        row_weights: row_weights.as_deref(),
    };
    let spec = LinearSpec {
        loss,
        chunking,
        grads: a.grad_out.is_some(),
    };
    let bytes_per_row = fused_linear::bytes_per_row(&inputs, &spec);
    let out = backend
        .compute(&inputs, &spec)
        .map_err(|e| match (e, &cache) {
            (KdError::InvalidArgument { arg, msg }, Some((dir, _)))
                if arg.contains("topk") || arg == "k" =>
            {
                CliError::Msg(format!(
                    "invalid argument `--teacher-cache` {}: {msg}",
                    dir.display()
                ))
            }
            (e, _) => linear_flagged(e),
        })?;
    let backend_name = backend.name();

    if let Some(dir) = &a.grad_out {
        std::fs::create_dir_all(dir).map_err(|e| {
            CliError::Msg(format!("--grad-out {}: cannot create: {e}", dir.display()))
        })?;
        let g = out.student.as_ref().ok_or_else(|| {
            CliError::Msg(format!("backend {backend_name} returned no gradients"))
        })?;
        npy::write_array(&dir.join("grad_hidden.npy"), &g.hidden, &h_shape)?;
        npy::write_array(&dir.join("grad_weight.npy"), &g.weight, &[v, h])?;
        if let Some(b) = &g.bias {
            npy::write_array(&dir.join("grad_bias.npy"), b, &[v])?;
        }
        match &out.teacher {
            Some(TeacherGrads::Linear(t)) => {
                let thh = t_hidden.as_ref().map_or(0, |(_, thh)| *thh);
                npy::write_array(&dir.join("teacher_grad_hidden.npy"), &t.hidden, &t_shape_h)?;
                npy::write_array(&dir.join("teacher_grad_weight.npy"), &t.weight, &[t_v, thh])?;
                if let Some(b) = &t.bias {
                    npy::write_array(&dir.join("teacher_grad_bias.npy"), b, &[t_v])?;
                }
            }
            Some(TeacherGrads::Logits(g)) => {
                let mut shape = t_lead.clone();
                shape.push(v);
                npy::write_array(&dir.join("teacher_grad_logits.npy"), g, &shape)?;
            }
            None if a.mutual => {
                return Err(CliError::Msg(format!(
                    "backend {backend_name} returned no teacher gradients for --mutual"
                )))
            }
            None => {}
        }
    }

    let (loss_v, nonfinite) = loss_json(
        spec.loss.reduction == Reduction::None,
        out.loss,
        &out.row_losses,
    );
    let mut report = json!({
        "loss": loss_v,
        "rows": n,
        "hidden": h,
        "vocab": v,
        "valid_rows": out.valid_rows,
        "chunk_rows": out.chunk_rows,
        "chunks": n.div_ceil(out.chunk_rows.max(1)),
        "bytes_per_row": bytes_per_row,
        "backend": backend_name,
        "dtype": dtype.as_str(),
        "divergence": spec.loss.divergence.as_str(),
        "reduction": spec.loss.reduction.as_str(),
        "temperature": spec.loss.temperature,
        "alpha": spec.loss.alpha,
        "softcap": spec.loss.softcap,
        "teacher_logprobs": spec.loss.teacher_log_probs,
        "mutual": a.mutual,
        "grad_out": a.grad_out.as_ref().map(|p| p.display().to_string()),
    });
    if let (Some(r), Some(t)) = (report.as_object_mut(), teacher_json.as_object()) {
        r.extend(t.clone());
    }
    if let (Some(r), Some(nf)) = (report.as_object_mut(), nonfinite) {
        r.insert("nonfinite".into(), nf);
    }
    outln!("{report}")?;
    Ok(ExitCode::SUCCESS)
}
