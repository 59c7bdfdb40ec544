//! `kdfuse demo`: a teacher and two students on the handwritten digits, a
//! table (or JSON), optionally learning curves as SVG.

use super::CliError;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use kdfuse::distill::Device;
use kdfuse_cli::demo::{self, DemoConfig, DemoReport, ModelReport, Progress, Stat};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Where the training steps run: auto = CUDA when usable, else the CPU.
    #[arg(long, default_value = "auto", value_parser = ["auto", "cpu", "cuda"])]
    device: String,
    /// Seed of the train/test split and of the teacher.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Student seeds (initialisation and data order), both students alike.
    #[arg(long, default_value_t = 3)]
    seeds: usize,
    /// Training images (of 1797); the rest is the test set.
    #[arg(long, default_value_t = 1300)]
    train: usize,
    /// Teacher hidden widths, comma-separated.
    #[arg(long, default_value = "1200,1200", value_parser = parse_widths)]
    teacher_hidden: Widths,
    /// Teacher epochs (few: a teacher trained on until it is certain of every
    /// training image has little to teach through its soft labels).
    #[arg(long, default_value_t = 8)]
    teacher_epochs: usize,
    /// Teacher dropout on its hidden layers.
    #[arg(long, default_value_t = 0.5)]
    teacher_dropout: f32,
    /// Teacher learning rate (Adam).
    #[arg(long, default_value_t = 1e-3)]
    teacher_lr: f32,
    /// Teacher weight decay.
    #[arg(long, default_value_t = 1e-4)]
    teacher_weight_decay: f32,
    /// Student hidden widths, comma-separated (empty: a linear student).
    #[arg(long, default_value = "10", value_parser = parse_widths)]
    student_hidden: Widths,
    /// Student epochs (learning rate decaying along a cosine).
    #[arg(long, default_value_t = 300)]
    student_epochs: usize,
    /// Student learning rate (Adam), at the start of the cosine decay.
    #[arg(long, default_value_t = 3e-3)]
    student_lr: f32,
    /// Batch size.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Weight α of the hard labels in the distilled student's loss.
    #[arg(long, default_value_t = 0.5, allow_negative_numbers = true)]
    alpha: f64,
    /// Temperature τ of the distilled student's loss.
    #[arg(long, default_value_t = 4.0, allow_negative_numbers = true)]
    temperature: f64,
    /// Leave this digit out of the students' training set (the teacher sees it).
    #[arg(long, value_name = "K", allow_negative_numbers = true)]
    omit_class: Option<i64>,
    /// Print the report as one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Write the learning curves (test accuracy per epoch) as SVG.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
}

#[derive(Debug, Clone)]
struct Widths(Vec<usize>);

fn parse_widths(s: &str) -> Result<Widths, String> {
    if s.trim().is_empty() {
        return Ok(Widths(Vec::new()));
    }
    s.split(',')
        .map(|w| {
            w.trim()
                .parse::<usize>()
                .ok()
                .filter(|&w| w > 0)
                .ok_or_else(|| format!("`{w}` is not a width ≥ 1 (expected e.g. 1200,1200)"))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Widths)
}

pub fn run(a: DemoArgs) -> Result<ExitCode, CliError> {
    let cfg = DemoConfig {
        device: a.device.parse::<Device>().map_err(CliError::Msg)?,
        seed: a.seed,
        seeds: a.seeds,
        train: a.train,
        teacher_hidden: a.teacher_hidden.0,
        teacher_epochs: a.teacher_epochs,
        teacher_dropout: a.teacher_dropout,
        teacher_lr: a.teacher_lr,
        teacher_weight_decay: a.teacher_weight_decay,
        teacher_cosine: false,
        student_hidden: a.student_hidden.0,
        student_epochs: a.student_epochs,
        student_lr: a.student_lr,
        batch: a.batch,
        alpha: a.alpha,
        temperature: a.temperature,
        omit_class: a.omit_class,
    };
    cfg.validate()?;
    if let Some(p) = &a.plot {
        if p.extension().is_none_or(|e| e != "svg") {
            return Err(CliError::Msg(format!(
                "--plot {}: expected a .svg file name",
                p.display()
            )));
        }
    }
    if let (Device::Auto, Ok((Device::Cpu, Some(why)))) = (cfg.device, cfg.device.resolve()) {
        eprintln!("kdfuse: note: CUDA unavailable ({why}); training on the CPU");
    }

    let total = cfg.teacher_epochs + 2 * cfg.seeds * cfg.student_epochs;
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} epochs  {msg}",
        )
        .expect("valid template"),
    );
    let mut current = String::new();
    let report = demo::run(&cfg, &mut |p| match p {
        Progress::Start { what, .. } => current = what,
        Progress::Epoch { loss, test_acc } => {
            bar.inc(1);
            bar.set_message(format!(
                "{current}: loss {loss:.4}, test {:.1}%",
                100.0 * test_acc
            ));
        }
    });
    bar.finish_and_clear();
    let report = report?;

    if let Some(p) = &a.plot {
        plot(&report, p).map_err(|e| CliError::Msg(format!("--plot {}: {e}", p.display())))?;
    }
    if a.json {
        outln!(
            "{}",
            serde_json::to_string(&report).map_err(|e| CliError::Msg(e.to_string()))?
        )?;
    } else {
        out!("{}", table(&report))?;
        if let Some(p) = &a.plot {
            outln!("learning curves: {}", p.display())?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn pct(s: &Stat, seeds: bool) -> String {
    if seeds {
        format!("{:.2}% ± {:.2}", 100.0 * s.mean, 100.0 * s.std)
    } else {
        format!("{:.2}%", 100.0 * s.mean)
    }
}

fn loss(s: &Stat, seeds: bool) -> String {
    if seeds {
        format!("{:.4} ± {:.4}", s.mean, s.std)
    } else {
        format!("{:.4}", s.mean)
    }
}

/// The human-readable report.
fn table(r: &DemoReport) -> String {
    let c = &r.config;
    let mut out = String::new();
    let omitted = match c.omit_class {
        Some(k) => format!(
            "; students train without digit {k} ({} images)",
            r.student_train_images
        ),
        None => String::new(),
    };
    out += &format!(
        "kdfuse demo: UCI handwritten digits (8×8), {} train / {} test images (split seed {}){omitted}\n",
        r.train_images, r.test_images, c.seed
    );
    out += &format!(
        "distilled student: alpha {} (hard labels), temperature {}, forward KL; students: {} epochs, Adam lr {}, batch {}; mean ± std over {} seeds\n\n",
        c.alpha, c.temperature, c.student_epochs, c.student_lr, c.batch, c.seeds
    );
    let mut rows: Vec<[String; 7]> = vec![[
        "model".into(),
        "sizes".into(),
        "params".into(),
        "train acc".into(),
        "test acc".into(),
        "test loss".into(),
        "µs/image".into(),
    ]];
    for (i, m) in r.models.iter().enumerate() {
        let seeds = i > 0 && c.seeds > 1;
        rows.push([
            m.name.clone(),
            demo::dims(&m.sizes),
            m.params.to_string(),
            pct(&m.train_acc, seeds),
            pct(&m.test_acc, seeds),
            loss(&m.test_loss, seeds),
            format!("{:.3}", m.infer_us),
        ]);
    }
    let widths: Vec<usize> = (0..7)
        .map(|j| rows.iter().map(|r| r[j].chars().count()).max().unwrap_or(0))
        .collect();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(j, s)| {
                let pad = widths[j] - s.chars().count();
                if j < 2 {
                    format!("{s}{}", " ".repeat(pad))
                } else {
                    format!("{}{s}", " ".repeat(pad))
                }
            })
            .collect();
        out += &format!("{}\n", line.join("  ").trim_end());
    }
    let per_seed: Vec<String> = r
        .hard()
        .test_acc_per_seed
        .iter()
        .zip(&r.distilled().test_acc_per_seed)
        .map(|(a, b)| format!("{:+.2}", 100.0 * (b - a)))
        .collect();
    out += &format!(
        "\ngain of distillation: {:+.2} ± {:.2} points of test accuracy (per seed: {})\n",
        r.gain.mean,
        r.gain.std,
        per_seed.join(", ")
    );
    if let (Some(k), Some(n)) = (c.omit_class, r.omitted_test_images) {
        let fmt = |m: &ModelReport| {
            m.omitted_correct
                .as_ref()
                .map(|v| {
                    v.iter()
                        .map(|x| x.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default()
        };
        out += &format!(
            "digit {k} (never seen by the students): test images of {k} classified right, of {n}: teacher {}; hard-label student {} (per seed); distilled student {}\n",
            fmt(r.teacher()),
            fmt(r.hard()),
            fmt(r.distilled())
        );
    }
    let timing = format!(
        "training took {:.1} s (teacher {:.1} s, hard-label students {:.1} s, distilled students {:.1} s); {:.1} s in all",
        r.models.iter().map(|m| m.train_s).sum::<f64>(),
        r.teacher().train_s,
        r.hard().train_s,
        r.distilled().train_s,
        r.total_s
    );
    out += &format!("{timing}\n");
    out += &match (r.device.as_str(), &r.fallback) {
        ("cuda", _) => {
            "ran on CUDA device 0 (cuBLAS GEMMs, kernels/app/mlp.cu, the fused KD kernel)\n"
                .to_string()
        }
        (_, Some(why)) => format!(
            "ran on the CPU with {} threads; not run on a GPU (CUDA unavailable: {why})\n",
            rayon::current_num_threads()
        ),
        _ => format!(
            "ran on the CPU with {} threads (--device cpu); not run on a GPU\n",
            rayon::current_num_threads()
        ),
    };
    out
}

/// Test accuracy per epoch of the three models, as SVG.
fn plot(r: &DemoReport, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let epochs = r.models.iter().map(|m| m.curve.len()).max().unwrap_or(1);
    let lo = r
        .models
        .iter()
        .flat_map(|m| m.curve.iter().skip(m.curve.len() / 10))
        .fold(1.0f64, |a, &b| a.min(b));
    let y0 = ((lo * 100.0 - 2.0).floor()).clamp(0.0, 99.0);
    let title = match r.config.omit_class {
        Some(k) => format!("kdfuse demo: test accuracy per epoch (students never see digit {k})"),
        None => "kdfuse demo: test accuracy per epoch (students: mean over seeds)".to_string(),
    };
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(1f64..epochs as f64, y0..100f64)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc("test accuracy (%)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()?;
    let colors = [BLACK, RED, BLUE];
    for (m, color) in r.models.iter().zip(colors) {
        let label = format!(
            "{} {} ({:.2}%)",
            m.name,
            demo::dims(&m.sizes),
            100.0 * m.test_acc.mean
        );
        chart
            .draw_series(LineSeries::new(
                m.curve
                    .iter()
                    .enumerate()
                    .map(|(e, &a)| ((e + 1) as f64, 100.0 * a)),
                color.stroke_width(2),
            ))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
