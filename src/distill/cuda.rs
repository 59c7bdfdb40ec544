//! The CUDA engine of `DistillStep`: cuBLAS GEMMs (through cudarc,
//! the library loaded at run time), the kernels of kernels/mlp.cu and the
//! fused loss kernel ([`CudaBackend::fused`]), all on the backend's stream.
//!
//! Matrices are row-major as on the CPU; cuBLAS is column-major, so a
//! row-major `C = A·B` is issued as the column-major `Cᵀ = Bᵀ·Aᵀ`.

use super::dropout::Dropout;
use super::engine::{Engine, StepBatch, TeacherSource};
use super::kernel_args::{self, UpdateArgs};
use super::mlp::{Layout, Mlp};
use super::optim::Optimizer;
use crate::cuda::{CudaBackend, Kernel, LossBuffers, MlpOp, PreparedCache, RowLayout};
use crate::error::{KdError, Result};
use crate::tensor::Dtype;
use cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut,
    LaunchConfig, PushKernelArg,
};
use std::sync::Arc;

/// Fails with [`KdError::CudaUnavailable`] unless a `DistillStep` can run on
/// CUDA device 0 here: driver, device, embedded kernels and cuBLAS.
pub fn available() -> Result<()> {
    CudaBackend::new(0)?;
    // SAFETY: only tries to open the library.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(KdError::CudaUnavailable(
            "no cuBLAS library (libcublas.so) found".into(),
        ));
    }
    Ok(())
}

fn blas_err(e: cudarc::cublas::result::CublasError) -> KdError {
    KdError::Cuda(format!("cuBLAS: {e}"))
}

struct Kernels {
    bias_act: CudaFunction,
    relu_back: CudaFunction,
    bias_grad: CudaFunction,
    sgd: CudaFunction,
    adam: CudaFunction,
}

fn grid(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 8192) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Column-major `C[m×n] = op(A)·op(B)` with leading dimensions, α = 1, β = 0.
#[allow(clippy::too_many_arguments)]
fn sgemm(
    blas: &CudaBlas,
    (ta, tb): (cublasOperation_t, cublasOperation_t),
    (m, n, k): (usize, usize, usize),
    a: &CudaView<'_, f32>,
    lda: usize,
    b: &CudaView<'_, f32>,
    ldb: usize,
    c: &mut CudaViewMut<'_, f32>,
    ldc: usize,
) -> Result<()> {
    let cfg = GemmConfig {
        transa: ta,
        transb: tb,
        m: m as i32,
        n: n as i32,
        k: k as i32,
        alpha: 1.0f32,
        lda: lda as i32,
        ldb: ldb as i32,
        beta: 0.0f32,
        ldc: ldc as i32,
    };
    // SAFETY: callers pass views at least as large as the shapes need
    // (checked by the layouts: every buffer holds cap rows of its width).
    unsafe { blas.gemm(cfg, a, b, c) }.map_err(blas_err)
}

/// Row-major `Z[rows×o] = H[rows×i]·W[i×o]`.
fn gemm_forward(
    blas: &CudaBlas,
    (rows, i, o): (usize, usize, usize),
    h: &CudaView<'_, f32>,
    w: &CudaView<'_, f32>,
    z: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    sgemm(
        blas,
        (CUBLAS_OP_N, CUBLAS_OP_N),
        (o, rows, i),
        w,
        o,
        h,
        i,
        z,
        o,
    )
}

/// The device side of one network (student or teacher): parameters and the
/// outputs of its layers for up to `cap` rows.
struct Net {
    layout: Layout,
    params: CudaSlice<f32>,
    /// Output of layer l + 1 at index l; the last is the logits.
    acts: Vec<CudaSlice<f32>>,
}

impl Net {
    fn new(stream: &Arc<CudaStream>, mlp: &Mlp, cap: usize) -> Result<Self> {
        let layout = mlp.layout().clone();
        let acts = alloc_acts(stream, &layout, cap)?;
        Ok(Net {
            params: stream.clone_htod(mlp.params())?,
            layout,
            acts,
        })
    }

    /// Forward on `x` (`rows` rows); `dropout(l)` for hidden layer l.
    fn forward(
        &mut self,
        blas: &CudaBlas,
        k: &Kernels,
        stream: &Arc<CudaStream>,
        x: &CudaSlice<f32>,
        rows: usize,
        dropout: &dyn Fn(usize) -> Option<Dropout>,
    ) -> Result<()> {
        let (lay, params) = (&self.layout, &self.params);
        lay.forward_layers(x, &mut self.acts, |l, (i, o), hidden, h, z| {
            let w = params.slice(lay.w[l]..lay.w[l] + i * o);
            gemm_forward(
                blas,
                (rows, i, o),
                &h.slice(0..rows * i),
                &w,
                &mut z.slice_mut(0..rows * o),
            )?;
            let d = if hidden { dropout(l) } else { None };
            let b = params.slice(lay.b[l]..lay.b[l] + o);
            let mut zv = z.slice_mut(0..rows * o);
            let (zp, _zg) = zv.device_ptr_mut(stream);
            let (bp, _bg) = b.device_ptr(stream);
            let args = kernel_args::bias_act(zp, bp, (rows, o), hidden, d);
            let mut lb = stream.launch_builder(&k.bias_act);
            lb.arg(&args);
            // SAFETY: z holds rows × o, b o (the launch contract's buffers).
            unsafe { lb.launch(grid(rows * o)) }?;
            Ok(())
        })
    }
}

fn alloc_acts(
    stream: &Arc<CudaStream>,
    layout: &Layout,
    cap: usize,
) -> Result<Vec<CudaSlice<f32>>> {
    layout.sizes[1..]
        .iter()
        .map(|&w| Ok(stream.alloc_zeros::<f32>(cap * w)?))
        .collect()
}

pub(crate) struct CudaEngine {
    kd: CudaBackend,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    k: Kernels,
    student: Net,
    teacher: Option<Net>,
    grads: CudaSlice<f32>,
    s1: CudaSlice<f32>,
    s2: CudaSlice<f32>,
    cap: usize,
    x: CudaSlice<f32>,
    labels: CudaSlice<i64>,
    t_logits: CudaSlice<f32>,
    dz: CudaSlice<f32>,
    dh: CudaSlice<f32>,
    loss: LossBuffers,
    /// The fused loss, prepared at the first step (with labels or without).
    prepared: PreparedCache,
}

impl CudaEngine {
    pub fn new(student: &Mlp, teacher: Option<&Mlp>) -> Result<Self> {
        available()?;
        let kd = CudaBackend::new(0)?;
        let stream = kd.stream().clone();
        let blas = CudaBlas::new(stream.clone()).map_err(blas_err)?;
        let load = |op| kd.kernel(Kernel::Mlp(op)).cloned();
        let k = Kernels {
            bias_act: load(MlpOp::BiasAct)?,
            relu_back: load(MlpOp::ReluBack)?,
            bias_grad: load(MlpOp::BiasGrad)?,
            sgd: load(MlpOp::Sgd)?,
            adam: load(MlpOp::Adam)?,
        };
        let cap = 64;
        let n = student.num_params();
        let widest = student.sizes().iter().copied().max().unwrap_or(1);
        Ok(CudaEngine {
            student: Net::new(&stream, student, cap)?,
            teacher: teacher.map(|t| Net::new(&stream, t, cap)).transpose()?,
            grads: stream.alloc_zeros(n)?,
            s1: stream.alloc_zeros(n)?,
            s2: stream.alloc_zeros(n)?,
            x: stream.alloc_zeros(cap * student.inputs())?,
            labels: stream.alloc_zeros(cap)?,
            t_logits: stream.alloc_zeros(cap * student.outputs())?,
            dz: stream.alloc_zeros(cap * widest)?,
            dh: stream.alloc_zeros(cap * widest)?,
            loss: LossBuffers::new(&stream, cap)?,
            prepared: PreparedCache::default(),
            cap,
            kd,
            stream,
            blas,
            k,
        })
    }

    /// Grows every per-row buffer to hold `rows` rows.
    fn ensure(&mut self, rows: usize) -> Result<()> {
        if rows <= self.cap {
            return Ok(());
        }
        let cap = rows.next_power_of_two();
        let s = &self.stream;
        let lay = &self.student.layout;
        let widest = lay.sizes.iter().copied().max().unwrap_or(1);
        self.student.acts = alloc_acts(s, lay, cap)?;
        if let Some(t) = &mut self.teacher {
            t.acts = alloc_acts(s, &t.layout, cap)?;
        }
        self.x = s.alloc_zeros(cap * lay.inputs())?;
        self.labels = s.alloc_zeros(cap)?;
        self.t_logits = s.alloc_zeros(cap * lay.outputs())?;
        self.dz = s.alloc_zeros(cap * widest)?;
        self.dh = s.alloc_zeros(cap * widest)?;
        self.loss = LossBuffers::new(s, cap)?;
        self.cap = cap;
        Ok(())
    }

    fn upload_x(&mut self, x: &[f32]) -> Result<()> {
        self.stream
            .memcpy_htod(x, &mut self.x.slice_mut(0..x.len()))?;
        Ok(())
    }

    fn launch_update(
        &mut self,
        opt: &Optimizer,
        t: u64,
        range: std::ops::Range<usize>,
        decay: bool,
    ) -> Result<()> {
        let n = range.len();
        if n == 0 {
            return Ok(());
        }
        let s = self.stream.clone();
        let mut p = self.student.params.slice_mut(range.clone());
        let g = self.grads.slice(range.clone());
        let mut s1 = self.s1.slice_mut(range.clone());
        let mut s2 = self.s2.slice_mut(range);
        let (pp, _pg) = p.device_ptr_mut(&s);
        let (gp, _gg) = g.device_ptr(&s);
        let (s1p, _s1g) = s1.device_ptr_mut(&s);
        let (s2p, _s2g) = s2.device_ptr_mut(&s);
        let mut b;
        let (sgd, adam);
        match kernel_args::update(opt.at(t, decay), [pp, gp, s1p, s2p], n) {
            UpdateArgs::Sgd(a) => {
                sgd = a;
                b = s.launch_builder(&self.k.sgd);
                b.arg(&sgd);
            }
            UpdateArgs::Adam(a) => {
                adam = a;
                b = s.launch_builder(&self.k.adam);
                b.arg(&adam);
            }
        }
        // SAFETY: the launch contract's four views hold n each.
        unsafe { b.launch(grid(n)) }?;
        Ok(())
    }
}

impl Engine for CudaEngine {
    fn forward_backward(&mut self, batch: &StepBatch<'_>) -> Result<f64> {
        let StepBatch {
            x,
            rows,
            labels,
            teacher,
            spec,
            dropout,
        } = *batch;
        self.ensure(rows)?;
        self.upload_x(x)?;
        let stream = self.stream.clone();
        if let Some(l) = labels {
            stream.memcpy_htod(l, &mut self.labels.slice_mut(0..rows))?;
        }
        self.student
            .forward(&self.blas, &self.k, &stream, &self.x, rows, dropout)?;
        let lay = self.student.layout.clone();
        let layers = lay.layers();
        let v = lay.outputs();
        match teacher {
            TeacherSource::Logits(t) => {
                stream.memcpy_htod(t, &mut self.t_logits.slice_mut(0..rows * v))?;
            }
            TeacherSource::Model => {
                let t = self.teacher.as_mut().expect("checked");
                t.forward(&self.blas, &self.k, &stream, &self.x, rows, &|_| None)?;
            }
            TeacherSource::None => {}
        }

        // The fused loss and ∂L/∂logits, straight into dz.
        {
            let logits = self.student.acts[layers - 1].slice(0..rows * v);
            let t_logits = match teacher {
                TeacherSource::Logits(_) => self.t_logits.slice(0..rows * v),
                TeacherSource::Model => {
                    let t = self.teacher.as_ref().expect("checked");
                    t.acts[t.layout.layers() - 1].slice(0..rows * v)
                }
                TeacherSource::None => self.student.acts[layers - 1].slice(0..rows * v),
            };
            let lab = self.labels.slice(0..rows);
            let mut dz = self.dz.slice_mut(0..rows * v);
            let f32s = (Dtype::F32, Dtype::F32);
            let prepared = self
                .prepared
                .get(&self.kd, spec, f32s, v, labels.is_some(), None)?;
            self.kd.fused_prepared::<f32, f32>(
                &stream,
                &prepared,
                &logits,
                &t_logits,
                labels.map(|_| &lab),
                Some(&mut dz),
                RowLayout::dense(rows, v),
                &mut self.loss,
            )?;
        }

        // Backward.
        for l in (0..layers).rev() {
            let (i, o) = (lay.sizes[l], lay.sizes[l + 1]);
            {
                let h = if l == 0 {
                    self.x.slice(0..rows * i)
                } else {
                    self.student.acts[l - 1].slice(0..rows * i)
                };
                let dz = self.dz.slice(0..rows * o);
                // dW[i×o] = Hᵀ·dZ: column-major dWᵀ = dZᵀ(o×rows) · H(rows×i).
                sgemm(
                    &self.blas,
                    (CUBLAS_OP_N, CUBLAS_OP_T),
                    (o, i, rows),
                    &dz,
                    o,
                    &h,
                    i,
                    &mut self.grads.slice_mut(lay.w[l]..lay.w[l] + i * o),
                    o,
                )?;
                let mut db = self.grads.slice_mut(lay.b[l]..lay.b[l] + o);
                let (dzp, _dzg) = dz.device_ptr(&stream);
                let (dbp, _dbg) = db.device_ptr_mut(&stream);
                let args = kernel_args::bias_grad(dzp, dbp, (rows, o));
                let mut b = stream.launch_builder(&self.k.bias_grad);
                b.arg(&args);
                // SAFETY: dz holds rows × o, db o.
                unsafe { b.launch(grid(o)) }?;
            }
            if l > 0 {
                {
                    // dH[rows×i] = dZ·Wᵀ: column-major dHᵀ = W(i×o, stored o×i)ᵀ · dZᵀ.
                    let w = self.student.params.slice(lay.w[l]..lay.w[l] + i * o);
                    let dz = self.dz.slice(0..rows * o);
                    let mut dh = self.dh.slice_mut(0..rows * i);
                    sgemm(
                        &self.blas,
                        (CUBLAS_OP_T, CUBLAS_OP_N),
                        (i, rows, o),
                        &w,
                        o,
                        &dz,
                        o,
                        &mut dh,
                        i,
                    )?;
                }
                let scale = dropout(l - 1).map_or(1.0f32, |d| d.scale);
                let dh = self.dh.slice(0..rows * i);
                let h = self.student.acts[l - 1].slice(0..rows * i);
                let mut dz = self.dz.slice_mut(0..rows * i);
                let (dhp, _dhg) = dh.device_ptr(&stream);
                let (hp, _hg) = h.device_ptr(&stream);
                let (dzp, _dzg) = dz.device_ptr_mut(&stream);
                let args = kernel_args::relu_back(dhp, hp, dzp, rows * i, scale);
                let mut b = stream.launch_builder(&self.k.relu_back);
                b.arg(&args);
                // SAFETY: dh, h and dz hold rows × i each.
                unsafe { b.launch(grid(rows * i)) }?;
            }
        }
        // The one host wait of the step: the loss.
        let loss = stream.clone_dtoh(&self.loss.loss)?;
        Ok(loss[0] as f64)
    }

    fn update(&mut self, opt: &Optimizer, t: u64) -> Result<()> {
        let lay = &self.student.layout;
        let (w, total) = (lay.weights, lay.total);
        self.launch_update(opt, t, 0..w, true)?;
        self.launch_update(opt, t, w..total, false)
    }

    fn predict(&mut self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        self.ensure(rows)?;
        self.upload_x(x)?;
        let stream = self.stream.clone();
        self.student
            .forward(&self.blas, &self.k, &stream, &self.x, rows, &|_| None)?;
        let v = self.student.layout.outputs();
        let last = self.student.layout.layers() - 1;
        Ok(stream.clone_dtoh(&self.student.acts[last].slice(0..rows * v))?)
    }

    fn teacher_predict(&mut self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        self.ensure(rows)?;
        self.upload_x(x)?;
        let stream = self.stream.clone();
        let t = self.teacher.as_mut().expect("checked");
        t.forward(&self.blas, &self.k, &stream, &self.x, rows, &|_| None)?;
        let v = t.layout.outputs();
        let last = t.layout.layers() - 1;
        Ok(stream.clone_dtoh(&t.acts[last].slice(0..rows * v))?)
    }

    fn params(&self) -> Result<Vec<f32>> {
        Ok(self.stream.clone_dtoh(&self.student.params)?)
    }

    fn grads(&self) -> Result<Vec<f32>> {
        Ok(self.stream.clone_dtoh(&self.grads)?)
    }
}
