//! Facts about the host for reports: CPU, cache, measured memory bandwidth,
//! commit and date.

use super::stats::Timing;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// The machine that ran the benchmark (the host).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostInfo {
    /// CPU model.
    pub cpu: String,
    /// Worker threads of the CPU backend.
    pub threads: usize,
    /// Last-level cache, bytes (0 if unknown).
    pub llc_bytes: usize,
    /// Host memory copy bandwidth measured in this run (bytes read + written), GB/s.
    pub memory_bandwidth_gbs: f64,
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// The CPU's model name (Linux), or the architecture.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// The last-level cache in bytes (Linux sysfs), 0 if unknown.
pub fn llc_bytes() -> usize {
    for idx in [3, 2] {
        if let Some(s) = read_trimmed(&format!(
            "/sys/devices/system/cpu/cpu0/cache/index{idx}/size"
        )) {
            let (num, mult) = match s.chars().last() {
                Some('K') => (&s[..s.len() - 1], 1024),
                Some('M') => (&s[..s.len() - 1], 1024 * 1024),
                _ => (s.as_str(), 1),
            };
            if let Ok(n) = num.parse::<usize>() {
                return n * mult;
            }
        }
    }
    0
}

/// Available host memory in bytes (Linux `MemAvailable`), if known.
pub fn available_memory() -> Option<usize> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Host memory copy bandwidth: a parallel copy of `bytes` (at least 8× the
/// last-level cache), bytes read + written over the median of `runs` copies.
pub fn memory_bandwidth_gbs(bytes: usize, runs: usize) -> f64 {
    let len = (bytes / 8).max(1 << 20);
    let src: Vec<u64> = (0..len as u64)
        .into_par_iter()
        .map(|i| i ^ 0x5bd1)
        .collect();
    let mut dst = vec![1u64; len];
    let chunk = len.div_ceil(rayon::current_num_threads() * 4).max(4096);
    let mut samples = Vec::with_capacity(runs);
    for i in 0..runs + 2 {
        let t0 = Instant::now();
        dst.par_chunks_mut(chunk)
            .zip(src.par_chunks(chunk))
            .for_each(|(d, s)| d.copy_from_slice(s));
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        if i >= 2 {
            samples.push(ms);
        }
    }
    std::hint::black_box(&dst);
    Timing::from_samples(&samples).map_or(0.0, |t| t.gbs(2 * 8 * len as u64))
}

/// The host's facts, with its memory bandwidth measured now.
pub fn host_info(measure_bandwidth: bool) -> HostInfo {
    let llc = llc_bytes();
    HostInfo {
        cpu: cpu_model(),
        threads: rayon::current_num_threads(),
        llc_bytes: llc,
        memory_bandwidth_gbs: if measure_bandwidth {
            memory_bandwidth_gbs((8 * llc).max(256 << 20), 10)
        } else {
            0.0
        },
    }
}

/// The source commit: `explicit`, else `KDFUSE_COMMIT`, else `git rev-parse`
/// in the current directory (with `-dirty` for local changes), else "unknown".
pub fn commit(explicit: Option<&str>) -> String {
    if let Some(c) = explicit {
        return c.to_string();
    }
    if let Ok(c) = std::env::var("KDFUSE_COMMIT") {
        if !c.trim().is_empty() {
            return c.trim().to_string();
        }
    }
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(h) if !h.is_empty() => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{h}-dirty")
            } else {
                h
            }
        }
        _ => "unknown".into(),
    }
}

/// Now, RFC 3339 in UTC to the second.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}
