//! The experiment behind `kdfuse demo`: on the handwritten digits, train a
//! large teacher on hard labels, then the same small student twice per seed,
//! with identical initialisation, steps and data order: (a) on hard labels
//! alone, (b) distilled from the teacher's soft labels. Optionally the
//! students never see one class (Hinton et al. 2015, §3).
//!
//! The teacher is frozen once trained and the data are not augmented, so its
//! logits over the students' training set are computed once and handed to
//! [`DistillStep::step_with_teacher_logits`]; that is exactly what running
//! the teacher forward in every step would give, without its cost.

use crate::digits::{Digits, CLASSES, FEATURES};
use kdfuse::distill::{Device, DistillConfig, DistillStep, Mlp, Optimizer};
use kdfuse::error::{invalid, Result};
use kdfuse::spec::LossSpec;
use kdfuse::tensor::{HostData, KdInputs, Logits};
use kdfuse::{Backend, CpuBackend};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;
use std::time::Instant;

/// Everything `kdfuse demo` can set.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DemoConfig {
    /// Where the steps run.
    #[serde(skip)]
    pub device: Device,
    /// Seed of the train/test split and of the teacher.
    pub seed: u64,
    /// Student seeds (initialisation and data order): `seed + 1 ..= seed + seeds`.
    pub seeds: usize,
    /// Training images; the rest of the 1797 are the test set.
    pub train: usize,
    /// Hidden widths of the teacher.
    pub teacher_hidden: Vec<usize>,
    /// Teacher epochs.
    pub teacher_epochs: usize,
    /// Teacher dropout on its hidden layers.
    pub teacher_dropout: f32,
    /// Teacher learning rate (Adam).
    pub teacher_lr: f32,
    /// Teacher weight decay (decoupled).
    pub teacher_weight_decay: f32,
    /// Cosine learning-rate decay for the teacher (students always have it).
    pub teacher_cosine: bool,
    /// Hidden widths of the student.
    pub student_hidden: Vec<usize>,
    /// Student epochs.
    pub student_epochs: usize,
    /// Student learning rate (Adam).
    pub student_lr: f32,
    /// Batch size of every step.
    pub batch: usize,
    /// Weight α of the hard labels in the distilled student's loss.
    pub alpha: f64,
    /// Temperature τ of the distilled student's loss.
    pub temperature: f64,
    /// A class the students never see in training.
    pub omit_class: Option<i64>,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            device: Device::Auto,
            seed: 1,
            seeds: 3,
            train: 1300,
            teacher_hidden: vec![1200, 1200],
            teacher_epochs: 8,
            teacher_dropout: 0.5,
            teacher_lr: 1e-3,
            teacher_weight_decay: 1e-4,
            teacher_cosine: false,
            student_hidden: vec![10],
            student_epochs: 300,
            student_lr: 3e-3,
            batch: 32,
            alpha: 0.5,
            temperature: 4.0,
            omit_class: None,
        }
    }
}

impl DemoConfig {
    /// Checks the settings that the steps do not check themselves.
    pub fn validate(&self) -> Result<()> {
        if self.seeds == 0 {
            return invalid("seeds", "must be ≥ 1");
        }
        if self.batch == 0 {
            return invalid("batch", "must be ≥ 1");
        }
        if self.teacher_epochs == 0 || self.student_epochs == 0 {
            return invalid("epochs", "teacher and student epochs must be ≥ 1");
        }
        for (arg, h) in [
            ("teacher_hidden", &self.teacher_hidden),
            ("student_hidden", &self.student_hidden),
        ] {
            if h.contains(&0) {
                return invalid(arg, format!("widths must be ≥ 1, got {h:?}"));
            }
        }
        if self.train == 0 || self.train >= 1797 {
            return invalid("train", format!("must be in [1, 1797), got {}", self.train));
        }
        LossSpec {
            alpha: self.alpha,
            temperature: self.temperature,
            ..Default::default()
        }
        .validate(true)?;
        if !(0.0..1.0).contains(&self.teacher_dropout) {
            return invalid(
                "teacher_dropout",
                format!("must be in [0, 1), got {}", self.teacher_dropout),
            );
        }
        Optimizer::adam(self.teacher_lr)
            .with_weight_decay(self.teacher_weight_decay)
            .validate()?;
        Optimizer::adam(self.student_lr).validate()?;
        if let Some(k) = self.omit_class {
            if !(0..CLASSES as i64).contains(&k) {
                return invalid(
                    "omit_class",
                    format!("must be a digit in [0, {}), got {k}", CLASSES),
                );
            }
        }
        Ok(())
    }

    fn sizes(hidden: &[usize]) -> Vec<usize> {
        let mut s = vec![FEATURES];
        s.extend_from_slice(hidden);
        s.push(CLASSES);
        s
    }
}

/// Mean and sample standard deviation over seeds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stat {
    /// Mean.
    pub mean: f64,
    /// Sample standard deviation (0 for one value).
    pub std: f64,
}

impl Stat {
    /// Of `xs` (non-empty).
    pub fn of(xs: &[f64]) -> Stat {
        let n = xs.len() as f64;
        let mean = xs.iter().sum::<f64>() / n;
        let var = if xs.len() > 1 {
            xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
        } else {
            0.0
        };
        Stat {
            mean,
            std: var.sqrt(),
        }
    }
}

/// One row of the table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelReport {
    /// `teacher`, `student (hard labels)` or `student (distilled)`.
    pub name: String,
    /// Layer widths.
    pub sizes: Vec<usize>,
    /// Parameters.
    pub params: usize,
    /// Accuracy on its own training set.
    pub train_acc: Stat,
    /// Accuracy on the test set.
    pub test_acc: Stat,
    /// Cross-entropy on the test set.
    pub test_loss: Stat,
    /// Inference time per test image, µs (the whole test set as one batch).
    pub infer_us: f64,
    /// Per seed: test images of the omitted class classified right.
    pub omitted_correct: Option<Vec<usize>>,
    /// Per seed: test accuracy.
    pub test_acc_per_seed: Vec<f64>,
    /// Test accuracy after each epoch, mean over seeds.
    pub curve: Vec<f64>,
    /// Wall time of its training, s (all seeds).
    pub train_s: f64,
}

/// What `kdfuse demo` reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DemoReport {
    /// The settings.
    pub config: DemoConfig,
    /// `cpu` or `cuda`.
    pub device: String,
    /// Why `auto` fell back to the CPU, if it did.
    pub fallback: Option<String>,
    /// Training and test images (students' training set size when a class is omitted).
    pub train_images: usize,
    /// Training images the students saw.
    pub student_train_images: usize,
    /// Test images.
    pub test_images: usize,
    /// Test images of the omitted class.
    pub omitted_test_images: Option<usize>,
    /// Teacher, hard-label student, distilled student.
    pub models: Vec<ModelReport>,
    /// Test accuracy of (b) minus (a), per seed, in points.
    pub gain: Stat,
    /// Total wall time, s.
    pub total_s: f64,
}

impl DemoReport {
    /// The teacher's row.
    pub fn teacher(&self) -> &ModelReport {
        &self.models[0]
    }
    /// The hard-label student's row.
    pub fn hard(&self) -> &ModelReport {
        &self.models[1]
    }
    /// The distilled student's row.
    pub fn distilled(&self) -> &ModelReport {
        &self.models[2]
    }
}

/// Progress of a run, for a progress bar.
#[derive(Debug, Clone)]
pub enum Progress {
    /// A model starts training for `epochs` epochs.
    Start {
        /// What is trained.
        what: String,
        /// Its epochs.
        epochs: usize,
    },
    /// An epoch ended.
    Epoch {
        /// Mean training loss of the epoch.
        loss: f64,
        /// Test accuracy after it.
        test_acc: f64,
    },
}

/// Accuracy and mean cross-entropy of `logits` against `labels`.
pub fn evaluate(logits: &[f32], labels: &[i64]) -> Result<(f64, f64)> {
    let n = labels.len();
    let v = logits.len() / n.max(1);
    let correct = (0..n)
        .filter(|&r| argmax(&logits[r * v..(r + 1) * v]) == labels[r] as usize)
        .count();
    let spec = LossSpec {
        alpha: 1.0,
        ..Default::default()
    };
    let inputs = KdInputs {
        student: Logits::new(HostData::F32(logits), n, v),
        teacher: Logits::new(HostData::F32(logits), n, v),
        labels: Some(labels),
        row_weights: None,
    };
    let ce = CpuBackend.compute(&inputs, &spec, None)?.loss;
    Ok((correct as f64 / n.max(1) as f64, ce))
}

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv {
                (i, v)
            } else {
                (bi, bv)
            }
        })
        .0
}

/// Runs `epochs` epochs of `step` over `data` in an order drawn from
/// `order_seed` (with `cosine`, the learning rate decays from the step's own
/// towards 0 along a cosine); returns the test accuracy after each epoch.
#[allow(clippy::too_many_arguments)]
pub fn train(
    step: &mut DistillStep,
    data: &Digits,
    teacher_logits: Option<&[f32]>,
    epochs: usize,
    batch: usize,
    order_seed: u64,
    cosine: bool,
    test: &Digits,
    progress: &mut dyn FnMut(Progress),
) -> Result<Vec<f64>> {
    let mut rng = StdRng::seed_from_u64(order_seed);
    let mut idx: Vec<usize> = (0..data.len()).collect();
    let mut curve = Vec::with_capacity(epochs);
    let (mut x, mut y, mut t) = (Vec::new(), Vec::new(), Vec::new());
    let lr0 = step.config().optimizer.lr();
    for e in 0..epochs {
        // Cosine decay from lr0 towards 0 over the epochs.
        let lr = 0.5 * lr0 * (1.0 + (std::f32::consts::PI * e as f32 / epochs as f32).cos());
        if cosine {
            step.set_learning_rate(lr)?;
        }
        idx.shuffle(&mut rng);
        let (mut loss_sum, mut batches) = (0.0, 0);
        for chunk in idx.chunks(batch) {
            x.clear();
            y.clear();
            t.clear();
            for &i in chunk {
                x.extend_from_slice(&data.x[i * FEATURES..(i + 1) * FEATURES]);
                y.push(data.y[i]);
                if let Some(tl) = teacher_logits {
                    t.extend_from_slice(&tl[i * CLASSES..(i + 1) * CLASSES]);
                }
            }
            loss_sum += match teacher_logits {
                Some(_) => step.step_with_teacher_logits(&x, Some(&y), &t)?,
                None => step.step(&x, Some(&y))?,
            };
            batches += 1;
        }
        let (acc, _) = evaluate(&step.predict(&test.x)?, &test.y)?;
        curve.push(acc);
        progress(Progress::Epoch {
            loss: loss_sum / batches.max(1) as f64,
            test_acc: acc,
        });
    }
    Ok(curve)
}

/// Inference time per row of `x`, µs: repeated until 50 ms have passed.
fn time_inference(mut predict: impl FnMut() -> Result<Vec<f32>>, rows: usize) -> Result<f64> {
    predict()?; // warm-up
    let t0 = Instant::now();
    let mut reps = 0u32;
    while reps < 3 || t0.elapsed().as_secs_f64() < 0.05 {
        predict()?;
        reps += 1;
    }
    Ok(t0.elapsed().as_secs_f64() * 1e6 / (reps as f64 * rows as f64))
}

struct SeedResult {
    train_acc: f64,
    test_acc: f64,
    test_loss: f64,
    omitted: Option<usize>,
    curve: Vec<f64>,
    infer_us: f64,
}

/// Runs the whole experiment.
pub fn run(cfg: &DemoConfig, progress: &mut dyn FnMut(Progress)) -> Result<DemoReport> {
    cfg.validate()?;
    let t_all = Instant::now();
    let (device, fallback) = cfg.device.resolve()?;
    let all = Digits::load();
    let (train_set, test) = all.split(cfg.train, cfg.seed)?;
    let student_train = match cfg.omit_class {
        Some(k) => train_set.without_class(k),
        None => train_set.clone(),
    };
    let omitted_idx: Option<Vec<usize>> = cfg
        .omit_class
        .map(|k| (0..test.len()).filter(|&i| test.y[i] == k).collect());
    let omitted_correct = |logits: &[f32]| {
        omitted_idx.as_ref().map(|idx| {
            idx.iter()
                .filter(|&&i| argmax(&logits[i * CLASSES..(i + 1) * CLASSES]) == test.y[i] as usize)
                .count()
        })
    };

    // The teacher: hard labels, dropout, weight decay, on the full training set.
    let t_sizes = DemoConfig::sizes(&cfg.teacher_hidden);
    let t_cfg = DistillConfig {
        loss: LossSpec {
            alpha: 1.0,
            ..Default::default()
        },
        optimizer: Optimizer::adam(cfg.teacher_lr).with_weight_decay(cfg.teacher_weight_decay),
        dropout: cfg.teacher_dropout,
        seed: cfg.seed,
    };
    let t0 = Instant::now();
    let mut t_step = DistillStep::new(&Mlp::new(&t_sizes, cfg.seed)?, None, t_cfg, device)?;
    progress(Progress::Start {
        what: format!("teacher {}", dims(&t_sizes)),
        epochs: cfg.teacher_epochs,
    });
    let t_curve = train(
        &mut t_step,
        &train_set,
        None,
        cfg.teacher_epochs,
        cfg.batch,
        cfg.seed,
        cfg.teacher_cosine,
        &test,
        progress,
    )?;
    let teacher_s = t0.elapsed().as_secs_f64();
    let teacher = t_step.student()?;
    let t_test_logits = t_step.predict(&test.x)?;
    let (t_train_acc, _) = evaluate(&t_step.predict(&train_set.x)?, &train_set.y)?;
    let (t_test_acc, t_test_loss) = evaluate(&t_test_logits, &test.y)?;
    let t_infer = time_inference(|| t_step.predict(&test.x), test.len())?;
    let soft = t_step.predict(&student_train.x)?;
    drop(t_step);

    // The students: per seed, the same initialisation and data order for both.
    let s_sizes = DemoConfig::sizes(&cfg.student_hidden);
    let mut hard = Vec::new();
    let mut distilled = Vec::new();
    let (mut hard_s, mut dist_s) = (0.0, 0.0);
    for k in 1..=cfg.seeds as u64 {
        let seed = cfg.seed + k;
        let init = Mlp::new(&s_sizes, seed)?;
        for distill in [false, true] {
            let s_cfg = DistillConfig {
                loss: LossSpec {
                    alpha: if distill { cfg.alpha } else { 1.0 },
                    temperature: if distill { cfg.temperature } else { 1.0 },
                    ..Default::default()
                },
                optimizer: Optimizer::adam(cfg.student_lr),
                dropout: 0.0,
                seed,
            };
            let what = format!(
                "student {} {} (seed {seed})",
                dims(&s_sizes),
                if distill { "distilled" } else { "hard labels" }
            );
            progress(Progress::Start {
                what,
                epochs: cfg.student_epochs,
            });
            let t0 = Instant::now();
            let mut step = DistillStep::new(&init, None, s_cfg, device)?;
            let curve = train(
                &mut step,
                &student_train,
                distill.then_some(&soft[..]),
                cfg.student_epochs,
                cfg.batch,
                seed,
                true,
                &test,
                progress,
            )?;
            let elapsed = t0.elapsed().as_secs_f64();
            let test_logits = step.predict(&test.x)?;
            let (train_acc, _) = evaluate(&step.predict(&student_train.x)?, &student_train.y)?;
            let (test_acc, test_loss) = evaluate(&test_logits, &test.y)?;
            let r = SeedResult {
                train_acc,
                test_acc,
                test_loss,
                omitted: omitted_correct(&test_logits),
                curve,
                infer_us: time_inference(|| step.predict(&test.x), test.len())?,
            };
            if distill {
                dist_s += elapsed;
                distilled.push(r);
            } else {
                hard_s += elapsed;
                hard.push(r);
            }
        }
    }

    let student_row = |name: &str, rs: &[SeedResult], train_s: f64| {
        let col = |f: &dyn Fn(&SeedResult) -> f64| rs.iter().map(f).collect::<Vec<f64>>();
        let epochs = rs[0].curve.len();
        ModelReport {
            name: name.to_string(),
            sizes: s_sizes.clone(),
            params: Mlp::new(&s_sizes, 0).map(|m| m.num_params()).unwrap_or(0),
            train_acc: Stat::of(&col(&|r| r.train_acc)),
            test_acc: Stat::of(&col(&|r| r.test_acc)),
            test_loss: Stat::of(&col(&|r| r.test_loss)),
            infer_us: Stat::of(&col(&|r| r.infer_us)).mean,
            omitted_correct: cfg
                .omit_class
                .map(|_| rs.iter().map(|r| r.omitted.unwrap_or(0)).collect()),
            test_acc_per_seed: col(&|r| r.test_acc),
            curve: (0..epochs)
                .map(|e| rs.iter().map(|r| r.curve[e]).sum::<f64>() / rs.len() as f64)
                .collect(),
            train_s,
        }
    };
    let teacher_row = ModelReport {
        name: "teacher".into(),
        sizes: t_sizes.clone(),
        params: teacher.num_params(),
        train_acc: Stat::of(&[t_train_acc]),
        test_acc: Stat::of(&[t_test_acc]),
        test_loss: Stat::of(&[t_test_loss]),
        infer_us: t_infer,
        omitted_correct: omitted_correct(&t_test_logits).map(|c| vec![c]),
        test_acc_per_seed: vec![t_test_acc],
        curve: t_curve,
        train_s: teacher_s,
    };
    let gains: Vec<f64> = hard
        .iter()
        .zip(&distilled)
        .map(|(a, b)| 100.0 * (b.test_acc - a.test_acc))
        .collect();
    Ok(DemoReport {
        config: cfg.clone(),
        device: device.as_str().into(),
        fallback,
        train_images: train_set.len(),
        student_train_images: student_train.len(),
        test_images: test.len(),
        omitted_test_images: omitted_idx.as_ref().map(|i| i.len()),
        models: vec![
            teacher_row,
            student_row("student (hard labels)", &hard, hard_s),
            student_row("student (distilled)", &distilled, dist_s),
        ],
        gain: Stat::of(&gains),
        total_s: t_all.elapsed().as_secs_f64(),
    })
}

/// `64-10-10`.
pub fn dims(sizes: &[usize]) -> String {
    sizes
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join("-")
}
