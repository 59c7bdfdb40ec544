//! GPU tests of the top-k selection kernel (kernels/topk_select/select.cu),
//! run by tests/gpu.rs's runner: the CPU tests' random sweep on the device
//! (`CudaBackend::select`, outputs poisoned before the launch) against the
//! sort oracle, the teacher-cache shapes (V up to 262144, k up to 4096) in
//! every dtype against the CPU backend, and the raw API on a caller stream.

use kdfuse::cuda::CudaBackend;
use kdfuse::topk_select::check::{compare, sweep, SweepConfig};
use kdfuse::topk_select::cuda::RawSelect;
use kdfuse::topk_select::{select_cpu, SelectSpec};
use kdfuse::{Dtype, HostData, Logits, OwnedData};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

pub fn select_sweep_against_oracle(b: &CudaBackend) {
    let cfg = SweepConfig {
        max_rows: 6,
        max_cols: 20_000,
        big_every: 25,
        big_cols: 262_144 + 5,
    };
    for seed in [41u64, 42] {
        let nan = sweep(500, seed, &cfg, &|l, s| b.select(l, s)).unwrap_or_else(|e| panic!("{e}"));
        println!("seed {seed}: {nan} NaN cases");
    }
}

fn normal(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| scale * <StandardNormal as Distribution<f32>>::sample(&StandardNormal, rng))
        .collect()
}

pub fn select_llm_vocabularies_every_dtype(b: &CudaBackend) {
    let mut rng = StdRng::seed_from_u64(43);
    for v in [32_000usize, 128_256, 151_936, 262_144] {
        let n = 9;
        let x = normal(&mut rng, n * v, 4.0);
        for dtype in [Dtype::F32, Dtype::Bf16, Dtype::F16] {
            let d = OwnedData::from_f32(&x, dtype);
            let l = Logits::new(d.view(), n, v);
            for k in [1, 32, 128, 1024, 4096] {
                let spec = SelectSpec { k, with_lse: true };
                let g = b.select(&l, &spec).unwrap();
                // The CPU backend is itself held to the oracle by the tests.
                let w = select_cpu(&l, &spec).unwrap();
                compare(&l, &g, &w).unwrap_or_else(|e| panic!("V {v} {dtype} k {k}: {e}"));
            }
        }
    }
}

pub fn select_raw_api_on_caller_stream(b: &CudaBackend) {
    use cudarc::driver::DevicePtr;
    let (n, v, k) = (5, 50_000, 64);
    let mut rng = StdRng::seed_from_u64(44);
    let x = normal(&mut rng, n * v, 2.0);
    let stream = b.context().new_stream().unwrap();
    let dx = stream.clone_htod(&x).unwrap();
    let di = stream.alloc_zeros::<i32>(n * k).unwrap();
    let dv = stream.alloc_zeros::<f32>(n * k).unwrap();
    let dl = stream.alloc_zeros::<f32>(n).unwrap();
    let bad = stream.clone_htod(&[u64::MAX]).unwrap();
    let raw = RawSelect {
        dtype: Dtype::F32,
        logits: dx.device_ptr(&stream).0,
        rows: n,
        cols: v,
        stride: v,
        indices: di.device_ptr(&stream).0,
        values: dv.device_ptr(&stream).0,
        lse: dl.device_ptr(&stream).0,
        bad_row: bad.device_ptr(&stream).0,
    };
    let spec = SelectSpec { k, with_lse: true };
    // SAFETY: every buffer above holds what the shapes need.
    unsafe {
        let e = b
            .select_raw(
                &stream,
                &raw,
                &SelectSpec {
                    k: 0,
                    with_lse: true,
                },
            )
            .unwrap_err();
        assert!(e.to_string().contains("`k`"), "{e}");
        b.select_raw(&stream, &raw, &spec).unwrap();
    }
    let l = Logits::new(HostData::F32(&x), n, v);
    let w = select_cpu(&l, &spec).unwrap();
    assert_eq!(stream.clone_dtoh(&bad).unwrap()[0], u64::MAX);
    assert_eq!(stream.clone_dtoh(&di).unwrap(), w.indices);
    assert_eq!(stream.clone_dtoh(&dv).unwrap(), w.values);
    let lse = stream.clone_dtoh(&dl).unwrap();
    for (g, w) in lse.iter().zip(w.lse.unwrap()) {
        assert!((g - w).abs() <= 1e-4 * w.abs().max(1.0), "{g} vs {w}");
    }
}

/// `kdfuse_topk_select_cuda` on the caller's stream: the CPU backend's
/// result, argument errors before anything is enqueued, and a NaN row
/// reported through the device `bad_row` (reset by the call itself).
pub fn select_c_abi_device_entry(b: &CudaBackend) {
    use cudarc::driver::DevicePtr;
    use kdfuse::capi::{
        kdfuse_context_create, kdfuse_context_destroy, kdfuse_last_error, kdfuse_topk_select_cuda,
        KdfuseStatus,
    };
    let (n, v, k) = (4usize, 30_000usize, 32usize);
    let mut rng = StdRng::seed_from_u64(45);
    let mut x = normal(&mut rng, n * v, 2.0);
    let mut ctx = std::ptr::null_mut();
    // SAFETY: a writable out pointer.
    assert_eq!(
        unsafe { kdfuse_context_create(0, &mut ctx) },
        KdfuseStatus::Ok
    );
    let stream = b.context().new_stream().unwrap();
    let run = |x: &[f32], k: i64, bad_init: u64| {
        let dx = stream.clone_htod(x).unwrap();
        let di = stream.alloc_zeros::<i32>(n * 32).unwrap();
        let dv = stream.alloc_zeros::<f32>(n * 32).unwrap();
        let dl = stream.alloc_zeros::<f32>(n).unwrap();
        let bad = stream.clone_htod(&[bad_init]).unwrap();
        // SAFETY: every buffer holds what the shapes need, on this device.
        let st = unsafe {
            kdfuse_topk_select_cuda(
                ctx,
                dx.device_ptr(&stream).0 as *const std::ffi::c_void,
                0,
                n as i64,
                v as i64,
                v as i64,
                k,
                di.device_ptr(&stream).0 as *mut i32,
                dv.device_ptr(&stream).0 as *mut f32,
                dl.device_ptr(&stream).0 as *mut f32,
                bad.device_ptr(&stream).0 as *mut u64,
                stream.cu_stream() as *mut std::ffi::c_void,
            )
        };
        // SAFETY: a NUL-terminated string owned by the library's thread-local.
        let msg = unsafe { std::ffi::CStr::from_ptr(kdfuse_last_error()) }
            .to_string_lossy()
            .into_owned();
        (
            st,
            msg,
            stream.clone_dtoh(&bad).unwrap()[0],
            stream.clone_dtoh(&di).unwrap(),
            stream.clone_dtoh(&dv).unwrap(),
        )
    };
    let (st, msg, bad, _, _) = run(&x, 0, 7);
    assert_eq!(st, KdfuseStatus::InvalidArgument);
    assert!(msg.contains("`k`"), "{msg}");
    assert_eq!(bad, 7, "nothing is enqueued on an argument error");
    let (st, _, bad, idx, val) = run(&x, k as i64, 0);
    assert_eq!(st, KdfuseStatus::Ok);
    assert_eq!(bad, u64::MAX);
    let w = select_cpu(
        &Logits::new(HostData::F32(&x), n, v),
        &SelectSpec { k, with_lse: false },
    )
    .unwrap();
    assert_eq!(idx, w.indices);
    assert_eq!(val, w.values);
    x[2 * v + 11] = f32::NAN;
    x[3 * v] = f32::NAN;
    let (st, _, bad, _, _) = run(&x, k as i64, 0);
    assert_eq!(st, KdfuseStatus::Ok);
    assert_eq!(bad, 2);
    // SAFETY: made by kdfuse_context_create.
    assert_eq!(unsafe { kdfuse_context_destroy(ctx) }, KdfuseStatus::Ok);
}
