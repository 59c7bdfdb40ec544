//! A multilayer perceptron: dense layers, ReLU between them, linear logits.
//!
//! Parameters live in one flat `f32` vector, every layer's weights first and
//! then every layer's biases, so that an optimizer runs over one buffer and
//! weight decay over one contiguous range. Layer `l` maps `sizes[l]` inputs to
//! `sizes[l+1]` outputs with `W_l` stored row-major `[in × out]`:
//! `z = h·W_l + b_l` for a row-major batch `h` `[rows × in]`.

use super::ops::{bias_act, gemm};
use crate::error::{invalid, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::borrow::Borrow;

/// Where each layer's parameters sit in the flat vector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Layout {
    pub sizes: Vec<usize>,
    /// Offset of `W_l`.
    pub w: Vec<usize>,
    /// Offset of `b_l`.
    pub b: Vec<usize>,
    /// Σ in·out: the weights are `[0, weights)`.
    pub weights: usize,
    /// All parameters.
    pub total: usize,
}

impl Layout {
    pub fn new(sizes: &[usize]) -> Self {
        let layers = sizes.len() - 1;
        let mut w = Vec::with_capacity(layers);
        let mut off = 0;
        for l in 0..layers {
            w.push(off);
            off += sizes[l] * sizes[l + 1];
        }
        let weights = off;
        let mut b = Vec::with_capacity(layers);
        for l in 0..layers {
            b.push(off);
            off += sizes[l + 1];
        }
        Layout {
            sizes: sizes.to_vec(),
            w,
            b,
            weights,
            total: off,
        }
    }

    pub fn layers(&self) -> usize {
        self.sizes.len() - 1
    }

    pub fn inputs(&self) -> usize {
        self.sizes[0]
    }

    pub fn outputs(&self) -> usize {
        *self.sizes.last().unwrap()
    }

    /// A training forward pass: `layer(l, (in, out), hidden, h, z)` for each
    /// layer in order, `h` its input (`x` for the first layer, else the
    /// previous layer's output), `z` its output `acts[l]`, `hidden` whether
    /// it is followed by another layer (ReLU and dropout) or gives the logits.
    pub fn forward_layers<X: ?Sized, A: Borrow<X>>(
        &self,
        x: &X,
        acts: &mut [A],
        mut layer: impl FnMut(usize, (usize, usize), bool, &X, &mut A) -> Result<()>,
    ) -> Result<()> {
        let layers = self.layers();
        for l in 0..layers {
            let (before, rest) = acts.split_at_mut(l);
            let h = if l == 0 { x } else { before[l - 1].borrow() };
            let widths = (self.sizes[l], self.sizes[l + 1]);
            layer(l, widths, l + 1 < layers, h, &mut rest[0])?;
        }
        Ok(())
    }
}

/// A multilayer perceptron `sizes[0] → … → sizes[L]` (ReLU hidden layers,
/// linear output).
#[derive(Debug, Clone, PartialEq)]
pub struct Mlp {
    layout: Layout,
    params: Vec<f32>,
}

fn check_sizes(sizes: &[usize]) -> Result<()> {
    if sizes.len() < 2 {
        return invalid(
            "sizes",
            format!("needs at least an input and an output size, got {sizes:?}"),
        );
    }
    if let Some(i) = sizes
        .iter()
        .position(|&s| s == 0 || s > i32::MAX as usize / 2)
    {
        return invalid(
            "sizes",
            format!("sizes[{i}] = {} must be in [1, 2^30)", sizes[i]),
        );
    }
    Ok(())
}

impl Mlp {
    /// A freshly initialised network: He-uniform weights for the ReLU layers
    /// (variance 2/in), variance 1/in for the output layer, zero biases.
    pub fn new(sizes: &[usize], seed: u64) -> Result<Self> {
        check_sizes(sizes)?;
        let layout = Layout::new(sizes);
        let mut params = vec![0.0f32; layout.total];
        let mut rng = StdRng::seed_from_u64(seed);
        for l in 0..layout.layers() {
            let fan_in = sizes[l] as f64;
            let gain = if l + 1 < layout.layers() { 6.0 } else { 3.0 };
            let a = (gain / fan_in).sqrt() as f32;
            let n = sizes[l] * sizes[l + 1];
            for p in &mut params[layout.w[l]..layout.w[l] + n] {
                *p = rng.random_range(-a..a);
            }
        }
        Ok(Mlp { layout, params })
    }

    /// A network with the given parameters (laid out as [`Mlp::params`]).
    pub fn from_params(sizes: &[usize], params: Vec<f32>) -> Result<Self> {
        check_sizes(sizes)?;
        let layout = Layout::new(sizes);
        if params.len() != layout.total {
            return invalid(
                "params",
                format!(
                    "sizes {sizes:?} need {} parameters, got {}",
                    layout.total,
                    params.len()
                ),
            );
        }
        Ok(Mlp { layout, params })
    }

    /// Layer widths, input first.
    pub fn sizes(&self) -> &[usize] {
        &self.layout.sizes
    }

    /// All parameters: `W_0, …, W_{L−1}` (each row-major `[in × out]`), then
    /// `b_0, …, b_{L−1}`.
    pub fn params(&self) -> &[f32] {
        &self.params
    }

    /// Number of parameters.
    pub fn num_params(&self) -> usize {
        self.layout.total
    }

    /// Input width.
    pub fn inputs(&self) -> usize {
        self.layout.inputs()
    }

    /// Output width (number of logits).
    pub fn outputs(&self) -> usize {
        self.layout.outputs()
    }

    /// `W_l`, row-major `[sizes[l] × sizes[l+1]]`.
    pub fn weight(&self, l: usize) -> &[f32] {
        let n = self.layout.sizes[l] * self.layout.sizes[l + 1];
        &self.params[self.layout.w[l]..self.layout.w[l] + n]
    }

    /// `b_l`, `sizes[l+1]` values.
    pub fn bias(&self, l: usize) -> &[f32] {
        &self.params[self.layout.b[l]..self.layout.b[l] + self.layout.sizes[l + 1]]
    }

    /// Logits `[rows × outputs]` for a row-major batch `x` `[rows × inputs]`,
    /// on the CPU (inference: no dropout).
    pub fn forward(&self, x: &[f32]) -> Result<Vec<f32>> {
        let rows = check_batch(x, self.inputs(), "x")?;
        Ok(forward(&self.layout, &self.params, x, rows))
    }

    pub(crate) fn layout(&self) -> &Layout {
        &self.layout
    }
}

/// Rows of a row-major batch of width `width`, or an error naming `arg`.
pub(crate) fn check_batch(x: &[f32], width: usize, arg: &'static str) -> Result<usize> {
    if !x.len().is_multiple_of(width) {
        return invalid(
            arg,
            format!(
                "holds {} values, not a whole number of rows of {width}",
                x.len()
            ),
        );
    }
    Ok(x.len() / width)
}

/// Inference forward: logits for `rows` rows of `x`.
pub(crate) fn forward(layout: &Layout, params: &[f32], x: &[f32], rows: usize) -> Vec<f32> {
    let mut h = x.to_vec();
    for l in 0..layout.layers() {
        let (i, o) = (layout.sizes[l], layout.sizes[l + 1]);
        let mut z = vec![0.0f32; rows * o];
        gemm(
            rows,
            i,
            o,
            &h,
            (i, 1),
            &params[layout.w[l]..],
            (o, 1),
            &mut z,
        );
        bias_act(
            &mut z,
            &params[layout.b[l]..layout.b[l] + o],
            l + 1 < layout.layers(),
            None,
        );
        h = z;
    }
    h
}
