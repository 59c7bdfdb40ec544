//! `kdfuse teacher-cache`: build a top-k teacher cache from dense logits,
//! or describe one.

use super::tensorfile::TensorArgs;
use super::{npy, CliError};
use clap::{Args, Subcommand};
use kdfuse::topk_select::{select_cpu, SelectSpec};
use kdfuse::{HostData, Logits};
use kdfuse_cli::teacher_cache::{
    CacheError, CacheMeta, CacheReader, CacheWriter, ValuesDtype, ValuesKind,
};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct CacheArgs {
    #[command(subcommand)]
    command: CacheCommand,
}

#[derive(Debug, Subcommand)]
enum CacheCommand {
    /// Select each row's top-k of dense teacher logits and write them as a
    /// cache of safetensors shards; prints JSON.
    Build(BuildArgs),
    /// Check a cache (index against shards) and print its metadata as JSON.
    Info(InfoArgs),
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Dense teacher logits: .npy or .safetensors [..., V] (leading dimensions
    /// flattened to rows), float32/bfloat16/float16 (float64 is converted).
    #[arg(long, value_name = "X.{npy,safetensors}")]
    logits: PathBuf,
    /// Entries kept per row, 1 ≤ k ≤ V.
    #[arg(short = 'k', long = "k", value_name = "K")]
    k: usize,
    /// The cache directory (created if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Rows per shard (the last shard of a run may hold fewer).
    #[arg(long, default_value_t = 65536, value_name = "R")]
    shard_rows: usize,
    /// Also store each row's log-sum-exp over all V (`lse`, F32 [rows]).
    #[arg(long)]
    with_lse: bool,
    /// Storage dtype of the values: f32 (exact) or bf16 (half the bytes,
    /// rounded to nearest even).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    values_dtype: String,
    /// A name for the teacher, kept in the metadata.
    #[arg(long, default_value = "", value_name = "S")]
    teacher_name: String,
    /// Store log-probabilities (logit − log-sum-exp over all V) instead of logits.
    #[arg(long)]
    logprobs: bool,
    /// Divide the logits by T > 0 before everything else (the values, the
    /// lse and the log-probs are then those of logits / T), and record T in
    /// the metadata. `kdfuse loss` applies its own --temperature to student
    /// and teacher alike, so it refuses such a cache; it is for consumers
    /// that expect tempered soft labels.
    #[arg(long, value_name = "T")]
    temperature: Option<f64>,
    /// Add the rows after those of an existing cache in --out (the same
    /// metadata), instead of starting a new one.
    #[arg(long)]
    append: bool,
    #[command(flatten)]
    tensor: TensorArgs,
}

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// The cache directory.
    #[arg(value_name = "DIR")]
    dir: PathBuf,
}

pub fn run(a: CacheArgs) -> Result<ExitCode, CliError> {
    match a.command {
        CacheCommand::Build(b) => build(b),
        CacheCommand::Info(i) => info(i),
    }
}

/// A cache error as a CLI error naming the option it came through.
pub(super) fn cache_err<'a>(flag: &'a str, dir: &'a Path) -> impl Fn(CacheError) -> CliError + 'a {
    let flag = flag.to_string();
    move |e| {
        let msg = e.to_string();
        // Errors that already name a file under the directory keep it; the
        // others get the directory.
        if msg.starts_with(&dir.display().to_string()) {
            CliError::Msg(format!("{flag}: {msg}"))
        } else {
            CliError::Msg(format!("{flag} {}: {msg}", dir.display()))
        }
    }
}

fn build(a: BuildArgs) -> Result<ExitCode, CliError> {
    a.tensor.install(&[("--logits", Some(&a.logits))])?;
    if a.shard_rows == 0 {
        return Err(CliError::Msg("--shard-rows must be ≥ 1".into()));
    }
    if a.k == 0 {
        return Err(CliError::Msg("-k must be ≥ 1".into()));
    }
    if let Some(t) = a.temperature {
        if !(t.is_finite() && t > 0.0 && (1.0 / t as f32).is_normal()) {
            return Err(CliError::Msg(format!(
                "--temperature must be finite and > 0 (1/T a normal f32), got {t}"
            )));
        }
    }
    let values_dtype: ValuesDtype = a.values_dtype.parse().map_err(CliError::Msg)?;
    let (mut x, n, v) = npy::read_matrix(&a.logits, "--logits")?;
    if a.k > v {
        return Err(CliError::Msg(format!(
            "-k {} exceeds the vocabulary of --logits (V = {v})",
            a.k
        )));
    }
    // A NaN has no place in the order of a row.
    if let Some(p) = x.iter().position(|x| x.is_nan()) {
        return Err(CliError::Msg(format!(
            "--logits {}: row {}, column {} is NaN",
            a.logits.display(),
            p / v,
            p % v
        )));
    }
    if let Some(t) = a.temperature {
        let t = t as f32;
        x.iter_mut().for_each(|x| *x /= t);
    }
    let meta = CacheMeta {
        k: a.k,
        vocab_size: v,
        temperature: a.temperature,
        teacher: a.teacher_name.clone(),
        values_kind: if a.logprobs {
            ValuesKind::Logprobs
        } else {
            ValuesKind::Logits
        },
        values_dtype,
        with_lse: a.with_lse,
    };
    let err = cache_err("--out", &a.out);
    let mut writer = if a.append {
        CacheWriter::append(&a.out, meta.clone(), a.shard_rows).map_err(&err)?
    } else {
        CacheWriter::create(&a.out, meta.clone(), a.shard_rows).map_err(&err)?
    };
    let first_row = writer.index().total_rows;
    let spec = SelectSpec {
        k: a.k,
        with_lse: a.with_lse || a.logprobs,
    };
    // One shard's rows at a time: the selection's memory stays bounded and
    // each shard is published as soon as it is selected.
    for lo in (0..n).step_by(a.shard_rows) {
        let hi = (lo + a.shard_rows).min(n);
        let logits = Logits::new(HostData::F32(&x[lo * v..hi * v]), hi - lo, v);
        let mut sel = select_cpu(&logits, &spec)?;
        if a.logprobs {
            let lse = sel.lse.as_deref().unwrap_or(&[]);
            for (r, row) in sel.values.chunks_mut(a.k).enumerate() {
                for x in row {
                    *x -= lse[r];
                }
            }
        }
        let lse = if a.with_lse { sel.lse.as_deref() } else { None };
        writer
            .push(sel.rows, &sel.indices, &sel.values, lse)
            .map_err(&err)?;
    }
    let index = writer.finish().map_err(&err)?;
    outln!(
        "{}",
        json!({
            "out": a.out.display().to_string(),
            "appended": a.append,
            "rows_added": index.total_rows - first_row,
            "total_rows": index.total_rows,
            "shards": index.shards.len(),
            "k": meta.k,
            "vocab_size": meta.vocab_size,
            "values_kind": meta.values_kind.as_str(),
            "values_dtype": meta.values_dtype.as_str(),
            "with_lse": meta.with_lse,
            "temperature": meta.temperature,
            "teacher": meta.teacher,
        })
    )?;
    Ok(ExitCode::SUCCESS)
}

fn info(a: InfoArgs) -> Result<ExitCode, CliError> {
    let r = CacheReader::open(&a.dir).map_err(cache_err("teacher-cache info", &a.dir))?;
    let index = serde_json::to_value(r.index())
        .map_err(|e| CliError::Msg(format!("cannot describe the index: {e}")))?;
    outln!("{index}")?;
    Ok(ExitCode::SUCCESS)
}
