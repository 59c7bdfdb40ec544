//! Command definitions and dispatch.

mod bench;
mod check;
mod demo;
mod feature;
mod info;
mod loss;
mod npy;

use clap::{Parser, Subcommand};
use kdfuse::{BackendKind, KdError};
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
}

/// A CLI failure: printed as one line, exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Kd(#[from] KdError),
    #[error("{0}")]
    Msg(String),
}

pub fn run(cli: Cli) -> Result<ExitCode, CliError> {
    match cli.command {
        Command::Info(a) => info::run(a),
        Command::Loss(a) => loss::run(a),
        Command::FeatureLoss(a) => feature::run(a),
        Command::Check(a) => check::run(a),
        Command::Bench(a) => bench::run(a),
        Command::BenchReport(a) => bench::report(a),
        Command::Profile(a) => bench::profile(a),
        Command::Demo(a) => demo::run(a),
    }
}

/// Creates the backend; `auto` says on stderr why it fell back to the CPU.
pub(crate) fn make_backend(kind: BackendKind) -> Result<Box<dyn kdfuse::Backend>, CliError> {
    if kind == BackendKind::Auto {
        return match kdfuse::cuda::CudaBackend::new(0) {
            Ok(b) => Ok(Box::new(b)),
            Err(KdError::CudaUnavailable(why)) => {
                eprintln!("kdfuse: note: CUDA unavailable ({why}); using the CPU backend");
                Ok(Box::new(kdfuse::CpuBackend))
            }
            Err(e) => Err(e.into()),
        };
    }
    Ok(kdfuse::create(kind)?)
}
