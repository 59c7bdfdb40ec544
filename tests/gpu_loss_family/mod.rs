//! GPU tests of the loss-family options, run by tests/gpu.rs's runner: the
//! top-k teacher kernels (kernels/kd_topk.cu) against the oracle at LLM
//! vocabularies and k up to 4096 in every mode, a vocabulary whose bit map
//! needs more than the default 48 KiB of shared memory, the device
//! validation pass, and soft-capping / row weights / the teacher gradient
//! of the fused kernel against the oracle in every divergence.

use kdfuse::check::{run_case, CaseConfig, NegInf, TopkCase};
use kdfuse::cuda::CudaBackend;
use kdfuse::{Divergence, Dtype, GradDtype, KdError, LossSpec, TopkMode};

fn case(
    cols: usize,
    dtype: Dtype,
    spec: LossSpec,
    topk: Option<TopkCase>,
    seed: u64,
) -> CaseConfig {
    CaseConfig {
        rows: 3,
        cols,
        student_pad: (seed % 3) as usize,
        teacher_pad: 0,
        dtype,
        grad_dtype: GradDtype::F32,
        spec,
        labels: true,
        ignore_frac: 0.2,
        neg_inf: NegInf::None,
        scale: 3.0,
        correlation: 0.8,
        seed,
        row_weights: true,
        topk,
    }
}

fn assert_case(b: &CudaBackend, c: &CaseConfig) {
    crate::common::assert_passed!(run_case(b, c).unwrap(), c);
}

pub fn topk_llm_vocabularies_every_mode(b: &CudaBackend) {
    let mut seed = 500;
    for cols in [32_000, 151_936, 262_144, 500_000] {
        for mode in TopkMode::ALL {
            for k in [1, 64, 1024, 4096] {
                seed += 1;
                let tail = mode == TopkMode::Tail;
                let spec = LossSpec {
                    topk_mode: mode,
                    temperature: if tail { 1.0 } else { 2.0 },
                    teacher_log_probs: tail,
                    alpha: 0.2,
                    softcap: (!tail && k == 64).then_some(30.0),
                    ..Default::default()
                };
                let dtype = if k == 1024 { Dtype::F32 } else { Dtype::Bf16 };
                let topk = TopkCase { k, i64: k % 2 == 0 };
                assert_case(b, &case(cols, dtype, spec, Some(topk), seed));
            }
        }
    }
}

/// The top-k kernels forced both ways on the same cases: v1 (`kd_topk_*`)
/// and auto (on sm_90 and later the single-read `kd_single_topk_*`, whose
/// plan is printed), each against the oracle.
pub fn topk_v1_and_single_read(_: &CudaBackend) {
    use kdfuse::single_read::KernelChoice;
    for choice in [KernelChoice::V1, KernelChoice::Auto] {
        let b = CudaBackend::open(0, Some(choice)).unwrap();
        for (i, mode) in TopkMode::ALL.into_iter().enumerate() {
            let cols = [32_000, 128_256, 262_144][i];
            let tail = mode == TopkMode::Tail;
            let spec = LossSpec {
                topk_mode: mode,
                temperature: if tail { 1.0 } else { 2.0 },
                teacher_log_probs: tail,
                alpha: 0.3,
                ..Default::default()
            };
            let plan = b
                .plan_topk_for(&spec, (Dtype::Bf16, Dtype::Bf16), cols)
                .unwrap();
            println!(
                "  top-k {mode} V={cols} --kernel {choice}: {}",
                plan.describe()
            );
            let topk = TopkCase {
                k: 256,
                i64: i % 2 == 0,
            };
            assert_case(
                &b,
                &case(cols, Dtype::Bf16, spec, Some(topk), 900 + i as u64),
            );
        }
    }
}

pub fn options_every_divergence(b: &CudaBackend) {
    for (i, divergence) in Divergence::ALL.into_iter().enumerate() {
        for dtype in Dtype::ALL {
            let spec = LossSpec {
                divergence,
                temperature: 2.0,
                alpha: 0.3,
                softcap: Some(20.0),
                grad_teacher: true,
                ..Default::default()
            };
            assert_case(b, &case(128_256 + i, dtype, spec, None, 700 + i as u64));
        }
    }
}

pub fn topk_validation_pass(b: &CudaBackend) {
    let stream = b.stream().clone();
    let (n, k, v) = (5usize, 8usize, 1000usize);
    let mut idx: Vec<i64> = (0..n * k).map(|i| (i % k) as i64 * 11).collect();
    let check = |idx: &[i64]| -> Result<(), KdError> {
        let d = stream.clone_htod(idx).unwrap();
        let (p, _g) = cudarc::driver::DevicePtr::device_ptr(&d, &stream);
        // SAFETY: n·k int64 on this context.
        unsafe { b.validate_topk_raw(&stream, p, true, n, k, v) }
    };
    check(&idx).unwrap();
    idx[3 * k + 5] = idx[3 * k + 1];
    idx[4 * k] = -3;
    match check(&idx) {
        Err(KdError::InvalidArgument { arg, msg }) => {
            assert_eq!(arg, "teacher_topk_indices");
            assert!(msg.starts_with("row 3:"), "{msg}");
        }
        other => panic!("expected the first bad row, got {other:?}"),
    }
}
