//! `kdfuse check`: a random-case sweep of a backend against the f64 oracle.

use super::{make_backend, CliError};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kdfuse::check::{sweep_precision, CaseReport, GroupStats};
use kdfuse::feature::check::{feature_sweep, FeatureCaseReport};
use kdfuse::{BackendKind, Precision};
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Backend to check (auto = CUDA when usable, else cpu).
    #[arg(long, default_value = "auto", value_parser = ["auto", "cpu", "cuda", "oracle"])]
    backend: String,
    /// Number of random cases.
    #[arg(long, default_value_t = 200)]
    cases: usize,
    /// The kernels' arithmetic under test: fast (default) or exact, each
    /// judged by its own tolerance (docs/DESIGN.md §3); the oracle is exact
    /// either way.
    #[arg(long, default_value = "fast", value_parser = ["fast", "exact"])]
    precision: String,
    /// Seed of the case generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Largest vocabulary drawn (and largest feature row H or map size S).
    #[arg(long, default_value_t = 262_144)]
    max_vocab: usize,
    /// Random cases of the feature losses (mse, cosine, attention); default:
    /// half of --cases.
    #[arg(long)]
    feature_cases: Option<usize>,
    /// Print every case.
    #[arg(long)]
    verbose: bool,
    /// Also write the report as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

pub fn run(a: CheckArgs) -> Result<ExitCode, CliError> {
    let kind: BackendKind = a.backend.parse().map_err(CliError::Msg)?;
    if a.max_vocab == 0 {
        return Err(CliError::Msg("--max-vocab must be ≥ 1".into()));
    }
    let feature_cases = a.feature_cases.unwrap_or(a.cases / 2);
    if a.cases == 0 && feature_cases == 0 {
        return Err(CliError::Msg(
            "nothing to check: --cases 0 (and no --feature-cases) runs no case; give at least one"
                .into(),
        ));
    }
    let backend = make_backend(kind)?;
    let verbose = a.verbose;
    let bar = progress_bar((a.cases + feature_cases) as u64);
    // The first failed write to stdout, reported after the sweep.
    let mut write_error: Option<CliError> = None;
    let mut line = |passed: bool, loss_err: f64, grad_err: f64, what: String| {
        bar.inc(1);
        if (verbose || !passed) && write_error.is_none() {
            let r = bar.suspend(|| {
                outln!(
                    "{} loss_err={:.2e} grad_err={:.2e}  {}",
                    if passed { "ok  " } else { "FAIL" },
                    loss_err,
                    grad_err,
                    what
                )
            });
            write_error = r.err();
        }
    };
    let precision: Precision = a.precision.parse().map_err(CliError::Msg)?;
    let report = sweep_precision(
        backend.as_ref(),
        a.cases,
        a.seed,
        a.max_vocab,
        precision,
        |r: &CaseReport| {
            let what = match r.eager {
                Some((le, ge)) => format!(
                    "{}  eager_loss_err={le:.2e} eager_grad_err={ge:.2e}",
                    r.config.describe()
                ),
                None => r.config.describe(),
            };
            line(r.passed, r.loss_err, r.grad_err, what)
        },
    );
    // The same backend as above (`auto` resolved, its note printed once).
    let feature_backend = kdfuse::feature::create(match kind {
        BackendKind::Auto => backend.name().parse().unwrap_or(BackendKind::Cpu),
        k => k,
    })?;
    let report = report?;
    let features = feature_sweep(
        feature_backend.as_ref(),
        feature_cases,
        a.seed,
        a.max_vocab,
        |r: &FeatureCaseReport| line(r.passed, r.loss_err, r.grad_err, r.config.describe()),
    );
    bar.finish_and_clear();
    let features = features?;
    if let Some(e) = write_error {
        return Err(e);
    }
    outln!(
        "backend {} ({} precision requested) vs oracle: {} cases, seed {}, V ≤ {}",
        backend.name(),
        precision,
        report.cases,
        a.seed,
        a.max_vocab
    )?;
    print_groups("dtype/divergence", &report.groups)?;
    print_eager(&report.groups)?;
    outln!(
        "feature losses, backend {} vs oracle: {} cases, seed {}, H, S ≤ {}",
        feature_backend.name(),
        features.cases,
        a.seed,
        a.max_vocab
    )?;
    print_groups("dtype/feature", &features.groups)?;
    outln!("tolerances (docs/DESIGN.md §3): loss 1e-5; gradient 1e-5 (f32 out), 4e-3 (bf16 out), 1e-3 (f16 out); top-k tail: loss 2e-5, gradient at least 2e-5; top-k rows against at least fp32's resolution of their log-ratios (check::topk_resolution); soft-capped rows against at least tanhf's (check::softcap_resolution); the fast GPU kernels against at least their mixed bound (check::fast_resolution: 8 fp32 ulps of the row's log-sum-exp scale)")?;
    if let Some(path) = &a.json {
        let body = serde_json::json!({
            "backend": backend.name(),
            "seed": a.seed,
            "max_vocab": a.max_vocab,
            "report": report,
            "features": features,
        });
        std::fs::write(
            path,
            serde_json::to_string_pretty(&body).unwrap_or_default(),
        )
        .map_err(|e| CliError::Msg(format!("{}: cannot write: {e}", path.display())))?;
    }
    if report.passed() && features.passed() {
        outln!("passed")?;
        Ok(ExitCode::SUCCESS)
    } else {
        let worse: Vec<&str> = report
            .groups
            .iter()
            .filter(|(_, g)| !g.eager_bound_holds())
            .map(|(k, _)| k.as_str())
            .collect();
        outln!(
            "FAILED: {} of {} cases past tolerance{}",
            report.failures.len() + features.failures.len(),
            report.cases + features.cases,
            if worse.is_empty() {
                String::new()
            } else {
                format!("; fast over 2× eager fp32's error in {}", worse.join(", "))
            }
        )?;
        Ok(ExitCode::from(1))
    }
}

/// The table of one sweep's groups.
fn print_groups(title: &str, groups: &BTreeMap<String, GroupStats>) -> Result<(), CliError> {
    outln!(
        "{:<18} {:>6} {:>14} {:>14} {:>7}",
        title,
        "cases",
        "max loss err",
        "max grad err",
        "failed"
    )?;
    for (k, g) in groups {
        outln!(
            "{:<18} {:>6} {:>14.2e} {:>14.2e} {:>7}",
            k,
            g.cases,
            g.max_loss_err,
            g.max_grad_err,
            g.failed
        )?;
    }
    Ok(())
}

/// The fast-versus-eager criterion per group (docs/DESIGN.md §3): only when
/// fast cases ran.
fn print_eager(groups: &BTreeMap<String, GroupStats>) -> Result<(), CliError> {
    if groups.values().all(|g| g.eager_cases == 0) {
        return Ok(());
    }
    outln!("fast against eager fp32 on the same cases (docs/DESIGN.md §3: errors within eager's on ≥ 99% of a group's cases, within 2× on all; below the noise floors of check::CaseReport::eager_ratio they tie; only the 2× bound fails the sweep):")?;
    outln!(
        "{:<18} {:>8} {:>9} {:>8} {:>6} {:>12} {:>6}",
        "dtype/divergence",
        "compared",
        "no worse",
        "%",
        "≥ 99%",
        "worst ratio",
        "≤ 2×"
    )?;
    let yes = |b: bool| if b { "yes" } else { "NO" };
    for (k, g) in groups.iter().filter(|(_, g)| g.eager_cases > 0) {
        outln!(
            "{:<18} {:>8} {:>9} {:>7.1}% {:>6} {:>12.2} {:>6}",
            k,
            g.eager_cases,
            g.eager_no_worse,
            100.0 * g.eager_no_worse as f64 / g.eager_cases as f64,
            yes(g.eager_share_holds()),
            g.eager_worst_ratio,
            yes(g.eager_bound_holds())
        )?;
    }
    Ok(())
}

/// A bar of the sweep's cases on stderr, when stderr is a terminal (hidden in
/// pipes and CI logs).
fn progress_bar(len: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("{bar:30} {pos}/{len} cases [{elapsed_precise}]")
    {
        bar.set_style(style);
    }
    bar
}
