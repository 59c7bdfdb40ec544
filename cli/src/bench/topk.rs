//! `kdfuse bench --topk-select`: [`kdfuse::topk_select::select_cpu`] (and
//! the CUDA selection when a GPU is usable) over a grid of rows × V × k ×
//! dtype, against the host memory bandwidth (the device copy bandwidth for
//! the GPU) measured in the same run, and against `torch.topk` when
//! `python3` imports torch.
//!
//! Bytes per element read: the selection reads each logit once (the
//! log-sum-exp pass re-reads the row from cache, not from memory), so the
//! byte model is `rows·V·size(dtype)` read plus `rows·k·8` (+ `rows·4` with
//! the log-sum-exp) written.

use super::host::{self, HostInfo};
use super::report::Measured;
use super::stats::Timing;
use kdfuse::cuda::CudaBackend;
use kdfuse::error::{invalid, KdError, Result};
use kdfuse::tensor::{Dtype, Logits, OwnedData};
use kdfuse::topk_select::{select_cpu, SelectSpec};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::time::Instant;

/// One point of the grid.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TopkConfig {
    /// Rows N.
    pub rows: usize,
    /// Vocabulary size V.
    pub cols: usize,
    /// Entries kept per row.
    pub k: usize,
    /// Dtype of the logits.
    pub dtype: Dtype,
    /// Also compute each row's log-sum-exp.
    pub with_lse: bool,
}

impl std::fmt::Display for TopkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}x{} k={}", self.dtype, self.rows, self.cols, self.k)?;
        if self.with_lse {
            write!(f, " +lse")?;
        }
        Ok(())
    }
}

impl TopkConfig {
    /// Checks the point: rows ≥ 1 and `k` as the selection accepts it.
    pub fn validate(&self) -> Result<()> {
        if self.rows == 0 {
            return invalid("rows", "must be at least 1");
        }
        if self.cols == 0 {
            return invalid("cols", "must be at least 1");
        }
        if self.k == 0 || self.k > self.cols || self.k > kdfuse::topk_select::MAX_K {
            return invalid(
                "k",
                format!(
                    "k = {} must be in 1..={} for V = {}",
                    self.k,
                    self.cols.min(kdfuse::topk_select::MAX_K),
                    self.cols
                ),
            );
        }
        Ok(())
    }

    /// Bytes the selection moves: the logits read once, the winners (int32
    /// column + f32 value) and the log-sum-exps written.
    pub fn bytes(&self) -> u64 {
        let read = self.rows * self.cols * self.dtype.size();
        let written = self.rows * self.k * 8 + if self.with_lse { self.rows * 4 } else { 0 };
        (read + written) as u64
    }

    /// Bytes moved per logit read.
    pub fn bytes_per_element(&self) -> f64 {
        self.bytes() as f64 / (self.rows * self.cols) as f64
    }
}

/// How to run the top-k benchmark.
#[derive(Debug, Clone)]
pub struct TopkOptions {
    /// Untimed runs first.
    pub warmup: usize,
    /// Timed runs per variant.
    pub runs: usize,
    /// Seed of the random logits.
    pub seed: u64,
    /// The CUDA device to time the selection on (`None`: reported as
    /// skipped, `cuda_skipped` saying why).
    pub cuda: Option<usize>,
    /// Why the CUDA selection is not timed, when `cuda` is `None`.
    pub cuda_skipped: String,
    /// Time `torch.topk` through this Python interpreter (`None`: skipped,
    /// `torch_skipped` saying why).
    pub python: Option<String>,
    /// Why torch is not timed, when `python` is `None`.
    pub torch_skipped: String,
    /// The commit to record.
    pub commit: Option<String>,
}

/// One measured point.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TopkResult {
    /// The point.
    pub config: TopkConfig,
    /// Bytes moved per logit read (see the module's byte model).
    pub bytes_per_element: f64,
    /// Random input sets the timed runs rotate among (together at least 4×
    /// the last-level cache where memory allows; 0 when skipped).
    pub input_sets: usize,
    /// [`select_cpu`], against the host memory bandwidth.
    pub cpu: Option<Measured>,
    /// Why the CPU selection was not timed (e.g. too little memory).
    pub cpu_skipped: Option<String>,
    /// The CUDA selection (CUDA events around each launch), against the
    /// device copy bandwidth.
    pub cuda: Option<Measured>,
    /// Why the CUDA selection was not timed.
    pub cuda_skipped: Option<String>,
    /// `torch.topk` (+ `torch.logsumexp` with the log-sum-exp) on the CPU,
    /// median ms, same threads.
    pub torch_ms: Option<f64>,
    /// Why torch was not timed.
    pub torch_skipped: Option<String>,
}

/// The top-k benchmark's report (`--json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TopkReport {
    /// Always "topk-select".
    pub benchmark: String,
    /// When it ran (RFC 3339, UTC).
    pub date: String,
    /// The source commit.
    pub commit: String,
    /// The host, with its memory copy bandwidth measured in this run.
    pub host: HostInfo,
    /// Device-to-device copy bandwidth measured in this run (GPU runs).
    pub device_copy_bandwidth_gbs: Option<f64>,
    /// Timed runs per variant.
    pub runs: usize,
    /// Untimed runs first.
    pub warmup: usize,
    /// Every point of the grid.
    pub results: Vec<TopkResult>,
}

/// One CSV row per point (the fields of [`TopkResult`], flattened; times
/// in ms, bandwidths in GB/s).
#[derive(Debug, Clone, Serialize)]
#[allow(missing_docs)]
pub struct TopkCsvRow {
    pub rows: usize,
    pub cols: usize,
    pub k: usize,
    pub dtype: String,
    pub with_lse: bool,
    pub bytes_per_element: f64,
    pub cpu_median_ms: Option<f64>,
    pub cpu_gbs: Option<f64>,
    pub cpu_fraction_of_memory_bw: Option<f64>,
    pub cuda_median_ms: Option<f64>,
    pub cuda_gbs: Option<f64>,
    pub cuda_fraction_of_copy_bw: Option<f64>,
    pub torch_median_ms: Option<f64>,
}

fn random_logits(c: &TopkConfig, seed: u64) -> OwnedData {
    let mut rng = StdRng::seed_from_u64(seed);
    let normal = Normal::new(0.0f32, 3.0).expect("valid normal");
    let x: Vec<f32> = (0..c.rows * c.cols)
        .map(|_| normal.sample(&mut rng))
        .collect();
    OwnedData::from_f32(&x, c.dtype)
}

fn spec(c: &TopkConfig) -> SelectSpec {
    SelectSpec {
        k: c.k,
        with_lse: c.with_lse,
    }
}

fn time_cpu(c: &TopkConfig, opts: &TopkOptions, sets: &[OwnedData]) -> Result<Timing> {
    let views: Vec<Logits> = sets
        .iter()
        .map(|d| Logits::new(d.view(), c.rows, c.cols))
        .collect();
    let mut samples = Vec::with_capacity(opts.runs);
    for i in 0..opts.warmup + opts.runs {
        let t0 = Instant::now();
        let sel = select_cpu(&views[i % views.len()], &spec(c))?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        std::hint::black_box(sel);
        if i >= opts.warmup {
            samples.push(ms);
        }
    }
    Timing::from_samples(&samples).ok_or_else(|| KdError::InvalidArgument {
        arg: "runs",
        msg: "no timed run".into(),
    })
}

fn time_cuda(
    backend: &CudaBackend,
    c: &TopkConfig,
    opts: &TopkOptions,
    sets: &[OwnedData],
) -> Result<Timing> {
    use cudarc::driver::sys::CUevent_flags;
    use cudarc::driver::{DevicePtr, DevicePtrMut};
    use kdfuse::topk_select::cuda::RawSelect;
    let stream = backend.stream().clone();
    let ctx = backend.context().clone();
    let mut xs = Vec::with_capacity(sets.len());
    for d in sets {
        let view = d.view();
        let bytes = view.bytes();
        let mut x = stream.alloc_zeros::<u8>(bytes.len().max(1))?;
        stream.memcpy_htod(bytes, &mut x)?;
        xs.push(x);
    }
    let mut idx = stream.alloc_zeros::<i32>(c.rows * c.k)?;
    let mut val = stream.alloc_zeros::<f32>(c.rows * c.k)?;
    let mut lse = stream.alloc_zeros::<f32>(c.rows)?;
    let mut bad = stream.alloc_zeros::<u64>(1)?;
    stream.memcpy_htod(&[u64::MAX], &mut bad)?;
    let ptrs: Vec<u64> = xs.iter().map(|x| x.device_ptr(&stream).0).collect();
    let (ip, _g1) = idx.device_ptr_mut(&stream);
    let (vp, _g2) = val.device_ptr_mut(&stream);
    let (lp, _g3) = lse.device_ptr_mut(&stream);
    let (bp, _g4) = bad.device_ptr_mut(&stream);
    let mut samples = Vec::with_capacity(opts.runs);
    for i in 0..opts.warmup + opts.runs {
        let raw = RawSelect {
            dtype: c.dtype,
            logits: ptrs[i % ptrs.len()],
            rows: c.rows,
            cols: c.cols,
            stride: c.cols,
            indices: ip,
            values: vp,
            lse: if c.with_lse { lp } else { 0 },
            bad_row: bp,
        };
        let a = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        let b = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        a.record(&stream)?;
        // SAFETY: every buffer was allocated above at the size `raw` gives,
        // and outlives the synchronising `elapsed_ms` below.
        unsafe { backend.select_raw(&stream, &raw, &spec(c)) }?;
        b.record(&stream)?;
        let ms = a.elapsed_ms(&b)? as f64;
        if i >= opts.warmup {
            samples.push(ms);
        }
    }
    stream.synchronize()?;
    Timing::from_samples(&samples).ok_or_else(|| KdError::InvalidArgument {
        arg: "runs",
        msg: "no timed run".into(),
    })
}

/// The Python run for `torch.topk`: prints the median milliseconds. The
/// runs rotate among as many input sets as kdfuse's, so that neither side
/// is timed on a resident tensor.
const TORCH_SCRIPT: &str = r#"
import sys, time, torch
rows, cols, k, dtype, lse, threads, warmup, runs, seed, sets = sys.argv[1:11]
rows, cols, k, threads, warmup, runs, sets = map(int, (rows, cols, k, threads, warmup, runs, sets))
torch.set_num_threads(threads)
torch.manual_seed(int(seed))
dt = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[dtype]
xs = [(3 * torch.randn(rows, cols)).to(dt) for _ in range(sets)]
def f(x):
    r = torch.topk(x, k, dim=-1)
    if lse == "1":
        torch.logsumexp(x.float(), dim=-1)
    return r
ts = []
for i in range(warmup + runs):
    x = xs[i % sets]
    t = time.perf_counter(); f(x); d = time.perf_counter() - t
    if i >= warmup:
        ts.append(d)
ts.sort()
print(ts[len(ts) // 2] * 1e3)
"#;

/// `python` when it imports torch, else why not.
pub fn torch_python(python: &str) -> std::result::Result<String, String> {
    match std::process::Command::new(python)
        .args(["-c", "import torch"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
    {
        Ok(s) if s.success() => Ok(python.to_string()),
        Ok(_) => Err(format!("{python} cannot import torch")),
        Err(e) => Err(format!("{python}: {e}")),
    }
}

fn time_torch(
    python: &str,
    c: &TopkConfig,
    opts: &TopkOptions,
    sets: usize,
) -> std::result::Result<f64, String> {
    let out = std::process::Command::new(python)
        .args(["-c", TORCH_SCRIPT])
        .args([
            c.rows.to_string(),
            c.cols.to_string(),
            c.k.to_string(),
            c.dtype.to_string(),
            if c.with_lse { "1" } else { "0" }.to_string(),
            rayon::current_num_threads().to_string(),
            opts.warmup.to_string(),
            opts.runs.to_string(),
            opts.seed.to_string(),
            sets.to_string(),
        ])
        .output()
        .map_err(|e| format!("{python}: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "torch run failed: {}",
            err.lines().last().unwrap_or("no message")
        ));
    }
    text.trim()
        .parse::<f64>()
        .map_err(|_| format!("torch run printed {:?}, not a time", text.trim()))
}

/// Runs every point of the grid.
pub fn run(configs: &[TopkConfig], opts: &TopkOptions, progress: bool) -> Result<TopkReport> {
    if opts.runs < super::MIN_RUNS {
        return invalid(
            "runs",
            format!(
                "at least {} timed runs are needed, got {}",
                super::MIN_RUNS,
                opts.runs
            ),
        );
    }
    for c in configs {
        c.validate()?;
    }
    let date = host::now_rfc3339();
    let host = host::host_info(true);
    let backend = match opts.cuda {
        Some(d) => Some(CudaBackend::new(d)?),
        None => None,
    };
    let device_copy = match &backend {
        Some(b) => {
            let (free, _) = b.context().mem_get_info()?;
            Some(super::cuda::copy_bandwidth_gbs(
                b,
                (1usize << 30).min(free / 4),
                20,
            )?)
        }
        None => None,
    };
    let bar = super::progress(configs.len(), progress);
    let mut results = Vec::with_capacity(configs.len());
    for c in configs {
        bar.set_message(c.to_string());
        let need = c.rows * c.cols * (c.dtype.size() + 4);
        let mut r = TopkResult {
            config: *c,
            bytes_per_element: c.bytes_per_element(),
            input_sets: 0,
            cpu: None,
            cpu_skipped: None,
            cuda: None,
            cuda_skipped: None,
            torch_ms: None,
            torch_skipped: None,
        };
        if host::available_memory().is_some_and(|a| need > a / 10 * 7) {
            let why = format!("{c} needs {:.1} GB of host memory", need as f64 / 1e9);
            r.cpu_skipped = Some(why.clone());
            r.cuda_skipped = Some(why.clone());
            r.torch_skipped = Some(why);
            results.push(r);
            bar.inc(1);
            continue;
        }
        // Rotated among sets larger than the last-level cache, as the loss
        // bench does, so the cache does not flatter.
        let set_bytes = c.rows * c.cols * c.dtype.size();
        let mut n_sets = (4 * host.llc_bytes).div_ceil(set_bytes.max(1)).clamp(1, 16);
        if let Some(avail) = host::available_memory() {
            n_sets = n_sets.min((avail / 10 * 7 - need) / set_bytes.max(1) + 1);
        }
        let data: Vec<OwnedData> = (0..n_sets)
            .map(|i| random_logits(c, opts.seed.wrapping_add(i as u64)))
            .collect();
        r.input_sets = n_sets;
        let t = time_cpu(c, opts, &data)?;
        r.cpu = Some(Measured::new(t, c.bytes(), host.memory_bandwidth_gbs));
        match (&backend, device_copy) {
            (Some(b), Some(copy)) => {
                let t = time_cuda(b, c, opts, &data)?;
                r.cuda = Some(Measured::new(t, c.bytes(), copy));
            }
            _ => r.cuda_skipped = Some(opts.cuda_skipped.clone()),
        }
        match &opts.python {
            Some(py) => match time_torch(py, c, opts, n_sets) {
                Ok(ms) => r.torch_ms = Some(ms),
                Err(why) => r.torch_skipped = Some(why),
            },
            None => r.torch_skipped = Some(opts.torch_skipped.clone()),
        }
        results.push(r);
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(TopkReport {
        benchmark: "topk-select".into(),
        date,
        commit: host::commit(opts.commit.as_deref()),
        host,
        device_copy_bandwidth_gbs: device_copy,
        runs: opts.runs,
        warmup: opts.warmup,
        results,
    })
}

fn opt_ms(m: &Option<Measured>) -> String {
    m.as_ref().map_or("-".into(), |m| {
        format!(
            "{:.3} ({:.1} GB/s, {:.0}%)",
            m.timing.median_ms,
            m.gbs,
            100.0 * m.fraction_of_reference
        )
    })
}

impl TopkReport {
    /// The text table printed on stdout.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "top-k selection on {} ({} threads); host memory copy bandwidth {:.1} GB/s{}; median of {} runs",
            self.host.cpu,
            self.host.threads,
            self.host.memory_bandwidth_gbs,
            self.device_copy_bandwidth_gbs
                .map_or(String::new(), |g| format!(", device copy bandwidth {g:.1} GB/s")),
            self.runs
        );
        let _ = writeln!(
            s,
            "{:<32} {:>6} {:>28} {:>28} {:>10}",
            "config", "B/elem", "cpu ms", "cuda ms", "torch ms"
        );
        for r in &self.results {
            let torch = r.torch_ms.map_or("-".into(), |t| format!("{t:.3}"));
            let _ = writeln!(
                s,
                "{:<32} {:>6.2} {:>28} {:>28} {:>10}",
                r.config.to_string(),
                r.bytes_per_element,
                opt_ms(&r.cpu),
                opt_ms(&r.cuda),
                torch
            );
        }
        let mut skips: Vec<String> = Vec::new();
        for r in &self.results {
            for (what, why) in [
                ("cpu", &r.cpu_skipped),
                ("cuda", &r.cuda_skipped),
                ("torch", &r.torch_skipped),
            ] {
                if let Some(why) = why {
                    let line = format!("{what} skipped: {why}");
                    if !skips.contains(&line) {
                        skips.push(line);
                    }
                }
            }
        }
        for l in skips {
            let _ = writeln!(s, "{l}");
        }
        s
    }

    /// One CSV row per point.
    pub fn csv_rows(&self) -> Vec<TopkCsvRow> {
        self.results
            .iter()
            .map(|r| TopkCsvRow {
                rows: r.config.rows,
                cols: r.config.cols,
                k: r.config.k,
                dtype: r.config.dtype.to_string(),
                with_lse: r.config.with_lse,
                bytes_per_element: r.bytes_per_element,
                cpu_median_ms: r.cpu.as_ref().map(|m| m.timing.median_ms),
                cpu_gbs: r.cpu.as_ref().map(|m| m.gbs),
                cpu_fraction_of_memory_bw: r.cpu.as_ref().map(|m| m.fraction_of_reference),
                cuda_median_ms: r.cuda.as_ref().map(|m| m.timing.median_ms),
                cuda_gbs: r.cuda.as_ref().map(|m| m.gbs),
                cuda_fraction_of_copy_bw: r.cuda.as_ref().map(|m| m.fraction_of_reference),
                torch_median_ms: r.torch_ms,
            })
            .collect()
    }
}
