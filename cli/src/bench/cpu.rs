//! Benchmarks of the fast CPU backend: random inputs rotated among sets
//! larger than the last-level cache, wall-clock timing of
//! [`kdfuse::Backend::compute`] (its output allocation included), against the
//! host memory bandwidth measured in the same run.

use super::config::BenchConfig;
use super::host;
use super::model;
use super::report::{BenchReport, BenchResult, Checks, Measured};
use super::stats::Timing;
use super::BenchOptions;
use kdfuse::backend::Backend;
use kdfuse::cpu::CpuBackend;
use kdfuse::error::{KdError, Result};
use kdfuse::tensor::{GradDtype, KdInputs, Logits, OwnedData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use std::time::Instant;

/// One host input set: student, teacher and labels.
pub(crate) struct HostSet {
    pub student: OwnedData,
    pub teacher: OwnedData,
    pub labels: Option<Vec<i64>>,
}

/// Random logits like the device's (σ = 2, teacher correlated with the
/// student, ρ = 0.8) and, with α > 0, labels with 5% ignored rows.
pub(crate) fn host_set(c: &BenchConfig, rows: usize, seed: u64) -> HostSet {
    let mut rng = StdRng::seed_from_u64(seed);
    let normal = Normal::new(0.0f32, 2.0).expect("valid normal");
    let n = rows * c.cols;
    let s: Vec<f32> = (0..n).map(|_| normal.sample(&mut rng)).collect();
    let t: Vec<f32> = s
        .iter()
        .map(|&x| 0.8 * x + 0.6 * normal.sample(&mut rng))
        .collect();
    let labels = random_labels(c, rows, seed ^ 0x1abe1);
    HostSet {
        student: OwnedData::from_f32(&s, c.dtype),
        teacher: OwnedData::from_f32(&t, c.dtype),
        labels,
    }
}

/// With α > 0, `rows` labels in [0, V) with 5% `ignore_index`; else `None`.
pub(crate) fn random_labels(c: &BenchConfig, rows: usize, seed: u64) -> Option<Vec<i64>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (c.alpha > 0.0).then(|| {
        (0..rows)
            .map(|_| {
                if rng.random::<f32>() < 0.05 {
                    c.spec().ignore_index
                } else {
                    rng.random_range(0..c.cols as i64)
                }
            })
            .collect()
    })
}

impl HostSet {
    pub(crate) fn inputs(&self, rows: usize, cols: usize) -> KdInputs<'_> {
        KdInputs {
            student: Logits::new(self.student.view(), rows, cols),
            teacher: Logits::new(self.teacher.view(), rows, cols),
            labels: self.labels.as_deref(),
            row_weights: None,
        }
    }
}

/// Times the CPU backend on `rows` rows of `c`: (timing, input sets, loss).
pub(crate) fn time_cpu(
    c: &BenchConfig,
    rows: usize,
    opts: &BenchOptions,
    llc: usize,
) -> Result<(Timing, usize, f64)> {
    let set_bytes = 2 * rows * c.cols * c.dtype.size();
    let out_bytes = if c.grad { rows * c.cols * 4 } else { 0 };
    let mut sets = (4 * llc).div_ceil(set_bytes.max(1)).clamp(1, 16);
    if let Some(avail) = host::available_memory() {
        let budget = avail / 10 * 7;
        if set_bytes + 2 * out_bytes > budget {
            return Err(KdError::InvalidArgument {
                arg: "rows",
                msg: format!(
                    "{c} needs {:.1} GB of host memory, {:.1} GB available",
                    (set_bytes + 2 * out_bytes) as f64 / 1e9,
                    avail as f64 / 1e9
                ),
            });
        }
        sets = sets.min((budget - 2 * out_bytes) / set_bytes.max(1)).max(1);
    }
    let data: Vec<HostSet> = (0..sets)
        .map(|i| host_set(c, rows, opts.seed.wrapping_add(i as u64)))
        .collect();
    let spec = c.spec();
    let grad = c.grad.then_some(GradDtype::F32);
    let mut samples = Vec::with_capacity(opts.runs);
    let mut loss = f64::NAN;
    for i in 0..opts.warmup + opts.runs {
        let inputs = data[i % sets].inputs(rows, c.cols);
        let t0 = Instant::now();
        let out = CpuBackend.compute(&inputs, &spec, grad)?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        if i % sets == 0 {
            loss = out.loss;
        }
        std::hint::black_box(out);
        if i >= opts.warmup {
            samples.push(ms);
        }
    }
    let timing = Timing::from_samples(&samples).ok_or_else(|| KdError::InvalidArgument {
        arg: "runs",
        msg: "no timed run".into(),
    })?;
    Ok((timing, sets, loss))
}

/// The bytes the CPU backend moves for `rows` rows of `c`: inputs once, an
/// f32 gradient once.
pub(crate) fn cpu_bytes(c: &BenchConfig, rows: usize) -> u64 {
    let per_row = model::fused_bytes(c, 4) / c.rows.max(1) as u64;
    per_row * rows as u64
}

/// Runs every configuration on the CPU backend.
pub fn run(configs: &[BenchConfig], opts: &BenchOptions) -> Result<BenchReport> {
    opts.validate()?;
    let date = host::now_rfc3339();
    let host = host::host_info(true);
    let reference = host.memory_bandwidth_gbs;
    let progress = super::progress(configs.len(), opts.progress);
    let mut results = Vec::with_capacity(configs.len());
    for c in configs {
        progress.set_message(c.to_string());
        c.validate()?;
        let bytes = cpu_bytes(c, c.rows);
        let floor_ms = bytes as f64 / (reference * 1e9) * 1e3;
        let r = match time_cpu(c, c.rows, opts, host.llc_bytes) {
            Ok((timing, sets, loss)) => BenchResult {
                config: c.clone(),
                skipped: None,
                input_sets: sets,
                floor_ms,
                fused: Some(Measured::new(timing, bytes, reference)),
                eager: None,
                eager_skipped: Some("the eager baseline runs on the GPU".into()),
                speedup_vs_eager: None,
                cpu: None,
                cpu_rows: 0,
                kernel: None,
                checks: Some(Checks {
                    loss,
                    passed: loss.is_finite(),
                    ..Default::default()
                }),
            },
            Err(KdError::InvalidArgument { arg: "rows", msg }) => {
                super::skipped(c.clone(), msg, floor_ms)
            }
            Err(e) => return Err(e),
        };
        results.push(r);
        progress.inc(1);
    }
    progress.finish_and_clear();
    Ok(BenchReport::new(
        "cpu", date, host, None, reference, opts, results,
    ))
}

/// `kdfuse profile --backend cpu`: the whole configuration, `opts.runs`
/// timed iterations (any number) after `opts.warmup`.
pub fn profile_rows(c: &BenchConfig, opts: &BenchOptions) -> Result<(Timing, usize, f64)> {
    c.validate()?;
    time_cpu(c, c.rows, opts, host::llc_bytes())
}
