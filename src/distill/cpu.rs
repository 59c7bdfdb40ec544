//! The CPU engine of `DistillStep`: the operations of [`super::ops`] (GEMMs
//! through `matrixmultiply`, bias/activation/dropout with rayon), the
//! optimizer with rayon, the fused loss and gradient through
//! [`crate::CpuBackend`].

use super::engine::{Engine, StepBatch, TeacherSource};
use super::mlp::{forward, Layout, Mlp};
use super::ops::{bias_act, bias_grad, gemm, relu_back};
use super::optim::Optimizer;
use crate::driver::Backend;
use crate::error::Result;
use crate::tensor::{GradDtype, HostData, KdInputs, Logits};
use crate::CpuBackend;

pub(crate) struct CpuEngine {
    layout: Layout,
    params: Vec<f32>,
    grads: Vec<f32>,
    s1: Vec<f32>,
    s2: Vec<f32>,
    /// Outputs of layers 1..=L (index l − 1); the last one is the logits.
    acts: Vec<Vec<f32>>,
    dh: Vec<f32>,
    dz: Vec<f32>,
    teacher: Option<Mlp>,
}

impl CpuEngine {
    pub fn new(student: &Mlp, teacher: Option<&Mlp>) -> Self {
        let layout = student.layout().clone();
        let n = layout.total;
        CpuEngine {
            acts: vec![Vec::new(); layout.layers()],
            layout,
            params: student.params().to_vec(),
            grads: vec![0.0; n],
            s1: vec![0.0; n],
            s2: vec![0.0; n],
            dh: Vec::new(),
            dz: Vec::new(),
            teacher: teacher.cloned(),
        }
    }
}

impl Engine for CpuEngine {
    fn forward_backward(&mut self, batch: &StepBatch<'_>) -> Result<f64> {
        let (x, rows, dropout) = (batch.x, batch.rows, batch.dropout);
        let lay = &self.layout;
        let layers = lay.layers();
        // Forward, keeping every layer's output.
        let params = &self.params;
        lay.forward_layers(x, &mut self.acts, |l, (i, o), hidden, h, z| {
            z.resize(rows * o, 0.0);
            gemm(rows, i, o, h, (i, 1), &params[lay.w[l]..], (o, 1), z);
            let d = if hidden { dropout(l) } else { None };
            bias_act(z, &params[lay.b[l]..lay.b[l] + o], hidden, d);
            Ok(())
        })?;
        let v = lay.outputs();
        let logits = &self.acts[layers - 1];
        let owned_teacher;
        let t_logits: &[f32] = match batch.teacher {
            TeacherSource::Logits(t) => t,
            TeacherSource::Model => {
                owned_teacher = self.teacher.as_ref().expect("checked").forward(x)?;
                &owned_teacher
            }
            TeacherSource::None => logits,
        };
        let inputs = KdInputs {
            student: Logits::new(HostData::F32(logits), rows, v),
            teacher: Logits::new(HostData::F32(t_logits), rows, v),
            labels: batch.labels,
            row_weights: None,
        };
        let out = CpuBackend.compute(&inputs, batch.spec, Some(GradDtype::F32))?;
        self.dz = out.grad.expect("asked for");

        // Backward.
        for l in (0..layers).rev() {
            let (i, o) = (lay.sizes[l], lay.sizes[l + 1]);
            let h: &[f32] = if l == 0 { x } else { &self.acts[l - 1] };
            gemm(
                i,
                rows,
                o,
                h,
                (1, i),
                &self.dz,
                (o, 1),
                &mut self.grads[lay.w[l]..lay.w[l] + i * o],
            );
            bias_grad(&self.dz, &mut self.grads[lay.b[l]..lay.b[l] + o]);
            if l > 0 {
                self.dh.resize(rows * i, 0.0);
                gemm(
                    rows,
                    o,
                    i,
                    &self.dz,
                    (o, 1),
                    &self.params[lay.w[l]..],
                    (1, o),
                    &mut self.dh,
                );
                let scale = dropout(l - 1).map_or(1.0, |d| d.scale);
                let mut dz = std::mem::take(&mut self.dz);
                dz.resize(rows * i, 0.0);
                relu_back(&self.dh, &self.acts[l - 1], scale, &mut dz);
                self.dz = dz;
            }
        }
        Ok(out.loss)
    }

    fn update(&mut self, opt: &Optimizer, t: u64) -> Result<()> {
        // Weights (with weight decay), then biases.
        let w = self.layout.weights;
        let (pw, pb) = self.params.split_at_mut(w);
        let (gw, gb) = self.grads.split_at(w);
        let (s1w, s1b) = self.s1.split_at_mut(w);
        let (s2w, s2b) = self.s2.split_at_mut(w);
        opt.at(t, true).apply_cpu(pw, gw, s1w, s2w);
        opt.at(t, false).apply_cpu(pb, gb, s1b, s2b);
        Ok(())
    }

    fn predict(&mut self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        Ok(forward(&self.layout, &self.params, x, rows))
    }

    fn teacher_predict(&mut self, x: &[f32], _rows: usize) -> Result<Vec<f32>> {
        self.teacher.as_ref().expect("checked").forward(x)
    }

    fn params(&self) -> Result<Vec<f32>> {
        Ok(self.params.clone())
    }

    fn grads(&self) -> Result<Vec<f32>> {
        Ok(self.grads.clone())
    }
}
