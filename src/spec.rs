//! What loss to compute: divergence, temperature, mixing, reduction
//! (docs/DESIGN.md §1), and the validation of every parameter.

use crate::error::{invalid, Result};
use std::fmt;

/// The spellings of a fieldless enum, from its variants' spellings in CLI
/// order: `ALL`, `as_str`, `Display`, and `FromStr`, whose error names the
/// kind (`$kind`) and lists every spelling.
macro_rules! spellings {
    ($t:ident, $kind:literal, $($v:ident => $s:literal),+ $(,)?) => {
        impl $t {
            /// Every value, in CLI order.
            pub const ALL: [$t; [$($s),+].len()] = [$($t::$v),+];

            /// The CLI/API spelling.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($t::$v => $s),+
                }
            }
        }

        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> std::result::Result<Self, String> {
                $t::ALL
                    .into_iter()
                    .find(|x| x.as_str() == s)
                    .ok_or_else(|| $crate::spec::unknown($kind, s, &[$($s),+]))
            }
        }
    };
}
pub(crate) use spellings;

/// "unknown `kind` `s` (expected a, b or c)".
pub(crate) fn unknown(kind: &str, s: &str, names: &[&str]) -> String {
    let expected = match names {
        [rest @ .., last] if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => names.join(""),
    };
    format!("unknown {kind} `{s}` (expected {expected})")
}

/// The divergence `D(p, q)` between the softened teacher `p` and student `q`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Divergence {
    /// KL(p‖q) = Σ p (log p − log q).
    ForwardKl,
    /// KL(q‖p).
    ReverseKl,
    /// Generalized Jensen–Shannon with weight β (`LossSpec::beta`); β = 0 is
    /// exactly forward KL and β = 1 exactly reverse KL.
    Jsd,
    /// Total variation distance ½ Σ |p − q| (bounded: in [0, 1]).
    Tvd,
    /// Soft cross-entropy −Σ p log q: forward KL plus the teacher's entropy
    /// H(p), with forward KL's gradient.
    SoftCe,
}

spellings!(Divergence, "divergence",
    ForwardKl => "forward-kl",
    ReverseKl => "reverse-kl",
    Jsd => "jsd",
    Tvd => "tvd",
    SoftCe => "soft-ce",
);

/// How per-row losses become one number (TRL's `batchmean` by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Reduction {
    /// Σ ℓ over valid rows / number of valid rows (0 when none).
    #[default]
    BatchMean,
    /// Σ ℓ over valid rows.
    Sum,
    /// Σ ℓ / (valid rows · V), PyTorch's element mean.
    Mean,
    /// The per-row vector (ignored rows 0); the scalar is then the sum.
    None,
}

spellings!(Reduction, "reduction",
    BatchMean => "batchmean",
    Sum => "sum",
    Mean => "mean",
    None => "none",
);

impl Reduction {
    /// The factor that turns Σ ℓ into the reduced loss (and the per-row
    /// gradient weight, before the upstream scale).
    pub fn row_weight(self, valid_rows: usize, vocab: usize) -> f64 {
        match self {
            Reduction::BatchMean if valid_rows > 0 => 1.0 / valid_rows as f64,
            Reduction::Mean if valid_rows > 0 => 1.0 / (valid_rows as f64 * vocab as f64),
            Reduction::BatchMean | Reduction::Mean => 0.0,
            Reduction::Sum | Reduction::None => 1.0,
        }
    }

    pub(crate) fn kernel_id(self) -> i32 {
        match self {
            Reduction::BatchMean => 0,
            Reduction::Sum => 1,
            Reduction::Mean => 2,
            Reduction::None => 3,
        }
    }
}

/// The arithmetic of the dense kernels, on the GPU and in the CPU backend
/// (docs/DESIGN.md §3).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Precision {
    /// The fast kernels (kernels/kd_fast.cu): one exp2 per side and element,
    /// within the instruction budget of docs/DESIGN.md §5; accurate to the
    /// mixed bound of §3 (relative 1e-5 plus a few fp32 ulps of the row's
    /// log-sum-exp). Every divergence without soft-capping or the teacher
    /// gradient; those two run the exact kernels
    /// ([`LossSpec::kernel_precision`] says which ran).
    #[default]
    Fast,
    /// The exact kernels (kernels/kd_fused.cu): every term measured from a
    /// reference, compensated sums, expm1/log1p where they matter; §3's
    /// tight tolerances.
    Exact,
}

impl Precision {
    /// Both, in CLI order.
    pub const ALL: [Precision; 2] = [Precision::Fast, Precision::Exact];

    /// The CLI/API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fast => "fast",
            Precision::Exact => "exact",
        }
    }

    /// The id of the C ABI and the Python binding (0 fast, 1 exact).
    pub fn id(self) -> i32 {
        match self {
            Precision::Fast => 0,
            Precision::Exact => 1,
        }
    }

    /// The precision of a C ABI / Python id; `None` for any other value.
    pub fn from_id(id: i32) -> Option<Precision> {
        match id {
            0 => Some(Precision::Fast),
            1 => Some(Precision::Exact),
            _ => None,
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Precision::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("unknown precision {s:?} (expected fast or exact)"))
    }
}

/// How a top-k (sparse) teacher is compared with the student (docs/DESIGN.md §4).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum TopkMode {
    /// Both distributions renormalised over the k teacher entries:
    /// KL(p‖q̃), q̃ = softmax over the support of s/τ; zero gradient off it.
    Support,
    /// The teacher is zero off its support, the student a full softmax:
    /// Σ_{i∈I} p_i (log p_i − log q_i).
    #[default]
    Full,
    /// k + 1 buckets (the support and one tail): teacher P_i = exp(v_i),
    /// P_tail = 1 − Σ P_i; needs log-prob values and τ = 1.
    Tail,
}

spellings!(TopkMode, "top-k mode",
    Support => "support",
    Full => "full",
    Tail => "tail",
);

impl TopkMode {
    /// The id the kernels use (`KD_TOPK_*` in kernels/kd_math.cuh).
    pub(crate) fn kernel_id(self) -> i32 {
        match self {
            TopkMode::Support => 0,
            TopkMode::Full => 1,
            TopkMode::Tail => 2,
        }
    }
}

/// The full loss specification:
/// `ℓ = α·CE(hard labels, τ = 1) + (1 − α)·c·D(p, q)`, `c = τ²` or 1.
#[derive(Debug, Clone, PartialEq)]
pub struct LossSpec {
    /// The divergence.
    pub divergence: Divergence,
    /// JSD weight β ∈ [0, 1]. Only JSD uses it: with any other divergence it
    /// must stay at its default 0.5 (validation fails otherwise, rather than
    /// ignoring it).
    pub beta: f64,
    /// Temperature τ > 0, finite; τ² and 1/τ² must be normal fp32 numbers
    /// (τ in about [1.1e-19, 9.2e18]), as every kernel parameter.
    pub temperature: f64,
    /// Weight α ∈ [0, 1] of the hard-label cross-entropy; α > 0 needs labels.
    pub alpha: f64,
    /// Multiply the soft term by τ² (Hinton's scaling); default on.
    pub t2_scaling: bool,
    /// Rows whose label equals this contribute nothing (default −100).
    pub ignore_index: i64,
    /// The reduction over rows.
    pub reduction: Reduction,
    /// Upstream gradient scale: the gradient is that of `grad_scale · L`.
    pub grad_scale: f64,
    /// Soft-capping `x ← cap·tanh(x/cap)` of the student's and the teacher's
    /// logits before anything else (Gemma 2 style); `None` = off. A −inf
    /// logit (a masked entry) stays −inf.
    pub softcap: Option<f64>,
    /// The teacher (dense rows or top-k values) holds log-probabilities, not
    /// logits. Re-tempered as p ∝ exp(log p / τ): the same as logits for a
    /// dense teacher; the `tail` top-k mode needs it.
    pub teacher_log_probs: bool,
    /// Also compute ∂L/∂teacher (mutual learning: the teacher trains too),
    /// in the same launch; dense teachers only.
    pub grad_teacher: bool,
    /// How a top-k teacher is used (ignored for a dense teacher).
    pub topk_mode: TopkMode,
    /// The dense kernels' arithmetic on the GPU and the CPU backend (default
    /// fast); the oracle and the top-k kernels are exact either way.
    pub precision: Precision,
}

impl Default for LossSpec {
    fn default() -> Self {
        LossSpec {
            divergence: Divergence::ForwardKl,
            beta: 0.5,
            temperature: 1.0,
            alpha: 0.0,
            t2_scaling: true,
            ignore_index: -100,
            reduction: Reduction::BatchMean,
            grad_scale: 1.0,
            softcap: None,
            teacher_log_probs: false,
            grad_teacher: false,
            topk_mode: TopkMode::Full,
            precision: Precision::Fast,
        }
    }
}

/// The divergence as the kernels see it: JSD endpoints resolved.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum KernelDivergence {
    ForwardKl,
    ReverseKl,
    Jsd(f64),
    Tvd,
    SoftCe,
}

impl KernelDivergence {
    pub(crate) fn id(self) -> i32 {
        match self {
            KernelDivergence::ForwardKl => 0,
            KernelDivergence::ReverseKl => 1,
            KernelDivergence::Jsd(_) => 2,
            KernelDivergence::Tvd => 3,
            KernelDivergence::SoftCe => 4,
        }
    }
}

impl LossSpec {
    /// Checks every parameter; `has_labels` says whether labels come with it.
    pub fn validate(&self, has_labels: bool) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return invalid(
                "temperature",
                format!("must be finite and > 0, got {}", self.temperature),
            );
        }
        if !(0.0..=1.0).contains(&self.alpha) {
            return invalid("alpha", format!("must be in [0, 1], got {}", self.alpha));
        }
        if !(0.0..=1.0).contains(&self.beta) {
            return invalid("beta", format!("must be in [0, 1], got {}", self.beta));
        }
        if !self.grad_scale.is_finite() {
            return invalid(
                "grad_scale",
                format!("must be finite, got {}", self.grad_scale),
            );
        }
        if self.divergence != Divergence::Jsd && self.beta != LossSpec::default().beta {
            return invalid(
                "beta",
                format!(
                    "only jsd uses beta; got beta = {} with {} (leave it at its default 0.5)",
                    self.beta, self.divergence
                ),
            );
        }
        if let Some(cap) = self.softcap {
            if !(cap.is_finite() && cap > 0.0) {
                return invalid("softcap", format!("must be finite and > 0, got {cap}"));
            }
            if self.teacher_log_probs {
                return invalid(
                    "softcap",
                    "caps logits; a teacher given as log-probs cannot be capped (pass its logits)",
                );
            }
        }
        self.validate_f32()?;
        if self.alpha > 0.0 && !has_labels {
            return invalid(
                "alpha",
                format!(
                    "alpha = {} > 0 needs labels for the hard-label loss",
                    self.alpha
                ),
            );
        }
        Ok(())
    }

    /// Every kernel parameter derived from the spec (`KernelParams`) is
    /// computed in f64 and used in fp32: each must round to a finite fp32
    /// number, and a non-zero one to a normal one (no silent overflow to ±inf,
    /// no flush to 0). For τ that is τ, 1/τ, log2(e)/τ, τ² and 1/τ² (the scale
    /// of a divergence between nearly equal rows), i.e. τ in about
    /// [1.1e-19, 9.2e18]; for the soft-cap C, C and 1/C.
    fn validate_f32(&self) -> Result<()> {
        let tau = self.temperature;
        for (what, x) in [
            ("temperature", tau),
            ("1/temperature", 1.0 / tau),
            ("log2(e)/temperature", std::f64::consts::LOG2_E / tau),
            ("temperature²", tau * tau),
            ("1/temperature²", 1.0 / (tau * tau)),
        ] {
            kernel_f32("temperature", what, x)?;
        }
        kernel_f32("alpha", "alpha", self.alpha)?;
        kernel_f32(
            "alpha",
            "(1 − alpha)·c (the soft term's weight)",
            self.soft_coef(),
        )?;
        if let KernelDivergence::Jsd(b) = self.kernel_divergence() {
            kernel_f32("beta", "beta", b)?;
            kernel_f32("beta", "1 − beta", 1.0 - b)?;
            if b as f32 == 1.0 {
                return invalid(
                    "beta",
                    format!("beta = {b} rounds to 1 in fp32 (the kernels' precision); use 1 (reverse KL) or at most 1 − 2⁻²⁴"),
                );
            }
        }
        kernel_f32("grad_scale", "grad_scale", self.grad_scale)?;
        if let Some(cap) = self.softcap {
            kernel_f32("softcap", "softcap", cap)?;
            kernel_f32("softcap", "1/softcap", 1.0 / cap)?;
        }
        Ok(())
    }

    /// The extra checks of a top-k teacher (on top of [`LossSpec::validate`]).
    pub fn validate_topk(&self) -> Result<()> {
        if self.divergence != Divergence::ForwardKl {
            return invalid(
                "divergence",
                format!(
                    "a top-k teacher supports forward-kl only (docs/DESIGN.md §4), got {}",
                    self.divergence
                ),
            );
        }
        if self.grad_teacher {
            return invalid(
                "grad_teacher",
                "a top-k teacher is fixed data; the teacher gradient needs a dense teacher",
            );
        }
        if self.topk_mode == TopkMode::Tail {
            if !self.teacher_log_probs {
                return invalid(
                    "topk_mode",
                    "tail needs the top-k values as log-probs (teacher_log_probs)",
                );
            }
            if self.temperature != 1.0 {
                return invalid(
                    "topk_mode",
                    format!("tail needs temperature 1, got {}", self.temperature),
                );
            }
        }
        Ok(())
    }

    /// Fails unless the spec uses only what the eager (unfused) baseline of
    /// `kdfuse bench` implements: no soft-capping, no teacher gradient.
    pub(crate) fn validate_eager(&self) -> Result<()> {
        if self.softcap.is_some() {
            return invalid(
                "softcap",
                "the eager baseline does not implement soft-capping",
            );
        }
        if self.grad_teacher {
            return invalid(
                "grad_teacher",
                "the eager baseline does not implement the teacher gradient",
            );
        }
        Ok(())
    }

    /// The soft term's coefficient `(1 − α)·c`.
    pub fn soft_coef(&self) -> f64 {
        let c = if self.t2_scaling {
            self.temperature * self.temperature
        } else {
            1.0
        };
        (1.0 - self.alpha) * c
    }

    /// The precision the dense GPU kernels actually run: `Fast` only where a
    /// fast kernel covers the loss (every divergence, without soft-capping
    /// or the teacher gradient), `Exact` otherwise.
    pub fn kernel_precision(&self) -> Precision {
        let covered = self.softcap.is_none() && !self.grad_teacher;
        if self.precision == Precision::Fast && covered {
            Precision::Fast
        } else {
            Precision::Exact
        }
    }

    /// The emulator's kernel variant (0 exact, 1 fast, 2 fast with α > 0).
    pub(crate) fn kernel_variant(&self) -> i32 {
        match self.kernel_precision() {
            Precision::Exact => 0,
            Precision::Fast if self.alpha > 0.0 => 2,
            Precision::Fast => 1,
        }
    }

    pub(crate) fn kernel_divergence(&self) -> KernelDivergence {
        match self.divergence {
            Divergence::ForwardKl => KernelDivergence::ForwardKl,
            Divergence::ReverseKl => KernelDivergence::ReverseKl,
            Divergence::Jsd if self.beta == 0.0 => KernelDivergence::ForwardKl,
            Divergence::Jsd if self.beta == 1.0 => KernelDivergence::ReverseKl,
            Divergence::Jsd => KernelDivergence::Jsd(self.beta),
            Divergence::Tvd => KernelDivergence::Tvd,
            Divergence::SoftCe => KernelDivergence::SoftCe,
        }
    }
}

/// `x` as the kernels' fp32: finite, and normal unless `x` is 0; otherwise an
/// error naming `arg` (`what` is the quantity derived from it).
pub(crate) fn kernel_f32(arg: &'static str, what: &str, x: f64) -> Result<f32> {
    let y = x as f32;
    if !y.is_finite() {
        return invalid(
            arg,
            format!(
                "{what} = {x:e} overflows fp32, the kernels' precision (largest {:e})",
                f32::MAX
            ),
        );
    }
    if x != 0.0 && !y.is_normal() {
        return invalid(
            arg,
            format!(
                "{what} = {x:e} underflows fp32, the kernels' precision (smallest normal {:e})",
                f32::MIN_POSITIVE
            ),
        );
    }
    Ok(y)
}
