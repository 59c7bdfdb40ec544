//! The C entry point `kdfuse_topk_select_host`: the CPU backend's result
//! through raw pointers, and its errors as statuses naming the argument.

use half::bf16;
use kdfuse::capi::{kdfuse_last_error, kdfuse_topk_select_host, KdfuseStatus};
use kdfuse::topk_select::{select_cpu, SelectSpec};
use kdfuse::{HostData, Logits};
use std::ffi::{c_void, CStr};

fn last_error() -> String {
    // SAFETY: a NUL-terminated string owned by the library's thread-local.
    unsafe { CStr::from_ptr(kdfuse_last_error()) }
        .to_string_lossy()
        .into_owned()
}

#[test]
fn strided_bf16_rows_match_the_cpu_backend() {
    let (n, v, stride, k) = (3usize, 1000usize, 1003usize, 17usize);
    let x: Vec<bf16> = (0..n * stride)
        .map(|i| bf16::from_f32(((i * 7919) % 613) as f32 * 0.01))
        .collect();
    let mut idx = vec![-1i32; n * k];
    let mut val = vec![f32::NAN; n * k];
    let mut lse = vec![f32::NAN; n];
    // SAFETY: the buffers hold the sizes passed.
    let st = unsafe {
        kdfuse_topk_select_host(
            x.as_ptr() as *const c_void,
            1,
            n as i64,
            v as i64,
            stride as i64,
            k as i64,
            idx.as_mut_ptr(),
            val.as_mut_ptr(),
            lse.as_mut_ptr(),
        )
    };
    assert_eq!(st, KdfuseStatus::Ok, "{}", last_error());
    let l = Logits::strided(HostData::Bf16(&x), n, v, stride);
    let w = select_cpu(&l, &SelectSpec { k, with_lse: true }).unwrap();
    assert_eq!(idx, w.indices);
    assert_eq!(val, w.values);
    assert_eq!(lse, w.lse.unwrap());
}

#[test]
fn errors_name_the_argument() {
    let x = [1f32, f32::NAN, 3.0, 4.0];
    let mut idx = [0i32; 4];
    let mut val = [0f32; 4];
    let vp = val.as_mut_ptr();
    let call = |dtype: i32, rows: i64, cols: i64, k: i64, idx: *mut i32| {
        // SAFETY: at most 4 elements read and written.
        unsafe {
            kdfuse_topk_select_host(
                x.as_ptr() as *const c_void,
                dtype,
                rows,
                cols,
                cols,
                k,
                idx,
                vp,
                std::ptr::null_mut(),
            )
        }
    };
    for (dtype, rows, cols, k, idx, arg) in [
        (7, 1, 4, 1, idx.as_mut_ptr(), "`dtype`"),
        (0, -1, 4, 1, idx.as_mut_ptr(), "`rows`"),
        (0, 1, 4, 0, idx.as_mut_ptr(), "`k`"),
        (0, 1, 4, 5, idx.as_mut_ptr(), "`k`"),
        (0, 1, 4, 1, std::ptr::null_mut(), "`indices`"),
        (0, 2, 2, 1, idx.as_mut_ptr(), "row 0 contains NaN"),
    ] {
        let st = call(dtype, rows, cols, k, idx);
        assert_eq!(st, KdfuseStatus::InvalidArgument);
        let e = last_error();
        assert!(e.contains(arg), "{arg}: {e}");
    }
}

/// The device entry point checks its context first: a NULL one is refused,
/// naming `ctx`, before any other argument is read or anything enqueued.
#[test]
fn cuda_entry_refuses_a_null_context() {
    let null = std::ptr::null_mut();
    // SAFETY: a NULL context is refused before any pointer is used.
    let st = unsafe {
        kdfuse::capi::kdfuse_topk_select_cuda(
            std::ptr::null(),
            null,
            0,
            2,
            8,
            8,
            3,
            null.cast(),
            null.cast(),
            null.cast(),
            null.cast(),
            null,
        )
    };
    assert_eq!(st, KdfuseStatus::InvalidArgument);
    assert!(last_error().contains("ctx"), "{}", last_error());
}
