//! `kdfuse bench` (fused vs eager vs copy bandwidth, or the CPU backend vs
//! memory bandwidth), `kdfuse bench-report` (Markdown from results JSON) and
//! `kdfuse profile` (one configuration under a profiler).

use super::{CliError, KernelArgs};
use clap::Args;
use kdfuse::cuda::CudaBackend;
use kdfuse::{Divergence, Dtype, KdError, Precision};
use kdfuse_cli::bench::cuda::{DeviceCase, Variant};
use kdfuse_cli::bench::{BenchConfig, BenchOptions, BenchReport, Preset, Timing, MIN_RUNS};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The configurations to measure, from flags (each a comma-separated list;
/// every combination is run).
#[derive(Debug, Args)]
pub struct ShapeArgs {
    /// Rows N (tokens).
    #[arg(long, value_delimiter = ',', value_name = "N,..")]
    rows: Vec<usize>,
    /// Vocabulary sizes V.
    #[arg(long, value_delimiter = ',', value_name = "V,..")]
    cols: Vec<usize>,
    /// Logit dtypes (f32, bf16, f16); the gradient has the same dtype on the GPU (the CPU backend writes it in f32)
    /// [default: bf16; f32 with --topk-select].
    #[arg(long, value_delimiter = ',')]
    dtype: Vec<Dtype>,
    /// Divergences (forward-kl, reverse-kl, jsd, tvd, soft-ce).
    #[arg(long, value_delimiter = ',', default_value = "forward-kl")]
    divergence: Vec<Divergence>,
    /// Weight of the hard-label cross-entropy (random labels when > 0).
    #[arg(long, default_value_t = 0.0)]
    alpha: f64,
    /// JSD β (jsd only) [default: 0.5].
    #[arg(long)]
    beta: Option<f64>,
    /// Temperature τ.
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Loss only (no gradient).
    #[arg(long)]
    loss_only: bool,
    /// Kernel arithmetic: fast (default) or exact; both (`fast,exact`) to
    /// compare them. Where no fast kernel covers the loss the exact one runs
    /// (the report names the one that ran).
    #[arg(long, value_delimiter = ',', default_value = "fast")]
    precision: Vec<Precision>,
}

impl ShapeArgs {
    /// Every combination of the flags; `missing` says what to give when
    /// --rows or --cols is missing (each command has its own flags).
    fn configs(&self, missing: &str) -> Result<Vec<BenchConfig>, CliError> {
        if self.rows.is_empty() || self.cols.is_empty() {
            return Err(CliError::Msg(missing.into()));
        }
        if self.beta.is_some() && !self.divergence.contains(&Divergence::Jsd) {
            return Err(CliError::Msg(
                "--beta is the JSD weight: it needs --divergence jsd".into(),
            ));
        }
        let mut out = Vec::new();
        let dtypes = if self.dtype.is_empty() {
            vec![Dtype::Bf16]
        } else {
            self.dtype.clone()
        };
        for &rows in &self.rows {
            for &cols in &self.cols {
                for &dtype in &dtypes {
                    for (&divergence, &precision) in self
                        .divergence
                        .iter()
                        .flat_map(|d| self.precision.iter().map(move |p| (d, p)))
                    {
                        let c = BenchConfig {
                            precision,
                            alpha: self.alpha,
                            beta: if divergence == Divergence::Jsd {
                                self.beta.unwrap_or(0.5)
                            } else {
                                0.5
                            },
                            temperature: self.temperature,
                            grad: !self.loss_only,
                            ..BenchConfig::new(rows, cols, dtype, divergence)
                        };
                        c.validate()?;
                        out.push(c);
                    }
                }
            }
        }
        Ok(out)
    }
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Backend: cuda, cpu, or auto (CUDA when usable, else the CPU).
    #[arg(long, default_value = "auto", value_parser = ["auto", "cpu", "cuda"])]
    backend: String,
    /// A named sweep: quick (about a minute) or llm (N ∈ {4096, 16384} ×
    /// V ∈ {32000, 128256, 151936, 262144} × {bf16, f32} × {forward-kl, jsd}).
    /// On the CPU backend N is scaled down (quick 16, llm {16, 64}).
    #[arg(long, value_parser = ["quick", "llm"], conflicts_with_all = ["rows", "cols"])]
    preset: Option<String>,
    #[command(flatten)]
    shape: ShapeArgs,
    /// Time the per-row top-k selection (`kdfuse::topk_select`) instead of
    /// the loss: the CPU, the GPU when usable and torch.topk when `python3`
    /// imports torch, over --rows × --cols × --k × --dtype
    /// [defaults 64 × 128256 × 128 × f32].
    #[arg(long, conflicts_with_all = ["preset", "divergence", "alpha", "beta", "temperature", "loss_only", "precision", "no_eager", "markdown"])]
    topk_select: bool,
    /// Compare the fused linear + distillation loss (chunked) with the
    /// unfused pipeline (one chunk of N rows: the full N×V logits) on the
    /// CPU, time and peak memory, each mode in its own process; over
    /// --rows × --hidden × --vocab × --dtype [defaults 4096 × 2048 ×
    /// 32000,128256 × f32]. With a usable GPU (--backend auto or cuda) both
    /// modes also run on it (`compute_cuda`): wall time and the device
    /// allocator's peak; otherwise "cuda skipped" and why.
    #[arg(long, conflicts_with_all = ["preset", "cols", "alpha", "beta", "temperature", "loss_only", "precision", "no_eager", "markdown", "topk_select"])]
    linear: bool,
    /// Hidden size H (--linear) [default: 2048].
    #[arg(long, value_delimiter = ',', value_name = "H,..", requires = "linear")]
    hidden: Vec<usize>,
    /// Vocabulary sizes V (--linear) [default: 32000,128256].
    #[arg(long, value_delimiter = ',', value_name = "V,..", requires = "linear")]
    vocab: Vec<usize>,
    /// The teacher (--linear): linear-head (hidden states and a head, its
    /// logits chunked too) or logits (dense [N, V] logits, an input).
    #[arg(long, default_value = "linear-head", value_parser = ["linear-head", "logits"], requires = "linear")]
    linear_teacher: String,
    /// Timed repetitions per mode (--linear); the median is reported.
    #[arg(long, default_value_t = 3, requires = "linear")]
    reps: usize,
    /// Rows per fused chunk (--linear), instead of --memory-budget.
    #[arg(
        long,
        value_name = "N",
        requires = "linear",
        conflicts_with = "memory_budget"
    )]
    chunk_rows: Option<usize>,
    /// Per-chunk buffer budget of the fused mode (--linear), e.g. 512MiB
    /// [default: 1GiB, the library's default].
    #[arg(long, value_name = "SIZE", requires = "linear")]
    memory_budget: Option<String>,
    /// Internal: run one mode of --linear in this process and print its
    /// measurements as JSON (the parent re-executes itself with it).
    #[arg(long, hide = true, value_parser = ["fused", "unfused"], requires = "linear")]
    linear_child: Option<String>,
    /// Entries kept per row (--topk-select) [default: 128].
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "K,..",
        requires = "topk_select"
    )]
    k: Vec<usize>,
    /// Also compute each row's log-sum-exp (--topk-select).
    #[arg(long, requires = "topk_select")]
    with_lse: bool,
    /// Python interpreter for the torch.topk comparison (--topk-select).
    #[arg(
        long,
        default_value = "python3",
        value_name = "PYTHON",
        requires = "topk_select"
    )]
    torch_python: String,
    /// Timed runs per variant (at least 20).
    #[arg(long, default_value_t = MIN_RUNS)]
    runs: usize,
    /// Untimed warm-up runs.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Skip the eager baseline (GPU).
    #[arg(long)]
    no_eager: bool,
    /// Rows of each configuration the CPU backend is timed on in a GPU run
    /// (0 = none).
    #[arg(long, default_value_t = 16)]
    cpu_rows: usize,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Commit to record (default: git rev-parse, or KDFUSE_COMMIT).
    #[arg(long)]
    commit: Option<String>,
    /// Write the report as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write one CSV row per configuration.
    #[arg(long, value_name = "FILE")]
    csv: Option<PathBuf>,
    /// Write the Markdown table (as in BENCHMARKS.md).
    #[arg(long, value_name = "FILE")]
    markdown: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
    #[command(flatten)]
    kernel: KernelArgs,
}

fn write_file(path: &Path, body: &[u8]) -> Result<(), CliError> {
    std::fs::write(path, body)
        .map_err(|e| CliError::Msg(format!("{}: cannot write: {e}", path.display())))
}

fn use_cuda(backend: &str, device: usize, kernel: &KernelArgs) -> Result<bool, CliError> {
    match backend {
        "cpu" => Ok(false),
        "cuda" => Ok(true),
        _ => match kdfuse::backend::select_cuda_for(device, kernel.forced())? {
            kdfuse::backend::CudaChoice::Usable(_) => Ok(true),
            kdfuse::backend::CudaChoice::Unavailable(why) => {
                eprintln!("kdfuse: note: CUDA unavailable ({why}); benchmarking the CPU backend");
                Ok(false)
            }
        },
    }
}

pub fn run(a: BenchArgs) -> Result<ExitCode, CliError> {
    if a.topk_select {
        return run_topk(a);
    }
    if a.linear {
        return run_linear(a);
    }
    let cuda = use_cuda(&a.backend, a.device, &a.kernel)?;
    let configs = match &a.preset {
        Some(p) => p.parse::<Preset>().map_err(CliError::Msg)?.configs(!cuda),
        None => a
            .shape
            .configs("give --preset, or --rows and --cols (comma-separated lists)")?,
    };
    let opts = BenchOptions {
        warmup: a.warmup,
        runs: a.runs,
        seed: a.seed,
        eager: !a.no_eager,
        cpu_rows: a.cpu_rows,
        device: a.device,
        commit: a.commit.clone(),
        progress: !a.no_progress,
        kernel: a.kernel.forced(),
    };
    opts.validate()?;
    let report = if cuda {
        kdfuse_cli::bench::cuda::run(&configs, &opts)?
    } else {
        kdfuse_cli::bench::cpu::run(&configs, &opts)?
    };
    out!("{}", report.table())?;
    write_json_csv(&a, &report, report.csv_rows())?;
    if let Some(p) = &a.markdown {
        write_file(p, report.markdown().as_bytes())?;
    }
    if report.checks_passed() {
        Ok(ExitCode::SUCCESS)
    } else {
        outln!("FAILED: a configuration's agreement checks failed (see `checks` in the JSON)")?;
        Ok(ExitCode::from(1))
    }
}

/// `kdfuse bench --topk-select`.
fn run_topk(a: BenchArgs) -> Result<ExitCode, CliError> {
    use kdfuse_cli::bench::topk::{self, TopkConfig, TopkOptions};
    let or = |v: &[usize], d: usize| if v.is_empty() { vec![d] } else { v.to_vec() };
    let (rows, cols, ks) = (
        or(&a.shape.rows, 64),
        or(&a.shape.cols, 128256),
        or(&a.k, 128),
    );
    let dtypes = if a.shape.dtype.is_empty() {
        vec![Dtype::F32]
    } else {
        a.shape.dtype.clone()
    };
    let mut configs = Vec::new();
    for &r in &rows {
        for &c in &cols {
            for &k in &ks {
                for &dtype in &dtypes {
                    let t = TopkConfig {
                        rows: r,
                        cols: c,
                        k,
                        dtype,
                        with_lse: a.with_lse,
                    };
                    t.validate()?;
                    configs.push(t);
                }
            }
        }
    }
    let (cuda, cuda_skipped) = match a.backend.as_str() {
        "cpu" => (None, "--backend cpu".to_string()),
        "cuda" => (Some(a.device), String::new()),
        _ => match kdfuse::backend::select_cuda(a.device)? {
            kdfuse::backend::CudaChoice::Usable(_) => (Some(a.device), String::new()),
            kdfuse::backend::CudaChoice::Unavailable(why) => {
                (None, format!("no usable GPU ({why})"))
            }
        },
    };
    let python = topk::torch_python(&a.torch_python);
    let opts = TopkOptions {
        warmup: a.warmup,
        runs: a.runs,
        seed: a.seed,
        cuda,
        cuda_skipped,
        python: python.as_ref().ok().cloned(),
        torch_skipped: python.err().unwrap_or_default(),
        commit: a.commit.clone(),
    };
    let report = topk::run(&configs, &opts, !a.no_progress)?;
    out!("{}", report.table())?;
    write_json_csv(&a, &report, report.csv_rows())?;
    Ok(ExitCode::SUCCESS)
}

/// `kdfuse bench --linear`: both modes of every point, each in a child
/// process (this binary with --linear-child), or one mode here when this is
/// the child.
fn run_linear(a: BenchArgs) -> Result<ExitCode, CliError> {
    use kdfuse::fused_linear::Chunking;
    use kdfuse_cli::bench::linear::{
        parse_size, run_cuda_modes, run_mode, LinearConfig, LinearHost, LinearReport, LinearResult,
        Mode, ModeResult, TeacherKind,
    };
    let or = |v: &[usize], d: &[usize]| if v.is_empty() { d.to_vec() } else { v.to_vec() };
    let (rows, hidden, vocab) = (
        or(&a.shape.rows, &[4096]),
        or(&a.hidden, &[2048]),
        or(&a.vocab, &[32_000, 128_256]),
    );
    let dtypes = if a.shape.dtype.is_empty() {
        vec![Dtype::F32]
    } else {
        a.shape.dtype.clone()
    };
    let [divergence] = a.shape.divergence.as_slice() else {
        return Err(CliError::Msg(
            "--divergence: --linear takes one divergence".into(),
        ));
    };
    let chunking = match (a.chunk_rows, &a.memory_budget) {
        (Some(0), _) => return Err(CliError::Msg("--chunk-rows must be ≥ 1, got 0".into())),
        (Some(r), _) => Chunking::Rows(r),
        (None, Some(b)) => Chunking::MemoryBudget(
            parse_size(b).map_err(|e| CliError::Msg(format!("--memory-budget {e}")))?,
        ),
        (None, None) => Chunking::default(),
    };
    if a.reps == 0 {
        return Err(CliError::Msg("--reps must be ≥ 1".into()));
    }
    let teacher: TeacherKind = a.linear_teacher.parse().map_err(CliError::Msg)?;
    let mut configs = Vec::new();
    for &n in &rows {
        for &h in &hidden {
            for &v in &vocab {
                for &dtype in &dtypes {
                    let c = LinearConfig {
                        rows: n,
                        hidden: h,
                        vocab: v,
                        dtype,
                        teacher,
                        divergence: *divergence,
                        chunking,
                    };
                    c.validate()?;
                    configs.push(c);
                }
            }
        }
    }
    if let Some(mode) = &a.linear_child {
        let [c] = configs.as_slice() else {
            return Err(CliError::Msg(
                "internal: --linear-child runs one point".into(),
            ));
        };
        let mode: Mode = mode.parse().map_err(CliError::Msg)?;
        let r = run_mode(c, mode, a.reps, a.seed)?;
        let body = serde_json::to_string(&r)
            .map_err(|e| CliError::Msg(format!("cannot encode the result: {e}")))?;
        outln!("{body}")?;
        return Ok(ExitCode::SUCCESS);
    }
    let exe = std::env::current_exe()
        .map_err(|e| CliError::Msg(format!("cannot find this executable to re-run it: {e}")))?;
    let child = |c: &LinearConfig, mode: Mode| -> Result<ModeResult, CliError> {
        let mut cmd = std::process::Command::new(&exe);
        cmd.args(["bench", "--linear", "--linear-child", mode.as_str()])
            .args(["--rows", &c.rows.to_string()])
            .args(["--hidden", &c.hidden.to_string()])
            .args(["--vocab", &c.vocab.to_string()])
            .args(["--dtype", c.dtype.as_str()])
            .args(["--divergence", c.divergence.as_str()])
            .args(["--linear-teacher", c.teacher.as_str()])
            .args(["--reps", &a.reps.to_string()])
            .args(["--seed", &a.seed.to_string()]);
        match c.chunking {
            Chunking::Rows(r) => cmd.args(["--chunk-rows", &r.to_string()]),
            Chunking::MemoryBudget(b) => cmd.args(["--memory-budget", &b.to_string()]),
        };
        let out = cmd
            .stderr(std::process::Stdio::inherit())
            .output()
            .map_err(|e| CliError::Msg(format!("cannot run {}: {e}", exe.display())))?;
        if !out.status.success() {
            return Err(CliError::Msg(format!(
                "{c}: the {} child failed ({})",
                mode.as_str(),
                out.status
            )));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| {
            CliError::Msg(format!(
                "{c}: the {} child's output is not a result: {e}",
                mode.as_str()
            ))
        })
    };
    // The GPU modes: in this process, when a GPU is usable.
    let (cuda, cuda_skipped) = match a.backend.as_str() {
        "cpu" => (None, "--backend cpu".to_string()),
        "cuda" => (
            Some(kdfuse::cuda::CudaBackend::open(
                a.device,
                a.kernel.forced(),
            )?),
            String::new(),
        ),
        _ => match kdfuse::backend::select_cuda_for(a.device, a.kernel.forced())? {
            kdfuse::backend::CudaChoice::Usable(b) => (Some(b), String::new()),
            kdfuse::backend::CudaChoice::Unavailable(why) => {
                (None, format!("no usable GPU ({why})"))
            }
        },
    };
    if cuda.is_none() {
        eprintln!("kdfuse: bench --linear: cuda skipped: {cuda_skipped}");
    }
    let mut results = Vec::new();
    for c in configs {
        if !a.no_progress {
            eprintln!("kdfuse: bench --linear {c}: fused");
        }
        let fused = child(&c, Mode::Fused)?;
        // The unfused mode holds the full logits (and gradient): skip it
        // when that cannot fit in the memory available now.
        let need = c.input_bytes()
            + kdfuse_cli::bench::linear::bytes_per_row(&c) * c.rows
            + c.weight_grad_bytes()
            + c.rows * c.hidden * 4;
        let avail = kdfuse_cli::bench::host::available_memory();
        let (unfused, skipped) = match avail {
            Some(m) if need as f64 > 0.9 * m as f64 => (
                None,
                Some(format!(
                    "needs about {:.1} GiB, {:.1} GiB available",
                    need as f64 / (1u64 << 30) as f64,
                    m as f64 / (1u64 << 30) as f64
                )),
            ),
            _ => {
                if !a.no_progress {
                    eprintln!("kdfuse: bench --linear {c}: unfused");
                }
                (Some(child(&c, Mode::Unfused)?), None)
            }
        };
        let gpu = match &cuda {
            Some(b) => {
                if !a.no_progress {
                    eprintln!("kdfuse: bench --linear {c}: GPU fused and unfused");
                }
                Ok(run_cuda_modes(b, &c, a.reps, a.seed)?)
            }
            None => Err(cuda_skipped.clone()),
        };
        results.push(LinearResult::new(c, fused, unfused, skipped).with_cuda(gpu));
    }
    let host = LinearHost::here();
    let report = LinearReport {
        benchmark: "fused-linear".into(),
        date: kdfuse_cli::bench::host::now_rfc3339(),
        commit: kdfuse_cli::bench::host::commit(a.commit.as_deref()),
        note: format!(
            "CPU measurements (host GEMMs by matrixmultiply and the CPU backend, {} threads); \
             teacher given as {}; GPU: {}",
            host.threads,
            match teacher {
                TeacherKind::LinearHead => "a linear head (hidden states and weight)",
                TeacherKind::Logits => "dense logits",
            },
            if cuda.is_some() {
                "both modes also on the GPU (compute_cuda wall time, device allocator peak)"
                    .to_string()
            } else {
                format!("cuda skipped: {cuda_skipped}")
            }
        ),
        host,
        reps: a.reps,
        results,
    };
    out!("{}", report.table())?;
    write_json_csv(&a, &report, report.csv_rows())?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Results JSON written by `kdfuse bench --json`.
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

/// Prints each results file as a Markdown section (BENCHMARKS.md's tables).
pub fn report(a: ReportArgs) -> Result<ExitCode, CliError> {
    for path in &a.files {
        let text = std::fs::read_to_string(path)
            .map_err(|e| CliError::Msg(format!("{}: cannot read: {e}", path.display())))?;
        if let Ok(r) = serde_json::from_str::<kdfuse_cli::bench::linear::LinearReport>(&text) {
            if r.benchmark == "fused-linear" {
                outln!("{}", r.table())?;
                continue;
            }
        }
        let r: BenchReport = serde_json::from_str(&text).map_err(|e| {
            CliError::Msg(format!(
                "{}: not a kdfuse bench report: {e}",
                path.display()
            ))
        })?;
        outln!("{}", r.markdown())?;
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct ProfileArgs {
    /// Backend: cuda or cpu.
    #[arg(long, default_value = "cuda", value_parser = ["cpu", "cuda"])]
    backend: String,
    #[command(flatten)]
    shape: ShapeArgs,
    /// What to run on the GPU: the fused kernel or the eager baseline.
    #[arg(long, default_value = "fused", value_parser = ["fused", "eager"])]
    variant: String,
    /// Profiled iterations.
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Untimed iterations before the profiled range.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    device: usize,
    #[command(flatten)]
    kernel: KernelArgs,
}

/// This invocation, for the profiler command lines.
fn this_command() -> String {
    std::env::args()
        .map(|a| {
            if a.contains(char::is_whitespace) {
                format!("'{a}'")
            } else {
                a
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn profile(a: ProfileArgs) -> Result<ExitCode, CliError> {
    if a.backend == "cpu" && a.variant == "eager" {
        return Err(CliError::Msg(
            "--variant eager is the GPU's unfused baseline: it needs --backend cuda".into(),
        ));
    }
    let configs = a
        .shape
        .configs("give --rows and --cols (one value each: profile runs one configuration)")?;
    let [c] = configs.as_slice() else {
        return Err(CliError::Msg(format!(
            "profile runs one configuration; the flags give {}",
            configs.len()
        )));
    };
    if a.iters == 0 {
        return Err(CliError::Msg("--iters must be ≥ 1".into()));
    }
    let me = this_command();
    if a.backend == "cpu" {
        let opts = BenchOptions {
            warmup: a.warmup,
            runs: a.iters,
            seed: a.seed,
            ..Default::default()
        };
        let (t, _, _) = kdfuse_cli::bench::cpu::profile_rows(c, &opts)?;
        print_timing(c, "cpu", &t)?;
        outln!("profile with: perf record -g -- {me}")?;
        return Ok(ExitCode::SUCCESS);
    }
    let variant = if a.variant == "eager" {
        Variant::Eager
    } else {
        Variant::Fused
    };
    let backend = CudaBackend::open(a.device, a.kernel.forced())?;
    let mut case = DeviceCase::new(&backend, c, 1, variant == Variant::Eager, a.seed)?;
    for i in 0..a.warmup {
        case.enqueue(variant, i)?;
    }
    backend.stream().synchronize().map_err(KdError::from)?;
    let t = kdfuse_cli::bench::cuda::profiled(&mut case, variant, a.iters)?;
    print_timing(c, &a.variant, &t)?;
    if variant == Variant::Fused {
        outln!("kernel: {}", case.plan().describe())?;
    }
    let kernels = if variant == Variant::Fused {
        "regex:kd_(fused|single)_"
    } else {
        "regex:kd_eager"
    };
    outln!(
        "the {} iterations run between cuProfilerStart and cuProfilerStop; profile them with:",
        a.iters
    )?;
    outln!("  ncu --profile-from-start off --set full --kernel-name {kernels} --launch-count 1 -o kdfuse-profile {me}")?;
    outln!("  nsys profile --capture-range=cudaProfilerApi --trace=cuda -o kdfuse-profile {me}")?;
    Ok(ExitCode::SUCCESS)
}

fn print_timing(c: &BenchConfig, what: &str, t: &Timing) -> Result<(), CliError> {
    outln!(
        "{c} [{what}]: median {:.3} ms (p10 {:.3}, p90 {:.3}) over {} iterations",
        t.median_ms,
        t.p10_ms,
        t.p90_ms,
        t.runs
    )
}

/// Writes `report` as JSON to `--json` and its `rows` as CSV to `--csv`,
/// where given.
fn write_json_csv<R: serde::Serialize, Row: serde::Serialize>(
    a: &BenchArgs,
    report: &R,
    rows: Vec<Row>,
) -> Result<(), CliError> {
    if let Some(p) = &a.json {
        let body = serde_json::to_vec_pretty(report)
            .map_err(|e| CliError::Msg(format!("cannot encode the report: {e}")))?;
        write_file(p, &body)?;
    }
    if let Some(p) = &a.csv {
        let mut w = csv::Writer::from_writer(Vec::new());
        for row in rows {
            w.serialize(row)
                .map_err(|e| CliError::Msg(format!("cannot encode CSV: {e}")))?;
        }
        let body = w
            .into_inner()
            .map_err(|e| CliError::Msg(format!("cannot encode CSV: {e}")))?;
        write_file(p, &body)?;
    }
    Ok(())
}
