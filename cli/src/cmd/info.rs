//! `kdfuse info`: what was built and what GPUs are here.

use super::CliError;
use clap::Args;
use kdfuse::{cuda, kernels_meta};
use serde_json::json;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
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
    if a.json {
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
    Ok(ExitCode::SUCCESS)
}
