//! `kdfuse bench --linear`: the fused linear + distillation loss
//! ([`kdfuse::fused_linear`], chunked) against the unfused pipeline, in the
//! same run, on the CPU backend.
//!
//! Unfused is the same code with one chunk of all N rows: the GEMM writes
//! the full `[N, V]` logits (and the teacher's), the fused loss writes the
//! full `[N, V]` logit gradient, then the two backward GEMMs. Both modes run
//! exactly the same GEMMs on the same inputs; only the chunk size differs.
//!
//! Each mode runs in its own child process (the `kdfuse` binary re-executed
//! with a hidden flag, [`run_mode`] there): it builds the inputs, resets the
//! peak RSS (`/proc/self/clear_refs`), then times `reps` calls. Its peak
//! extra memory is VmHWM at the end minus VmRSS after the inputs were built
//! (and the heap peak of the binary's counting allocator, [`crate::alloc`],
//! minus the heap in use then).
//!
//! When a CUDA GPU is usable both modes also run on it
//! ([`fused_linear::compute_cuda`], the same inputs and chunking, in the
//! parent process: [`run_cuda_modes`]). Their time is the wall time of the
//! whole `compute_cuda` call (uploading the inputs, the device chunk loop,
//! downloading the results; the last download synchronises the stream),
//! not of the device work alone; their memory is the device allocator's
//! peak of the call ([`fused_linear::LinearOutput::device_peak_bytes`]).
//! Without a usable GPU every point records `cuda_skipped` and why.

use super::host;
use kdfuse::cuda::CudaBackend;
use kdfuse::error::{invalid, Result};
use kdfuse::fused_linear::{
    self, Chunking, Linear, LinearInputs, LinearSpec, LinearTeacher, Matrix,
};
use kdfuse::spec::{Divergence, LossSpec};
use kdfuse::tensor::{Dtype, Logits, OwnedData};
use kdfuse::CpuBackend;
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::time::Instant;

/// Parses a size: a number with an optional unit, B, KB/MB/GB/TB (powers of
/// 1000) or KiB/MiB/GiB/TiB (powers of 1024), case-insensitive: `512MiB`,
/// `1GiB`, `1.5GB`, `1048576`.
pub fn parse_size(text: &str) -> std::result::Result<usize, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = (&t[..split], t[split..].trim());
    let mult: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0f64.powi(4),
        _ => {
            return Err(format!(
                "`{text}`: unknown unit `{unit}` (expected B, KB, MB, GB, KiB, MiB or GiB)"
            ))
        }
    };
    let x: f64 = num
        .parse()
        .map_err(|_| format!("`{text}` is not a size (e.g. 512MiB, 1GiB, 1073741824)"))?;
    let bytes = (x * mult).round();
    if !bytes.is_finite() || bytes < 1.0 || bytes >= usize::MAX as f64 {
        return Err(format!("`{text}`: must be at least one byte"));
    }
    Ok(bytes as usize)
}

/// How the teacher is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TeacherKind {
    /// Hidden states `[N, H]` and a head `[V, H]`: its logits are chunked too.
    LinearHead,
    /// Dense logits `[N, V]`, an input.
    Logits,
}

impl std::str::FromStr for TeacherKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "linear-head" | "linear" => Ok(TeacherKind::LinearHead),
            "logits" => Ok(TeacherKind::Logits),
            _ => Err(format!(
                "unknown teacher `{s}` (expected linear-head or logits)"
            )),
        }
    }
}

impl TeacherKind {
    /// The name as the flag spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            TeacherKind::LinearHead => "linear-head",
            TeacherKind::Logits => "logits",
        }
    }
}

/// One benchmark point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinearConfig {
    /// Rows N.
    pub rows: usize,
    /// Hidden size H (student and teacher).
    pub hidden: usize,
    /// Vocabulary V.
    pub vocab: usize,
    /// The operands' dtype.
    pub dtype: Dtype,
    /// The teacher.
    pub teacher: TeacherKind,
    /// The divergence (forward + backward, batchmean, τ = 1).
    pub divergence: Divergence,
    /// The fused mode's chunking (the unfused one is `Rows(N)`).
    #[serde(with = "chunking_serde")]
    pub chunking: Chunking,
}

mod chunking_serde {
    use kdfuse::fused_linear::Chunking;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum C {
        Rows(usize),
        MemoryBudget(usize),
    }

    pub fn serialize<S: Serializer>(c: &Chunking, s: S) -> Result<S::Ok, S::Error> {
        match *c {
            Chunking::Rows(r) => C::Rows(r),
            Chunking::MemoryBudget(b) => C::MemoryBudget(b),
        }
        .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Chunking, D::Error> {
        Ok(match C::deserialize(d)? {
            C::Rows(r) => Chunking::Rows(r),
            C::MemoryBudget(b) => Chunking::MemoryBudget(b),
        })
    }
}

impl std::fmt::Display for LinearConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "N={} H={} V={} {} teacher={} {}",
            self.rows,
            self.hidden,
            self.vocab,
            self.dtype,
            self.teacher.as_str(),
            self.divergence
        )
    }
}

impl LinearConfig {
    /// Checks the shape.
    pub fn validate(&self) -> Result<()> {
        for (arg, x) in [
            ("rows", self.rows),
            ("hidden", self.hidden),
            ("vocab", self.vocab),
        ] {
            if x == 0 {
                return invalid(arg, "must be ≥ 1");
            }
        }
        if self.vocab > i32::MAX as usize {
            return invalid("vocab", format!("must be at most {}", i32::MAX));
        }
        Ok(())
    }

    fn spec(&self, mode: Mode) -> LinearSpec {
        LinearSpec {
            loss: LossSpec {
                divergence: self.divergence,
                ..Default::default()
            },
            chunking: match mode {
                Mode::Fused => self.chunking,
                Mode::Unfused => Chunking::Rows(self.rows),
            },
            grads: true,
        }
    }

    /// Bytes of the student's weight gradient (`[V, H]` f32).
    pub fn weight_grad_bytes(&self) -> usize {
        self.vocab * self.hidden * 4
    }

    /// Bytes of the inputs (hidden states, heads, teacher logits).
    pub fn input_bytes(&self) -> usize {
        let s = self.dtype.size();
        let student = (self.rows + self.vocab) * self.hidden * s;
        student
            + match self.teacher {
                TeacherKind::LinearHead => student,
                TeacherKind::Logits => self.rows * self.vocab * s,
            }
    }
}

/// The chunked pipeline or one chunk of N rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Chunks of the configured size.
    Fused,
    /// One chunk of all N rows (the full logits materialised).
    Unfused,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "fused" => Ok(Mode::Fused),
            "unfused" => Ok(Mode::Unfused),
            _ => Err(format!("unknown mode `{s}` (expected fused or unfused)")),
        }
    }
}

impl Mode {
    /// The name.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Fused => "fused",
            Mode::Unfused => "unfused",
        }
    }
}

/// What one mode measured (in its own process).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModeResult {
    /// fused or unfused.
    pub mode: Mode,
    /// Rows per chunk.
    pub chunk_rows: usize,
    /// Chunks per call.
    pub chunks: usize,
    /// Each repetition's wall time, ms.
    pub times_ms: Vec<f64>,
    /// Their median.
    pub median_ms: f64,
    /// VmRSS after the inputs were built.
    pub baseline_rss_bytes: u64,
    /// VmHWM after the repetitions.
    pub peak_rss_bytes: u64,
    /// `peak_rss_bytes - baseline_rss_bytes`: the call's peak extra memory.
    pub peak_rss_extra_bytes: u64,
    /// Whether the peak RSS was reset after the inputs were built
    /// (`/proc/self/clear_refs`); if not, a higher transient while building
    /// the inputs could hide the call's peak.
    pub hwm_reset: bool,
    /// The counting allocator's heap peak during the repetitions minus the
    /// heap in use after the inputs were built (`None` where it is not
    /// installed).
    pub heap_peak_extra_bytes: Option<u64>,
    /// The loss of the last repetition.
    pub loss: f64,
}

/// Reads a `kB` field of `/proc/self/status` in bytes.
fn proc_status_bytes(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Resets VmHWM to the current RSS (Linux ≥ 4.0).
fn reset_hwm() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// `len` normal values of standard deviation `sigma`, generated in parallel
/// (each block its own seeded generator: the same values whatever the
/// threads).
fn normal(len: usize, sigma: f32, seed: u64) -> Vec<f32> {
    const BLOCK: usize = 1 << 20;
    let mut x = vec![0.0f32; len];
    x.par_chunks_mut(BLOCK).enumerate().for_each(|(i, b)| {
        let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(0x9e37_79b9).wrapping_add(i as u64));
        let d = Normal::new(0.0f32, sigma).expect("valid normal");
        for v in b {
            *v = d.sample(&mut rng);
        }
    });
    x
}

/// The inputs of one point, built in the operands' dtype.
struct Inputs {
    s_hidden: OwnedData,
    s_weight: OwnedData,
    t_hidden: Option<OwnedData>,
    t_weight: Option<OwnedData>,
    t_logits: Option<OwnedData>,
}

impl Inputs {
    /// Random inputs: hidden states N(0, 1), heads N(0, 2/√H) (logits of
    /// σ ≈ 2); the teacher's head is 0.8·W + 0.6·noise on the same hidden
    /// states (a copy), so that the teacher's logits correlate with the
    /// student's; dense teacher logits N(0, 2).
    fn build(c: &LinearConfig, seed: u64) -> Self {
        let own = |x: Vec<f32>| OwnedData::from_f32(&x, c.dtype);
        let (n, h, v) = (c.rows, c.hidden, c.vocab);
        let hs = normal(n * h, 1.0, seed);
        let ws = normal(v * h, 2.0 / (h as f32).sqrt(), seed + 1);
        let (mut t_hidden, mut t_weight, mut t_logits) = (None, None, None);
        match c.teacher {
            TeacherKind::LinearHead => {
                let mut tw = normal(v * h, 1.2 / (h as f32).sqrt(), seed + 2);
                tw.par_iter_mut()
                    .zip(ws.par_iter())
                    .for_each(|(t, w)| *t += 0.8 * w);
                t_hidden = Some(own(hs.clone()));
                t_weight = Some(own(tw));
            }
            TeacherKind::Logits => t_logits = Some(own(normal(n * v, 2.0, seed + 3))),
        }
        Inputs {
            s_hidden: own(hs),
            s_weight: own(ws),
            t_hidden,
            t_weight,
            t_logits,
        }
    }

    fn view(&self, c: &LinearConfig) -> LinearInputs<'_> {
        let (n, h, v) = (c.rows, c.hidden, c.vocab);
        let teacher = match (&self.t_hidden, &self.t_weight, &self.t_logits) {
            (Some(th), Some(tw), _) => LinearTeacher::Linear(Linear::new(
                Matrix::new(th.view(), n, h),
                Matrix::new(tw.view(), v, h),
                None,
            )),
            (_, _, Some(t)) => LinearTeacher::Logits(Logits::new(t.view(), n, v)),
            _ => unreachable!("Inputs::build makes one teacher"),
        };
        LinearInputs {
            student: Linear::new(
                Matrix::new(self.s_hidden.view(), n, h),
                Matrix::new(self.s_weight.view(), v, h),
                None,
            ),
            teacher,
            labels: None,
            row_weights: None,
        }
    }
}

/// Runs one mode `reps` times in this process (the child's side):
/// builds the inputs, resets the peak RSS, times the calls.
pub fn run_mode(c: &LinearConfig, mode: Mode, reps: usize, seed: u64) -> Result<ModeResult> {
    c.validate()?;
    if reps == 0 {
        return invalid("reps", "must be ≥ 1");
    }
    let data = Inputs::build(c, seed);
    let inputs = data.view(c);
    let spec = c.spec(mode);
    let chunk_rows = fused_linear::chunk_rows(&inputs, &spec)?;
    let hwm_reset = reset_hwm();
    let baseline = proc_status_bytes("VmRSS:").unwrap_or(0);
    let heap_base = crate::alloc::current();
    crate::alloc::reset_peak();
    let mut times_ms = Vec::with_capacity(reps);
    let mut loss = f64::NAN;
    for _ in 0..reps {
        let t0 = Instant::now();
        let out = fused_linear::compute(&CpuBackend, &inputs, &spec)?;
        times_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        loss = out.loss;
        std::hint::black_box(&out);
    }
    let peak = proc_status_bytes("VmHWM:").unwrap_or(0);
    let heap_peak = crate::alloc::peak();
    let median_ms = median(&times_ms);
    Ok(ModeResult {
        mode,
        chunk_rows,
        chunks: c.rows.div_ceil(chunk_rows),
        times_ms,
        median_ms,
        baseline_rss_bytes: baseline,
        peak_rss_bytes: peak,
        peak_rss_extra_bytes: peak.saturating_sub(baseline),
        hwm_reset,
        heap_peak_extra_bytes: crate::alloc::installed()
            .then(|| heap_peak.saturating_sub(heap_base) as u64),
        loss,
    })
}

/// The median of `times` (not empty).
fn median(times: &[f64]) -> f64 {
    let mut sorted = times.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.len() % 2 == 1 {
        sorted[sorted.len() / 2]
    } else {
        0.5 * (sorted[sorted.len() / 2 - 1] + sorted[sorted.len() / 2])
    }
}

/// What one mode measured on the GPU.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CudaModeResult {
    /// fused or unfused.
    pub mode: Mode,
    /// Rows per chunk.
    pub chunk_rows: usize,
    /// Chunks per call.
    pub chunks: usize,
    /// Each repetition's wall time of the whole `compute_cuda` call
    /// (uploads, the device chunk loop, downloads: synchronised), ms.
    pub times_ms: Vec<f64>,
    /// Their median.
    pub median_ms: f64,
    /// The device allocator's peak of one call: every buffer of the device
    /// chunk loop, all alive until the call ends
    /// ([`fused_linear::LinearOutput::device_peak_bytes`]).
    pub device_peak_bytes: usize,
    /// The loss of the last repetition.
    pub loss: f64,
}

/// Both modes of one point on the GPU.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CudaResult {
    /// The GPU (its name, as the driver gives it).
    pub device: String,
    /// The fused (chunked) mode, or `None` when it failed.
    pub fused: Option<CudaModeResult>,
    /// Why the fused mode has no result (its error).
    pub fused_failed: Option<String>,
    /// The unfused mode (one chunk of N rows), or `None` when it failed
    /// (e.g. out of device memory).
    pub unfused: Option<CudaModeResult>,
    /// Why the unfused mode has no result (its error).
    pub unfused_failed: Option<String>,
    /// Fused median time over unfused median time.
    pub time_ratio: Option<f64>,
}

/// Runs one mode `reps` times on the GPU, after one untimed call (module
/// loading, the cuBLAS handle).
fn run_cuda_mode(
    backend: &CudaBackend,
    c: &LinearConfig,
    inputs: &LinearInputs,
    mode: Mode,
    reps: usize,
) -> Result<CudaModeResult> {
    let spec = c.spec(mode);
    let warm = fused_linear::compute_cuda(backend, inputs, &spec)?;
    let chunk_rows = warm.chunk_rows;
    let mut device_peak_bytes = warm.device_peak_bytes.unwrap_or(0);
    drop(warm);
    let mut times_ms = Vec::with_capacity(reps);
    let mut loss = f64::NAN;
    for _ in 0..reps {
        let t0 = Instant::now();
        // compute_cuda returns after downloading its results: the work is
        // done.
        let out = fused_linear::compute_cuda(backend, inputs, &spec)?;
        times_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        loss = out.loss;
        device_peak_bytes = device_peak_bytes.max(out.device_peak_bytes.unwrap_or(0));
        std::hint::black_box(&out);
    }
    Ok(CudaModeResult {
        mode,
        chunk_rows,
        chunks: c.rows.div_ceil(chunk_rows),
        median_ms: median(&times_ms),
        times_ms,
        device_peak_bytes,
        loss,
    })
}

/// Both modes of `c` on the GPU of `backend`, `reps` timed calls each, on
/// the inputs [`run_mode`] builds from `seed`. A mode that fails (e.g. the
/// unfused one out of device memory) is recorded with its error.
pub fn run_cuda_modes(
    backend: &CudaBackend,
    c: &LinearConfig,
    reps: usize,
    seed: u64,
) -> Result<CudaResult> {
    c.validate()?;
    if reps == 0 {
        return invalid("reps", "must be ≥ 1");
    }
    let data = Inputs::build(c, seed);
    let inputs = data.view(c);
    let split = |r: Result<CudaModeResult>| match r {
        Ok(m) => (Some(m), None),
        Err(e) => (None, Some(e.to_string())),
    };
    let (fused, fused_failed) = split(run_cuda_mode(backend, c, &inputs, Mode::Fused, reps));
    let (unfused, unfused_failed) = split(run_cuda_mode(backend, c, &inputs, Mode::Unfused, reps));
    let time_ratio = match (&fused, &unfused) {
        (Some(f), Some(u)) => Some(f.median_ms / u.median_ms),
        _ => None,
    };
    Ok(CudaResult {
        device: backend
            .context()
            .name()
            .unwrap_or_else(|e| format!("unnamed ({e})")),
        fused,
        fused_failed,
        unfused,
        unfused_failed,
        time_ratio,
    })
}

/// Bytes of per-chunk buffers one row takes for `c` (the library's
/// [`fused_linear::bytes_per_row`]).
pub fn bytes_per_row(c: &LinearConfig) -> usize {
    // A one-element stand-in of each input: the count depends on V, the
    // dtype and the teacher's kind only.
    let one = OwnedData::from_f32(&vec![0.0; c.vocab.max(1)], c.dtype);
    let h1 = OwnedData::from_f32(&[0.0], c.dtype);
    let student = Linear::new(
        Matrix::new(h1.view(), 1, 1),
        Matrix::new(one.view(), c.vocab, 1),
        None,
    );
    let teacher = match c.teacher {
        TeacherKind::LinearHead => LinearTeacher::Linear(student),
        TeacherKind::Logits => LinearTeacher::Logits(Logits::new(one.view(), 1, c.vocab)),
    };
    let inputs = LinearInputs {
        student,
        teacher,
        labels: None,
        row_weights: None,
    };
    fused_linear::bytes_per_row(&inputs, &c.spec(Mode::Fused))
}

/// One point: both modes, and what they say against the prediction.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinearResult {
    /// The point.
    pub config: LinearConfig,
    /// Per-chunk buffer bytes per row ([`fused_linear::bytes_per_row`]).
    pub bytes_per_row: usize,
    /// One fused chunk's buffers: `bytes_per_row × chunk_rows`.
    pub chunk_bytes: usize,
    /// The weight gradient, `V × H × 4`.
    pub weight_grad_bytes: usize,
    /// The prediction `1.2 × chunk_bytes + weight_grad_bytes`.
    pub predicted_extra_bytes: usize,
    /// The fused (chunked) mode.
    pub fused: ModeResult,
    /// The unfused mode (one chunk of N rows), or `None` when skipped.
    pub unfused: Option<ModeResult>,
    /// Why the unfused mode was not run.
    pub unfused_skipped: Option<String>,
    /// Fused median time over unfused median time.
    pub time_ratio: Option<f64>,
    /// Whether the fused peak extra RSS is within the prediction.
    pub memory_within_prediction: bool,
    /// Whether the fused time is within 10% of the unfused one.
    pub time_within_10pct: Option<bool>,
    /// |fused loss − unfused loss| / |unfused loss|.
    pub loss_rel_diff: Option<f64>,
    /// Both modes on the GPU, when one was usable.
    #[serde(default)]
    pub cuda: Option<CudaResult>,
    /// Why the GPU modes were not run ("no usable GPU (…)", "--backend
    /// cpu").
    #[serde(default)]
    pub cuda_skipped: Option<String>,
}

impl LinearResult {
    /// Puts the two modes' measurements together.
    pub fn new(
        config: LinearConfig,
        fused: ModeResult,
        unfused: Option<ModeResult>,
        unfused_skipped: Option<String>,
    ) -> Self {
        let bytes_per_row = bytes_per_row(&config);
        let chunk_bytes = bytes_per_row * fused.chunk_rows;
        let weight_grad_bytes = config.weight_grad_bytes();
        let predicted = (1.2 * chunk_bytes as f64) as usize + weight_grad_bytes;
        let time_ratio = unfused.as_ref().map(|u| fused.median_ms / u.median_ms);
        let loss_rel_diff = unfused
            .as_ref()
            .map(|u| (fused.loss - u.loss).abs() / u.loss.abs().max(f64::MIN_POSITIVE));
        LinearResult {
            bytes_per_row,
            chunk_bytes,
            weight_grad_bytes,
            predicted_extra_bytes: predicted,
            memory_within_prediction: fused.peak_rss_extra_bytes <= predicted as u64,
            time_within_10pct: time_ratio.map(|r| r <= 1.10),
            time_ratio,
            loss_rel_diff,
            config,
            fused,
            unfused,
            unfused_skipped,
            cuda: None,
            cuda_skipped: None,
        }
    }

    /// One GPU mode's result, if it ran.
    pub fn cuda_mode(&self, mode: Mode) -> Option<&CudaModeResult> {
        let g = self.cuda.as_ref()?;
        match mode {
            Mode::Fused => g.fused.as_ref(),
            Mode::Unfused => g.unfused.as_ref(),
        }
    }

    /// Adds the GPU modes' result, or why they were not run.
    pub fn with_cuda(mut self, cuda: std::result::Result<CudaResult, String>) -> Self {
        match cuda {
            Ok(r) => self.cuda = Some(r),
            Err(why) => self.cuda_skipped = Some(why),
        }
        self
    }
}

/// The machine, as the report states it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinearHost {
    /// CPU model.
    pub cpu: String,
    /// Worker threads (rayon) of the GEMMs and the CPU backend.
    pub threads: usize,
    /// Total memory, bytes (0 if unknown).
    pub memory_bytes: u64,
}

impl LinearHost {
    /// This machine.
    pub fn here() -> Self {
        let total = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                let l = s.lines().find(|l| l.starts_with("MemTotal:"))?.to_string();
                l.split_whitespace().nth(1)?.parse::<u64>().ok()
            })
            .map_or(0, |kb| kb * 1024);
        LinearHost {
            cpu: host::cpu_model(),
            threads: rayon::current_num_threads(),
            memory_bytes: total,
        }
    }
}

/// The report (`--json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinearReport {
    /// Always "fused-linear".
    pub benchmark: String,
    /// When it ran (RFC 3339, UTC).
    pub date: String,
    /// The source commit.
    pub commit: String,
    /// The machine (CPU measurements: the CPU backend and host GEMMs).
    pub host: LinearHost,
    /// A free-form note (the machine's sharing, what is measured).
    pub note: String,
    /// Timed repetitions per mode.
    pub reps: usize,
    /// Every point.
    pub results: Vec<LinearResult>,
}

/// One CSV row per point.
#[derive(Debug, Clone, Serialize)]
#[allow(missing_docs)]
pub struct LinearCsvRow {
    pub rows: usize,
    pub hidden: usize,
    pub vocab: usize,
    pub dtype: String,
    pub teacher: String,
    pub chunk_rows: usize,
    pub chunks: usize,
    pub fused_median_ms: f64,
    pub unfused_median_ms: Option<f64>,
    pub time_ratio: Option<f64>,
    pub fused_peak_extra_mib: f64,
    pub unfused_peak_extra_mib: Option<f64>,
    pub fused_heap_peak_extra_mib: Option<f64>,
    pub unfused_heap_peak_extra_mib: Option<f64>,
    pub predicted_extra_mib: f64,
    pub memory_within_prediction: bool,
    pub time_within_10pct: Option<bool>,
    pub loss_rel_diff: Option<f64>,
    pub cuda_fused_median_ms: Option<f64>,
    pub cuda_unfused_median_ms: Option<f64>,
    pub cuda_time_ratio: Option<f64>,
    pub cuda_fused_device_peak_mib: Option<f64>,
    pub cuda_unfused_device_peak_mib: Option<f64>,
    pub cuda_skipped: Option<String>,
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

impl LinearReport {
    /// One CSV row per point.
    pub fn csv_rows(&self) -> Vec<LinearCsvRow> {
        self.results
            .iter()
            .map(|r| LinearCsvRow {
                rows: r.config.rows,
                hidden: r.config.hidden,
                vocab: r.config.vocab,
                dtype: r.config.dtype.to_string(),
                teacher: r.config.teacher.as_str().into(),
                chunk_rows: r.fused.chunk_rows,
                chunks: r.fused.chunks,
                fused_median_ms: r.fused.median_ms,
                unfused_median_ms: r.unfused.as_ref().map(|u| u.median_ms),
                time_ratio: r.time_ratio,
                fused_peak_extra_mib: mib(r.fused.peak_rss_extra_bytes),
                unfused_peak_extra_mib: r.unfused.as_ref().map(|u| mib(u.peak_rss_extra_bytes)),
                fused_heap_peak_extra_mib: r.fused.heap_peak_extra_bytes.map(mib),
                unfused_heap_peak_extra_mib: r
                    .unfused
                    .as_ref()
                    .and_then(|u| u.heap_peak_extra_bytes.map(mib)),
                predicted_extra_mib: mib(r.predicted_extra_bytes as u64),
                memory_within_prediction: r.memory_within_prediction,
                time_within_10pct: r.time_within_10pct,
                loss_rel_diff: r.loss_rel_diff,
                cuda_fused_median_ms: r.cuda_mode(Mode::Fused).map(|m| m.median_ms),
                cuda_unfused_median_ms: r.cuda_mode(Mode::Unfused).map(|m| m.median_ms),
                cuda_time_ratio: r.cuda.as_ref().and_then(|g| g.time_ratio),
                cuda_fused_device_peak_mib: r
                    .cuda_mode(Mode::Fused)
                    .map(|m| mib(m.device_peak_bytes as u64)),
                cuda_unfused_device_peak_mib: r
                    .cuda_mode(Mode::Unfused)
                    .map(|m| mib(m.device_peak_bytes as u64)),
                cuda_skipped: r.cuda_skipped.clone(),
            })
            .collect()
    }

    /// The table printed to stdout (Markdown, as in BENCHMARKS.md).
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "fused linear + distillation on the CPU: {} ({} threads, {:.0} GiB); {}; median of {} rep(s) per mode",
            self.host.cpu,
            self.host.threads,
            self.host.memory_bytes as f64 / (1u64 << 30) as f64,
            self.note,
            self.reps
        );
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "| N | H | V | dtype | teacher | chunk rows × chunks | fused ms | unfused ms | fused/unfused | fused peak extra MiB (heap) | unfused peak extra MiB (heap) | prediction MiB | fused within prediction |"
        );
        let _ = writeln!(
            s,
            "|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|"
        );
        let heap = |h: Option<u64>| h.map_or(String::new(), |h| format!(" ({:.0})", mib(h)));
        for r in &self.results {
            let c = &r.config;
            let (u_ms, u_mem) = match &r.unfused {
                Some(u) => (
                    format!("{:.0}", u.median_ms),
                    format!(
                        "{:.0}{}",
                        mib(u.peak_rss_extra_bytes),
                        heap(u.heap_peak_extra_bytes)
                    ),
                ),
                None => ("skipped".into(), "skipped".into()),
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} × {} | {:.0} | {} | {} | {:.0}{} | {} | {:.0} | {} |",
                c.rows,
                c.hidden,
                c.vocab,
                c.dtype,
                c.teacher.as_str(),
                r.fused.chunk_rows,
                r.fused.chunks,
                r.fused.median_ms,
                u_ms,
                r.time_ratio.map_or("–".into(), |t| format!("{t:.3}")),
                mib(r.fused.peak_rss_extra_bytes),
                heap(r.fused.heap_peak_extra_bytes),
                u_mem,
                mib(r.predicted_extra_bytes as u64),
                if r.memory_within_prediction { "yes" } else { "NO" },
            );
        }
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "prediction = 1.2 × (bytes_per_row × chunk_rows) + the weight gradient (V × H × 4); peak extra = VmHWM − VmRSS after the inputs were built, each mode in its own process"
        );
        for r in &self.results {
            if let Some(why) = &r.unfused_skipped {
                let _ = writeln!(s, "{}: unfused skipped: {why}", r.config);
            }
            if let Some(d) = r.loss_rel_diff {
                let _ = writeln!(
                    s,
                    "{}: fused loss {:.6}, unfused {:.6} (relative difference {d:.1e}); time within 10%: {}",
                    r.config,
                    r.fused.loss,
                    r.unfused.as_ref().map_or(f64::NAN, |u| u.loss),
                    match r.time_within_10pct {
                        Some(true) => "yes",
                        Some(false) => "NO",
                        None => "–",
                    }
                );
            }
            if let Some(why) = &r.cuda_skipped {
                let _ = writeln!(s, "{}: cuda skipped: {why}", r.config);
            }
        }
        s.push_str(&self.cuda_table());
        s
    }

    /// The GPU modes' table (empty when no point ran on a GPU).
    fn cuda_table(&self) -> String {
        let mut s = String::new();
        let ran: Vec<(&LinearResult, &CudaResult)> = self
            .results
            .iter()
            .filter_map(|r| r.cuda.as_ref().map(|g| (r, g)))
            .collect();
        let Some((_, first)) = ran.first() else {
            return s;
        };
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "fused linear + distillation on the GPU ({}): wall time of compute_cuda (uploads, device chunk loop, downloads), median of {} rep(s) after one untimed call; device peak = the bytes the device chunk loop allocated (all alive until the call ends)",
            first.device, self.reps
        );
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "| N | H | V | dtype | teacher | chunk rows × chunks | GPU fused ms | GPU unfused ms | fused/unfused | fused device peak MiB | unfused device peak MiB |"
        );
        let _ = writeln!(s, "|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|");
        let ms = |m: Option<&CudaModeResult>| {
            m.map_or("failed".into(), |m| format!("{:.1}", m.median_ms))
        };
        let peak = |m: Option<&CudaModeResult>| {
            m.map_or("failed".into(), |m| {
                format!("{:.0}", mib(m.device_peak_bytes as u64))
            })
        };
        for (r, g) in &ran {
            let c = &r.config;
            let (f, u) = (r.cuda_mode(Mode::Fused), r.cuda_mode(Mode::Unfused));
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                c.rows,
                c.hidden,
                c.vocab,
                c.dtype,
                c.teacher.as_str(),
                f.map_or("–".into(), |f| format!("{} × {}", f.chunk_rows, f.chunks)),
                ms(f),
                ms(u),
                g.time_ratio.map_or("–".into(), |t| format!("{t:.3}")),
                peak(f),
                peak(u),
            );
        }
        for (r, g) in &ran {
            if let Some(e) = &g.fused_failed {
                let _ = writeln!(s, "{}: GPU fused failed: {e}", r.config);
            }
            if let Some(e) = &g.unfused_failed {
                let _ = writeln!(s, "{}: GPU unfused failed: {e}", r.config);
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1gb"), Ok(1_000_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1.5KiB"), Ok(1536));
        assert!(parse_size("1.5XB").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn small_point_runs_both_modes_alike() {
        let c = LinearConfig {
            rows: 37,
            hidden: 16,
            vocab: 300,
            dtype: Dtype::F32,
            teacher: TeacherKind::LinearHead,
            divergence: Divergence::ForwardKl,
            chunking: Chunking::Rows(8),
        };
        let f = run_mode(&c, Mode::Fused, 2, 1).unwrap();
        let u = run_mode(&c, Mode::Unfused, 1, 1).unwrap();
        assert_eq!((f.chunk_rows, f.chunks, u.chunks), (8, 5, 1));
        assert!(f.loss.is_finite() && f.loss > 0.0);
        assert!((f.loss - u.loss).abs() <= 1e-5 * u.loss.abs());
        let r = LinearResult::new(c.clone(), f, Some(u), None);
        assert_eq!(r.bytes_per_row, 300 * 4 * 3);
        let rep = LinearReport {
            benchmark: "fused-linear".into(),
            date: String::new(),
            commit: String::new(),
            host: LinearHost::here(),
            note: String::new(),
            reps: 1,
            results: vec![r],
        };
        assert!(rep.table().contains("| 37 | 16 | 300 |"));
        assert_eq!(rep.csv_rows().len(), 1);
    }
}
