//! `kdfuse_compute_host_f64` (the C ABI's double-precision path, the f64
//! oracle): its loss and gradients against the oracle's backend on the same
//! (fp32-exact) inputs, every option the Python package passes, and the
//! errors that name the field.

use kdfuse::capi::{
    kdfuse_batch_init, kdfuse_compute_host, kdfuse_compute_host_f64, kdfuse_last_error,
    kdfuse_params_default, KdfuseBatch, KdfuseDtype, KdfuseParams, KdfuseReduction, KdfuseStatus,
};
use kdfuse::{Backend, Divergence, GradDtype, HostData, KdInputs, Logits, LossSpec, Oracle};
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

#[derive(Debug)]
struct F64Out {
    loss: f64,
    rows: Vec<f64>,
    grad: Vec<f64>,
    grad_teacher: Vec<f64>,
    valid: i32,
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
    let labels = [1i64, -100, 5, 0];
    let weights32 = [1.0f32, 0.5, 0.0, 2.0];
    let weights64: Vec<f64> = weights32.iter().map(|&w| w as f64).collect();
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
        // The oracle backend rounds its gradients to f32; the f64 path does not.
        for (g, &w) in got.grad.iter().zip(want.grad.as_ref().unwrap()) {
            assert!(
                (g - w as f64).abs() <= 1e-6 * (w.abs() as f64).max(1e-3),
                "{what}"
            );
        }
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
    let p = params(|p| p.temperature = -1.0);
    assert!(run_f64(&p, None, None).unwrap_err().contains("temperature"));
    let p = params(|_| {});
    let e = run_f64(&p, Some(&[0, 1, 6, 2]), None).unwrap_err();
    assert!(e.contains("batch.labels"), "{e}");
    let e = run_f64(&p, None, Some(&[1.0, f64::NAN, 1.0, 1.0])).unwrap_err();
    assert!(e.contains("batch.row_weights"), "{e}");

    let x = [0.0f64; N * V];
    let mut loss = 0.0f64;
    // An f32 batch on the f64 path, and an f64 batch on the f32 path.
    let mut b = batch(KdfuseDtype::F32);
    b.student = x.as_ptr().cast();
    b.teacher = x.as_ptr().cast();
    b.loss = (&mut loss as *mut f64).cast();
    // SAFETY: host buffers of the batch's shape.
    assert_eq!(
        unsafe { kdfuse_compute_host_f64(&b, &p) },
        KdfuseStatus::InvalidArgument
    );
    assert!(last_error().contains("batch.dtype"), "{}", last_error());
    b.dtype = KdfuseDtype::F64 as i32;
    b.grad_dtype = KdfuseDtype::F64 as i32;
    // SAFETY: as above.
    assert_eq!(
        unsafe { kdfuse_compute_host(&b, &p) },
        KdfuseStatus::InvalidArgument
    );
    assert!(
        last_error().contains("kdfuse_compute_host_f64"),
        "{}",
        last_error()
    );
    // A top-k teacher has no f64 path; a misaligned pointer is named.
    let idx = [0i32; N];
    let mut t = b;
    t.teacher = std::ptr::null();
    t.topk_indices = idx.as_ptr().cast();
    t.topk_values = x.as_ptr().cast();
    t.topk_k = 1;
    // SAFETY: as above.
    assert_eq!(
        unsafe { kdfuse_compute_host_f64(&t, &p) },
        KdfuseStatus::InvalidArgument
    );
    assert!(last_error().contains("topk"), "{}", last_error());
    let mut m = b;
    m.student = x.as_ptr().cast::<u8>().wrapping_add(4).cast();
    // SAFETY: the misaligned pointer is refused before any read.
    assert_eq!(
        unsafe { kdfuse_compute_host_f64(&m, &p) },
        KdfuseStatus::InvalidArgument
    );
    assert!(last_error().contains("batch.student"), "{}", last_error());
    // An empty batch: loss +0.
    let mut e = b;
    e.rows = 0;
    loss = f64::NAN;
    e.loss = (&mut loss as *mut f64).cast();
    // SAFETY: nothing is read for N = 0.
    assert_eq!(unsafe { kdfuse_compute_host_f64(&e, &p) }, KdfuseStatus::Ok);
    assert!(loss == 0.0 && loss.is_sign_positive());
}
