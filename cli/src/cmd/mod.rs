//! Command definitions and dispatch.

/// `println!` that returns a [`CliError`] when stdout cannot be written
/// (a full disk: `> /dev/full`) instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cmd::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` that returns a [`CliError`] when stdout cannot be written.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cmd::write_stdout(format_args!($($arg)*))
    };
}

mod bench;
mod cache;
mod check;
mod demo;
mod feature;
mod info;
mod linear_loss;
mod loss;
mod npy;
mod tensorfile;

use clap::{Args, Parser, Subcommand};
use kdfuse::backend::CudaChoice;
use kdfuse::single_read::KernelChoice;
use kdfuse::{BackendKind, KdError};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Fused knowledge-distillation loss kernels: loss and gradient in one pass.
#[derive(Debug, Parser)]
#[command(name = "kdfuse", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show the build (embedded architectures, toolchain) and the GPUs seen.
    Info(info::InfoArgs),
    /// Compute a distillation loss (and gradient) from .npy files; prints JSON.
    Loss(loss::LossArgs),
    /// Compute a feature distillation loss (mse, cosine, attention transfer)
    /// and gradients from .npy files; prints JSON.
    FeatureLoss(feature::FeatureLossArgs),
    /// Compute the fused linear + distillation loss (hidden states and heads,
    /// chunk by chunk, the logits never whole) and its gradients; prints JSON.
    LinearLoss(linear_loss::LinearLossArgs),
    /// Sweep random cases of a backend against the f64 oracle.
    Check(check::CheckArgs),
    /// Benchmark: fused vs eager vs copy bandwidth (GPU), or the CPU backend
    /// vs memory bandwidth; table, JSON, CSV, Markdown.
    Bench(bench::BenchArgs),
    /// Print results JSON of `kdfuse bench` as Markdown tables.
    BenchReport(bench::ReportArgs),
    /// Run one configuration repeatedly for a profiler (ncu, nsys, perf).
    Profile(bench::ProfileArgs),
    /// Train a teacher and distil a small student on the handwritten digits.
    Demo(demo::DemoArgs),
    /// Build or describe a top-k teacher cache (safetensors shards and an
    /// index) for `kdfuse loss --teacher-cache`.
    TeacherCache(cache::CacheArgs),
}

/// A CLI failure: printed as one line, exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Kd(#[from] KdError),
    #[error("{0}")]
    Msg(String),
}

/// Writes to stdout; a failure is an error naming stdout.
pub(crate) fn write_stdout(args: std::fmt::Arguments<'_>) -> Result<(), CliError> {
    use std::io::Write;
    std::io::stdout()
        .lock()
        .write_fmt(args)
        .map_err(|e| CliError::Msg(format!("cannot write to stdout: {e}")))
}

/// Flushes stdout (what `print!` left buffered); a failure is an error.
pub fn flush_stdout() -> Result<(), CliError> {
    use std::io::Write;
    std::io::stdout()
        .flush()
        .map_err(|e| CliError::Msg(format!("cannot write to stdout: {e}")))
}

pub fn run(cli: Cli) -> Result<ExitCode, CliError> {
    match cli.command {
        Command::Info(a) => info::run(a),
        Command::Loss(a) => loss::run(a),
        Command::FeatureLoss(a) => feature::run(a),
        Command::LinearLoss(a) => linear_loss::run(a),
        Command::Check(a) => check::run(a),
        Command::Bench(a) => bench::run(a),
        Command::BenchReport(a) => bench::report(a),
        Command::Profile(a) => bench::profile(a),
        Command::Demo(a) => demo::run(a),
        Command::TeacherCache(a) => cache::run(a),
    }
}

/// `--kernel`: which dense loss kernel the CUDA backend runs.
#[derive(Debug, Args)]
pub(crate) struct KernelArgs {
    /// The dense loss kernel on CUDA: auto (single-read where the GPU and V
    /// allow it, else v1), v1, or single-read (an error where it cannot
    /// run). Top-k teachers always run v1's top-k kernels.
    /// [default: $KDFUSE_KERNEL, else auto]
    #[arg(long, value_name = "auto|v1|single-read", value_parser = parse_kernel)]
    kernel: Option<KernelChoice>,
}

fn parse_kernel(s: &str) -> Result<KernelChoice, String> {
    KernelChoice::parse("--kernel", s).map_err(|e| match e {
        KdError::InvalidArgument { msg, .. } => msg,
        e => e.to_string(),
    })
}

impl KernelArgs {
    /// `--kernel`, else `KDFUSE_KERNEL` (an error naming it when invalid),
    /// else auto.
    pub(crate) fn choice(&self) -> Result<KernelChoice, CliError> {
        match self.kernel {
            Some(c) => Ok(c),
            None => Ok(KernelChoice::from_env()?),
        }
    }

    /// `--kernel` when given (else the backend keeps `KDFUSE_KERNEL`'s).
    pub(crate) fn forced(&self) -> Option<KernelChoice> {
        self.kernel
    }
}

/// Creates the backend; `auto` says on stderr why it fell back to the CPU.
pub(crate) fn make_backend(kind: BackendKind) -> Result<Box<dyn kdfuse::Backend>, CliError> {
    make_backend_with(kind, None)
}

/// [`make_backend`], the CUDA backend running the dense loss kernel
/// `kernel` when given (else `KDFUSE_KERNEL`'s).
pub(crate) fn make_backend_with(
    kind: BackendKind,
    kernel: Option<KernelChoice>,
) -> Result<Box<dyn kdfuse::Backend>, CliError> {
    Ok(match kind {
        BackendKind::Auto => match kdfuse::backend::select_cuda_for(0, kernel)? {
            CudaChoice::Usable(b) => Box::new(b),
            CudaChoice::Unavailable(why) => {
                eprintln!("kdfuse: note: CUDA unavailable ({why}); using the CPU backend");
                Box::new(kdfuse::CpuBackend)
            }
        },
        BackendKind::Cuda => Box::new(kdfuse::cuda::CudaBackend::open(0, kernel)?),
        _ => kdfuse::create(kind)?,
    })
}

/// A path as it will be opened: the canonical form of the file or, when it
/// does not exist yet, of its directory joined with its name.
fn resolved(p: &Path) -> PathBuf {
    if let Ok(c) = p.canonicalize() {
        return c;
    }
    let dir = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match (dir.canonicalize(), p.file_name()) {
        (Ok(d), Some(name)) => d.join(name),
        _ => p.to_path_buf(),
    }
}

/// Fails when two outputs are one file, or an output is one of the inputs
/// (it would be overwritten while, or after, being read).
pub(crate) fn check_paths(
    inputs: &[(&str, Option<&PathBuf>)],
    outputs: &[(&str, Option<&PathBuf>)],
) -> Result<(), CliError> {
    let outs: Vec<(&str, PathBuf)> = outputs
        .iter()
        .filter_map(|(f, p)| p.map(|p| (*f, resolved(p))))
        .collect();
    for (i, (flag, out)) in outs.iter().enumerate() {
        if let Some((other, _)) = outs[..i].iter().find(|(_, o)| o == out) {
            return Err(CliError::Msg(format!(
                "{other} and {flag} are the same file ({}): give each output its own path",
                out.display()
            )));
        }
        for (input, p) in inputs {
            if p.is_some_and(|p| resolved(p) == *out) {
                return Err(CliError::Msg(format!(
                    "{flag} would overwrite the input {input} ({}): give the output another path",
                    out.display()
                )));
            }
        }
    }
    Ok(())
}
