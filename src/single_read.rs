//! Which dense loss kernel runs: v1 (`kd_fused_*`: one CTA per row, the row
//! read two or three times) or single-read (`kd_single_*`: one
//! thread-block cluster per row, each logit read from global memory once;
//! docs/DESIGN.md §5 "Single-read kernels").
//!
//! [`plan`] decides from the device's compute capability and shared memory,
//! V and the input dtype; [`KernelChoice`] forces one side (`kdfuse
//! --kernel`, the `KDFUSE_KERNEL` environment variable). The CUDA backend
//! then asks the occupancy API whether such clusters can be resident and
//! falls back to v1 when not.

use crate::error::{invalid, Result};
use serde::Serialize;
use std::fmt;

extern "C" {
    fn kd_host_single_smem(v: i64, in_size: i64, nc: i64) -> i64;
    fn kd_host_single_topk_smem(v: i64, in_size: i64, nc: i64) -> i64;
    fn kd_host_single_max_cluster() -> i32;
}

/// Threads per CTA of the single-read kernels on a GPU (`KD_SINGLE_THREADS`).
pub const SINGLE_THREADS: u32 = 256;

/// Which dense kernel to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KernelChoice {
    /// Single-read where it fits the device, else v1.
    #[default]
    Auto,
    /// Always v1.
    V1,
    /// Always single-read; an error where it cannot run.
    SingleRead,
}

impl KernelChoice {
    /// Every choice, in CLI order.
    pub const ALL: [KernelChoice; 3] = [
        KernelChoice::Auto,
        KernelChoice::V1,
        KernelChoice::SingleRead,
    ];

    /// The CLI / environment spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            KernelChoice::Auto => "auto",
            KernelChoice::V1 => "v1",
            KernelChoice::SingleRead => "single-read",
        }
    }

    /// Parses `auto`, `v1` or `single-read`; `arg` names the source in the error.
    pub fn parse(arg: &'static str, s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(KernelChoice::Auto),
            "v1" => Ok(KernelChoice::V1),
            "single-read" => Ok(KernelChoice::SingleRead),
            _ => invalid(arg, format!("must be auto, v1 or single-read, got {s:?}")),
        }
    }

    /// `KDFUSE_KERNEL` when set (an error names it when it is not a
    /// choice), else `Auto`.
    pub fn from_env() -> Result<Self> {
        match std::env::var("KDFUSE_KERNEL") {
            Ok(s) if !s.is_empty() => Self::parse("KDFUSE_KERNEL", &s),
            _ => Ok(KernelChoice::Auto),
        }
    }
}

impl fmt::Display for KernelChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a device offers the single-read kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DeviceCaps {
    /// Compute capability (major, minor); clusters need 9.0.
    pub compute_capability: (i32, i32),
    /// Dynamic shared memory one CTA may opt in to, bytes.
    pub smem_per_block: usize,
    /// Shared memory of one SM, bytes.
    pub smem_per_sm: usize,
    /// The largest cluster the kernels may use (8 portable, 16 where
    /// non-portable sizes are allowed).
    pub max_cluster: u32,
}

impl DeviceCaps {
    /// An H100 / H200 (sm_90): 227 KiB per CTA, 228 KiB per SM, clusters of
    /// up to 16. The emulator plans with it by default.
    pub const SM90: DeviceCaps = DeviceCaps {
        compute_capability: (9, 0),
        smem_per_block: 227 * 1024,
        smem_per_sm: 228 * 1024,
        max_cluster: 16,
    };
}

/// Where a plan came from: the kernel and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kernel", rename_all = "kebab-case")]
pub enum KernelPlan {
    /// v1, and why not single-read.
    V1 {
        /// Why (forced, no clusters, too large, …).
        reason: String,
    },
    /// Single-read with clusters of `cluster` CTAs, each with `smem_bytes`
    /// of dynamic shared memory.
    SingleRead {
        /// CTAs per row (1–16).
        cluster: u32,
        /// Dynamic shared memory per CTA, bytes.
        smem_bytes: usize,
    },
}

impl KernelPlan {
    /// `v1` or `single-read`.
    pub fn kernel(&self) -> &'static str {
        match self {
            KernelPlan::V1 { .. } => "v1",
            KernelPlan::SingleRead { .. } => "single-read",
        }
    }

    /// One line for reports: `single-read (cluster 8, 67 KiB/CTA)` or
    /// `v1 (why)`.
    pub fn describe(&self) -> String {
        match self {
            KernelPlan::V1 { reason } => format!("v1 ({reason})"),
            KernelPlan::SingleRead {
                cluster,
                smem_bytes,
            } => format!(
                "single-read (cluster {cluster}, {:.1} KiB shared memory per CTA)",
                *smem_bytes as f64 / 1024.0
            ),
        }
    }
}

/// Dynamic shared memory of one single-read CTA for rows of `v` elements of
/// `in_size` bytes split over `cluster` CTAs (kernels/kd/kd_single_layout.h).
pub fn smem_bytes(v: usize, in_size: usize, cluster: u32) -> usize {
    // SAFETY: pure arithmetic.
    unsafe { kd_host_single_smem(v as i64, in_size as i64, i64::from(cluster.max(1))) as usize }
}

/// Dynamic shared memory of one single-read top-k CTA (`kd_single_topk_*`:
/// the student slice and a bit map of its support; kd_single_layout.h).
pub fn topk_smem_bytes(v: usize, in_size: usize, cluster: u32) -> usize {
    // SAFETY: pure arithmetic.
    unsafe {
        kd_host_single_topk_smem(v as i64, in_size as i64, i64::from(cluster.max(1))) as usize
    }
}

/// What a single-read CTA stages: a dense teacher's two rows, or the
/// student and the bit map of a top-k teacher's support.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Staged {
    /// Student and teacher (`kd_single_<div>*`).
    Dense,
    /// Student and support bit map (`kd_single_topk_*`).
    Topk,
}

impl Staged {
    /// Dynamic shared memory of one CTA.
    pub fn smem_bytes(self, v: usize, in_size: usize, cluster: u32) -> usize {
        match self {
            Staged::Dense => smem_bytes(v, in_size, cluster),
            Staged::Topk => topk_smem_bytes(v, in_size, cluster),
        }
    }
}

/// The largest cluster the kernels support (16).
pub fn max_cluster() -> u32 {
    // SAFETY: returns a constant.
    unsafe { kd_host_single_max_cluster() as u32 }
}

/// Shared memory the runtime reserves per CTA on sm_80 and later.
const RESERVED_PER_CTA: usize = 1024;
/// CTAs per SM the automatic choice aims for (the register limit of
/// 256-thread CTAs at 64 registers), so that enough 16-byte loads are in
/// flight to cover memory latency.
const TARGET_CTAS_PER_SM: usize = 4;

/// The kernel for a dense loss on a device with `caps`, rows of `v`
/// elements of `in_size` bytes. `Auto` takes single-read where clusters
/// exist and a slice fits: the smallest cluster whose CTAs leave room for
/// four per SM, else the largest (the smallest CTAs, the most per SM) when
/// its slices fit at all. `SingleRead` errs
/// where it cannot run; `V1` always plans v1.
pub fn plan(
    choice: KernelChoice,
    caps: &DeviceCaps,
    v: usize,
    in_size: usize,
) -> Result<KernelPlan> {
    plan_staged(choice, caps, v, in_size, Staged::Dense)
}

/// [`plan`] for what the kernel stages: the same rule, with the top-k
/// kernels' smaller slices (the student and a bit map) for `Staged::Topk`.
pub fn plan_staged(
    choice: KernelChoice,
    caps: &DeviceCaps,
    v: usize,
    in_size: usize,
    staged: Staged,
) -> Result<KernelPlan> {
    let smem_bytes = |v, in_size, nc| staged.smem_bytes(v, in_size, nc);
    let v1 = |reason: String| -> Result<KernelPlan> {
        if choice == KernelChoice::SingleRead {
            return invalid("kernel", format!("single-read cannot run here: {reason}"));
        }
        Ok(KernelPlan::V1 { reason })
    };
    if choice == KernelChoice::V1 {
        return Ok(KernelPlan::V1 {
            reason: "forced".into(),
        });
    }
    if caps.compute_capability.0 < 9 {
        return v1(format!(
            "compute capability {}.{}: thread-block clusters need 9.0",
            caps.compute_capability.0, caps.compute_capability.1
        ));
    }
    let largest = caps.max_cluster.min(max_cluster()).max(1);
    let fits = |nc: u32, limit: usize| smem_bytes(v, in_size, nc) <= limit;
    let target = (caps.smem_per_sm / TARGET_CTAS_PER_SM).saturating_sub(RESERVED_PER_CTA);
    let limit = caps.smem_per_block;
    let pick = (1..=largest)
        .find(|&nc| fits(nc, target.min(limit)))
        .or_else(|| fits(largest, limit).then_some(largest));
    match pick {
        Some(cluster) => Ok(KernelPlan::SingleRead {
            cluster,
            smem_bytes: smem_bytes(v, in_size, cluster),
        }),
        None => v1(format!(
            "V = {v}: a row needs {} KiB per CTA even over {largest} CTAs, above the {} KiB a CTA may use",
            smem_bytes(v, in_size, largest) / 1024,
            limit / 1024
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_kernels_formula() {
        // cap = 8·⌈⌈V/8⌉/nc⌉ + 16 elements per side, 3072 bytes of scratch.
        assert_eq!(smem_bytes(128_256, 2, 16), 3072 + 2 * 2 * (8 * 1002 + 16));
        assert_eq!(smem_bytes(7, 4, 1), 3072 + 2 * 4 * (8 + 16));
        assert_eq!(max_cluster(), 16);
        // Top-k: the student slice and ⌈cap/32⌉ words of bits.
        assert_eq!(
            topk_smem_bytes(128_256, 2, 16),
            3072 + 2 * (8 * 1002 + 16) + 4 * (8 * 1002 + 16usize).div_ceil(32)
        );
    }

    #[test]
    fn top_k_slices_are_about_half_a_dense_one() {
        let caps = DeviceCaps::SM90;
        // bf16 V = 128256: 257 KB of student per row, 6 CTAs of ≤ 56 KiB.
        let p = plan_staged(KernelChoice::Auto, &caps, 128_256, 2, Staged::Topk).unwrap();
        assert!(
            matches!(p, KernelPlan::SingleRead { cluster: 6, .. }),
            "{p:?}"
        );
        // f32 V = 2M: 8 MB of student, beyond 16 CTAs.
        let big = plan_staged(KernelChoice::Auto, &caps, 2_000_000, 4, Staged::Topk).unwrap();
        assert_eq!(big.kernel(), "v1");
    }

    #[test]
    fn auto_picks_the_smallest_cluster_that_leaves_four_ctas_per_sm() {
        let caps = DeviceCaps::SM90;
        // bf16 V = 128256: 513 KB per row; 16 CTAs of ≈ 35 KB.
        let p = plan(KernelChoice::Auto, &caps, 128_256, 2).unwrap();
        assert_eq!(p.kernel(), "single-read");
        let KernelPlan::SingleRead {
            cluster,
            smem_bytes,
        } = p
        else {
            unreachable!()
        };
        assert_eq!(cluster, 10);
        assert!(smem_bytes <= 56 * 1024);
        // Beyond the four-per-SM target: the largest cluster, 16.
        assert!(matches!(
            plan(KernelChoice::Auto, &caps, 128_256, 4).unwrap(),
            KernelPlan::SingleRead { cluster: 16, .. }
        ));
        // A small row: one CTA.
        assert!(matches!(
            plan(KernelChoice::Auto, &caps, 4096, 2).unwrap(),
            KernelPlan::SingleRead { cluster: 1, .. }
        ));
    }

    #[test]
    fn falls_back_to_v1_and_forced_choices_hold() {
        let caps = DeviceCaps::SM90;
        let a100 = DeviceCaps {
            compute_capability: (8, 0),
            ..caps
        };
        assert_eq!(
            plan(KernelChoice::Auto, &a100, 32_000, 2).unwrap().kernel(),
            "v1"
        );
        let e = plan(KernelChoice::SingleRead, &a100, 32_000, 2).unwrap_err();
        assert!(e.to_string().contains("9.0"), "{e}");
        // f32 V = 2M: 16 MB per row, beyond 16 CTAs.
        let big = plan(KernelChoice::Auto, &caps, 2_000_000, 4).unwrap();
        assert_eq!(big.kernel(), "v1");
        assert!(plan(KernelChoice::SingleRead, &caps, 2_000_000, 4).is_err());
        assert_eq!(
            plan(KernelChoice::V1, &caps, 4096, 2).unwrap().kernel(),
            "v1"
        );
        assert!(KernelChoice::parse("kernel", "fast").is_err());
        for c in KernelChoice::ALL {
            assert_eq!(KernelChoice::parse("kernel", c.as_str()).unwrap(), c);
        }
    }
}
