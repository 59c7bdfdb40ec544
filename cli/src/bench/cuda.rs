//! Benchmarks of the CUDA backend: the fused kernel and the eager baseline on
//! device-resident random inputs (made on the device, never zeros), rotated
//! among input sets whose total is at least 8× the L2 cache, timed with CUDA
//! events, beside the device-to-device copy bandwidth measured in the same
//! run, plus the CPU backend on a few rows of each configuration.

use super::config::BenchConfig;
use super::cpu::{cpu_bytes, random_labels, time_cpu};
use super::report::{BenchReport, BenchResult, Checks, DeviceMeta, Measured};
use super::stats::Timing;
use super::{host, model, BenchOptions};
use cudarc::driver::sys::{CUdevice_attribute as A, CUevent_flags};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use kdfuse::backend::Backend;
use kdfuse::cpu::CpuBackend;
use kdfuse::cuda::{
    CudaBackend, EagerScratch, FillArgs, LossBuffers, PreparedLoss, RawFusedArgs, RowLayout,
};
use kdfuse::error::{invalid, KdError, Result};
use kdfuse::single_read::KernelPlan;
use kdfuse::spec::LossSpec;
use kdfuse::tensor::{Dtype, KdInputs, Logits, OwnedData};

const GIB: usize = 1 << 30;

/// Which computation to time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// The fused kernel (v1 or single-read, as the backend plans it).
    Fused,
    /// The eager baseline (kernels/app/eager.cu).
    Eager,
}

/// One configuration's device buffers: `sets` input sets, the outputs, and
/// (optionally) the eager baseline's intermediates.
pub struct DeviceCase<'b> {
    backend: &'b CudaBackend,
    /// The configuration.
    pub config: BenchConfig,
    spec: LossSpec,
    /// The fused loss, prepared once (its plan says which kernel runs).
    prepared: PreparedLoss,
    inputs: Vec<(CudaSlice<u8>, CudaSlice<u8>)>,
    labels: Option<CudaSlice<i64>>,
    grad: Option<CudaSlice<u8>>,
    out: LossBuffers,
    scratch: Option<EagerScratch>,
}

/// Fills `count` elements of `dtype` at `ptr` with σ·(ρ·z(shared) + √(1−ρ²)·z(own)).
pub(crate) fn fill(
    backend: &CudaBackend,
    ptr: u64,
    count: usize,
    dtype: Dtype,
    seeds: (u64, u64),
    rho: f32,
) -> Result<()> {
    let name = format!("kd_fill_normal_{dtype}");
    let f = backend
        .module()
        .load_function(&name)
        .map_err(|e| KdError::Cuda(format!("kernel {name}: {e}")))?;
    let stream = backend.stream();
    let args = FillArgs {
        out: ptr,
        count: count as i64,
        shared_seed: seeds.0,
        own_seed: seeds.1,
        rho,
        sigma: 2.0,
    };
    let mut b = stream.launch_builder(&f);
    b.arg(&args);
    // SAFETY: `ptr` holds `count` elements of `dtype`.
    unsafe {
        b.launch(LaunchConfig {
            grid_dim: (count.div_ceil(256).clamp(1, 1 << 16) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        })
    }?;
    Ok(())
}

impl<'b> DeviceCase<'b> {
    /// Allocates and fills `sets` input sets for `config` (and the eager
    /// scratch when `eager`), on the backend's stream.
    pub fn new(
        backend: &'b CudaBackend,
        config: &BenchConfig,
        sets: usize,
        eager: bool,
        seed: u64,
    ) -> Result<Self> {
        config.validate()?;
        let stream = backend.stream();
        let spec = config.spec();
        let nv = config.elements();
        let in_bytes = nv * config.dtype.size();
        let mut inputs = Vec::with_capacity(sets);
        for i in 0..sets.max(1) {
            // SAFETY: filled right below.
            let mut s = unsafe { stream.alloc::<u8>(in_bytes) }?;
            let mut t = unsafe { stream.alloc::<u8>(in_bytes) }?;
            let base = seed.wrapping_mul(1000).wrapping_add(2 * i as u64);
            let (sp, _g1) = s.device_ptr_mut(stream);
            let (tp, _g2) = t.device_ptr_mut(stream);
            fill(backend, sp, nv, config.dtype, (base, 0), 1.0)?;
            fill(backend, tp, nv, config.dtype, (base, base + 1), 0.8)?;
            drop((_g1, _g2));
            inputs.push((s, t));
        }
        let labels = match random_labels(config, config.rows, seed) {
            Some(l) => Some(stream.clone_htod(&l)?),
            None => None,
        };
        let grad = if config.grad {
            // SAFETY: written by every run before it is read.
            Some(unsafe { stream.alloc::<u8>(nv * config.dtype.size()) }?)
        } else {
            None
        };
        let out = LossBuffers::new(stream, config.rows)?;
        let prepared = backend.prepare(
            &spec,
            (config.dtype, config.dtype),
            config.cols,
            labels.is_some(),
        )?;
        let scratch = if eager {
            Some(EagerScratch::new(stream, config.rows, config.cols, &spec)?)
        } else {
            None
        };
        Ok(DeviceCase {
            backend,
            config: config.clone(),
            spec,
            prepared,
            inputs,
            labels,
            grad,
            out,
            scratch,
        })
    }

    /// The kernel the fused variant runs.
    pub fn plan(&self) -> &KernelPlan {
        self.prepared.plan()
    }

    /// Input sets.
    pub fn sets(&self) -> usize {
        self.inputs.len()
    }

    fn raw(&mut self, set: usize) -> RawFusedArgs {
        let stream = self.backend.stream().clone();
        let (s, t) = &self.inputs[set % self.inputs.len()];
        let ptr = |p: (u64, _)| p.0;
        let student = ptr(s.device_ptr(&stream));
        let teacher = ptr(t.device_ptr(&stream));
        let labels = self
            .labels
            .as_ref()
            .map_or(0, |l| ptr(l.device_ptr(&stream)));
        let grad = self
            .grad
            .as_mut()
            .map_or(0, |g| g.device_ptr_mut(&stream).0);
        let row_losses = {
            let (p, _g) = self.out.row_losses.device_ptr_mut(&stream);
            p
        };
        let loss = {
            let (p, _g) = self.out.loss.device_ptr_mut(&stream);
            p
        };
        let valid_rows = {
            let (p, _g) = self.out.valid_rows.device_ptr_mut(&stream);
            p
        };
        RawFusedArgs {
            dtype: self.config.dtype,
            grad_dtype: self.config.dtype,
            student,
            teacher,
            labels,
            grad,
            row_losses,
            loss,
            valid_rows,
            row_weights: 0,
            grad_teacher: 0,
            layout: RowLayout::dense(self.config.rows, self.config.cols),
        }
    }

    /// Enqueues one run of `variant` on input set `set`.
    pub fn enqueue(&mut self, variant: Variant, set: usize) -> Result<()> {
        let raw = self.raw(set);
        let stream = self.backend.stream().clone();
        // SAFETY: every buffer was allocated for this configuration on this
        // stream and outlives the work (the case owns them).
        unsafe {
            match variant {
                Variant::Fused => self.backend.launch_prepared(&stream, &self.prepared, &raw),
                Variant::Eager => match self.scratch.as_mut() {
                    Some(scratch) => self.backend.eager_raw(&stream, &raw, scratch, &self.spec),
                    None => invalid("eager", "this case was made without the eager scratch"),
                },
            }
        }
    }

    /// `warmup` untimed then `runs` timed runs of `variant`, rotating input
    /// sets, each between two CUDA events.
    pub fn time(&mut self, variant: Variant, warmup: usize, runs: usize) -> Result<Timing> {
        let stream = self.backend.stream().clone();
        let ctx = self.backend.context().clone();
        let mut events = Vec::with_capacity(runs);
        for i in 0..warmup + runs {
            let timed = i >= warmup;
            let start = if timed {
                let e = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
                e.record(&stream)?;
                Some(e)
            } else {
                None
            };
            self.enqueue(variant, i)?;
            if let Some(start) = start {
                let end = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
                end.record(&stream)?;
                events.push((start, end));
            }
        }
        stream.synchronize()?;
        let mut samples = Vec::with_capacity(runs);
        for (a, b) in &events {
            samples.push(a.elapsed_ms(b)? as f64);
        }
        Timing::from_samples(&samples)
            .ok_or_else(|| KdError::Cuda("no valid CUDA event timing".into()))
    }

    /// The reduced loss of the last run (waits for the stream).
    pub fn loss(&self) -> Result<f64> {
        let v = self.backend.stream().clone_dtoh(&self.out.loss)?;
        Ok(v[0] as f64)
    }

    /// The per-row losses of the last run, first `k` rows.
    pub fn row_losses(&self, k: usize) -> Result<Vec<f32>> {
        let v = self.backend.stream().clone_dtoh(&self.out.row_losses)?;
        Ok(v[..k.min(v.len())].to_vec())
    }

    /// The gradient of the last run as f32 (waits for the stream); `None`
    /// for a loss-only configuration.
    pub fn grad_f32(&self) -> Result<Option<Vec<f32>>> {
        let Some(g) = &self.grad else { return Ok(None) };
        let bytes = self.backend.stream().clone_dtoh(g)?;
        let data = OwnedData::from_bytes(&bytes, self.config.dtype);
        let view = data.view();
        Ok(Some((0..view.len()).map(|i| view.get(i)).collect()))
    }

    /// Loss of the first `k` rows of input set 0 recomputed by the CPU
    /// backend from the device's own inputs; the largest relative difference
    /// from the device's row losses of the last run on set 0.
    fn cpu_rows_check(&self, k: usize) -> Result<f64> {
        let stream = self.backend.stream();
        let (s, t) = &self.inputs[0];
        let bytes = k * self.config.cols * self.config.dtype.size();
        let hs = stream.clone_dtoh(&s.slice(..bytes))?;
        let ht = stream.clone_dtoh(&t.slice(..bytes))?;
        let labels = match &self.labels {
            Some(l) => Some(stream.clone_dtoh(&l.slice(..k))?),
            None => None,
        };
        let (sd, td) = (
            OwnedData::from_bytes(&hs, self.config.dtype),
            OwnedData::from_bytes(&ht, self.config.dtype),
        );
        let inputs = KdInputs {
            student: Logits::new(sd.view(), k, self.config.cols),
            teacher: Logits::new(td.view(), k, self.config.cols),
            labels: labels.as_deref(),
            row_weights: None,
        };
        let cpu = CpuBackend.compute(&inputs, &self.spec, None)?;
        let dev = self.row_losses(k)?;
        Ok(cpu
            .row_losses
            .iter()
            .zip(&dev)
            .map(|(&c, &d)| (c - d as f64).abs() / c.abs().max(1e-6))
            .fold(0.0, f64::max))
    }
}

/// What the device is, with its clocks and driver.
pub fn device_meta(backend: &CudaBackend) -> Result<DeviceMeta> {
    let ctx = backend.context();
    let attr = |a| ctx.attribute(a).unwrap_or(0) as f64;
    let (major, minor) = ctx.compute_capability()?;
    let mem_khz = attr(A::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE);
    let bus_bits = attr(A::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH);
    Ok(DeviceMeta {
        name: ctx.name()?,
        compute_capability: format!("{major}.{minor}"),
        driver: kdfuse::cuda::driver_version()?,
        sms: attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT) as i32,
        l2_bytes: attr(A::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE) as i32,
        memory_bytes: ctx.total_mem()?,
        sm_clock_mhz: attr(A::CU_DEVICE_ATTRIBUTE_CLOCK_RATE) / 1e3,
        memory_clock_mhz: mem_khz / 1e3,
        theoretical_bandwidth_gbs: 2.0 * mem_khz * 1e3 * bus_bits / 8.0 / 1e9,
    })
}

/// Device-to-device copy bandwidth: `cuMemcpyDtoDAsync` of `bytes` (random
/// contents), bytes read + written over the median of `runs` event-timed copies.
pub fn copy_bandwidth_gbs(backend: &CudaBackend, bytes: usize, runs: usize) -> Result<f64> {
    let stream = backend.stream().clone();
    let ctx = backend.context().clone();
    let words = bytes / 4;
    // SAFETY: src is filled below; dst is only written.
    let mut src = unsafe { stream.alloc::<f32>(words) }?;
    let mut dst = unsafe { stream.alloc::<f32>(words) }?;
    {
        let (p, _g) = src.device_ptr_mut(&stream);
        fill(backend, p, words, Dtype::F32, (7, 0), 1.0)?;
    }
    let mut samples = Vec::with_capacity(runs);
    for i in 0..runs + 3 {
        let a = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        let b = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        a.record(&stream)?;
        stream.memcpy_dtod(&src, &mut dst)?;
        b.record(&stream)?;
        let ms = a.elapsed_ms(&b)? as f64;
        if i >= 3 {
            samples.push(ms);
        }
    }
    Ok(Timing::from_samples(&samples).map_or(0.0, |t| t.gbs(2 * 4 * words as u64)))
}

/// Input sets so that their total is at least 8× L2 (1 when one set already
/// is), at most 64.
fn sets_for(set_bytes: usize, l2: usize) -> usize {
    (8 * l2).div_ceil(set_bytes.max(1)).clamp(1, 64)
}

fn measure_config(
    backend: &CudaBackend,
    c: &BenchConfig,
    opts: &BenchOptions,
    meta: &DeviceMeta,
    copy_gbs: f64,
    host_gbs: f64,
    llc: usize,
) -> Result<BenchResult> {
    c.validate()?;
    let spec = c.spec();
    let nv = c.elements();
    let set_bytes = 2 * nv * c.dtype.size();
    let grad_bytes = if c.grad { nv * c.dtype.size() } else { 0 };
    let eager_bytes = EagerScratch::bytes_needed(c.rows, c.cols, &spec);
    let bytes = model::fused_bytes(c, c.dtype.size());
    let floor_ms = bytes as f64 / (copy_gbs * 1e9) * 1e3;
    let (free, _) = backend.context().mem_get_info()?;
    let budget = free.saturating_sub(GIB);
    if set_bytes + grad_bytes > budget {
        return Ok(super::skipped(
            c.clone(),
            format!(
                "needs {:.1} GB of device memory, {:.1} GB free",
                (set_bytes + grad_bytes) as f64 / 1e9,
                free as f64 / 1e9
            ),
            floor_ms,
        ));
    }
    let eager = opts.eager && set_bytes + grad_bytes + eager_bytes <= budget;
    let room = budget - grad_bytes - if eager { eager_bytes } else { 0 };
    let sets = sets_for(set_bytes, meta.l2_bytes.max(0) as usize).min((room / set_bytes).max(1));
    let mut case = DeviceCase::new(backend, c, sets, eager, opts.seed)?;
    let kernel = case.plan().describe();

    let fused_t = case.time(Variant::Fused, opts.warmup, opts.runs)?;
    // The last run used set (warmup + runs − 1) % sets; one more on set 0
    // for the checks.
    case.enqueue(Variant::Fused, 0)?;
    let loss = case.loss()?;
    let k = c.rows.min(4);
    let cpu_diff = case.cpu_rows_check(k)?;
    let fused = Measured::new(fused_t, bytes, copy_gbs);

    let (eager_m, eager_diff, eager_skipped) = if eager {
        let t = case.time(Variant::Eager, opts.warmup, opts.runs)?;
        case.enqueue(Variant::Eager, 0)?;
        let el = case.loss()?;
        let diff = (el - loss).abs() / loss.abs().max(1e-30);
        (
            Some(Measured::new(t, model::eager_bytes(c), copy_gbs)),
            Some(diff),
            None,
        )
    } else if opts.eager {
        (
            None,
            None,
            Some(format!(
                "its fp32 intermediates need {:.1} GB more device memory",
                eager_bytes as f64 / 1e9
            )),
        )
    } else {
        (None, None, Some("not asked for".into()))
    };
    drop(case);

    let cpu_rows = opts.cpu_rows.min(c.rows);
    let cpu = if cpu_rows > 0 {
        let (t, _, _) = time_cpu(c, cpu_rows, opts, llc)?;
        Some(Measured::new(t, cpu_bytes(c, cpu_rows), host_gbs))
    } else {
        None
    };
    let passed = loss.is_finite() && cpu_diff <= 1e-4 && eager_diff.is_none_or(|d| d <= 2e-3);
    Ok(BenchResult {
        config: c.clone(),
        skipped: None,
        input_sets: sets,
        floor_ms,
        speedup_vs_eager: eager_m
            .as_ref()
            .map(|e| e.timing.median_ms / fused.timing.median_ms),
        fused: Some(fused),
        eager: eager_m,
        eager_skipped,
        cpu,
        cpu_rows,
        kernel: Some(kernel),
        checks: Some(Checks {
            loss,
            eager_loss_rel_diff: eager_diff,
            cpu_rows_checked: k,
            cpu_row_max_rel_diff: Some(cpu_diff),
            passed,
        }),
    })
}

/// Runs every configuration on CUDA device `opts.device`.
pub fn run(configs: &[BenchConfig], opts: &BenchOptions) -> Result<BenchReport> {
    opts.validate()?;
    let date = host::now_rfc3339();
    let backend = CudaBackend::open(opts.device, opts.kernel)?;
    let meta = device_meta(&backend)?;
    let host = host::host_info(opts.cpu_rows > 0);
    let (free, _) = backend.context().mem_get_info()?;
    let copy_gbs = copy_bandwidth_gbs(&backend, GIB.min(free / 4), 20)?;
    let progress = super::progress(configs.len(), opts.progress);
    let mut results = Vec::with_capacity(configs.len());
    for c in configs {
        progress.set_message(c.to_string());
        results.push(measure_config(
            &backend,
            c,
            opts,
            &meta,
            copy_gbs,
            host.memory_bandwidth_gbs,
            host.llc_bytes,
        )?);
        progress.inc(1);
    }
    progress.finish_and_clear();
    Ok(BenchReport::new(
        "cuda",
        date,
        host,
        Some(meta),
        copy_gbs,
        opts,
        results,
    ))
}

/// `iters` runs of `variant` between `cuProfilerStart` and `cuProfilerStop`
/// (what `ncu --profile-from-start off` and `nsys --capture-range=cudaProfilerApi`
/// capture), each timed with CUDA events.
pub fn profiled(case: &mut DeviceCase<'_>, variant: Variant, iters: usize) -> Result<Timing> {
    // SAFETY: plain driver calls on the current context.
    unsafe { cudarc::driver::sys::cuProfilerStart() }
        .result()
        .map_err(KdError::from)?;
    let t = case.time(variant, 0, iters);
    // SAFETY: as above.
    let stop = unsafe { cudarc::driver::sys::cuProfilerStop() }.result();
    let t = t?;
    stop.map_err(KdError::from)?;
    Ok(t)
}
