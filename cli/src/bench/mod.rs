//! Benchmarks with a roofline (`kdfuse bench`, `kdfuse profile`, the
//! criterion benches): configurations and presets, the byte model
//! (docs/DESIGN.md §5), timing summaries, the CPU and CUDA runners and the report.
//!
//! Every number is measured beside its reference in the same run: the
//! device-to-device copy bandwidth on a GPU, the host memory bandwidth on the
//! CPU. Inputs are random (never zeros) and rotated among sets larger than
//! the last-level cache, so the cache does not flatter.

mod config;
pub mod cpu;
pub mod cuda;
pub mod host;
pub mod linear;
pub mod model;
mod report;
mod stats;
pub mod topk;

pub use config::{BenchConfig, Preset, LLM_VOCABS};
pub use host::HostInfo;
pub use report::{BenchReport, BenchResult, Checks, CsvRow, DeviceMeta, Measured};
pub use stats::Timing;

use indicatif::{ProgressBar, ProgressStyle};

/// How to run a benchmark.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Untimed runs first (module load, first-touch, clocks).
    pub warmup: usize,
    /// Timed runs per variant (at least 20).
    pub runs: usize,
    /// Seed of the random inputs.
    pub seed: u64,
    /// Also time the eager baseline (GPU).
    pub eager: bool,
    /// Rows of each configuration the CPU backend is timed on in a GPU run
    /// (0 = not at all).
    pub cpu_rows: usize,
    /// CUDA device ordinal.
    pub device: usize,
    /// The commit to record (default: `git rev-parse` or KDFUSE_COMMIT).
    pub commit: Option<String>,
    /// A progress bar on stderr (hidden when stderr is not a terminal).
    pub progress: bool,
    /// The dense loss kernel on CUDA (`--kernel`); `None`: the backend's
    /// (`KDFUSE_KERNEL`, else auto).
    pub kernel: Option<kdfuse::single_read::KernelChoice>,
}

/// The fewest timed runs a benchmark accepts.
pub const MIN_RUNS: usize = 20;

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            warmup: 3,
            runs: MIN_RUNS,
            seed: 1,
            eager: true,
            cpu_rows: 16,
            device: 0,
            commit: None,
            progress: true,
            kernel: None,
        }
    }
}

impl BenchOptions {
    /// Checks the options.
    pub fn validate(&self) -> kdfuse::Result<()> {
        if self.runs < MIN_RUNS {
            return kdfuse::error::invalid(
                "runs",
                format!(
                    "at least {MIN_RUNS} timed runs are needed, got {}",
                    self.runs
                ),
            );
        }
        Ok(())
    }
}

pub(crate) fn progress(len: usize, enabled: bool) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len as u64);
    if let Ok(style) =
        ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}] {msg}")
    {
        pb.set_style(style);
    }
    pb
}

pub(crate) fn skipped(config: BenchConfig, why: String, floor_ms: f64) -> BenchResult {
    BenchResult {
        config,
        skipped: Some(why),
        input_sets: 0,
        floor_ms,
        fused: None,
        eager: None,
        eager_skipped: None,
        speedup_vs_eager: None,
        cpu: None,
        cpu_rows: 0,
        checks: None,
        kernel: None,
    }
}
