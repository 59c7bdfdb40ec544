//! The one interface every backend implements, and backend selection.

use crate::error::{KdError, Result};
use crate::spec::{LossSpec, Precision};
use crate::tensor::{GradDtype, KdInputs, TopkInputs};
use std::fmt;
use std::str::FromStr;

/// What a backend returns for one batch.
#[derive(Debug, Clone, PartialEq)]
pub struct KdOutput {
    /// The reduced loss (for `Reduction::None`, the sum of the rows).
    pub loss: f64,
    /// Per-row losses ℓ, times the row weights when given (before the
    /// reduction's weight; ignored rows 0).
    pub row_losses: Vec<f64>,
    /// Rows that counted.
    pub valid_rows: usize,
    /// ∂L/∂student, `[N, V]` dense row-major, as f32 values (rounded to the
    /// input dtype first when [`GradDtype::Input`] was asked for).
    pub grad: Option<Vec<f32>>,
    /// ∂L/∂teacher, `[N, V]` dense, in the gradient's dtype; only when
    /// `LossSpec::grad_teacher` was asked for (with a gradient dtype).
    pub grad_teacher: Option<Vec<f32>>,
}

/// A way of computing the fused loss and gradient.
pub trait Backend: Send + Sync {
    /// Short name (`oracle`, `cpu`, `cuda`).
    fn name(&self) -> &'static str;

    /// The arithmetic this backend runs `spec` with on a dense teacher: the
    /// GPU kernels, their emulation and the CPU backend follow
    /// [`LossSpec::kernel_precision`]; the oracle is exact whatever
    /// `spec.precision` says.
    fn precision(&self, spec: &LossSpec) -> Precision {
        let _ = spec;
        Precision::Exact
    }

    /// Loss and, when `grad` is `Some`, the gradient with respect to the
    /// student logits. Inputs and spec are validated first.
    ///
    /// NaN and infinities (every backend): −inf is a masked entry; a NaN or
    /// a +inf in a used input (the student row; the teacher row when α < 1,
    /// masked columns included), or a used side that is all −inf, makes the
    /// row's loss and every entry of its gradient rows NaN, and the reduced
    /// loss NaN. Soft-capping maps +inf to the cap. Ignored rows and rows of
    /// weight 0 are not used (loss 0, gradient 0).
    fn compute(
        &self,
        inputs: &KdInputs,
        spec: &LossSpec,
        grad: Option<GradDtype>,
    ) -> Result<KdOutput>;

    /// As [`Backend::compute`], with a top-k (sparse) teacher
    /// (docs/DESIGN.md §4, mode `spec.topk_mode`). Indices are validated first.
    ///
    /// NaN and infinities as [`Backend::compute`]; used inputs: the values
    /// when α < 1, the student on the support, and the whole student row in
    /// `full` and `tail` or when α > 0 (`support` with α = 0 does not read
    /// the student off the support). All values −inf is NaN in `support`
    /// and `full`, an empty support (P_tail = 1) in `tail`.
    fn compute_topk(
        &self,
        inputs: &TopkInputs,
        spec: &LossSpec,
        grad: Option<GradDtype>,
    ) -> Result<KdOutput>;
}

/// Validation shared by every backend.
pub(crate) fn validate(inputs: &KdInputs, spec: &LossSpec) -> Result<()> {
    spec.validate(inputs.labels.is_some())?;
    inputs.validate(spec.ignore_index)
}

/// Validation shared by every backend, top-k teacher.
pub(crate) fn validate_topk(inputs: &TopkInputs, spec: &LossSpec) -> Result<()> {
    spec.validate(inputs.labels.is_some())?;
    spec.validate_topk()?;
    inputs.validate(spec.ignore_index)
}

/// Which backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendKind {
    /// CUDA when usable, else the fast CPU backend.
    #[default]
    Auto,
    /// The fast CPU backend.
    Cpu,
    /// The CUDA backend.
    Cuda,
    /// The f64 reference.
    Oracle,
}

impl BackendKind {
    /// The CLI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Auto => "auto",
            BackendKind::Cpu => "cpu",
            BackendKind::Cuda => "cuda",
            BackendKind::Oracle => "oracle",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        [
            BackendKind::Auto,
            BackendKind::Cpu,
            BackendKind::Cuda,
            BackendKind::Oracle,
        ]
        .into_iter()
        .find(|b| b.as_str() == s)
        .ok_or_else(|| format!("unknown backend `{s}` (expected auto, cpu, cuda or oracle)"))
    }
}

/// What `Auto` finds: the CUDA backend, or why CUDA is unavailable (the
/// caller then runs on the CPU).
pub enum CudaChoice {
    /// CUDA is usable: its backend on the requested device.
    Usable(crate::cuda::CudaBackend),
    /// No driver, no device or no kernels: the reason, to report.
    Unavailable(String),
}

/// The one "CUDA if usable, else the CPU" rule: the CUDA backend on
/// `device`, or [`CudaChoice::Unavailable`] when CUDA cannot be used here.
/// Any other failure (a usable driver that errs) is an error, never a
/// silent fallback.
pub fn select_cuda(device: usize) -> Result<CudaChoice> {
    match crate::cuda::CudaBackend::new(device) {
        Ok(b) => Ok(CudaChoice::Usable(b)),
        Err(KdError::CudaUnavailable(why)) => Ok(CudaChoice::Unavailable(why)),
        Err(e) => Err(e),
    }
}

/// Creates a backend. `Auto` falls back to the CPU when CUDA is unusable
/// ([`select_cuda`]).
pub fn create(kind: BackendKind) -> Result<Box<dyn Backend>> {
    match kind {
        BackendKind::Oracle => Ok(Box::new(crate::oracle::Oracle)),
        BackendKind::Cpu => Ok(Box::new(crate::cpu::CpuBackend)),
        BackendKind::Cuda => Ok(Box::new(crate::cuda::CudaBackend::new(0)?)),
        BackendKind::Auto => Ok(match select_cuda(0)? {
            CudaChoice::Usable(b) => Box::new(b),
            CudaChoice::Unavailable(_) => Box::new(crate::cpu::CpuBackend),
        }),
    }
}
