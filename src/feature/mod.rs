//! Feature distillation (docs/DESIGN.md §1, "Feature losses"): losses between
//! student and teacher feature rows, with the gradient with respect to the
//! student and, optionally, the teacher features.
//!
//! Per row (sample) i, with ε the spec's `eps`:
//!
//! - **mse**: `r_i = Σ_h (s_h − t_h)²`; the default reduction `mean` divides
//!   the sum by N·H: PyTorch's `mse_loss(s, t)` (mean over all elements).
//! - **cosine**: `r_i = 1 − cos(s, t)`, `cos = ⟨s, t⟩ / (max(‖s‖₂, ε)·max(‖t‖₂, ε))`
//!   (PyTorch's `cosine_similarity`, ε = 1e-8: each norm is clamped
//!   separately, so a zero row has cos = 0 and r = 1). `mean` divides by N.
//!   A clamped norm is a constant for the gradient (the exact derivative of
//!   the formula; where 0 < ‖s‖ < ε this can differ from PyTorch's autograd),
//!   so a zero student row gets `−w·t/(ε·max(‖t‖, ε))`, of size 1/ε, as in
//!   PyTorch (beyond f16's range).
//! - **attention** (Zagoruyko & Komodakis 2017, their code's form): a sample is
//!   `[C, S]` (channels × positions, S = H·W; student and teacher may have
//!   different C, the same S). `Q_j = (1/C) Σ_c x_{c,j}²`,
//!   `Q̂ = Q / max(‖Q‖₂, ε)` (`F.normalize`, ε = 1e-12),
//!   `r_i = Σ_j (Q̂_s,j − Q̂_t,j)²`; `mean` divides by N·S, i.e.
//!   `(at(s) − at(t)).pow(2).mean()`.
//!
//! Reductions ([`Reduction`]): `mean` (default, as above), `batchmean`
//! (Σ r_i / N), `sum` (Σ r_i), `none` (the per-row vector; the scalar is the
//! sum). Gradients are those of `grad_scale · L`. fp32 sums of squares
//! overflow for feature values beyond about 1e19.
//!
//! Backends: [`crate::Oracle`] (f64, the definitions directly),
//! [`crate::CpuBackend`] (rayon over rows, the kernels' fp32 row arithmetic
//! from kernels/feature_math.cuh) and [`crate::cuda::CudaBackend`]
//! (kernels/feature.cu, one launch for the batch; device buffers through
//! [`crate::cuda::CudaBackend::feature`]), all through [`FeatureBackend`].

pub mod check;
mod cpu;
mod cuda;
mod cuda_host;
#[doc(hidden)]
#[cfg(feature = "emulation")]
pub mod emu;
mod inputs;
pub mod oracle;
pub(crate) mod params;

pub use cuda::{FeatureBuffers, RawFeatureArgs};
pub use inputs::{FeatureInputs, FeatureLayout, Features};

use crate::backend::BackendKind;
use crate::error::{invalid, Result};
use crate::spec::{spellings, Reduction};
use crate::tensor::{Dtype, GradDtype};

/// Which feature loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FeatureKind {
    /// Squared error, `Σ_h (s − t)²` per row.
    #[default]
    Mse,
    /// `1 − cos(s, t)` per row, norms clamped at ε.
    Cosine,
    /// Attention transfer: squared distance of the L2-normalised maps
    /// `mean_c x²`, per sample `[C, S]`.
    Attention,
}

spellings!(FeatureKind, "feature loss",
    Mse => "mse",
    Cosine => "cosine",
    Attention => "attention",
);

impl FeatureKind {
    /// ε when the spec does not set one: 1e-8 for cosine (PyTorch's
    /// `cosine_similarity`), 1e-12 for attention (`F.normalize`); MSE has none
    /// (0).
    pub fn default_eps(self) -> f64 {
        match self {
            FeatureKind::Mse => 0.0,
            FeatureKind::Cosine => 1e-8,
            FeatureKind::Attention => 1e-12,
        }
    }

    /// The id the kernels use (KD_FEAT_* in kernels/feature_math.cuh).
    pub(crate) fn id(self) -> i32 {
        match self {
            FeatureKind::Mse => 0,
            FeatureKind::Cosine => 1,
            FeatureKind::Attention => 2,
        }
    }
}

/// The feature loss to compute.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FeatureSpec {
    /// The loss.
    pub kind: FeatureKind,
    /// The reduction over rows (`mean` by default, see the module docs).
    #[serde(serialize_with = "reduction_name")]
    pub reduction: Reduction,
    /// ε of the norm clamps; `None` is the kind's default
    /// ([`FeatureKind::default_eps`]). MSE has no clamp: `Some` with MSE
    /// fails validation.
    pub eps: Option<f64>,
    /// Upstream gradient scale: the gradients are those of `grad_scale · L`.
    pub grad_scale: f64,
}

fn reduction_name<S: serde::Serializer>(
    r: &Reduction,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(r.as_str())
}

impl Default for FeatureSpec {
    fn default() -> Self {
        FeatureSpec::new(FeatureKind::Mse)
    }
}

impl FeatureSpec {
    /// `kind` with the mean reduction, the default ε and scale 1.
    pub fn new(kind: FeatureKind) -> Self {
        FeatureSpec {
            kind,
            reduction: Reduction::Mean,
            eps: None,
            grad_scale: 1.0,
        }
    }

    /// The ε in effect.
    pub fn eps(&self) -> f64 {
        self.eps.unwrap_or(self.kind.default_eps())
    }

    /// Checks every parameter.
    pub fn validate(&self) -> Result<()> {
        if let (FeatureKind::Mse, Some(eps)) = (self.kind, self.eps) {
            return invalid(
                "eps",
                format!("mse has no norm clamp: eps is for cosine and attention, got {eps}"),
            );
        }
        if let Some(eps) = self.eps {
            if !(eps.is_finite() && eps >= f32::MIN_POSITIVE as f64 && eps <= f32::MAX as f64) {
                return invalid(
                    "eps",
                    format!(
                        "must be finite and in [{:e}, {:e}] (an fp32 normal number), got {eps}",
                        f32::MIN_POSITIVE,
                        f32::MAX
                    ),
                );
            }
        }
        if !self.grad_scale.is_finite() {
            return invalid(
                "grad_scale",
                format!("must be finite, got {}", self.grad_scale),
            );
        }
        crate::spec::kernel_f32("grad_scale", "grad_scale", self.grad_scale)?;
        Ok(())
    }

    /// Elements per row that `mean` averages over: H for MSE, 1 for cosine,
    /// S for attention.
    pub fn mean_count(&self, layout: &FeatureLayout) -> usize {
        match self.kind {
            FeatureKind::Mse => layout.student_len(),
            FeatureKind::Cosine => 1,
            FeatureKind::Attention => layout.width,
        }
    }

    /// The factor that turns Σ r_i into the reduced loss.
    pub fn loss_weight(&self, layout: &FeatureLayout) -> f64 {
        self.reduction
            .row_weight(layout.rows, self.mean_count(layout))
    }

    /// The weight of every row's gradient: [`FeatureSpec::loss_weight`] × `grad_scale`.
    pub fn grad_weight(&self, layout: &FeatureLayout) -> f64 {
        self.grad_scale * self.loss_weight(layout)
    }
}

/// Which gradients to compute, and in which dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FeatureGrads {
    /// ∂L/∂student.
    pub student: bool,
    /// ∂L/∂teacher.
    pub teacher: bool,
    /// f32, or the inputs' dtype (rounded once from fp32).
    pub dtype: GradDtype,
}

impl FeatureGrads {
    /// The loss only.
    pub const NONE: FeatureGrads = FeatureGrads {
        student: false,
        teacher: false,
        dtype: GradDtype::F32,
    };

    /// The student's gradient.
    pub fn student(dtype: GradDtype) -> Self {
        FeatureGrads {
            student: true,
            teacher: false,
            dtype,
        }
    }

    /// Both gradients.
    pub fn both(dtype: GradDtype) -> Self {
        FeatureGrads {
            student: true,
            teacher: true,
            dtype,
        }
    }

    /// The dtype the gradients are written in, for inputs of `input`.
    pub fn out_dtype(&self, input: Dtype) -> Dtype {
        self.dtype.dtype_for(input)
    }
}

/// What a backend returns for one batch.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureOutput {
    /// The reduced loss (for `Reduction::None`, the sum of the rows).
    pub loss: f64,
    /// Per-row losses r_i (unweighted).
    pub row_losses: Vec<f64>,
    /// ∂L/∂student, dense `[N, C_s·S]` (or `[N, H]`), as f32 values (rounded
    /// to the input dtype first when [`GradDtype::Input`] was asked for).
    pub grad_student: Option<Vec<f32>>,
    /// ∂L/∂teacher, dense `[N, C_t·S]` (or `[N, H]`).
    pub grad_teacher: Option<Vec<f32>>,
}

/// The outputs of one feature batch: allocated by the driver for the call,
/// filled by the backend's [`FeatureBackend::batch`], then returned
/// as a [`FeatureOutput`].
#[derive(Debug)]
pub struct Outputs {
    /// Per-row losses r_i (N); NaN until written.
    pub row_losses: Vec<f64>,
    /// ∂L/∂student, dense `[N, C_s·S]`, when asked for; NaN until written,
    /// so that an entry a backend skipped cannot pass as a value.
    pub grad_student: Option<Vec<f32>>,
    /// ∂L/∂teacher, dense `[N, C_t·S]`, when asked for; NaN until written.
    pub grad_teacher: Option<Vec<f32>>,
    /// The dtype the gradients are rounded to.
    pub grad_dtype: Dtype,
    /// The reduced loss, when the backend reduces (the kernels do, on the
    /// device); `None` leaves it to the driver:
    /// [`FeatureSpec::loss_weight`] times the sum of the row losses.
    pub loss: Option<f64>,
}

/// A way of computing the feature losses.
pub trait FeatureBackend: Send + Sync {
    /// Short name (`oracle`, `cpu`, `cuda`).
    fn name(&self) -> &'static str;

    /// One batch, `inputs` and `spec` already validated: the row losses,
    /// the gradients `out` holds buffers for and, when the backend reduces,
    /// the loss. Called by [`FeatureBackend::feature_loss`].
    fn batch(&self, inputs: &FeatureInputs, spec: &FeatureSpec, out: &mut Outputs) -> Result<()>;

    /// The loss and the gradients asked for. Inputs and spec are validated
    /// first.
    fn feature_loss(
        &self,
        inputs: &FeatureInputs,
        spec: &FeatureSpec,
        grads: FeatureGrads,
    ) -> Result<FeatureOutput> {
        drive(inputs, spec, grads, |out| self.batch(inputs, spec, out))
    }
}

/// Validation shared by every backend.
pub(crate) fn validate(inputs: &FeatureInputs, spec: &FeatureSpec) -> Result<()> {
    spec.validate()?;
    inputs.validate(spec.kind)
}

/// The driver of one call: validates `inputs` and `spec`, allocates the
/// outputs `grads` asks for, runs `batch` on them and assembles the
/// [`FeatureOutput`].
fn drive(
    inputs: &FeatureInputs,
    spec: &FeatureSpec,
    grads: FeatureGrads,
    batch: impl FnOnce(&mut Outputs) -> Result<()>,
) -> Result<FeatureOutput> {
    validate(inputs, spec)?;
    let layout = inputs.layout(spec.kind);
    let n = layout.rows;
    let poisoned = |want: bool, len: usize| want.then(|| vec![f32::NAN; n * len]);
    let mut out = Outputs {
        row_losses: vec![f64::NAN; n],
        grad_student: poisoned(grads.student, layout.student_len()),
        grad_teacher: poisoned(grads.teacher, layout.teacher_len()),
        grad_dtype: grads.out_dtype(inputs.student.dtype()),
        loss: None,
    };
    batch(&mut out)?;
    Ok(FeatureOutput {
        loss: out
            .loss
            .unwrap_or_else(|| spec.loss_weight(&layout) * crate::sum(&out.row_losses)),
        row_losses: out.row_losses,
        grad_student: out.grad_student,
        grad_teacher: out.grad_teacher,
    })
}

/// Creates a feature backend. `Auto` falls back to the CPU when CUDA is
/// unusable.
pub fn create(kind: BackendKind) -> Result<Box<dyn FeatureBackend>> {
    match kind {
        BackendKind::Oracle => Ok(Box::new(crate::oracle::Oracle)),
        BackendKind::Cpu => Ok(Box::new(crate::cpu::CpuBackend)),
        BackendKind::Cuda => Ok(Box::new(crate::cuda::CudaBackend::new(0)?)),
        BackendKind::Auto => Ok(match crate::backend::select_cuda(0)? {
            crate::backend::CudaChoice::Usable(b) => Box::new(b),
            crate::backend::CudaChoice::Unavailable(_) => Box::new(crate::cpu::CpuBackend),
        }),
    }
}
