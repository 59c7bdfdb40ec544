//! What one benchmark measures: a configuration, and the presets.

use kdfuse::error::{invalid, Result};
use kdfuse::spec::{Divergence, LossSpec, Precision};
use kdfuse::tensor::Dtype;
use serde::{Deserialize, Serialize};
use std::fmt;

/// One benchmark configuration: a dense `[rows, cols]` batch of student and
/// teacher logits and the loss to compute on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchConfig {
    /// Rows N (tokens).
    pub rows: usize,
    /// Vocabulary V.
    pub cols: usize,
    /// Dtype of the logits (and of the gradient).
    pub dtype: Dtype,
    /// Divergence.
    pub divergence: Divergence,
    /// JSD β.
    pub beta: f64,
    /// Temperature τ.
    pub temperature: f64,
    /// Weight of the hard-label cross-entropy (labels are drawn when > 0).
    pub alpha: f64,
    /// Whether the gradient is computed (forward + backward) or the loss only.
    pub grad: bool,
    /// The kernels' arithmetic (absent from results written before it
    /// existed: those ran the exact kernels).
    #[serde(default = "exact")]
    pub precision: Precision,
}

fn exact() -> Precision {
    Precision::Exact
}

impl BenchConfig {
    /// Forward + backward of `divergence` with the default loss parameters.
    pub fn new(rows: usize, cols: usize, dtype: Dtype, divergence: Divergence) -> Self {
        let d = LossSpec::default();
        BenchConfig {
            rows,
            cols,
            dtype,
            divergence,
            beta: d.beta,
            temperature: d.temperature,
            alpha: 0.0,
            grad: true,
            precision: d.precision,
        }
    }

    /// The loss specification (defaults for everything not configured).
    pub fn spec(&self) -> LossSpec {
        LossSpec {
            divergence: self.divergence,
            beta: self.beta,
            temperature: self.temperature,
            alpha: self.alpha,
            precision: self.precision,
            ..Default::default()
        }
    }

    /// N·V.
    pub fn elements(&self) -> usize {
        self.rows * self.cols
    }

    /// Checks the shape and the loss parameters.
    pub fn validate(&self) -> Result<()> {
        if self.rows == 0 {
            return invalid("rows", "must be ≥ 1");
        }
        if self.cols == 0 || self.cols > i32::MAX as usize {
            return invalid(
                "cols",
                format!("must be in [1, {}], got {}", i32::MAX, self.cols),
            );
        }
        self.spec().validate(self.alpha > 0.0)
    }
}

impl fmt::Display for BenchConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {}x{} {}{}{}",
            self.divergence,
            self.dtype,
            self.rows,
            self.cols,
            self.spec().kernel_precision(),
            if self.alpha > 0.0 {
                format!(" α={}", self.alpha)
            } else {
                String::new()
            },
            if self.grad { "" } else { " loss-only" }
        )
    }
}

/// Named sweeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// A one-minute run: two vocabularies, bf16, forward KL and JSD.
    Quick,
    /// N ∈ {4096, 16384} × V ∈ {32000, 128256, 151936, 262144} × {bf16, f32},
    /// forward KL and JSD.
    Llm,
}

impl std::str::FromStr for Preset {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "quick" => Ok(Preset::Quick),
            "llm" => Ok(Preset::Llm),
            _ => Err(format!("unknown preset `{s}` (expected quick or llm)")),
        }
    }
}

/// The vocabularies of current LLM families (Llama 2, Llama 3, Qwen 2, Gemma 3).
pub const LLM_VOCABS: [usize; 4] = [32_000, 128_256, 151_936, 262_144];

impl Preset {
    /// The configurations. `cpu` shrinks N so that the preset fits a CPU's
    /// time (quick: N = 16 instead of 4096); V, dtypes and divergences stay.
    pub fn configs(self, cpu: bool) -> Vec<BenchConfig> {
        let divs = [Divergence::ForwardKl, Divergence::Jsd];
        let mut out = Vec::new();
        match self {
            Preset::Quick => {
                let rows = if cpu { 16 } else { 4096 };
                for cols in [32_000, 128_256] {
                    for d in divs {
                        out.push(BenchConfig::new(rows, cols, Dtype::Bf16, d));
                    }
                }
            }
            Preset::Llm => {
                let rows_set: &[usize] = if cpu { &[16, 64] } else { &[4096, 16_384] };
                for &rows in rows_set {
                    for cols in LLM_VOCABS {
                        for dtype in [Dtype::Bf16, Dtype::F32] {
                            for d in divs {
                                out.push(BenchConfig::new(rows, cols, dtype, d));
                            }
                        }
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llm_preset_is_the_full_grid() {
        let c = Preset::Llm.configs(false);
        assert_eq!(c.len(), 2 * 4 * 2 * 2);
        assert!(c.iter().all(|c| c.grad && c.alpha == 0.0));
        assert!(c.iter().any(|c| c.rows == 16_384 && c.cols == 262_144));
        assert!(c
            .iter()
            .all(|c| matches!(c.divergence, Divergence::ForwardKl | Divergence::Jsd)));
    }

    #[test]
    fn validation_names_the_argument() {
        let mut c = BenchConfig::new(0, 10, Dtype::F32, Divergence::Jsd);
        assert!(c.validate().unwrap_err().to_string().contains("rows"));
        c.rows = 2;
        c.temperature = -1.0;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("temperature"));
    }
}
