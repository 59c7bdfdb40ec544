//! One distillation training step, end to end: teacher forward → fused loss
//! and gradient → student backward → parameter update, for a small
//! [`Mlp`], on the CPU or on CUDA.
//!
//! - CPU: `matrixmultiply` GEMMs split over rayon threads, rayon for the
//!   element-wise work, the loss through [`crate::CpuBackend`].
//! - CUDA: cuBLAS GEMMs (through cudarc), the small kernels of
//!   kernels/mlp.cu for bias/ReLU/dropout, bias gradients and the optimizer,
//!   and the fused loss kernel through [`crate::cuda::CudaBackend::fused`],
//!   all on one stream; the step waits only to read the loss back.
//!
//! Both run the same arithmetic in f32 (summation orders inside the GEMMs
//! differ), so a few steps agree within rounding (tests/gpu.rs checks it).
//!
//! ```no_run
//! use kdfuse::distill::{Device, DistillConfig, DistillStep, Mlp, Optimizer};
//! use kdfuse::LossSpec;
//! let teacher = Mlp::new(&[64, 256, 10], 1)?; // trained elsewhere
//! let student = Mlp::new(&[64, 10, 10], 2)?;
//! let cfg = DistillConfig {
//!     loss: LossSpec { alpha: 0.5, temperature: 4.0, ..Default::default() },
//!     optimizer: Optimizer::adam(1e-2),
//!     ..Default::default()
//! };
//! let mut step = DistillStep::new(&student, Some(&teacher), cfg, Device::Cpu)?;
//! let (x, y) = (vec![0.5f32; 32 * 64], vec![3i64; 32]);
//! let loss = step.step(&x, Some(&y))?;  // teacher forward inside
//! let trained: Mlp = step.student()?;
//! # Ok::<(), kdfuse::KdError>(())
//! ```

// The modules form a DAG, this one on top: dropout and optim at the
// bottom, then ops, mlp and engine, then the cpu and cuda engines.
mod cpu;
pub mod cuda;
mod dropout;
#[doc(hidden)]
#[cfg(feature = "emulation")]
pub mod emu;
mod engine;
mod kernel_args;
mod mlp;
mod ops;
mod optim;

#[doc(hidden)]
pub use dropout::Dropout;
pub use mlp::Mlp;
pub use optim::Optimizer;

use crate::error::{invalid, KdError, Result};
use crate::spec::LossSpec;
use engine::{Engine, StepBatch, TeacherSource};
use mlp::check_batch;
use std::fmt;
use std::str::FromStr;

/// Where a [`DistillStep`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    /// CUDA when usable (driver, GPU, embedded kernels, cuBLAS), else the CPU.
    #[default]
    Auto,
    /// The CPU (rayon).
    Cpu,
    /// CUDA device 0.
    Cuda,
}

impl Device {
    /// The CLI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Device::Auto => "auto",
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        }
    }

    /// `Cpu` or `Cuda`: `Auto` becomes `Cuda` when it is usable, else `Cpu`
    /// with the reason CUDA is not. `Cuda` fails with
    /// [`KdError::CudaUnavailable`] when it is not usable.
    pub fn resolve(self) -> Result<(Device, Option<String>)> {
        match self {
            Device::Cpu => Ok((Device::Cpu, None)),
            Device::Cuda => cuda::available().map(|()| (Device::Cuda, None)),
            Device::Auto => match cuda::available() {
                Ok(()) => Ok((Device::Cuda, None)),
                Err(KdError::CudaUnavailable(why)) => Ok((Device::Cpu, Some(why))),
                Err(e) => Err(e),
            },
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        [Device::Auto, Device::Cpu, Device::Cuda]
            .into_iter()
            .find(|d| d.as_str() == s)
            .ok_or_else(|| format!("unknown device `{s}` (expected cpu, cuda or auto)"))
    }
}

/// What a [`DistillStep`] optimises.
#[derive(Debug, Clone, PartialEq)]
pub struct DistillConfig {
    /// The loss on the student's logits (α = weight of the hard labels,
    /// τ, divergence, reduction). α = 1 trains on hard labels alone and
    /// needs no teacher.
    pub loss: LossSpec,
    /// The optimizer.
    pub optimizer: Optimizer,
    /// Dropout rate on the student's hidden layers while training, in [0, 1).
    pub dropout: f32,
    /// Seed of the dropout masks (a counter-based hash of seed, step, layer
    /// and element, the same on CPU and CUDA).
    pub seed: u64,
}

impl Default for DistillConfig {
    /// α = 0.5, τ = 4, forward KL, batchmean; Adam(1e-3); no dropout.
    fn default() -> Self {
        DistillConfig {
            loss: LossSpec {
                alpha: 0.5,
                temperature: 4.0,
                ..Default::default()
            },
            optimizer: Optimizer::adam(1e-3),
            dropout: 0.0,
            seed: 0,
        }
    }
}

impl DistillConfig {
    /// Checks the loss, the optimizer and the dropout rate.
    pub fn validate(&self) -> Result<()> {
        self.loss.validate(true)?;
        self.optimizer.validate()?;
        if !(0.0..1.0).contains(&self.dropout) {
            return invalid(
                "dropout",
                format!("must be in [0, 1), got {}", self.dropout),
            );
        }
        Ok(())
    }
}

/// A student (and optionally a frozen teacher) being trained: each
/// [`DistillStep::step`] is teacher forward → fused KD loss and gradient
/// (the crate's backends) → student backward → optimizer update.
pub struct DistillStep {
    engine: Box<dyn Engine>,
    cfg: DistillConfig,
    sizes: Vec<usize>,
    has_teacher: bool,
    t: u64,
    device: Device,
}

impl fmt::Debug for DistillStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DistillStep")
            .field("sizes", &self.sizes)
            .field("device", &self.device)
            .field("steps", &self.t)
            .finish()
    }
}

impl DistillStep {
    /// Copies `student` (and `teacher`) to `device` and prepares the
    /// optimizer state. `Device::Auto` picks CUDA when usable. The teacher
    /// must take the student's inputs and give as many logits.
    pub fn new(
        student: &Mlp,
        teacher: Option<&Mlp>,
        cfg: DistillConfig,
        device: Device,
    ) -> Result<Self> {
        cfg.validate()?;
        if let Some(t) = teacher {
            if t.inputs() != student.inputs() || t.outputs() != student.outputs() {
                return invalid(
                    "teacher",
                    format!(
                        "maps {} inputs to {} logits, the student {} to {}",
                        t.inputs(),
                        t.outputs(),
                        student.inputs(),
                        student.outputs()
                    ),
                );
            }
        }
        let (device, _) = device.resolve()?;
        let engine: Box<dyn Engine> = match device {
            Device::Cuda => Box::new(cuda::CudaEngine::new(student, teacher)?),
            _ => Box::new(cpu::CpuEngine::new(student, teacher)),
        };
        Ok(DistillStep {
            engine,
            cfg,
            sizes: student.sizes().to_vec(),
            has_teacher: teacher.is_some(),
            t: 0,
            device,
        })
    }

    /// `Cpu` or `Cuda`.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Updates taken so far.
    pub fn steps(&self) -> u64 {
        self.t
    }

    /// The configuration.
    pub fn config(&self) -> &DistillConfig {
        &self.cfg
    }

    /// Sets the learning rate of the next steps (a schedule's hook).
    pub fn set_learning_rate(&mut self, lr: f32) -> Result<()> {
        let opt = self.cfg.optimizer.with_lr(lr);
        opt.validate()?;
        self.cfg.optimizer = opt;
        Ok(())
    }

    /// One step on the batch `x` (row-major `[rows × inputs]`) with hard
    /// labels `labels` (needed when α > 0): the teacher runs forward on `x`.
    /// Without a teacher α must be 1. Returns the batch's loss before the
    /// update.
    pub fn step(&mut self, x: &[f32], labels: Option<&[i64]>) -> Result<f64> {
        let source = if self.has_teacher {
            TeacherSource::Model
        } else {
            TeacherSource::None
        };
        self.run(x, labels, source, true)
    }

    /// As [`DistillStep::step`], with the teacher's logits `[rows × V]` given
    /// (e.g. computed once for a whole data set, as the teacher is frozen).
    pub fn step_with_teacher_logits(
        &mut self,
        x: &[f32],
        labels: Option<&[i64]>,
        teacher_logits: &[f32],
    ) -> Result<f64> {
        self.run(x, labels, TeacherSource::Logits(teacher_logits), true)
    }

    /// The loss and ∂loss/∂parameters (laid out as [`Mlp::params`]) that the
    /// next step would use, without updating anything. `teacher_logits`
    /// replaces the teacher when given.
    pub fn gradients(
        &mut self,
        x: &[f32],
        labels: Option<&[i64]>,
        teacher_logits: Option<&[f32]>,
    ) -> Result<(f64, Vec<f32>)> {
        let source = match teacher_logits {
            Some(t) => TeacherSource::Logits(t),
            None if self.has_teacher => TeacherSource::Model,
            None => TeacherSource::None,
        };
        let loss = self.run(x, labels, source, false)?;
        Ok((loss, self.engine.grads()?))
    }

    fn run(
        &mut self,
        x: &[f32],
        labels: Option<&[i64]>,
        source: TeacherSource<'_>,
        update: bool,
    ) -> Result<f64> {
        let (inputs, v) = (self.sizes[0], *self.sizes.last().unwrap());
        let rows = check_batch(x, inputs, "x")?;
        if rows == 0 {
            return invalid("x", "the batch is empty");
        }
        if let Some(l) = labels {
            if l.len() != rows {
                return invalid("labels", format!("has {} entries for {rows} rows", l.len()));
            }
        }
        match source {
            TeacherSource::Logits(t) if t.len() != rows * v => {
                return invalid(
                    "teacher_logits",
                    format!(
                        "holds {} values, {rows} rows × {v} need {}",
                        t.len(),
                        rows * v
                    ),
                )
            }
            TeacherSource::None if self.cfg.loss.alpha != 1.0 => {
                return invalid(
                    "teacher",
                    format!(
                        "alpha = {} < 1 needs a teacher (or teacher logits)",
                        self.cfg.loss.alpha
                    ),
                )
            }
            _ => {}
        }
        let t = self.t + 1;
        let (rate, seed) = (self.cfg.dropout, self.cfg.seed);
        let dropout = move |layer: usize| Dropout::new(rate, seed, t, layer);
        let loss = self.engine.forward_backward(&StepBatch {
            x,
            rows,
            labels,
            teacher: source,
            spec: &self.cfg.loss,
            dropout: &dropout,
        })?;
        if update {
            self.engine.update(&self.cfg.optimizer, t)?;
            self.t = t;
        }
        Ok(loss)
    }

    /// The student's logits `[rows × V]` for `x` (inference: no dropout).
    pub fn predict(&mut self, x: &[f32]) -> Result<Vec<f32>> {
        let rows = check_batch(x, self.sizes[0], "x")?;
        if rows == 0 {
            return Ok(Vec::new());
        }
        self.engine.predict(x, rows)
    }

    /// The teacher's logits for `x`, on the step's device.
    pub fn teacher_predict(&mut self, x: &[f32]) -> Result<Vec<f32>> {
        if !self.has_teacher {
            return invalid("teacher", "this step has no teacher");
        }
        let rows = check_batch(x, self.sizes[0], "x")?;
        if rows == 0 {
            return Ok(Vec::new());
        }
        self.engine.teacher_predict(x, rows)
    }

    /// The student as trained so far.
    pub fn student(&self) -> Result<Mlp> {
        Mlp::from_params(&self.sizes, self.engine.params()?)
    }
}
