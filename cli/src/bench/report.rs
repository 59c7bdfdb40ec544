//! What a benchmark run produces: the report (JSON), its table, CSV rows
//! and Markdown (for BENCHMARKS.md).

use super::config::BenchConfig;
use super::host::HostInfo;
use super::stats::Timing;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// The GPU that ran the benchmark.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceMeta {
    /// Marketing name.
    pub name: String,
    /// Compute capability, "major.minor".
    pub compute_capability: String,
    /// Driver's CUDA version.
    pub driver: String,
    /// Streaming multiprocessors.
    pub sms: i32,
    /// L2 cache, bytes.
    pub l2_bytes: i32,
    /// Global memory, bytes.
    pub memory_bytes: usize,
    /// Maximum SM clock, MHz (0 if the driver does not say).
    pub sm_clock_mhz: f64,
    /// Memory clock, MHz (0 if the driver does not say).
    pub memory_clock_mhz: f64,
    /// Theoretical memory bandwidth from the clock and bus width, GB/s.
    pub theoretical_bandwidth_gbs: f64,
}

/// One measured variant of one configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measured {
    /// Timed runs.
    pub timing: Timing,
    /// Bytes of the byte model for this variant.
    pub bytes: u64,
    /// `bytes` / median time.
    pub gbs: f64,
    /// `gbs` / the reference bandwidth (copy bandwidth on a GPU, memory
    /// bandwidth on the CPU), measured in the same run.
    pub fraction_of_reference: f64,
}

impl Measured {
    /// From a timing, the bytes moved and the reference bandwidth.
    pub fn new(timing: Timing, bytes: u64, reference_gbs: f64) -> Self {
        let gbs = timing.gbs(bytes);
        Measured {
            timing,
            bytes,
            gbs,
            fraction_of_reference: if reference_gbs > 0.0 {
                gbs / reference_gbs
            } else {
                0.0
            },
        }
    }
}

/// Agreement checks made on the benchmark's own inputs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Checks {
    /// The measured variant's reduced loss on the first input set.
    pub loss: f64,
    /// |eager − fused| / |fused| of the reduced loss (GPU runs with eager).
    pub eager_loss_rel_diff: Option<f64>,
    /// Rows recomputed by the CPU backend from the device's inputs.
    pub cpu_rows_checked: usize,
    /// Largest relative difference of those rows' losses.
    pub cpu_row_max_rel_diff: Option<f64>,
    /// Every check within its bound (loss finite; eager 2e-3; CPU rows 1e-4).
    pub passed: bool,
}

/// The results for one configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchResult {
    /// What was measured.
    pub config: BenchConfig,
    /// Why nothing was measured (e.g. not enough memory).
    pub skipped: Option<String>,
    /// Input sets rotated among (so that caches do not flatter).
    pub input_sets: usize,
    /// Time floor: fused bytes / reference bandwidth, ms.
    pub floor_ms: f64,
    /// The measured backend (the fused CUDA kernel, or the CPU backend).
    pub fused: Option<Measured>,
    /// The eager baseline (GPU runs).
    pub eager: Option<Measured>,
    /// Why the eager baseline was not measured, if it was not.
    pub eager_skipped: Option<String>,
    /// eager median / fused median.
    pub speedup_vs_eager: Option<f64>,
    /// The CPU backend on the first `cpu_rows` rows (GPU runs), against the
    /// host memory bandwidth.
    pub cpu: Option<Measured>,
    /// Rows the CPU baseline ran on.
    pub cpu_rows: usize,
    /// Agreement checks.
    pub checks: Option<Checks>,
    /// The dense loss kernel that ran (CUDA runs): `KernelPlan::describe`,
    /// e.g. `single-read (cluster 10, 53.2 KiB shared memory per CTA)` or
    /// `v1 (forced)`.
    #[serde(default)]
    pub kernel: Option<String>,
}

/// A whole run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchReport {
    /// `kdfuse <version>`.
    pub tool: String,
    /// Commit of the source (`git rev-parse`, `--commit` or KDFUSE_COMMIT).
    pub commit: String,
    /// When the run started (RFC 3339, UTC).
    pub date: String,
    /// `cuda` or `cpu`.
    pub backend: String,
    /// The host.
    pub host: HostInfo,
    /// The GPU (CUDA runs).
    pub device: Option<DeviceMeta>,
    /// The reference bandwidth every fraction is of: device-to-device copy
    /// (CUDA runs) or host memory copy (CPU runs), bytes read + written, GB/s.
    pub reference_bandwidth_gbs: f64,
    /// Untimed runs before the timed ones.
    pub warmup: usize,
    /// Timed runs per variant.
    pub runs: usize,
    /// Per configuration.
    pub results: Vec<BenchResult>,
}

impl BenchReport {
    /// A report of `results` measured by `backend` (`cuda` or `cpu`), the
    /// run having started at `date`; the commit comes from `opts`.
    pub(crate) fn new(
        backend: &str,
        date: String,
        host: HostInfo,
        device: Option<DeviceMeta>,
        reference_bandwidth_gbs: f64,
        opts: &super::BenchOptions,
        results: Vec<BenchResult>,
    ) -> Self {
        BenchReport {
            tool: format!("kdfuse {}", env!("CARGO_PKG_VERSION")),
            commit: super::host::commit(opts.commit.as_deref()),
            date,
            backend: backend.into(),
            host,
            device,
            reference_bandwidth_gbs,
            warmup: opts.warmup,
            runs: opts.runs,
            results,
        }
    }

    /// Whether every check that ran passed.
    pub fn checks_passed(&self) -> bool {
        self.results
            .iter()
            .all(|r| r.checks.as_ref().is_none_or(|c| c.passed))
    }

    /// A one-line description of where it ran.
    pub fn title(&self) -> String {
        match &self.device {
            Some(d) => format!(
                "{} (sm_{}, {} SMs, driver CUDA {}), copy bandwidth {:.0} GB/s; host {} × {} threads",
                d.name,
                d.compute_capability.replace('.', ""),
                d.sms,
                d.driver,
                self.reference_bandwidth_gbs,
                self.host.cpu,
                self.host.threads
            ),
            None => format!(
                "CPU backend on {} × {} threads, memory copy bandwidth {:.1} GB/s",
                self.host.cpu, self.host.threads, self.reference_bandwidth_gbs
            ),
        }
    }

    /// The readable table (what `kdfuse bench` prints).
    pub fn table(&self) -> String {
        let gpu = self.device.is_some();
        let mut s = String::new();
        let _ = writeln!(s, "{}", self.title());
        let _ = writeln!(
            s,
            "commit {}, {}, {} timed runs (median; p10–p90) after {} warm-up",
            self.commit, self.date, self.runs, self.warmup
        );
        let mut head = format!(
            "{:<30} {:>9} {:>9} {:>26} {:>8} {:>6}",
            "configuration",
            "MB",
            "floor ms",
            "kdfuse ms",
            "GB/s",
            if gpu { "%copy" } else { "%mem" }
        );
        if gpu {
            let _ = write!(
                head,
                " {:>10} {:>8} {:>9} {:>6}",
                "eager ms", "speedup", "cpu GB/s", "%mem"
            );
        }
        let _ = writeln!(s, "{head}");
        for r in &self.results {
            let name = r.config.to_string();
            if let Some(why) = &r.skipped {
                let _ = writeln!(s, "{name:<30} skipped: {why}");
                continue;
            }
            let Some(f) = &r.fused else { continue };
            let _ = write!(
                s,
                "{:<30} {:>9.1} {:>9.3} {:>26} {:>8.1} {:>5.1}%",
                name,
                f.bytes as f64 / 1e6,
                r.floor_ms,
                format!(
                    "{:.3} ({:.3}–{:.3})",
                    f.timing.median_ms, f.timing.p10_ms, f.timing.p90_ms
                ),
                f.gbs,
                100.0 * f.fraction_of_reference
            );
            if gpu {
                match (&r.eager, r.speedup_vs_eager) {
                    (Some(e), Some(x)) => {
                        let _ = write!(s, " {:>10.3} {:>7.2}×", e.timing.median_ms, x);
                    }
                    _ => {
                        let _ = write!(s, " {:>10} {:>8}", "—", "—");
                    }
                }
                match &r.cpu {
                    Some(c) => {
                        let _ = write!(
                            s,
                            " {:>9.2} {:>5.1}%",
                            c.gbs,
                            100.0 * c.fraction_of_reference
                        );
                    }
                    None => {
                        let _ = write!(s, " {:>9} {:>6}", "—", "—");
                    }
                }
            }
            if let Some(k) = &r.kernel {
                let _ = write!(s, "  [{k}]");
            }
            if r.checks.as_ref().is_some_and(|c| !c.passed) {
                let _ = write!(s, "  CHECK FAILED");
            }
            let _ = writeln!(s);
        }
        s
    }

    /// One flat record per configuration.
    pub fn csv_rows(&self) -> Vec<CsvRow> {
        self.results
            .iter()
            .map(|r| {
                let f = r.fused.as_ref();
                let e = r.eager.as_ref();
                let c = r.cpu.as_ref();
                CsvRow {
                    device: self
                        .device
                        .as_ref()
                        .map_or_else(|| self.host.cpu.clone(), |d| d.name.clone()),
                    backend: self.backend.clone(),
                    commit: self.commit.clone(),
                    date: self.date.clone(),
                    divergence: r.config.divergence.to_string(),
                    dtype: r.config.dtype.to_string(),
                    rows: r.config.rows,
                    cols: r.config.cols,
                    alpha: r.config.alpha,
                    temperature: r.config.temperature,
                    grad: r.config.grad,
                    precision: r.config.spec().kernel_precision().to_string(),
                    skipped: r.skipped.clone().unwrap_or_default(),
                    reference_gbs: self.reference_bandwidth_gbs,
                    bytes: f.map(|f| f.bytes),
                    floor_ms: r.floor_ms,
                    median_ms: f.map(|f| f.timing.median_ms),
                    p10_ms: f.map(|f| f.timing.p10_ms),
                    p90_ms: f.map(|f| f.timing.p90_ms),
                    gbs: f.map(|f| f.gbs),
                    fraction_of_reference: f.map(|f| f.fraction_of_reference),
                    eager_median_ms: e.map(|e| e.timing.median_ms),
                    eager_bytes: e.map(|e| e.bytes),
                    speedup_vs_eager: r.speedup_vs_eager,
                    cpu_rows: r.cpu_rows,
                    cpu_gbs: c.map(|c| c.gbs),
                    cpu_fraction_of_memory: c.map(|c| c.fraction_of_reference),
                    checks_passed: r.checks.as_ref().map(|c| c.passed),
                    kernel: r.kernel.clone().unwrap_or_default(),
                }
            })
            .collect()
    }

    /// A Markdown section: a heading naming the card, driver, commit and
    /// date, and the table.
    pub fn markdown(&self) -> String {
        let gpu = self.device.is_some();
        let mut s = String::new();
        let _ = writeln!(s, "#### {}\n", self.title());
        let _ = writeln!(
            s,
            "commit `{}`, {}; median of {} timed runs after {} warm-up.\n",
            self.commit, self.date, self.runs, self.warmup
        );
        if gpu {
            let _ = writeln!(s, "| configuration | kernel | floor ms | kdfuse ms | GB/s | % copy | eager ms | speed-up | CPU GB/s (% mem) |");
            let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|---:|");
        } else {
            let _ = writeln!(
                s,
                "| configuration | MB | floor ms | kdfuse ms (p10–p90) | GB/s | % memory BW |"
            );
            let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|");
        }
        for r in &self.results {
            let name = r.config.to_string();
            let Some(f) = &r.fused else {
                let why = r.skipped.clone().unwrap_or_default();
                let _ = writeln!(s, "| {name} | skipped: {why} |");
                continue;
            };
            if gpu {
                let eager = r
                    .eager
                    .as_ref()
                    .map_or("—".into(), |e| format!("{:.3}", e.timing.median_ms));
                let x = r
                    .speedup_vs_eager
                    .map_or("—".into(), |x| format!("{x:.2}×"));
                let cpu = r.cpu.as_ref().map_or("—".into(), |c| {
                    format!("{:.2} ({:.0}%)", c.gbs, 100.0 * c.fraction_of_reference)
                });
                let kernel = r.kernel.as_deref().unwrap_or("—");
                let _ = writeln!(
                    s,
                    "| {name} | {kernel} | {:.3} | {:.3} | {:.0} | {:.1}% | {eager} | {x} | {cpu} |",
                    r.floor_ms,
                    f.timing.median_ms,
                    f.gbs,
                    100.0 * f.fraction_of_reference
                );
            } else {
                let _ = writeln!(
                    s,
                    "| {name} | {:.1} | {:.3} | {:.3} ({:.3}–{:.3}) | {:.2} | {:.1}% |",
                    f.bytes as f64 / 1e6,
                    r.floor_ms,
                    f.timing.median_ms,
                    f.timing.p10_ms,
                    f.timing.p90_ms,
                    f.gbs,
                    100.0 * f.fraction_of_reference
                );
            }
        }
        s
    }
}

/// One CSV record (`kdfuse bench --csv`).
#[derive(Debug, Clone, Serialize)]
pub struct CsvRow {
    pub device: String,
    pub backend: String,
    pub commit: String,
    pub date: String,
    pub divergence: String,
    pub dtype: String,
    pub rows: usize,
    pub cols: usize,
    pub alpha: f64,
    pub temperature: f64,
    pub grad: bool,
    /// The kernels' arithmetic that ran (fast or exact).
    pub precision: String,
    pub skipped: String,
    pub reference_gbs: f64,
    pub bytes: Option<u64>,
    pub floor_ms: f64,
    pub median_ms: Option<f64>,
    pub p10_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub gbs: Option<f64>,
    pub fraction_of_reference: Option<f64>,
    pub eager_median_ms: Option<f64>,
    pub eager_bytes: Option<u64>,
    pub speedup_vs_eager: Option<f64>,
    pub cpu_rows: usize,
    pub cpu_gbs: Option<f64>,
    pub cpu_fraction_of_memory: Option<f64>,
    pub checks_passed: Option<bool>,
    /// The dense loss kernel that ran (CUDA runs; empty otherwise).
    pub kernel: String,
}
