//! What a device does for a step: the [`Engine`] trait the CPU and CUDA
//! engines implement, and the batch of one step.

use super::dropout::Dropout;
use super::optim::Optimizer;
use crate::error::Result;
use crate::spec::LossSpec;

/// Where a step's teacher logits come from.
#[derive(Clone, Copy)]
pub(crate) enum TeacherSource<'a> {
    /// The step's own teacher, run forward on the batch.
    Model,
    /// Given by the caller, `[rows × V]`.
    Logits(&'a [f32]),
    /// None (α = 1): the student's own logits stand in, with weight 0.
    None,
}

/// One training batch, checked: what a forward and backward pass needs.
pub(crate) struct StepBatch<'a> {
    /// Inputs, row-major `[rows × inputs]`.
    pub x: &'a [f32],
    pub rows: usize,
    /// Hard labels (`rows`), needed when α > 0.
    pub labels: Option<&'a [i64]>,
    pub teacher: TeacherSource<'a>,
    pub spec: &'a LossSpec,
    /// The dropout of hidden layer `l` at this step.
    pub dropout: &'a dyn Fn(usize) -> Option<Dropout>,
}

/// The device-specific half of a step.
pub(crate) trait Engine {
    /// Forward, fused loss and gradient, backward: the gradient of every
    /// parameter is left in the engine; returns the loss.
    fn forward_backward(&mut self, batch: &StepBatch<'_>) -> Result<f64>;
    /// One optimizer update at step `t ≥ 1` from the stored gradients.
    fn update(&mut self, opt: &Optimizer, t: u64) -> Result<()>;
    /// Student logits (inference).
    fn predict(&mut self, x: &[f32], rows: usize) -> Result<Vec<f32>>;
    /// Teacher logits (inference); only called when there is a teacher.
    fn teacher_predict(&mut self, x: &[f32], rows: usize) -> Result<Vec<f32>>;
    /// The student's parameters.
    fn params(&self) -> Result<Vec<f32>>;
    /// The last gradients.
    fn grads(&self) -> Result<Vec<f32>>;
}
