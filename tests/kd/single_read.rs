//! The single-read kernels (kernels/kd/kd_single.cu) under the cluster
//! emulation: against the f64 oracle for every divergence × dtype pair ×
//! option, at V on both sides of each cluster-size threshold (1, 2, 4, 8, 16
//! CTAs, then too large: v1); the byte counters against the byte model (and
//! v1's re-reads, so the model tests can fail); and the race checker's own
//! test (a remote read before the cluster barrier must be reported).
//!
//! The thresholds come from a small emulated device (a few KiB of shared
//! memory per CTA), so that 16-CTA rows are a few thousand elements; the
//! layout and the planner are the same as on an sm_90 GPU.

use crate::common::assert_passed;

use kdfuse::check::{generate, random_config, run_case, CaseConfig};
use kdfuse::emu::{cluster_race_probe, ByteCounts, EmuBackend};
use kdfuse::single_read::{DeviceCaps, KernelChoice, KernelPlan, Staged};
use kdfuse::{Divergence, Dtype, GradDtype, LossSpec, Precision};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Shared memory a CTA may use on the emulated device: one CTA holds 256
/// bf16 columns (120 in f32).
pub(crate) const LIMIT: usize = 4160;

pub(crate) fn small_device() -> DeviceCaps {
    DeviceCaps {
        compute_capability: (9, 0),
        smem_per_block: LIMIT,
        // The planner aims for four CTAs per SM: here the same limit.
        smem_per_sm: 4 * (LIMIT + 1024),
        max_cluster: 16,
    }
}

pub(crate) fn emu(kernel: KernelChoice) -> EmuBackend {
    EmuBackend {
        kernel,
        caps: small_device(),
        grid: 2,
        // 32 threads per CTA: up to 16 CTAs per cluster run at once.
        single_threads: 32,
        ..Default::default()
    }
}

/// The largest V a cluster of `nc` CTAs holds for `in_size`-byte inputs,
/// staging `staged`.
pub(crate) fn v_max_staged(staged: Staged, nc: u32, in_size: usize) -> usize {
    (1..100_000)
        .take_while(|&v| staged.smem_bytes(v, in_size, nc) <= LIMIT)
        .last()
        .unwrap()
}

/// Every V the sweep visits for `in_size`, with the cluster the plan must
/// take there (0: v1): each threshold's last V and the next one.
pub(crate) fn thresholds_staged(staged: Staged, in_size: usize) -> Vec<(usize, u32)> {
    let mut out = Vec::new();
    for nc in [1u32, 2, 4, 8, 16] {
        let v = v_max_staged(staged, nc, in_size);
        out.push((v, nc));
        let next = (nc + 1..=16)
            .find(|&m| staged.smem_bytes(v + 1, in_size, m) <= LIMIT)
            .unwrap_or(0);
        out.push((v + 1, next));
    }
    out
}

fn thresholds(in_size: usize) -> Vec<(usize, u32)> {
    thresholds_staged(Staged::Dense, in_size)
}

pub(crate) const PAIRS: [(Dtype, GradDtype); 5] = [
    (Dtype::F32, GradDtype::F32),
    (Dtype::Bf16, GradDtype::Input),
    (Dtype::Bf16, GradDtype::F32),
    (Dtype::F16, GradDtype::Input),
    (Dtype::F16, GradDtype::F32),
];

const OPTIONS: [&str; 6] = [
    "fast",
    "fast, alpha > 0",
    "exact",
    "soft-capping",
    "teacher gradient",
    "row weights, ignored rows, unaligned rows, in place",
];

/// A random case of `divergence` at V = `cols`, with option `opt`.
fn case(
    rng: &mut StdRng,
    divergence: Divergence,
    pair: (Dtype, GradDtype),
    opt: usize,
    cols: usize,
) -> (CaseConfig, bool) {
    let mut c = loop {
        let c = random_config(rng, 64);
        if c.spec.divergence == divergence {
            break c;
        }
    };
    c.rows = 3;
    c.cols = cols;
    c.dtype = pair.0;
    c.grad_dtype = pair.1;
    c.topk = None;
    c.row_weights = false;
    c.ignore_frac = 0.0;
    // Aligned rows with a row stride (16-byte chunks used).
    c.student_pad = 8 * rng.random_range(0..3usize);
    c.teacher_pad = 8 * rng.random_range(0..3usize);
    c.spec = LossSpec {
        precision: Precision::Fast,
        alpha: 0.0,
        softcap: None,
        grad_teacher: false,
        ..c.spec
    };
    let mut in_place = false;
    match opt {
        0 => {}
        1 => {
            c.labels = true;
            c.spec.alpha = 0.5;
        }
        2 => c.spec.precision = Precision::Exact,
        3 => {
            c.spec.softcap = Some(15.0);
            c.spec.teacher_log_probs = false;
        }
        4 => {
            c.spec.grad_teacher = true;
            c.spec.teacher_log_probs = false;
        }
        _ => {
            c.labels = true;
            c.ignore_frac = 0.3;
            c.row_weights = true;
            c.student_pad = 1;
            c.teacher_pad = 2;
            in_place = pair.1 == GradDtype::Input;
        }
    }
    (c, in_place)
}

#[test]
fn the_thresholds_plan_the_expected_clusters() {
    for in_size in [2usize, 4] {
        let dtype = if in_size == 2 {
            Dtype::Bf16
        } else {
            Dtype::F32
        };
        let list = thresholds(in_size);
        // Every cluster size 1, 2, 4, 8, 16 and v1 appear.
        for nc in [1u32, 2, 4, 8, 16, 0] {
            assert!(list.iter().any(|&(_, c)| c == nc), "{nc} in {list:?}");
        }
        for (v, nc) in list {
            let p = emu(KernelChoice::Auto).plan(v, dtype).unwrap();
            match p {
                KernelPlan::SingleRead { cluster, .. } => assert_eq!(cluster, nc, "V = {v}"),
                KernelPlan::V1 { .. } => assert_eq!(nc, 0, "V = {v}: {}", p.describe()),
            }
        }
    }
    // No clusters before sm_90: v1, and forcing single-read is an error.
    let a100 = EmuBackend {
        caps: DeviceCaps {
            compute_capability: (8, 0),
            ..small_device()
        },
        ..emu(KernelChoice::Auto)
    };
    assert_eq!(a100.plan(100, Dtype::Bf16).unwrap().kernel(), "v1");
    let forced = EmuBackend {
        kernel: KernelChoice::SingleRead,
        ..a100
    };
    assert!(forced.plan(100, Dtype::Bf16).is_err());
}

#[test]
fn every_divergence_dtype_and_option_against_oracle() {
    let mut rng = StdRng::seed_from_u64(1301);
    let mut i = 0usize;
    for divergence in Divergence::ALL {
        for pair in PAIRS {
            let list = thresholds(pair.0.size());
            for opt in 0..OPTIONS.len() {
                let (v, nc) = list[i % list.len()];
                i += 1;
                let (c, in_place) = case(&mut rng, divergence, pair, opt, v);
                let b = EmuBackend {
                    in_place,
                    ..emu(KernelChoice::Auto)
                };
                let plan = b.plan(v, pair.0).unwrap();
                assert_eq!(plan.kernel(), if nc == 0 { "v1" } else { "single-read" });
                let report = run_case(&b, &c).unwrap();
                assert_passed!(report, c, "single-read, ");
            }
        }
    }
}

/// Rows of `data` that the kernels sweep (not ignored, weight ≠ 0).
pub(crate) fn active_rows(c: &CaseConfig) -> u64 {
    let data = generate(c);
    let inputs = data.inputs();
    (0..c.rows)
        .filter(|&r| {
            let ignored = inputs.labels.is_some_and(|l| l[r] == c.spec.ignore_index);
            let zero = inputs.row_weights.is_some_and(|w| w[r] == 0.0);
            !(ignored || zero)
        })
        .count() as u64
}

/// Bytes of one input element and of one gradient element of `pair`.
pub(crate) fn byte_sizes(pair: (Dtype, GradDtype)) -> (u64, u64) {
    let din = pair.0.size() as u64;
    match pair.1 {
        GradDtype::Input => (din, din),
        GradDtype::F32 => (din, 4),
    }
}

fn counted(b: &EmuBackend, c: &CaseConfig, grad: Option<GradDtype>) -> (ByteCounts, KernelPlan) {
    let data = generate(c);
    let (_, run) = b.compute_run(&data.inputs(), &c.spec, grad).unwrap();
    (run.bytes, run.plan)
}

#[test]
fn single_read_moves_each_element_once() {
    let mut rng = StdRng::seed_from_u64(1302);
    let mut turn = 0usize;
    for divergence in Divergence::ALL {
        for pair in PAIRS {
            let (din, dout) = byte_sizes(pair);
            // Two options per pair, in turn; V in turn over the thresholds.
            for _ in 0..2 {
                let opt = [0usize, 1, 2, 4, 5][turn % 5];
                let list = thresholds(pair.0.size());
                let (v, nc) = list[(turn * 3) % 8];
                turn += 1;
                assert_ne!(nc, 0);
                let (mut c, _) = case(&mut rng, divergence, pair, opt, v);
                c.rows = 4;
                let (n, vv, act) = (c.rows as u64, v as u64, active_rows(&c));
                let (bytes, plan) = counted(&emu(KernelChoice::Auto), &c, Some(pair.1));
                assert_eq!(plan.kernel(), "single-read");
                let gt = if c.spec.grad_teacher {
                    dout * vv * n
                } else {
                    0
                };
                let want = ByteCounts {
                    student_loaded: din * vv * act,
                    teacher_loaded: din * vv * act,
                    grad_stored: dout * vv * n,
                    grad_teacher_stored: gt,
                    ..Default::default()
                };
                assert_eq!(bytes, want, "{} ({})", c.describe(), plan.describe());
                // Loss only: the inputs once, nothing stored.
                if turn % 2 == 1 {
                    continue;
                }
                let (bytes, _) = counted(&emu(KernelChoice::Auto), &c, None);
                let want = ByteCounts {
                    student_loaded: din * vv * act,
                    teacher_loaded: din * vv * act,
                    ..Default::default()
                };
                assert_eq!(bytes, want, "loss only: {}", c.describe());
            }
        }
    }
}

#[test]
fn bytes_per_element_single_read_against_v1() {
    // All rows active, gradient in the input dtype: 2·in + out per element
    // for single-read; v1 re-reads the row (4·in + out, JSD and TVD 6·in + out).
    let mut rng = StdRng::seed_from_u64(1303);
    for divergence in Divergence::ALL {
        for dtype in [Dtype::Bf16, Dtype::F32] {
            let (mut c, _) = case(&mut rng, divergence, (dtype, GradDtype::Input), 0, 1801);
            c.labels = false;
            c.rows = 2;
            // β = 0 or 1 would make JSD a KL (one read fewer in v1).
            if divergence == Divergence::Jsd {
                c.spec.beta = 0.5;
            }
            let elems = (c.rows * c.cols) as f64;
            let per = |b: ByteCounts| {
                (b.student_loaded + b.teacher_loaded + b.grad_stored) as f64 / elems
            };
            let (single, plan) = counted(&emu(KernelChoice::Auto), &c, Some(GradDtype::Input));
            assert_eq!(plan.kernel(), "single-read");
            let (v1, plan) = counted(&emu(KernelChoice::V1), &c, Some(GradDtype::Input));
            assert_eq!(plan.kernel(), "v1");
            let size = dtype.size() as f64;
            let reads = if matches!(divergence, Divergence::Jsd | Divergence::Tvd) {
                3.0
            } else {
                2.0
            };
            assert_eq!(per(single), 3.0 * size, "{}", c.describe());
            assert_eq!(per(v1), (2.0 * reads + 1.0) * size, "{}", c.describe());
        }
    }
    // bf16 forward KL: 6 bytes against v1's 10; JSD 6 against 14.
}

#[test]
fn v1_bytes_follow_its_own_model() {
    // v1 with labels, ignored rows and α > 0: per swept row, every pass
    // reads both rows, plus the label's student logit once (the row loss).
    let mut rng = StdRng::seed_from_u64(1304);
    for divergence in Divergence::ALL {
        for opt in [1usize, 2] {
            let (mut c, _) = case(
                &mut rng,
                divergence,
                (Dtype::Bf16, GradDtype::Input),
                opt,
                777,
            );
            c.labels = true;
            c.spec.alpha = 0.5;
            c.ignore_frac = 0.4;
            c.rows = 5;
            if divergence == Divergence::Jsd {
                c.spec.beta = 0.5;
            }
            let (n, v, act) = (c.rows as u64, c.cols as u64, active_rows(&c));
            let data = generate(&c);
            let inputs = data.inputs();
            let labels = inputs.labels.unwrap();
            let in_range = (0..c.rows)
                .filter(|&r| {
                    labels[r] != c.spec.ignore_index && (0..c.cols as i64).contains(&labels[r])
                })
                .count() as u64;
            let (bytes, _) = counted(&emu(KernelChoice::V1), &c, Some(GradDtype::Input));
            let passes = if matches!(divergence, Divergence::Jsd | Divergence::Tvd) {
                3
            } else {
                2
            };
            assert_eq!(
                bytes.student_loaded,
                passes * 2 * v * act + 2 * in_range,
                "{}",
                c.describe()
            );
            assert_eq!(
                bytes.teacher_loaded,
                passes * 2 * v * act,
                "{}",
                c.describe()
            );
            assert_eq!(bytes.grad_stored, 2 * v * n);
        }
    }
}

#[test]
fn the_race_checker_reports_unordered_remote_accesses() {
    assert_eq!(cluster_race_probe(0), Ok(None));
    for mode in 1..=3 {
        match cluster_race_probe(mode) {
            Ok(Some(what)) => assert!(what.contains("CTA"), "{what}"),
            other => panic!("mode {mode}: no race reported ({other:?})"),
        }
    }
}
