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
        let (mut gs, mut gt) = (vec![f32::NAN; n * ls], vec![f32::NAN; n * lt]);
        let (mut rows, mut loss) = (vec![f32::NAN; n], f32::NAN);
        b.student = s.as_ptr().cast();
        b.teacher = t.as_ptr().cast();
        b.grad_student = gs.as_mut_ptr().cast::<c_void>();
        b.grad_teacher = gt.as_mut_ptr().cast::<c_void>();
        b.row_losses = rows.as_mut_ptr().cast::<c_void>();
        b.loss = (&mut loss as *mut f32).cast();
        // SAFETY: host buffers of the batch's shape.
        let st = unsafe { kdfuse_feature_compute_host(&b) };
        assert_eq!(st, KdfuseStatus::Ok, "{kind:?}: {}", last_error());
        assert_eq!(loss, want32.loss as f32, "{kind:?}");
        assert_eq!(gs, want32.grad_student.clone().unwrap(), "{kind:?}");
        assert_eq!(gt, want32.grad_teacher.clone().unwrap(), "{kind:?}");
        for (g, w) in rows.iter().zip(&want32.row_losses) {
            assert_eq!(*g, *w as f32, "{kind:?}");
        }

        // f64 through the struct: the oracle's values.
        let s64: Vec<f64> = s.iter().map(|&x| x as f64).collect();
        let t64: Vec<f64> = t.iter().map(|&x| x as f64).collect();
        let mut b64 = b;
        b64.dtype = KdfuseDtype::F64 as i32;
        b64.grad_dtype = KdfuseDtype::F64 as i32;
        let (mut gs64, mut gt64) = (vec![f64::NAN; n * ls], vec![f64::NAN; n * lt]);
        let (mut rows64, mut loss64) = (vec![f64::NAN; n], f64::NAN);
        b64.student = s64.as_ptr().cast();
        b64.teacher = t64.as_ptr().cast();
        b64.grad_student = gs64.as_mut_ptr().cast::<c_void>();
        b64.grad_teacher = gt64.as_mut_ptr().cast::<c_void>();
        b64.row_losses = rows64.as_mut_ptr().cast::<c_void>();
        b64.loss = (&mut loss64 as *mut f64).cast();
        // SAFETY: host buffers of doubles of the batch's shape.
        let st = unsafe { kdfuse_feature_compute_host(&b64) };
        assert_eq!(st, KdfuseStatus::Ok, "{kind:?}: {}", last_error());
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
    let mut b = base;
    b.kind = 7;
    refused(b, "feature_batch.kind");
    let mut b = base;
    b.eps = 1e-3;
    refused(b, "feature_batch.eps");
    let mut b = base;
    b.student_channels = 2;
    refused(b, "channels");
    let mut b = base;
    b.size -= 8;
    refused(b, "feature_batch.size");
    let mut b = base;
    b.student_stride = 3;
    refused(b, "feature_batch.student_stride");
    let mut b = base;
    b.loss = std::ptr::null_mut();
    refused(b, "feature_batch");
    let mut b = base;
    b.grad_dtype = KdfuseDtype::F64 as i32;
    refused(b, "feature_batch.grad_dtype");
    let mut b = base;
    b.grad_student = s.as_ptr().cast_mut().cast();
    refused(b, "overlap");
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
