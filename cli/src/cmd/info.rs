//! `kdfuse info`: what was built and what GPUs are here.

use super::{CliError, KernelArgs};
use clap::Args;
use kdfuse::single_read::{self, DeviceCaps, KernelChoice, KernelPlan, Staged};
use kdfuse::{cuda, kernels_meta, Dtype, LossSpec};
use serde_json::json;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    kernel: KernelArgs,
}

/// The shapes `info` shows the loss kernel's plan for.
const PLANNED: [(Dtype, usize); 4] = [
    (Dtype::Bf16, 32_000),
    (Dtype::Bf16, 128_256),
    (Dtype::Bf16, 262_144),
    (Dtype::F32, 128_256),
];

/// The loss kernel's plans on one device (or on an sm_90 when no GPU is
/// here).
struct LossKernel {
    /// `GPU <n>` or `planned for an sm_90 (no GPU here)`.
    label: String,
    caps: DeviceCaps,
    /// Per shape and teacher: the plan, or why none could be made.
    plans: Vec<Plan>,
}

/// One shape's plan for a dense or a top-k teacher.
struct Plan {
    dtype: Dtype,
    cols: usize,
    teacher: Staged,
    plan: Result<KernelPlan, String>,
}

/// [`PLANNED`] × (dense, top-k), each planned by `f`.
fn each_plan(mut f: impl FnMut(Dtype, usize, Staged) -> kdfuse::Result<KernelPlan>) -> Vec<Plan> {
    [Staged::Dense, Staged::Topk]
        .into_iter()
        .flat_map(|teacher| PLANNED.iter().map(move |&(d, v)| (d, v, teacher)))
        .map(|(dtype, cols, teacher)| Plan {
            dtype,
            cols,
            teacher,
            plan: f(dtype, cols, teacher).map_err(|e| e.to_string()),
        })
        .collect()
}

fn teacher_name(t: Staged) -> &'static str {
    match t {
        Staged::Dense => "dense",
        Staged::Topk => "top-k",
    }
}

/// The plans of [`PLANNED`] under `choice`: per device, by its backend
/// (the module's kernels and the occupancy API included) where the kernels
/// load, else by the planner on its caps; without a device, on
/// `DeviceCaps::SM90`.
fn loss_kernels(choice: KernelChoice, ordinals: &[usize]) -> Vec<LossKernel> {
    let planned = |caps: &DeviceCaps| {
        each_plan(|d, v, t| single_read::plan_staged(choice, caps, v, d.size(), t))
    };
    if ordinals.is_empty() {
        let caps = DeviceCaps::SM90;
        return vec![LossKernel {
            label: "planned for an sm_90 (no GPU here)".into(),
            caps,
            plans: planned(&caps),
        }];
    }
    ordinals
        .iter()
        .filter_map(|&i| {
            let spec = LossSpec::default();
            match cuda::CudaBackend::open(i, Some(choice)) {
                Ok(b) => {
                    let plans = each_plan(|d, v, t| match t {
                        Staged::Dense => b.plan_for(&spec, (d, d), v),
                        Staged::Topk => b.plan_topk_for(&spec, (d, d), v),
                    });
                    Some(LossKernel {
                        label: format!("GPU {i}"),
                        caps: b.device_caps(),
                        plans,
                    })
                }
                Err(e) => {
                    let caps = cuda::device_caps(i).ok()?;
                    Some(LossKernel {
                        label: format!("GPU {i} (planned only: {e})"),
                        caps,
                        plans: planned(&caps),
                    })
                }
            }
        })
        .collect()
}

fn caps_line(c: &DeviceCaps) -> String {
    format!(
        "compute capability {}.{}, {} KiB shared memory per CTA (opt-in), {} KiB per SM, clusters of up to {}",
        c.compute_capability.0,
        c.compute_capability.1,
        c.smem_per_block / 1024,
        c.smem_per_sm / 1024,
        c.max_cluster
    )
}

/// Largest register count any kernel uses, from the ptxas report.
fn max_registers() -> Option<u32> {
    kernels_meta::PTXAS_REPORT
        .lines()
        .filter_map(|l| {
            let i = l.find("Used ")?;
            l[i + 5..].split_whitespace().next()?.parse::<u32>().ok()
        })
        .max()
}

pub fn run(a: InfoArgs) -> Result<ExitCode, CliError> {
    let kernels = kernels_meta::NO_KERNELS_REASON.is_none();
    let devices = cuda::device_infos();
    let driver = cuda::driver_version().ok();
    let choice = a.kernel.choice()?;
    let ordinals: Vec<usize> = match &devices {
        Ok(d) => d.iter().map(|g| g.ordinal).collect(),
        Err(_) => Vec::new(),
    };
    let loss_kernel = loss_kernels(choice, &ordinals);
    if a.json {
        let devices_json: Vec<_> = loss_kernel
            .iter()
            .map(|k| {
                let plans: Vec<_> = k
                    .plans
                    .iter()
                    .map(|p| {
                        let (d, v, t) = (p.dtype.as_str(), p.cols, teacher_name(p.teacher));
                        match &p.plan {
                            Ok(plan) => json!({
                                "dtype": d,
                                "cols": v,
                                "teacher": t,
                                "plan": plan,
                                "describe": plan.describe(),
                            }),
                            Err(e) => json!({ "dtype": d, "cols": v, "teacher": t, "error": e }),
                        }
                    })
                    .collect();
                json!({ "label": k.label, "caps": k.caps, "plans": plans })
            })
            .collect();
        let gpus = match &devices {
            Ok(d) => json!(d),
            Err(_) => json!([]),
        };
        let report = json!({
            "version": env!("CARGO_PKG_VERSION"),
            "kernels_embedded": kernels,
            "no_kernels_reason": kernels_meta::NO_KERNELS_REASON,
            "architectures": kernels_meta::ARCHES,
            "toolchain": kernels_meta::TOOLCHAIN,
            "fatbin_bytes": kernels_meta::FATBIN.len(),
            "max_registers": max_registers(),
            "driver": driver,
            "gpus": gpus,
            "gpu_error": devices.as_ref().err().map(|e| e.to_string()),
            "loss_kernel": {
                "choice": choice,
                "devices": devices_json,
            },
        });
        outln!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        )?;
        return Ok(ExitCode::SUCCESS);
    }
    outln!("kdfuse {}", env!("CARGO_PKG_VERSION"))?;
    if kernels {
        outln!(
            "kernels: {} (fatbin {} bytes, at most {} registers per thread, no spills)",
            kernels_meta::TOOLCHAIN,
            kernels_meta::FATBIN.len(),
            max_registers().unwrap_or(0)
        )?;
        outln!("architectures: {}", kernels_meta::ARCHES.join(", "))?;
    } else {
        outln!(
            "kernels: none embedded ({})",
            kernels_meta::NO_KERNELS_REASON.unwrap_or("")
        )?;
    }
    match devices {
        Ok(d) if d.is_empty() => outln!("GPUs: none (the CUDA driver reports no device)")?,
        Ok(d) => {
            outln!("driver: CUDA {}", driver.unwrap_or_default())?;
            for g in d {
                outln!(
                    "GPU {}: {}, compute capability {}.{}, {} SMs, {:.1} GiB, L2 {} MiB, theoretical bandwidth {:.0} GB/s",
                    g.ordinal,
                    g.name,
                    g.compute_capability.0,
                    g.compute_capability.1,
                    g.sms,
                    g.memory_bytes as f64 / (1u64 << 30) as f64,
                    g.l2_bytes >> 20,
                    g.theoretical_bandwidth_gbs
                )?;
            }
        }
        Err(e) => outln!("GPUs: none ({e})")?,
    }
    outln!("Loss kernel (--kernel / KDFUSE_KERNEL: {choice}):")?;
    for k in &loss_kernel {
        outln!("  {}: {}", k.label, caps_line(&k.caps))?;
        for p in &k.plans {
            let what = match &p.plan {
                Ok(plan) => plan.describe(),
                Err(e) => format!("error: {e}"),
            };
            let teacher = match p.teacher {
                Staged::Dense => String::new(),
                Staged::Topk => ", top-k teacher".into(),
            };
            outln!("    {} V={}{teacher}: {what}", p.dtype, p.cols)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
