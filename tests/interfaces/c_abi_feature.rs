//! The feature losses through the C ABI (`KdfuseFeatureBatch`,
//! `kdfuse_feature_compute_host`): the CPU backend's and the oracle's values
//! through the struct (f32 and f64 buffers, strided rows, attention maps with
//! different channel counts), and the errors that name the field.

use kdfuse::capi::{
    kdfuse_feature_batch_init, kdfuse_feature_compute_cuda, kdfuse_feature_compute_host,
    kdfuse_feature_workspace_len, kdfuse_last_error, KdfuseDtype, KdfuseFeatureBatch,
    KdfuseFeatureKind, KdfuseReduction, KdfuseStatus,
};
use kdfuse::{
    CpuBackend, FeatureBackend, FeatureGrads, FeatureInputs, FeatureKind, FeatureSpec, Features,
    GradDtype, HostData, Oracle, Reduction,
};
use std::ffi::{c_void, CStr};

fn last_error() -> String {
    // SAFETY: the library returns a NUL-terminated thread-local string.
    unsafe { CStr::from_ptr(kdfuse_last_error()) }
        .to_string_lossy()
        .into_owned()
}

fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 29 + seed * 13) % 41) as f32 / 8.0 - 2.5)
        .collect()
}

fn init(kind: KdfuseFeatureKind, rows: i64, width: i64, dtype: KdfuseDtype) -> KdfuseFeatureBatch {
    let mut b = std::mem::MaybeUninit::<KdfuseFeatureBatch>::uninit();
    // SAFETY: writable memory for one struct.
    let st = unsafe {
        kdfuse_feature_batch_init(b.as_mut_ptr(), kind as i32, rows, width, dtype as i32)
    };
    assert_eq!(st, KdfuseStatus::Ok);
    // SAFETY: initialised by the call above.
    unsafe { b.assume_init() }
}

/// The outputs of one `kdfuse_feature_compute_host` call.
struct HostOut<T> {
    gs: Vec<T>,
    gt: Vec<T>,
    rows: Vec<T>,
    loss: T,
}

/// `b` on the inputs `s` and `t` (of `T`, as `b.dtype` says), into output
/// buffers filled with `nan`: (rows, student row length, teacher row length).
fn compute_host<T: Copy>(
    mut b: KdfuseFeatureBatch,
    s: &[T],
    t: &[T],
    (n, ls, lt): (usize, usize, usize),
    nan: T,
) -> HostOut<T> {
    let mut o = HostOut {
        gs: vec![nan; n * ls],
        gt: vec![nan; n * lt],
        rows: vec![nan; n],
        loss: nan,
    };
    b.student = s.as_ptr().cast();
    b.teacher = t.as_ptr().cast();
    b.grad_student = o.gs.as_mut_ptr().cast::<c_void>();
    b.grad_teacher = o.gt.as_mut_ptr().cast::<c_void>();
    b.row_losses = o.rows.as_mut_ptr().cast::<c_void>();
    b.loss = (&mut o.loss as *mut T).cast();
    // SAFETY: host buffers of the batch's shape, in the batch's dtype.
    let st = unsafe { kdfuse_feature_compute_host(&b) };
    assert_eq!(st, KdfuseStatus::Ok, "{}", last_error());
    o
}

/// (kind, rows, C_s, C_t, width, student row stride): the student rows are
/// padded by 3 elements, to test strides.
const CASES: [(KdfuseFeatureKind, FeatureKind, usize, usize, usize, usize); 3] = [
    (KdfuseFeatureKind::Mse, FeatureKind::Mse, 4, 1, 1, 7),
    (KdfuseFeatureKind::Cosine, FeatureKind::Cosine, 3, 1, 1, 5),
    (
        KdfuseFeatureKind::Attention,
        FeatureKind::Attention,
        2,
        3,
        2,
        6,
    ),
];

#[test]
fn host_path_matches_the_backends() {
    for (ckind, kind, n, cs, ct, width) in CASES {
        let (ls, lt) = (cs * width, ct * width);
        let stride = ls + 3;
        let s = values(n * stride, 1);
        let t = values(n * lt, 2);
        let spec = FeatureSpec {
            reduction: Reduction::None,
            grad_scale: 2.0,
            ..FeatureSpec::new(kind)
        };
        let inputs = FeatureInputs {
            student: Features::maps(HostData::F32(&s), n, cs, width).with_row_stride(stride),
            teacher: Features::maps(HostData::F32(&t), n, ct, width),
        };
        let want32 = CpuBackend
            .feature_loss(&inputs, &spec, FeatureGrads::both(GradDtype::F32))
            .unwrap();
        let want64 = Oracle
            .feature_loss(&inputs, &spec, FeatureGrads::both(GradDtype::F32))
            .unwrap();

        // f32 through the struct.
        let mut b = init(ckind, n as i64, width as i64, KdfuseDtype::F32);
        b.reduction = KdfuseReduction::None as i32;
        b.grad_scale = 2.0;
        b.student_channels = cs as i64;
        b.teacher_channels = ct as i64;
        b.student_stride = stride as i64;
        b.teacher_stride = lt as i64;
        b.grad_student_stride = ls as i64;
        b.grad_teacher_stride = lt as i64;
        let got = compute_host(b, &s, &t, (n, ls, lt), f32::NAN);
        assert_eq!(got.loss, want32.loss as f32, "{kind:?}");
        assert_eq!(got.gs, want32.grad_student.clone().unwrap(), "{kind:?}");
        assert_eq!(got.gt, want32.grad_teacher.clone().unwrap(), "{kind:?}");
        for (g, w) in got.rows.iter().zip(&want32.row_losses) {
            assert_eq!(*g, *w as f32, "{kind:?}");
        }

        // f64 through the struct: the oracle's values.
        let s64: Vec<f64> = s.iter().map(|&x| x as f64).collect();
        let t64: Vec<f64> = t.iter().map(|&x| x as f64).collect();
        let mut b64 = b;
        b64.dtype = KdfuseDtype::F64 as i32;
        b64.grad_dtype = KdfuseDtype::F64 as i32;
        let HostOut {
            gs: gs64,
            gt: gt64,
            rows: rows64,
            loss: loss64,
        } = compute_host(b64, &s64, &t64, (n, ls, lt), f64::NAN);
        assert!((loss64 - want64.loss).abs() <= 1e-12 * want64.loss.abs().max(1.0));
        for (g, w) in rows64.iter().zip(&want64.row_losses) {
            assert!((g - w).abs() <= 1e-12 * w.abs().max(1.0), "{kind:?}");
        }
        for (g, &w) in gs64.iter().zip(want64.grad_student.as_ref().unwrap()) {
            assert!(
                (g - w as f64).abs() <= 1e-6 * (w.abs() as f64).max(1e-3),
                "{kind:?}"
            );
        }
        for (g, &w) in gt64.iter().zip(want64.grad_teacher.as_ref().unwrap()) {
            assert!(
                (g - w as f64).abs() <= 1e-6 * (w.abs() as f64).max(1e-3),
                "{kind:?}"
            );
        }
    }
}

#[test]
fn feature_errors_name_the_field() {
    let s = values(8, 1);
    let mut loss = 0.0f32;
    let base = {
        let mut b = init(KdfuseFeatureKind::Mse, 2, 4, KdfuseDtype::F32);
        b.student = s.as_ptr().cast();
        b.teacher = s.as_ptr().cast();
        b.loss = (&mut loss as *mut f32).cast();
        b
    };
    let refused = |b: KdfuseFeatureBatch, field: &str| {
        // SAFETY: host buffers of the batch's shape (or refused before use).
        let st = unsafe { kdfuse_feature_compute_host(&b) };
        assert_eq!(st, KdfuseStatus::InvalidArgument, "{field}");
        let e = last_error();
        assert!(e.contains(field), "{field}: {e}");
    };
    type Change<'a> = &'a dyn Fn(&mut KdfuseFeatureBatch);
    let cases: [(&str, Change); 8] = [
        ("feature_batch.kind", &|b| b.kind = 7),
        ("feature_batch.eps", &|b| b.eps = 1e-3),
        ("channels", &|b| b.student_channels = 2),
        ("feature_batch.size", &|b| b.size -= 8),
        ("feature_batch.student_stride", &|b| b.student_stride = 3),
        ("feature_batch", &|b| b.loss = std::ptr::null_mut()),
        ("feature_batch.grad_dtype", &|b| {
            b.grad_dtype = KdfuseDtype::F64 as i32
        }),
        ("overlap", &|b| {
            b.grad_student = s.as_ptr().cast_mut().cast()
        }),
    ];
    for (field, bad) in cases {
        let mut b = base;
        bad(&mut b);
        refused(b, field);
    }
    // The workspace length: 0 for mse; the CUDA path needs a context.
    let mut len = -1i64;
    // SAFETY: a readable struct and a writable int64.
    assert_eq!(
        unsafe { kdfuse_feature_workspace_len(&base, &mut len) },
        KdfuseStatus::Ok
    );
    assert_eq!(len, 0);
    // SAFETY: a NULL context is refused before anything is read.
    let st = unsafe { kdfuse_feature_compute_cuda(std::ptr::null(), &base, std::ptr::null_mut()) };
    assert_eq!(st, KdfuseStatus::InvalidArgument);
    assert!(last_error().contains("ctx"), "{}", last_error());
}
