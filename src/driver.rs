//! The interface every loss backend implements ([`Backend`]) and its driver.
//! The driver ([`Backend::compute`], [`Backend::compute_topk`]) validates the
//! call, allocates the outputs, counts the valid rows and assembles the
//! [`KdOutput`]; a backend computes one validated batch into the outputs it
//! is handed ([`Backend::dense`], [`Backend::topk`]).

use crate::error::Result;
use crate::spec::{LossSpec, Precision};
use crate::tensor::{Dtype, GradDtype, KdInputs, Logits, TopkInputs};

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

/// The outputs of one batch: allocated by the driver for the call, filled by
/// the backend's [`Backend::dense`] (or [`Backend::topk`]), then
/// returned as a [`KdOutput`].
#[derive(Debug)]
pub struct Outputs {
    /// Per-row losses (N), as [`KdOutput::row_losses`]; NaN until written.
    pub row_losses: Vec<f64>,
    /// ∂L/∂student, `[N, V]` dense, when a gradient was asked for; NaN until
    /// written, so that an entry a backend skipped cannot pass as a value.
    pub grad: Option<Vec<f32>>,
    /// ∂L/∂teacher, `[N, V]` dense, when a gradient and
    /// `LossSpec::grad_teacher` were asked for; NaN until written.
    pub grad_teacher: Option<Vec<f32>>,
    /// The dtype the gradients are rounded to (`None`: no gradient).
    pub grad_dtype: Option<Dtype>,
    /// The rows that count, from the labels; the emulation replaces it with
    /// the kernels' own count.
    pub valid_rows: usize,
    /// The reduced loss, when the backend reduces (the kernels do, on the
    /// device); `None` leaves it to the driver: the reduction's weight times
    /// the sum of the row losses.
    pub loss: Option<f64>,
}

/// A way of computing the fused loss and gradient.
pub trait Backend: Send + Sync {
    /// Short name (`oracle`, `cpu`, `cuda`).
    fn name(&self) -> &'static str;

    /// The arithmetic this backend runs `spec` with on a dense teacher: the
    /// GPU kernels, their emulation and the CPU backend follow
    /// [`LossSpec::kernel_precision`] (the default); the oracle and the eager
    /// baseline are exact whatever `spec.precision` says.
    fn precision(&self, spec: &LossSpec) -> Precision {
        spec.kernel_precision()
    }

    /// One batch with a dense teacher, `inputs` and `spec` already
    /// validated: the row losses, the gradients `out` holds buffers for and,
    /// when the backend reduces, the loss. Called by [`Backend::compute`].
    fn dense(&self, inputs: &KdInputs, spec: &LossSpec, out: &mut Outputs) -> Result<()>;

    /// As [`Backend::dense`], with a top-k teacher. Called by
    /// [`Backend::compute_topk`].
    fn topk(&self, inputs: &TopkInputs, spec: &LossSpec, out: &mut Outputs) -> Result<()>;

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
    ) -> Result<KdOutput> {
        drive(inputs, spec, grad, |out| self.dense(inputs, spec, out))
    }

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
    ) -> Result<KdOutput> {
        drive(inputs, spec, grad, |out| self.topk(inputs, spec, out))
    }
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

/// The inputs of one call as the driver sees them: a dense or a top-k
/// teacher.
pub(crate) trait CallInputs {
    /// [`validate`] or [`validate_topk`].
    fn check(&self, spec: &LossSpec) -> Result<()>;
    /// The student logits, `[N, V]`.
    fn student(&self) -> &Logits<'_>;
    /// The hard labels, if any.
    fn labels(&self) -> Option<&[i64]>;
    /// The row weights, if any.
    fn row_weights(&self) -> Option<&[f32]>;
    /// The rows whose label is not `ignore_index`.
    fn count_valid(&self, ignore_index: i64) -> usize;
}

/// [`CallInputs`] for input types with `student`, `labels`, `row_weights`
/// and `valid_rows`, each checked by its validation function.
macro_rules! call_inputs {
    ($($t:ident: $check:ident),+) => {$(
        impl CallInputs for $t<'_> {
            fn check(&self, spec: &LossSpec) -> Result<()> {
                $check(self, spec)
            }
            fn student(&self) -> &Logits<'_> {
                &self.student
            }
            fn labels(&self) -> Option<&[i64]> {
                self.labels
            }
            fn row_weights(&self) -> Option<&[f32]> {
                self.row_weights
            }
            fn count_valid(&self, ignore_index: i64) -> usize {
                self.valid_rows(ignore_index)
            }
        }
    )+};
}
call_inputs!(KdInputs: validate, TopkInputs: validate_topk);

/// The driver of one call: validates `inputs` and `spec`, allocates the
/// outputs, runs `batch` on them and assembles the [`KdOutput`].
pub(crate) fn drive(
    inputs: &impl CallInputs,
    spec: &LossSpec,
    grad: Option<GradDtype>,
    batch: impl FnOnce(&mut Outputs) -> Result<()>,
) -> Result<KdOutput> {
    inputs.check(spec)?;
    let student = inputs.student();
    let (n, v) = (student.rows, student.cols);
    let poisoned = || vec![f32::NAN; n * v];
    let mut out = Outputs {
        row_losses: vec![f64::NAN; n],
        grad: grad.map(|_| poisoned()),
        grad_teacher: (grad.is_some() && spec.grad_teacher).then(poisoned),
        grad_dtype: grad.map(|g| g.dtype_for(student.dtype())),
        valid_rows: inputs.count_valid(spec.ignore_index),
        loss: None,
    };
    batch(&mut out)?;
    let loss = out.loss.unwrap_or_else(|| {
        spec.reduction.row_weight(out.valid_rows, v) * crate::sum(&out.row_losses)
    });
    Ok(KdOutput {
        loss,
        row_losses: out.row_losses,
        valid_rows: out.valid_rows,
        grad: out.grad,
        grad_teacher: out.grad_teacher,
    })
}

/// Writes `scale · src` into `dst`, rounded to f32 and then to `dtype`: how
/// the f64 references store a gradient row.
pub(crate) fn store_row(dst: &mut [f32], src: &[f64], scale: f64, dtype: Dtype) {
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = dtype.round((scale * x) as f32);
    }
}
