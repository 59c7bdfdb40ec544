//! `kdfuse feature-loss`: the feature losses from .npy files.

use super::tensorfile::TensorArgs;
use super::{npy, CliError};
use clap::Args;
use kdfuse::{
    BackendKind, Dtype, FeatureGrads, FeatureInputs, FeatureKind, FeatureSpec, Features, GradDtype,
    OwnedData, Reduction,
};
use serde_json::json;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct FeatureLossArgs {
    /// Student features: C-order .npy or .safetensors, float32/float16/float64
    /// (bfloat16 in .safetensors); [N, H] for mse
    /// and cosine, [N, C, S] or [N, C, H, W] for attention.
    #[arg(long, value_name = "FS.npy")]
    student: PathBuf,
    /// Teacher features: the student's shape (attention: any C, the same
    /// spatial size).
    #[arg(long, value_name = "FT.npy")]
    teacher: PathBuf,
    /// mse = Σ(s − t)² per row; cosine = 1 − cos(s, t) per row; attention =
    /// Σ_j (Q̂_s − Q̂_t)² per sample, Q = mean_c x², Q̂ = Q/max(‖Q‖₂, ε).
    #[arg(long, value_parser = ["mse", "cosine", "attention"])]
    kind: String,
    /// Reduction over rows: mean = Σ/(N·H) (mse), Σ/N (cosine), Σ/(N·S)
    /// (attention); batchmean = Σ/N; sum; none (per-row losses).
    #[arg(long, default_value = "mean", value_parser = ["mean", "batchmean", "sum", "none"])]
    reduction: String,
    /// ε of the norm clamps (default 1e-8 for cosine, 1e-12 for attention;
    /// mse has none).
    #[arg(long, allow_negative_numbers = true)]
    eps: Option<f64>,
    /// Precision the backend computes from; the inputs are rounded to it first.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
    dtype: String,
    /// auto = CUDA when usable, else the fast CPU backend.
    #[arg(long, default_value = "auto", value_parser = ["auto", "cpu", "cuda", "oracle"])]
    backend: String,
    /// Write ∂loss/∂student as float32 .npy of the student's shape.
    #[arg(long, value_name = "G.npy")]
    grad: Option<PathBuf>,
    /// Write ∂loss/∂teacher as float32 .npy of the teacher's shape.
    #[arg(long, value_name = "GT.npy")]
    grad_teacher: Option<PathBuf>,
    #[command(flatten)]
    tensor: TensorArgs,
}

/// `[N, C, S]` of a file's shape for `kind` (C = 1 for rows).
fn dims(kind: FeatureKind, shape: &[usize], arg: &str) -> Result<(usize, usize, usize), CliError> {
    match (kind, shape) {
        (FeatureKind::Mse | FeatureKind::Cosine, &[n, h]) => Ok((n, 1, h)),
        (FeatureKind::Attention, &[n, c, s]) => Ok((n, c, s)),
        (FeatureKind::Attention, &[n, c, h, w]) => match h.checked_mul(w) {
            Some(s) => Ok((n, c, s)),
            None => Err(CliError::Msg(format!(
                "{arg}: the map size H·W of shape {shape:?} overflows"
            ))),
        },
        (FeatureKind::Attention, _) => Err(CliError::Msg(format!(
            "{arg} must be 3-D [N, C, S] or 4-D [N, C, H, W] for attention, got shape {shape:?}"
        ))),
        _ => Err(CliError::Msg(format!(
            "{arg} must be 2-D [N, H] for {kind}, got shape {shape:?}"
        ))),
    }
}

/// Makes the backend; `auto` resolves as for `kdfuse loss` (CUDA when
/// usable, else the CPU, with a note on stderr saying why).
fn make_backend(kind: BackendKind) -> Result<Box<dyn kdfuse::FeatureBackend>, CliError> {
    let kind = match kind {
        BackendKind::Auto => super::make_backend(kind)?
            .name()
            .parse()
            .unwrap_or(BackendKind::Cpu),
        k => k,
    };
    Ok(kdfuse::feature::create(kind)?)
}

pub fn run(a: FeatureLossArgs) -> Result<ExitCode, CliError> {
    let kind: FeatureKind = a.kind.parse().map_err(CliError::Msg)?;
    if kind == FeatureKind::Mse && a.eps.is_some() {
        return Err(CliError::Msg(
            "--eps is the norm clamp of cosine and attention: mse has none (drop --eps)".into(),
        ));
    }
    let inputs = [
        ("--student", Some(&a.student)),
        ("--teacher", Some(&a.teacher)),
    ];
    a.tensor.install(&inputs)?;
    super::check_paths(
        &inputs,
        &[
            ("--grad", a.grad.as_ref()),
            ("--grad-teacher", a.grad_teacher.as_ref()),
        ],
    )?;
    let spec = FeatureSpec {
        kind,
        reduction: a.reduction.parse::<Reduction>().map_err(CliError::Msg)?,
        eps: a.eps,
        grad_scale: 1.0,
    };
    let dtype: Dtype = a.dtype.parse().map_err(CliError::Msg)?;
    let backend_kind: BackendKind = a.backend.parse().map_err(CliError::Msg)?;
    spec.validate()?;

    let (s, s_shape) = npy::read_array(&a.student, "--student")?;
    let (t, t_shape) = npy::read_array(&a.teacher, "--teacher")?;
    let (n, cs, width) = dims(kind, &s_shape, "--student")?;
    let (tn, ct, t_width) = dims(kind, &t_shape, "--teacher")?;
    if tn != n {
        return Err(CliError::Msg(format!(
            "shape mismatch: --student has {n} rows, --teacher {tn}"
        )));
    }
    if t_width != width || (kind != FeatureKind::Attention && t_shape != s_shape) {
        let what = if kind == FeatureKind::Attention {
            "spatial size"
        } else {
            "shape"
        };
        return Err(CliError::Msg(format!(
            "shape mismatch: --teacher has {what} {t_shape:?}, the student {s_shape:?}"
        )));
    }
    let sd = OwnedData::from_f32(&s, dtype);
    let td = OwnedData::from_f32(&t, dtype);
    let inputs = FeatureInputs {
        student: Features::maps(sd.view(), n, cs, width),
        teacher: Features::maps(td.view(), n, ct, width),
    };
    inputs.validate(kind)?;
    let backend = make_backend(backend_kind)?;
    let grads = FeatureGrads {
        student: a.grad.is_some(),
        teacher: a.grad_teacher.is_some(),
        dtype: GradDtype::F32,
    };
    let out = backend.feature_loss(&inputs, &spec, grads)?;
    if let (Some(path), Some(g)) = (&a.grad, &out.grad_student) {
        npy::write_array(path, g, &s_shape)?;
    }
    if let (Some(path), Some(g)) = (&a.grad_teacher, &out.grad_teacher) {
        npy::write_array(path, g, &t_shape)?;
    }
    let (loss, nonfinite) =
        super::loss::loss_json(spec.reduction == Reduction::None, out.loss, &out.row_losses);
    let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
    let mut report = json!({
        "loss": loss,
        "kind": kind.as_str(),
        "rows": n,
        "student_shape": s_shape,
        "teacher_shape": t_shape,
        "backend": backend.name(),
        "dtype": dtype.as_str(),
        "reduction": spec.reduction.as_str(),
        "eps": if kind == FeatureKind::Mse { None } else { Some(spec.eps()) },
        "grad": path(&a.grad),
        "grad_teacher": path(&a.grad_teacher),
    });
    if let (Some(r), Some(n)) = (report.as_object_mut(), nonfinite) {
        r.insert("nonfinite".into(), n);
    }
    outln!("{report}")?;
    Ok(ExitCode::SUCCESS)
}
