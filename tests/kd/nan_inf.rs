//! NaN and infinities (README "NaN and infinities"): a NaN or a +inf in a
//! used input makes the row's loss NaN and every entry of its gradient rows
//! NaN, and the reduced loss NaN; −inf is a masked entry. Each case runs on
//! the f64 oracle, the CPU backend (the kernels' math on the host) and the
//! CUDA kernels under the emulation, for every divergence, at the row's
//! maximum, elsewhere, and in a masked column (the other side −inf), for the
//! student and the teacher, and for top-k values in every mode. Rows next to
//! a poisoned one stay finite and equal to the oracle's.

use crate::common::{self, for_each_backend, On};
use kdfuse::{
    Backend, Divergence, GradDtype, HostData, KdInputs, KdOutput, Logits, LossSpec, Oracle,
    Reduction, TopkIndices, TopkInputs, TopkMode, TopkTeacher,
};

const N: usize = 3;
/// The poisoned row.
const BAD: usize = 1;

/// Deterministic logits in [−3, 3) (a splitmix64 stream).
fn row_values(seed: usize, v: usize) -> Vec<f32> {
    let mut x = seed as u64;
    (0..v)
        .map(|_| {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            6.0 * ((z >> 40) as f32 / (1u64 << 24) as f32) - 3.0
        })
        .collect()
}

/// Where a special value goes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Pos {
    /// At the row's largest logit of that side.
    Max,
    /// At an ordinary element.
    Elsewhere,
    /// In a column where the other side is −inf.
    Masked,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Side {
    Student,
    Teacher,
}

/// Student and teacher [N, V] with row BAD's special value placed.
fn dense_case(v: usize, side: Side, pos: Pos, value: f32) -> (Vec<f32>, Vec<f32>) {
    let mut s: Vec<f32> = (0..N).flat_map(|r| row_values(2 * r + 1, v)).collect();
    let mut t: Vec<f32> = (0..N).flat_map(|r| row_values(2 * r + 2, v)).collect();
    // The masked column of row BAD: the other side −inf there (a shared
    // vocabulary mask would hide nothing); column 3 is not the maximum.
    let masked = 3;
    match side {
        Side::Student => t[BAD * v + masked] = f32::NEG_INFINITY,
        Side::Teacher => s[BAD * v + masked] = f32::NEG_INFINITY,
    }
    let (x, _) = match side {
        Side::Student => (&mut s, &t),
        Side::Teacher => (&mut t, &s),
    };
    let row = &x[BAD * v..(BAD + 1) * v];
    let j = match pos {
        Pos::Max => (0..v).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap(),
        Pos::Elsewhere => v / 2 + 1,
        Pos::Masked => masked,
    };
    assert!(j != masked || pos == Pos::Masked, "column 3 is the maximum");
    x[BAD * v + j] = value;
    (s, t)
}

fn all_nan(x: &[f32]) -> bool {
    x.iter().all(|g| g.is_nan())
}

fn all_finite(x: &[f32]) -> bool {
    x.iter().all(|g| g.is_finite())
}

/// Relative L2 distance (0 for two zero vectors).
fn rel(a: &[f32], b: &[f32]) -> f64 {
    let (mut n, mut d) = (0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        n += (x as f64 - y as f64).powi(2);
        d += (y as f64).powi(2);
    }
    if d == 0.0 {
        n.sqrt()
    } else {
        (n / d).sqrt()
    }
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    if a.is_nan() || b.is_nan() {
        return a.is_nan() && b.is_nan();
    }
    if a.is_infinite() || b.is_infinite() {
        return a == b;
    }
    (a - b).abs() <= tol * b.abs().max(1e-6)
}

/// Row `r` of an [N, V] gradient.
fn row_of(g: &Option<Vec<f32>>, r: usize, v: usize) -> &[f32] {
    &g.as_ref().expect("gradient")[r * v..(r + 1) * v]
}

/// Row BAD poisoned, the other rows finite and equal to the reference's.
fn assert_poisoned(what: &str, out: &KdOutput, reference: &KdOutput, v: usize, teacher: bool) {
    assert!(
        out.row_losses[BAD].is_nan(),
        "{what}: row loss {}",
        out.row_losses[BAD]
    );
    assert!(
        out.loss.is_nan(),
        "{what}: batch loss {} (NaN dropped)",
        out.loss
    );
    let numbers = |g: &[f32]| g.iter().filter(|x| !x.is_nan()).count();
    let g = row_of(&out.grad, BAD, v);
    assert!(
        all_nan(g),
        "{what}: {} gradient entries not NaN",
        numbers(g)
    );
    if teacher {
        let gt = row_of(&out.grad_teacher, BAD, v);
        assert!(
            all_nan(gt),
            "{what}: {} teacher gradient entries not NaN",
            numbers(gt)
        );
    }
    for r in (0..N).filter(|&r| r != BAD) {
        assert!(
            close(out.row_losses[r], reference.row_losses[r], 1e-4),
            "{what}: row {r}"
        );
        let g = row_of(&out.grad, r, v);
        assert!(all_finite(g), "{what}: row {r} gradient not finite");
        assert!(
            rel(g, row_of(&reference.grad, r, v)) < 1e-4,
            "{what}: row {r} gradient"
        );
    }
}

/// Every backend against the oracle's result for a row BAD that is not
/// poisoned (−inf, or a capped +inf): same infinities, finite values close.
fn assert_matches(what: &str, out: &KdOutput, reference: &KdOutput, v: usize) {
    assert!(!reference.loss.is_nan(), "{what}: oracle loss NaN");
    assert!(
        close(out.loss, reference.loss, 1e-4),
        "{what}: loss {} vs {}",
        out.loss,
        reference.loss
    );
    for r in 0..N {
        assert!(
            close(out.row_losses[r], reference.row_losses[r], 1e-4),
            "{what}: row {r} loss {} vs {}",
            out.row_losses[r],
            reference.row_losses[r]
        );
        // The gradient of an infinite loss is not defined.
        if reference.row_losses[r].is_finite() {
            let g = row_of(&out.grad, r, v);
            assert!(all_finite(g), "{what}: row {r} gradient not finite");
            let e = rel(g, row_of(&reference.grad, r, v));
            assert!(e < 1e-4, "{what}: row {r} gradient error {e:.2e}");
        }
    }
}

fn specs(div: Divergence) -> Vec<(String, LossSpec, bool)> {
    let base = LossSpec {
        divergence: div,
        temperature: 2.0,
        beta: 0.5,
        grad_teacher: true,
        ..Default::default()
    };
    vec![
        ("soft".into(), base.clone(), false),
        (
            "alpha=0.3".into(),
            LossSpec {
                alpha: 0.3,
                ..base.clone()
            },
            true,
        ),
    ]
}

/// Dense f32 inputs [N, V], without labels or row weights.
fn dense<'a>(s: &'a [f32], t: &'a [f32], v: usize) -> KdInputs<'a> {
    common::inputs(s, t, N, v, None)
}

/// The oracle's result (the reference) and `b`'s, with f32 gradients.
fn reference_and(b: &dyn Backend, inputs: &KdInputs, spec: &LossSpec) -> (KdOutput, KdOutput) {
    let run = |b: &dyn Backend| b.compute(inputs, spec, Some(GradDtype::F32)).unwrap();
    (run(&Oracle), run(b))
}

/// The same for a top-k teacher.
fn reference_and_topk(
    b: &dyn Backend,
    inputs: &TopkInputs,
    spec: &LossSpec,
) -> (KdOutput, KdOutput) {
    let run = |b: &dyn Backend| b.compute_topk(inputs, spec, Some(GradDtype::F32)).unwrap();
    (run(&Oracle), run(b))
}

/// The divergence × side × position × value table (dense teacher) on `b`.
fn dense_table(b: &dyn Backend, on: On, v: usize) {
    let labels: Vec<i64> = (0..N as i64).map(|r| (5 * r + 2) % v as i64).collect();
    for div in Divergence::ALL {
        for (sname, spec, with_labels) in specs(div) {
            for side in [Side::Student, Side::Teacher] {
                for pos in [Pos::Max, Pos::Elsewhere, Pos::Masked] {
                    for value in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                        let (s, t) = dense_case(v, side, pos, value);
                        let inputs = KdInputs {
                            labels: with_labels.then_some(&labels[..]),
                            ..dense(&s, &t, v)
                        };
                        let (reference, out) = reference_and(b, &inputs, &spec);
                        let what = format!("{on} {div} {sname} V={v} {side:?} {pos:?} {value}");
                        if value.is_nan() || value == f32::INFINITY {
                            assert_poisoned(&what, &out, &reference, v, true);
                        } else {
                            assert_matches(&what, &out, &reference, v);
                        }
                    }
                }
            }
        }
    }
}

fn dense_nan_and_inf_table_small_rows(b: &dyn Backend, on: On) {
    dense_table(b, on, 37);
}
for_each_backend!(dense_nan_and_inf_table_small_rows(b, on));

/// Many elements per CUDA thread and per host lane (the emulation's spot
/// checks of such rows are below).
fn dense_nan_and_inf_table_long_rows(b: &dyn Backend, on: On) {
    dense_table(b, on, 3001);
}
for_each_backend!([oracle, cpu, cuda] dense_nan_and_inf_table_long_rows(b, on));

/// A lane (thread) whose only elements are NaN and −inf must not lose the
/// NaN in the block merge; spot checks over many threads.
fn dense_long_rows_in_the_kernels(b: &dyn Backend, on: On) {
    let v = 3001;
    for div in Divergence::ALL {
        for (side, pos, value) in [
            (Side::Student, Pos::Masked, f32::NAN),
            (Side::Teacher, Pos::Masked, f32::NAN),
            (Side::Teacher, Pos::Max, f32::INFINITY),
            (Side::Student, Pos::Elsewhere, f32::NAN),
        ] {
            let (s, t) = dense_case(v, side, pos, value);
            let inputs = dense(&s, &t, v);
            let spec = LossSpec {
                divergence: div,
                grad_teacher: true,
                ..Default::default()
            };
            let (reference, out) = reference_and(b, &inputs, &spec);
            let what = format!("{on} {div} {side:?} {pos:?} {value}");
            assert_poisoned(&what, &out, &reference, v, true);
        }
    }
}
for_each_backend!([emu, cuda] dense_long_rows_in_the_kernels(b, on));

/// The single-read kernels (one cluster per row) under the emulation: the
/// table at V = 37 (one CTA), and the spot checks at V = 3001 split over
/// four CTAs of a small emulated device, so that a NaN must cross the
/// cluster's merge through distributed shared memory.
#[test]
fn single_read_kernels_keep_poisoned_rows_nan() {
    use kdfuse::emu::EmuBackend;
    use kdfuse::single_read::{DeviceCaps, KernelChoice, KernelPlan};
    let b = EmuBackend {
        kernel: KernelChoice::SingleRead,
        caps: DeviceCaps {
            compute_capability: (9, 0),
            smem_per_block: 9216,
            smem_per_sm: 4 * (9216 + 1024),
            max_cluster: 16,
        },
        single_threads: 32,
        ..Default::default()
    };
    assert!(matches!(
        b.plan(3001, kdfuse::Dtype::F32).unwrap(),
        KernelPlan::SingleRead { cluster: 4, .. }
    ));
    dense_table(&b, On::Emu, 37);
    dense_long_rows_in_the_kernels(&b, On::Emu);
}

fn every_dtype_and_the_loss_only_path(b: &dyn Backend, on: On) {
    use kdfuse::{Dtype, OwnedData};
    let v = 37;
    let (s, t) = dense_case(v, Side::Teacher, Pos::Elsewhere, f32::NAN);
    for dtype in Dtype::ALL {
        let (sd, td) = (
            OwnedData::from_f32(&s, dtype),
            OwnedData::from_f32(&t, dtype),
        );
        let inputs = common::inputs_of(sd.view(), td.view(), N, v);
        let spec = LossSpec::default();
        let out = b.compute(&inputs, &spec, None).unwrap();
        assert!(
            out.loss.is_nan() && out.row_losses[BAD].is_nan(),
            "{on} {dtype} loss only"
        );
        let out = b.compute(&inputs, &spec, Some(GradDtype::Input)).unwrap();
        assert!(
            all_nan(row_of(&out.grad, BAD, v)),
            "{on} {dtype} gradient in the input dtype"
        );
    }
}
for_each_backend!(every_dtype_and_the_loss_only_path(b, on));

/// Soft-capping maps +inf to the cap (a finite logit): no poison.
fn plus_inf_under_softcap_is_the_cap(b: &dyn Backend, on: On) {
    let v = 37;
    for side in [Side::Student, Side::Teacher] {
        let (s, t) = dense_case(v, side, Pos::Elsewhere, f32::INFINITY);
        let inputs = dense(&s, &t, v);
        // NaN stays NaN through the cap.
        let (s2, t2) = dense_case(v, side, Pos::Elsewhere, f32::NAN);
        let inputs2 = dense(&s2, &t2, v);
        for div in Divergence::ALL {
            let spec = LossSpec {
                divergence: div,
                softcap: Some(5.0),
                ..Default::default()
            };
            let (reference, out) = reference_and(b, &inputs, &spec);
            let (reference2, out2) = reference_and(b, &inputs2, &spec);
            let what = format!("{on} {div} softcap {side:?}");
            assert_matches(&format!("{what} +inf"), &out, &reference, v);
            assert_poisoned(&format!("{what} NaN"), &out2, &reference2, v, false);
        }
    }
}
for_each_backend!(plus_inf_under_softcap_is_the_cap(b, on));

/// The oracle's log-softmax of an all −inf row is NaN: so is the row.
fn an_all_masked_side_is_nan(b: &dyn Backend, on: On) {
    let v = 37;
    for side in [Side::Student, Side::Teacher] {
        let (mut s, mut t) = dense_case(v, side, Pos::Elsewhere, 0.5);
        let x = if side == Side::Student {
            &mut s
        } else {
            &mut t
        };
        x[BAD * v..(BAD + 1) * v].fill(f32::NEG_INFINITY);
        let inputs = dense(&s, &t, v);
        for div in Divergence::ALL {
            let spec = LossSpec {
                divergence: div,
                ..Default::default()
            };
            let (reference, out) = reference_and(b, &inputs, &spec);
            let what = format!("{on} {div} all −inf {side:?}");
            assert_poisoned(&what, &out, &reference, v, false);
        }
    }
}
for_each_backend!(an_all_masked_side_is_nan(b, on));

/// α = 1 (no soft term): the teacher is not used. Ignored rows and rows of
/// weight 0 are not used at all: loss 0, zero gradients, finite batch loss.
fn unused_inputs_do_not_poison(b: &dyn Backend, on: On) {
    let v = 37;
    let labels: Vec<i64> = vec![4, 9, 11];
    let (s, t) = dense_case(v, Side::Teacher, Pos::Elsewhere, f32::NAN);
    let inputs = KdInputs {
        labels: Some(&labels),
        ..dense(&s, &t, v)
    };
    let spec = LossSpec {
        alpha: 1.0,
        grad_teacher: true,
        ..Default::default()
    };
    let out = b.compute(&inputs, &spec, Some(GradDtype::F32)).unwrap();
    assert!(out.loss.is_finite(), "{on}: α = 1 reads no teacher");
    assert!(all_finite(out.grad.as_ref().unwrap()), "{on}");
    for div in Divergence::ALL {
        for side in [Side::Student, Side::Teacher] {
            let (s, t) = dense_case(v, side, Pos::Max, f32::NAN);
            let ignored: Vec<i64> = vec![4, -100, 11];
            let weights = [1.0f32, 0.0, 0.5];
            for (what, labels, row_weights) in [
                ("ignored", Some(&ignored[..]), None),
                ("weight 0", None, Some(&weights[..])),
            ] {
                let inputs = KdInputs {
                    labels,
                    row_weights,
                    ..dense(&s, &t, v)
                };
                let spec = LossSpec {
                    divergence: div,
                    grad_teacher: true,
                    ..Default::default()
                };
                let out = b.compute(&inputs, &spec, Some(GradDtype::F32)).unwrap();
                let w = format!("{on} {div} {side:?} {what}");
                assert_eq!(out.row_losses[BAD], 0.0, "{w}");
                assert!(out.loss.is_finite(), "{w}: {}", out.loss);
                assert!(out.row_losses.iter().all(|l| l.is_finite()), "{w}");
                assert!(row_of(&out.grad, BAD, v).iter().all(|&g| g == 0.0), "{w}");
                assert!(
                    row_of(&out.grad_teacher, BAD, v).iter().all(|&g| g == 0.0),
                    "{w}"
                );
            }
        }
    }
}
for_each_backend!(unused_inputs_do_not_poison(b, on));

fn reduction_none_keeps_the_other_rows(b: &dyn Backend, on: On) {
    let v = 37;
    let (s, t) = dense_case(v, Side::Student, Pos::Elsewhere, f32::NAN);
    let inputs = dense(&s, &t, v);
    for reduction in Reduction::ALL {
        let spec = LossSpec {
            reduction,
            ..Default::default()
        };
        let out = b.compute(&inputs, &spec, Some(GradDtype::F32)).unwrap();
        assert!(out.loss.is_nan(), "{on} {reduction}");
        assert!(out.row_losses[BAD].is_nan(), "{on} {reduction}");
        assert!(out.row_losses[0].is_finite() && out.row_losses[2].is_finite());
    }
}
for_each_backend!(reduction_none_keeps_the_other_rows(b, on));

// ----------------------------------------------------------------- top-k --

/// Where a top-k special value goes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum TopkPos {
    /// The largest value.
    ValueMax,
    /// Another value.
    Value,
    /// The student at a support index.
    StudentOn,
    /// The student off the support.
    StudentOff,
}

struct TopkCase {
    s: Vec<f32>,
    idx: Vec<i64>,
    vals: Vec<f32>,
    k: usize,
}

/// A top-k teacher from a dense one: the k largest entries per row, as
/// log-probs (tail needs them; the other modes take them as logits).
fn topk_case(v: usize, k: usize, pos: TopkPos, value: f32) -> TopkCase {
    let mut s: Vec<f32> = (0..N).flat_map(|r| row_values(2 * r + 1, v)).collect();
    let (mut idx, mut vals) = (Vec::new(), Vec::new());
    for r in 0..N {
        let t = row_values(2 * r + 2, v);
        let m = t.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(x as f64));
        let lse = m + t.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
        let mut order: Vec<usize> = (0..v).collect();
        order.sort_by(|&a, &b| t[b].total_cmp(&t[a]));
        for &j in &order[..k] {
            idx.push(j as i64);
            vals.push((t[j] as f64 - lse) as f32);
        }
    }
    let off = (0..v)
        .find(|j| !idx[BAD * k..(BAD + 1) * k].contains(&(*j as i64)))
        .unwrap();
    match pos {
        TopkPos::ValueMax => vals[BAD * k] = value,
        TopkPos::Value => vals[BAD * k + k - 1] = value,
        TopkPos::StudentOn => s[BAD * v + idx[BAD * k + 1] as usize] = value,
        TopkPos::StudentOff => s[BAD * v + off] = value,
    }
    TopkCase { s, idx, vals, k }
}

fn topk_inputs<'a>(c: &'a TopkCase, v: usize, labels: Option<&'a [i64]>) -> TopkInputs<'a> {
    TopkInputs {
        student: Logits::new(HostData::F32(&c.s), N, v),
        teacher: TopkTeacher {
            indices: TopkIndices::I64(&c.idx),
            values: HostData::F32(&c.vals),
            k: c.k,
        },
        labels,
        row_weights: None,
    }
}

fn topk_nan_and_inf_table(b: &dyn Backend, on: On) {
    // Long rows are left to the emulation's other tests (they take long there).
    let vs: &[usize] = if on == On::Emu { &[41] } else { &[41, 2500] };
    for &v in vs {
        let k = 6;
        let labels: Vec<i64> = (0..N as i64).map(|r| (3 * r + 1) % v as i64).collect();
        for mode in TopkMode::ALL {
            let tail = mode == TopkMode::Tail;
            for alpha in [0.0, 0.4] {
                let spec = LossSpec {
                    topk_mode: mode,
                    temperature: if tail { 1.0 } else { 2.0 },
                    teacher_log_probs: tail,
                    alpha,
                    ..Default::default()
                };
                let lab = (alpha > 0.0).then_some(&labels[..]);
                for pos in [
                    TopkPos::ValueMax,
                    TopkPos::Value,
                    TopkPos::StudentOn,
                    TopkPos::StudentOff,
                ] {
                    for value in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                        let c = topk_case(v, k, pos, value);
                        let inputs = topk_inputs(&c, v, lab);
                        let (reference, out) = reference_and_topk(b, &inputs, &spec);
                        // Support mode with α = 0 never reads the student off
                        // the support.
                        let unused =
                            mode == TopkMode::Support && alpha == 0.0 && pos == TopkPos::StudentOff;
                        let what = format!("{on} topk-{mode} α={alpha} V={v} {pos:?} {value}");
                        if (value.is_nan() || value == f32::INFINITY) && !unused {
                            assert_poisoned(&what, &out, &reference, v, false);
                        } else {
                            assert_matches(&what, &out, &reference, v);
                        }
                    }
                }
            }
        }
    }
}
for_each_backend!(topk_nan_and_inf_table(b, on));

/// No teacher distribution in support and full mode (NaN); an empty support
/// in tail mode (P_tail = 1, finite).
fn topk_all_values_masked(b: &dyn Backend, on: On) {
    let v = 41;
    for mode in TopkMode::ALL {
        let tail = mode == TopkMode::Tail;
        let mut c = topk_case(v, 4, TopkPos::Value, -1.0);
        c.vals[BAD * 4..(BAD + 1) * 4].fill(f32::NEG_INFINITY);
        let inputs = topk_inputs(&c, v, None);
        let spec = LossSpec {
            topk_mode: mode,
            temperature: 1.0,
            teacher_log_probs: tail,
            ..Default::default()
        };
        let (reference, out) = reference_and_topk(b, &inputs, &spec);
        let what = format!("{on} topk-{mode} all values −inf");
        if tail {
            assert_matches(&what, &out, &reference, v);
        } else {
            assert_poisoned(&what, &out, &reference, v, false);
        }
    }
}
for_each_backend!(topk_all_values_masked(b, on));
