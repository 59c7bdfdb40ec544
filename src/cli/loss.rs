//! `kdfuse loss`: the file interface.

use super::{make_backend, npy, CliError};
use clap::Args;
use kdfuse::{
    BackendKind, Divergence, Dtype, GradDtype, KdInputs, Logits, LossSpec, OwnedData, Reduction,
};
use serde_json::json;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct LossArgs {
    /// Student logits: 2-D C-order .npy [N, V], float32 or float16 (float64 is converted).
    #[arg(long, value_name = "S.npy")]
    student: PathBuf,
    /// Teacher logits: 2-D .npy [N, V_t] with V_t ≥ V; only the first V columns
    /// are used (a padded teacher vocabulary).
    #[arg(long, value_name = "T.npy")]
    teacher: PathBuf,
    /// Hard labels: 1-D int64 or int32 .npy of length N; rows equal to
    /// --ignore-index are masked out. Needed when --alpha > 0.
    #[arg(long, value_name = "L.npy")]
    labels: Option<PathBuf>,
    /// The divergence D(teacher ‖ student).
    #[arg(long, default_value = "forward-kl", value_parser = ["forward-kl", "reverse-kl", "jsd", "tvd", "soft-ce"])]
    divergence: String,
    /// JSD weight β in [0, 1] (0 = forward KL, 1 = reverse KL).
    #[arg(long, default_value_t = 0.5, allow_negative_numbers = true)]
    beta: f64,
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
    /// auto = CUDA when usable, else the fast CPU backend.
    #[arg(long, default_value = "auto", value_parser = ["auto", "cpu", "cuda", "oracle"])]
    backend: String,
    /// Write ∂loss/∂student as float32 .npy [N, V].
    #[arg(long, value_name = "G.npy")]
    grad: Option<PathBuf>,
}

pub fn run(a: LossArgs) -> Result<ExitCode, CliError> {
    let spec = LossSpec {
        divergence: a.divergence.parse::<Divergence>().map_err(CliError::Msg)?,
        beta: a.beta,
        temperature: a.temperature,
        alpha: a.alpha,
        t2_scaling: !a.no_t2_scaling,
        ignore_index: a.ignore_index,
        reduction: a.reduction.parse::<Reduction>().map_err(CliError::Msg)?,
        grad_scale: 1.0,
        ..LossSpec::default()
    };
    let dtype: Dtype = a.dtype.parse().map_err(CliError::Msg)?;
    let kind: BackendKind = a.backend.parse().map_err(CliError::Msg)?;
    spec.validate(a.labels.is_some())?;

    let (s, n, v) = npy::read_matrix(&a.student, "--student")?;
    let (t, tn, tv) = npy::read_matrix(&a.teacher, "--teacher")?;
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
    let sd = OwnedData::from_f32(&s, dtype);
    let td = OwnedData::from_f32(&t, dtype);
    let inputs = KdInputs {
        student: Logits::new(sd.view(), n, v),
        teacher: Logits::strided(td.view(), n, v, tv),
        labels: labels.as_deref(),
        row_weights: None,
    };
    inputs.validate(spec.ignore_index)?;
    let backend = make_backend(kind)?;
    let out = backend.compute(&inputs, &spec, a.grad.as_ref().map(|_| GradDtype::F32))?;
    if let (Some(path), Some(g)) = (&a.grad, &out.grad) {
        npy::write_matrix(path, g, n, v)?;
    }
    let loss = if spec.reduction == Reduction::None {
        json!(out
            .row_losses
            .iter()
            .map(|&x| json_num(x))
            .collect::<Vec<_>>())
    } else {
        json_num(out.loss)
    };
    let report = json!({
        "loss": loss,
        "rows": n,
        "cols": v,
        "valid_rows": out.valid_rows,
        "backend": backend.name(),
        "dtype": dtype.as_str(),
        "divergence": spec.divergence.as_str(),
        "reduction": spec.reduction.as_str(),
        "temperature": spec.temperature,
        "alpha": spec.alpha,
        "grad": a.grad.as_ref().map(|p| p.display().to_string()),
    });
    println!("{report}");
    Ok(ExitCode::SUCCESS)
}

/// JSON has no inf/NaN: they are written as the strings "inf", "-inf", "nan".
pub(super) fn json_num(x: f64) -> serde_json::Value {
    if x.is_finite() {
        json!(x)
    } else if x.is_nan() {
        json!("nan")
    } else if x > 0.0 {
        json!("inf")
    } else {
        json!("-inf")
    }
}
