//! `kdfuse_compute_host_f64` and `kdfuse_compute_topk_host_f64` (the C
//! ABI's double-precision paths, the f64 oracle): their loss and gradients
//! against the oracle's backend on the same (fp32-exact) inputs, every
//! option the Python package passes, and the errors that name the field.

use crate::common::topk_inputs;
use kdfuse::capi::{
    kdfuse_batch_init, kdfuse_compute_host, kdfuse_compute_host_f64, kdfuse_compute_topk_host_f64,
    kdfuse_last_error, kdfuse_params_default, KdfuseBatch, KdfuseDtype, KdfuseParams,
    KdfuseReduction, KdfuseStatus, KdfuseTopkMode,
};
use kdfuse::{
    Backend, Divergence, GradDtype, HostData, KdInputs, KdOutput, Logits, LossSpec, Oracle,
    TopkIndices, TopkInputs, TopkMode,
};
use std::ffi::{c_void, CStr};

const N: usize = 4;
const V: usize = 6;

fn data(seed: u32) -> Vec<f32> {
    // Small fp32-exact values: k/8 for k in [-24, 24].
    (0..N * V)
        .map(|i| ((i as u32 * 37 + seed * 11) % 49) as f32 / 8.0 - 3.0)
        .collect()
}

fn last_error() -> String {
    // SAFETY: the library returns a NUL-terminated thread-local string.
    unsafe { CStr::from_ptr(kdfuse_last_error()) }
        .to_string_lossy()
        .into_owned()
}

fn params(f: impl FnOnce(&mut KdfuseParams)) -> KdfuseParams {
    let mut p = std::mem::MaybeUninit::<KdfuseParams>::uninit();
    // SAFETY: writable memory for one struct.
    assert_eq!(
        unsafe { kdfuse_params_default(p.as_mut_ptr()) },
        KdfuseStatus::Ok
    );
    // SAFETY: initialised by the call above.
    let mut p = unsafe { p.assume_init() };
    f(&mut p);
    p
}

fn batch(dtype: KdfuseDtype) -> KdfuseBatch {
    let mut b = std::mem::MaybeUninit::<KdfuseBatch>::uninit();
    // SAFETY: writable memory for one struct.
    assert_eq!(
        unsafe { kdfuse_batch_init(b.as_mut_ptr(), N as i64, V as i64, KdfuseDtype::F32 as i32) },
        KdfuseStatus::Ok
    );
    // SAFETY: initialised by the call above.
    let mut b = unsafe { b.assume_init() };
    b.dtype = dtype as i32;
    b.grad_dtype = dtype as i32;
    b
}

/// The labels and row weights of the cases with labels.
const LABELS: [i64; N] = [1, -100, 5, 0];
const WEIGHTS: [f32; N] = [1.0, 0.5, 0.0, 2.0];

fn weights64() -> Vec<f64> {
    WEIGHTS.iter().map(|&w| w as f64).collect()
}

#[derive(Debug)]
struct F64Out {
    loss: f64,
    rows: Vec<f64>,
    grad: Vec<f64>,
    grad_teacher: Vec<f64>,
    valid: i32,
}

/// The f64 path's loss, valid-row count, row losses and gradient against
/// the oracle's (which rounds its gradient to f32; the f64 path does not).
fn assert_matches_oracle(got: &F64Out, want: &KdOutput, what: &str) {
    assert!(
        (got.loss - want.loss).abs() <= 1e-12 * want.loss.abs().max(1.0),
        "{what}: {} vs {}",
        got.loss,
        want.loss
    );
    assert_eq!(got.valid as usize, want.valid_rows, "{what}");
    for (g, w) in got.rows.iter().zip(&want.row_losses) {
        assert!(
            (g - w).abs() <= 1e-12 * w.abs().max(1.0),
            "{what}: {g} vs {w}"
        );
    }
    for (g, &w) in got.grad.iter().zip(want.grad.as_ref().unwrap()) {
        assert!(
            (g - w as f64).abs() <= 1e-6 * (w.abs() as f64).max(1e-3),
            "{what}: {g} vs {w}"
        );
    }
}

fn run_f64(
    p: &KdfuseParams,
    labels: Option<&[i64]>,
    weights: Option<&[f64]>,
) -> Result<F64Out, String> {
    let s: Vec<f64> = data(1).iter().map(|&x| x as f64).collect();
    let t: Vec<f64> = data(2).iter().map(|&x| x as f64).collect();
    let mut out = F64Out {
        loss: f64::NAN,
        rows: vec![f64::NAN; N],
        grad: vec![f64::NAN; N * V],
        grad_teacher: vec![f64::NAN; N * V],
        valid: -1,
    };
    let mut b = batch(KdfuseDtype::F64);
    b.student = s.as_ptr().cast();
    b.teacher = t.as_ptr().cast();
    b.labels = labels.map_or(std::ptr::null(), |l| l.as_ptr());
    b.row_weights = weights.map_or(std::ptr::null(), |w| w.as_ptr().cast());
    b.grad = out.grad.as_mut_ptr().cast::<c_void>();
    if p.grad_teacher != 0 {
        b.grad_teacher = out.grad_teacher.as_mut_ptr().cast::<c_void>();
    }
    b.row_losses = out.rows.as_mut_ptr().cast();
    b.loss = (&mut out.loss as *mut f64).cast();
    b.valid_rows = &mut out.valid;
    // SAFETY: every buffer above is host memory of the batch's shape, in doubles.
    match unsafe { kdfuse_compute_host_f64(&b, p) } {
        KdfuseStatus::Ok => Ok(out),
        _ => Err(last_error()),
    }
}

#[test]
fn f64_path_matches_the_oracle_backend() {
    let s = data(1);
    let t = data(2);
    let (labels, weights32, weights64) = (LABELS, WEIGHTS, weights64());
    let cases: Vec<(KdfuseParams, LossSpec, bool)> = vec![
        (params(|_| {}), LossSpec::default(), false),
        (
            params(|p| {
                p.divergence = 2;
                p.beta = 0.3;
                p.temperature = 2.0;
                p.alpha = 0.4;
                p.reduction = KdfuseReduction::Mean as i32;
                p.grad_teacher = 1;
            }),
            LossSpec {
                divergence: Divergence::Jsd,
                beta: 0.3,
                temperature: 2.0,
                alpha: 0.4,
                reduction: kdfuse::Reduction::Mean,
                grad_teacher: true,
                ..Default::default()
            },
            true,
        ),
        (
            params(|p| {
                p.divergence = 1;
                p.softcap = 2.5;
                p.reduction = KdfuseReduction::None as i32;
                p.t2_scaling = 0;
                p.grad_scale = 3.0;
                p.temperature = 1.5;
            }),
            LossSpec {
                divergence: Divergence::ReverseKl,
                softcap: Some(2.5),
                reduction: kdfuse::Reduction::None,
                t2_scaling: false,
                grad_scale: 3.0,
                temperature: 1.5,
                ..Default::default()
            },
            true,
        ),
    ];
    for (p, spec, with_labels) in cases {
        let lab = with_labels.then_some(&labels[..]);
        let got = run_f64(&p, lab, with_labels.then_some(&weights64[..])).unwrap();
        let inputs = KdInputs {
            student: Logits::new(HostData::F32(&s), N, V),
            teacher: Logits::new(HostData::F32(&t), N, V),
            labels: lab,
            row_weights: with_labels.then_some(&weights32[..]),
        };
        let want = Oracle
            .compute(&inputs, &spec, Some(GradDtype::F32))
            .unwrap();
        let what = format!("{spec:?}");
        assert_matches_oracle(&got, &want, &what);
        if let Some(wt) = want.grad_teacher {
            for (g, &w) in got.grad_teacher.iter().zip(&wt) {
                assert!(
                    (g - w as f64).abs() <= 1e-6 * (w.abs() as f64).max(1e-3),
                    "{what}"
                );
            }
        }
    }
}

#[test]
fn f64_path_errors_name_the_field() {
    let p = params(|_| {});
    for (needle, p, labels, weights) in [
        ("temperature", params(|p| p.temperature = -1.0), None, None),
        ("batch.labels", p, Some(&[0, 1, 6, 2][..]), None),
        (
            "batch.row_weights",
            p,
            None,
            Some(&[1.0, f64::NAN, 1.0, 1.0][..]),
        ),
    ] {
        let e = run_f64(&p, labels, weights).unwrap_err();
        assert!(e.contains(needle), "{e}");
    }

    let x = [0.0f64; N * V];
    let mut loss = 0.0f64;
    // An f32 batch on the f64 path, and an f64 batch on the f32 path; a
    // top-k teacher has no f64 path; a misaligned pointer is named.
    let mut b = batch(KdfuseDtype::F32);
    b.student = x.as_ptr().cast();
    b.teacher = x.as_ptr().cast();
    b.loss = (&mut loss as *mut f64).cast();
    let mut b64 = b;
    b64.dtype = KdfuseDtype::F64 as i32;
    b64.grad_dtype = KdfuseDtype::F64 as i32;
    let idx = [0i32; N];
    let mut t = b64;
    t.teacher = std::ptr::null();
    t.topk_indices = idx.as_ptr().cast();
    t.topk_values = x.as_ptr().cast();
    t.topk_k = 1;
    let mut m = b64;
    m.student = x.as_ptr().cast::<u8>().wrapping_add(4).cast();
    type Entry = unsafe extern "C" fn(*const KdfuseBatch, *const KdfuseParams) -> KdfuseStatus;
    let (host, host_f64): (Entry, Entry) = (kdfuse_compute_host, kdfuse_compute_host_f64);
    for (batch, entry, needle) in [
        (b, host_f64, "batch.dtype"),
        (b64, host, "kdfuse_compute_host_f64"),
        (t, host_f64, "topk"),
        (m, host_f64, "batch.student"),
    ] {
        // SAFETY: host buffers of the batch's shape; the misaligned pointer
        // is refused before any read.
        assert_eq!(
            unsafe { entry(&batch, &p) },
            KdfuseStatus::InvalidArgument,
            "{needle}"
        );
        assert!(last_error().contains(needle), "{}", last_error());
    }
    let b = b64;
    // An empty batch: loss +0.
    let mut e = b;
    e.rows = 0;
    loss = f64::NAN;
    e.loss = (&mut loss as *mut f64).cast();
    // SAFETY: nothing is read for N = 0.
    assert_eq!(unsafe { kdfuse_compute_host_f64(&e, &p) }, KdfuseStatus::Ok);
    assert!(loss == 0.0 && loss.is_sign_positive());
}

const K: usize = 3;

/// A change to a good batch.
type Change<'a> = &'a dyn Fn(&mut KdfuseBatch);

/// Distinct top-k indices per row (int32), in [0, V).
fn topk_indices() -> Vec<i32> {
    (0..N)
        .flat_map(|r| (0..K).map(move |i| ((r + 2 * i) % V) as i32))
        .collect()
}

/// Top-k values: fp32-exact logits, or (for the tail mode) fp32-exact
/// log-probs whose mass stays below 1 (ln(1/8) each).
fn topk_values(log_probs: bool) -> Vec<f32> {
    if log_probs {
        return (0..N * K).map(|i| -2.0 - (i % 4) as f32 / 8.0).collect();
    }
    data(3)[..N * K].to_vec()
}

fn run_topk_f64(b: &mut KdfuseBatch, p: &KdfuseParams, out: &mut F64Out) -> Result<(), String> {
    b.grad = out.grad.as_mut_ptr().cast::<c_void>();
    b.row_losses = out.rows.as_mut_ptr().cast();
    b.loss = (&mut out.loss as *mut f64).cast();
    b.valid_rows = &mut out.valid;
    // SAFETY: every buffer the caller set is host memory of the batch's
    // shape, in doubles; the outputs are set above.
    match unsafe { kdfuse_compute_topk_host_f64(b, p) } {
        KdfuseStatus::Ok => Ok(()),
        _ => Err(last_error()),
    }
}

fn f64_out() -> F64Out {
    F64Out {
        loss: f64::NAN,
        rows: vec![f64::NAN; N],
        grad: vec![f64::NAN; N * V],
        grad_teacher: Vec::new(),
        valid: -1,
    }
}

#[test]
fn topk_f64_path_matches_the_oracle_backend() {
    let s = data(1);
    let s64: Vec<f64> = s.iter().map(|&x| x as f64).collect();
    let idx = topk_indices();
    let (labels, weights32, weights64) = (LABELS, WEIGHTS, weights64());
    let cases: Vec<(KdfuseParams, LossSpec, bool)> = vec![
        (params(|_| {}), LossSpec::default(), false),
        (
            params(|p| {
                p.topk_mode = KdfuseTopkMode::Support as i32;
                p.temperature = 2.0;
                p.alpha = 0.4;
                p.reduction = KdfuseReduction::Mean as i32;
                p.softcap = 2.5;
            }),
            LossSpec {
                topk_mode: TopkMode::Support,
                temperature: 2.0,
                alpha: 0.4,
                reduction: kdfuse::Reduction::Mean,
                softcap: Some(2.5),
                ..Default::default()
            },
            true,
        ),
        (
            params(|p| {
                p.topk_mode = KdfuseTopkMode::Tail as i32;
                p.teacher_log_probs = 1;
                p.reduction = KdfuseReduction::None as i32;
                p.grad_scale = 3.0;
            }),
            LossSpec {
                topk_mode: TopkMode::Tail,
                teacher_log_probs: true,
                reduction: kdfuse::Reduction::None,
                grad_scale: 3.0,
                ..Default::default()
            },
            true,
        ),
    ];
    for (p, spec, with_labels) in cases {
        let vals = topk_values(spec.teacher_log_probs);
        let vals64: Vec<f64> = vals.iter().map(|&x| x as f64).collect();
        let lab = with_labels.then_some(&labels[..]);
        let mut b = batch(KdfuseDtype::F64);
        b.student = s64.as_ptr().cast();
        b.topk_indices = idx.as_ptr().cast();
        b.topk_values = vals64.as_ptr().cast();
        b.topk_k = K as i64;
        b.labels = lab.map_or(std::ptr::null(), |l| l.as_ptr());
        if with_labels {
            b.row_weights = weights64.as_ptr().cast();
        }
        let mut got = f64_out();
        run_topk_f64(&mut b, &p, &mut got).unwrap();
        let inputs = TopkInputs {
            row_weights: with_labels.then_some(&weights32[..]),
            ..topk_inputs(&s, N, V, TopkIndices::I32(&idx), &vals, K, lab)
        };
        let want = Oracle
            .compute_topk(&inputs, &spec, Some(GradDtype::F32))
            .unwrap();
        assert_matches_oracle(&got, &want, &format!("{spec:?}"));
    }
}

#[test]
fn topk_f64_path_errors_name_the_field() {
    let s: Vec<f64> = data(1).iter().map(|&x| x as f64).collect();
    let idx = topk_indices();
    let idx64: Vec<i64> = idx.iter().map(|&i| i as i64).collect();
    let vals: Vec<f64> = topk_values(false).iter().map(|&x| x as f64).collect();
    let p = params(|_| {});
    let good = || {
        let mut b = batch(KdfuseDtype::F64);
        b.student = s.as_ptr().cast();
        b.topk_indices = idx.as_ptr().cast();
        b.topk_values = vals.as_ptr().cast();
        b.topk_k = K as i64;
        b
    };
    let err = |b: &mut KdfuseBatch, p: &KdfuseParams| {
        let mut out = f64_out();
        run_topk_f64(b, p, &mut out).unwrap_err()
    };
    // The good batch works, with int64 indices too.
    let mut out = f64_out();
    run_topk_f64(&mut good(), &p, &mut out).unwrap();
    let mut b = good();
    b.topk_indices = idx64.as_ptr().cast();
    b.topk_index_dtype = 1;
    let mut out64 = f64_out();
    run_topk_f64(&mut b, &p, &mut out64).unwrap();
    assert_eq!(out.loss, out64.loss);

    let mut out_of_range = idx.clone();
    out_of_range[K + 1] = V as i32;
    let mut twice = idx.clone();
    twice[K + 1] = twice[K];
    let mut g = vec![0.0f64; N * V];
    let g = g.as_mut_ptr();
    let labels = [0i64, 1, 6, 2];
    let w = [1.0f64, f64::INFINITY, 1.0, 1.0];
    let keep: Change = &|_| {};
    let cases: [(&[&str], Change, KdfuseParams); 14] = [
        // A dense teacher (no indices), an f32 batch, a bad or repeated index.
        (
            &["batch.topk_indices", "kdfuse_compute_host_f64"],
            &|b| {
                b.topk_indices = std::ptr::null();
                b.topk_values = std::ptr::null();
                b.teacher = s.as_ptr().cast();
            },
            p,
        ),
        (
            &["batch.dtype", "kdfuse_compute_topk_host_f64"],
            &|b| b.dtype = KdfuseDtype::F32 as i32,
            p,
        ),
        (
            &["batch.topk_indices", "row 1"],
            &|b| b.topk_indices = out_of_range.as_ptr().cast(),
            p,
        ),
        (
            &["batch.topk_indices", "twice"],
            &|b| b.topk_indices = twice.as_ptr().cast(),
            p,
        ),
        // k out of range, another divergence, the tail mode without log-probs.
        (&["batch.topk_k"], &|b| b.topk_k = V as i64 + 1, p),
        (&["divergence"], keep, params(|p| p.divergence = 2)),
        (
            &["topk_mode"],
            keep,
            params(|p| p.topk_mode = KdfuseTopkMode::Tail as i32),
        ),
        // A teacher gradient, a dense teacher beside the top-k one.
        (&["grad_teacher"], keep, params(|p| p.grad_teacher = 1)),
        (&["batch.grad_teacher"], &|b| b.grad_teacher = g.cast(), p),
        (&["batch.teacher"], &|b| b.teacher = s.as_ptr().cast(), p),
        // Misaligned values and indices are refused before any read.
        (
            &["batch.topk_values"],
            &|b| b.topk_values = vals.as_ptr().cast::<u8>().wrapping_add(4).cast(),
            p,
        ),
        (
            &["batch.topk_indices"],
            &|b| {
                b.topk_indices = idx64.as_ptr().cast::<u8>().wrapping_add(4).cast();
                b.topk_index_dtype = 1;
            },
            p,
        ),
        // Bad labels and row weights, as on the dense path.
        (&["batch.labels"], &|b| b.labels = labels.as_ptr(), p),
        (
            &["batch.row_weights"],
            &|b| b.row_weights = w.as_ptr().cast(),
            p,
        ),
    ];
    for (needles, bad, p) in cases {
        let mut b = good();
        bad(&mut b);
        let e = err(&mut b, &p);
        for needle in needles {
            assert!(e.contains(needle), "{needles:?}: {e}");
        }
    }
    // An empty batch: loss +0.
    let mut b = good();
    b.rows = 0;
    let mut out = f64_out();
    run_topk_f64(&mut b, &p, &mut out).unwrap();
    assert!(out.loss == 0.0 && out.loss.is_sign_positive());
}
