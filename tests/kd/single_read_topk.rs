//! The single-read top-k kernels (kernels/kd/kd_topk.cu, `kd_single_topk_*`)
//! under the cluster emulation: against the f64 oracle for every top-k mode
//! × dtype pair × option × index width, at V on both sides of each
//! cluster-size threshold (1, 2, 4, 8, 16 CTAs, then v1); the byte counters
//! against the model (the student read once; v1 reads it twice); and rows
//! whose indices are out of range or repeated inside one CTA's slice, which
//! every CTA of the cluster must turn into NaN.

use crate::common::assert_passed;
use crate::single_read::{
    active_rows, byte_sizes, emu, small_device, thresholds_staged, v_max_staged, PAIRS,
};

use kdfuse::check::{generate, random_config, run_case, CaseConfig, TopkCase};
use kdfuse::driver::Outputs;
use kdfuse::emu::{ByteCounts, EmuBackend};
use kdfuse::single_read::{plan_staged, KernelChoice, KernelPlan, Staged};
use kdfuse::tensor::{Logits, OwnedData, TopkIndices, TopkInputs, TopkTeacher};
use kdfuse::{Dtype, GradDtype, LossSpec, TopkMode};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn v_max(nc: u32, in_size: usize) -> usize {
    v_max_staged(Staged::Topk, nc, in_size)
}

fn thresholds(in_size: usize) -> Vec<(usize, u32)> {
    thresholds_staged(Staged::Topk, in_size)
}

const OPTIONS: [&str; 4] = [
    "plain",
    "alpha > 0",
    "soft-capping (not tail)",
    "row weights, ignored rows, unaligned rows, in place",
];

/// A random top-k case in `mode` at V = `cols`, k = `k`, with option `opt`.
fn case(
    rng: &mut StdRng,
    mode: TopkMode,
    pair: (Dtype, GradDtype),
    opt: usize,
    cols: usize,
    k: usize,
    i64: bool,
) -> (CaseConfig, bool) {
    let mut c = loop {
        let c = random_config(rng, 64);
        if c.topk.is_some() && c.spec.topk_mode == mode {
            break c;
        }
    };
    c.rows = 3;
    c.cols = cols;
    c.dtype = pair.0;
    c.grad_dtype = pair.1;
    c.topk = Some(TopkCase { k, i64 });
    c.row_weights = false;
    c.ignore_frac = 0.0;
    c.student_pad = 8 * rng.random_range(0..3usize);
    c.spec.alpha = 0.0;
    c.spec.softcap = None;
    let mut in_place = false;
    match opt {
        0 => {}
        1 => {
            c.labels = true;
            c.spec.alpha = 0.5;
        }
        2 if mode != TopkMode::Tail => c.spec.softcap = Some(12.0),
        2 => {}
        _ => {
            c.labels = true;
            c.spec.alpha = 0.3;
            c.ignore_frac = 0.3;
            c.row_weights = true;
            c.student_pad = 1;
            in_place = pair.1 == GradDtype::Input;
        }
    }
    (c, in_place)
}

/// k for the `i`-th case at V = `v`: one entry, the whole row, or a share
/// that spreads over the cluster's CTAs.
fn pick_k(rng: &mut StdRng, i: usize, v: usize) -> usize {
    match i % 4 {
        0 => 1,
        1 => v,
        _ => rng.random_range(1..=v.min(300)),
    }
}

#[test]
fn the_top_k_thresholds_plan_the_expected_clusters() {
    for in_size in [2usize, 4] {
        let list = thresholds(in_size);
        for nc in [1u32, 2, 4, 8, 16, 0] {
            assert!(list.iter().any(|&(_, c)| c == nc), "{nc} in {list:?}");
        }
        for (v, nc) in list {
            let p = plan_staged(
                KernelChoice::Auto,
                &small_device(),
                v,
                in_size,
                Staged::Topk,
            )
            .unwrap();
            match p {
                KernelPlan::SingleRead { cluster, .. } => assert_eq!(cluster, nc, "V = {v}"),
                KernelPlan::V1 { .. } => assert_eq!(nc, 0, "V = {v}: {}", p.describe()),
            }
        }
    }
    // A top-k CTA stages the student alone: about twice the dense V per CTA.
    assert!(v_max(1, 2) > 2 * 256 - 64, "{}", v_max(1, 2));
}

#[test]
fn every_mode_dtype_and_option_against_oracle() {
    let mut rng = StdRng::seed_from_u64(1311);
    let mut i = 0usize;
    for mode in TopkMode::ALL {
        for pair in PAIRS {
            let list = thresholds(pair.0.size());
            for opt in 0..OPTIONS.len() {
                let (v, nc) = list[i % list.len()];
                let k = pick_k(&mut rng, i, v);
                let (c, in_place) = case(&mut rng, mode, pair, opt, v, k, i.is_multiple_of(2));
                i += 1;
                let b = EmuBackend {
                    in_place,
                    ..emu(KernelChoice::Auto)
                };
                let plan = plan_staged(b.kernel, &b.caps, v, pair.0.size(), Staged::Topk).unwrap();
                assert_eq!(
                    plan.kernel(),
                    if nc == 0 { "v1" } else { "single-read" },
                    "{}",
                    c.describe()
                );
                let report = run_case(&b, &c).unwrap();
                assert_passed!(report, c, "single-read top-k, ");
            }
        }
    }
}

fn counted(b: &EmuBackend, c: &CaseConfig, grad: Option<GradDtype>) -> (ByteCounts, KernelPlan) {
    let data = generate(c);
    let inputs = data.topk_inputs().unwrap();
    let (_, run) = b.compute_topk_run(&inputs, &c.spec, grad).unwrap();
    (run.bytes, run.plan)
}

#[test]
fn single_read_top_k_reads_the_student_once() {
    // Per swept row: the student once (in·V; loss only in support mode with
    // α = 0: the k support entries alone), the gradient stored once
    // (out·V, every row); the values twice with a gradient (the gather and
    // the support's gradients), once without; each CTA reads the k indices
    // in the mark, the gather and the gradient.
    let mut rng = StdRng::seed_from_u64(1312);
    let mut turn = 0usize;
    for mode in TopkMode::ALL {
        for pair in PAIRS {
            let (din, dout) = byte_sizes(pair);
            for opt in [0usize, 1, 3] {
                let list = thresholds(pair.0.size());
                let (v, nc) = list[(turn * 3) % 8];
                assert_ne!(nc, 0);
                let k = pick_k(&mut rng, turn, v);
                let i64 = turn.is_multiple_of(2);
                turn += 1;
                let (mut c, _) = case(&mut rng, mode, pair, opt, v, k, i64);
                c.rows = 4;
                let (n, vv, kk, act) = (c.rows as u64, v as u64, k as u64, active_rows(&c));
                let isz = if i64 { 8 } else { 4 };
                let (bytes, plan) = counted(&emu(KernelChoice::Auto), &c, Some(pair.1));
                let KernelPlan::SingleRead { cluster, .. } = plan else {
                    panic!("{}: {}", c.describe(), plan.describe())
                };
                let want = ByteCounts {
                    student_loaded: din * vv * act,
                    teacher_loaded: 2 * din * kk * act,
                    grad_stored: dout * vv * n,
                    other_loaded: 3 * isz * kk * u64::from(cluster) * act,
                    ..Default::default()
                };
                assert_eq!(bytes, want, "{} ({})", c.describe(), plan.describe());
                let (bytes, _) = counted(&emu(KernelChoice::Auto), &c, None);
                let support_only = mode == TopkMode::Support && c.spec.alpha == 0.0;
                let want = ByteCounts {
                    student_loaded: din * act * if support_only { kk } else { vv },
                    teacher_loaded: din * kk * act,
                    other_loaded: 2 * isz * kk * u64::from(cluster) * act,
                    ..Default::default()
                };
                assert_eq!(bytes, want, "loss only: {}", c.describe());
            }
        }
    }
}

#[test]
fn bytes_per_element_single_read_top_k_against_v1() {
    // Full mode, k = 1, bf16 and f32 in and out: single-read moves in + out
    // per student element (4 B in bf16), v1 2·in + out (6 B): it sweeps the
    // row twice. The k-proportional terms follow the same model in both.
    let mut rng = StdRng::seed_from_u64(1313);
    for dtype in [Dtype::Bf16, Dtype::F32] {
        let v = v_max(4, dtype.size());
        let (mut c, _) = case(
            &mut rng,
            TopkMode::Full,
            (dtype, GradDtype::Input),
            0,
            v,
            1,
            false,
        );
        c.labels = false;
        c.rows = 2;
        let (n, size) = ((c.rows * v) as u64, dtype.size() as u64);
        let (single, plan) = counted(&emu(KernelChoice::Auto), &c, Some(GradDtype::Input));
        assert_eq!(plan.kernel(), "single-read");
        let (v1, plan) = counted(&emu(KernelChoice::V1), &c, Some(GradDtype::Input));
        assert_eq!(plan.kernel(), "v1");
        let rows = c.rows as u64;
        // Student: once per element; v1 twice, plus the k gathered entries
        // in its gather and its support gradient.
        assert_eq!(single.student_loaded, size * n, "{}", c.describe());
        assert_eq!(
            v1.student_loaded,
            2 * size * n + 2 * size * rows,
            "{}",
            c.describe()
        );
        assert_eq!(single.grad_stored, size * n);
        assert_eq!(v1.grad_stored, size * n);
        assert_eq!(single.teacher_loaded, v1.teacher_loaded);
        assert_eq!(v1.other_loaded, 3 * 4 * rows);
    }
}

#[test]
fn bad_indices_poison_the_row_in_every_cta_of_the_cluster() {
    // Rows of V = v_max(4): a cluster of 4 CTAs. Row 0 repeats an index in
    // the last CTA's slice (only that CTA sees the repeat), row 1 holds an
    // index ≥ V, row 2 is clean. The driver's validation is bypassed (as a
    // raw CUDA launch would be): the kernel's own checks must poison rows 0
    // and 1 whole, loss and every gradient element, and leave row 2 equal
    // to v1's.
    for dtype in [Dtype::F32, Dtype::Bf16] {
        let v = v_max(4, dtype.size());
        let (n, k) = (3usize, 4usize);
        let mut rng = StdRng::seed_from_u64(1314);
        let s: Vec<f32> = (0..n * v).map(|_| rng.random_range(-3.0..3.0f32)).collect();
        let student = OwnedData::from_f32(&s, dtype);
        let idx: Vec<i32> = vec![
            (v - 3) as i32,
            (v - 3) as i32,
            5,
            9, // row 0: a repeat near the end
            1,
            v as i32,
            2,
            3, // row 1: V is out of range
            0,
            (v / 2) as i32,
            (v - 1) as i32,
            7, // row 2: clean
        ];
        let vals: Vec<f32> = (0..n * k).map(|_| rng.random_range(-2.0..2.0f32)).collect();
        let values = OwnedData::from_f32(&vals, dtype);
        let inputs = TopkInputs {
            student: Logits::new(student.view(), n, v),
            teacher: TopkTeacher {
                indices: TopkIndices::I32(&idx),
                values: values.view(),
                k,
            },
            labels: None,
            row_weights: None,
        };
        let spec = LossSpec {
            topk_mode: TopkMode::Full,
            ..Default::default()
        };
        let run = |choice: KernelChoice| {
            let mut out = Outputs {
                row_losses: vec![f64::NAN; n],
                grad: Some(vec![f32::NAN; n * v]),
                grad_teacher: None,
                grad_dtype: Some(dtype),
                valid_rows: n,
                loss: None,
            };
            let r = emu(choice).topk_run(&inputs, &spec, &mut out).unwrap();
            (out, r.plan)
        };
        let (single, plan) = run(KernelChoice::Auto);
        assert!(
            matches!(plan, KernelPlan::SingleRead { cluster: 4, .. }),
            "{}",
            plan.describe()
        );
        let (v1, _) = run(KernelChoice::V1);
        let g = single.grad.as_ref().unwrap();
        let g1 = v1.grad.as_ref().unwrap();
        for row in [0usize, 1] {
            assert!(single.row_losses[row].is_nan(), "row {row}");
            let bad = g[row * v..(row + 1) * v]
                .iter()
                .filter(|x| !x.is_nan())
                .count();
            assert_eq!(
                bad, 0,
                "row {row}: {bad} gradient elements not NaN ({dtype})"
            );
        }
        let loss = (single.row_losses[2], v1.row_losses[2]);
        assert!(loss.0.is_finite() && (loss.0 - loss.1).abs() <= 1e-5 * (1.0 + loss.1.abs()));
        // Row 2 as v1 computes it, to the rounding of a different merge order.
        let row2 = |x: &[f32]| x[2 * v..3 * v].to_vec();
        let (a, b) = (row2(g), row2(g1));
        let max = b.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let ulp = if dtype == Dtype::F32 {
            0.0
        } else {
            1.0 / 128.0
        };
        for j in 0..v {
            assert!(
                (a[j] - b[j]).abs() <= 1e-5 * max + ulp * b[j].abs(),
                "row 2, column {j}: {} against v1's {} ({dtype})",
                a[j],
                b[j]
            );
        }
    }
}
