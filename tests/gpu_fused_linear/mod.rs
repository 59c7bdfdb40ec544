//! GPU tests of the fused linear + distillation loss on the device
//! (`fused_linear::compute_cuda`: cuBLAS GEMMs and the fused kernels in the
//! device chunk loop), run by tests/gpu.rs's runner, against the host path
//! on the oracle (`fused_linear::compute(&Oracle, …)`): f32 and bf16, chunks
//! of 1 row, N rows and a size that does not divide N, the memory budget,
//! every teacher kind, mutual learning; the raw entry on a caller stream.
//! The same problems run under the emulation in tests/fused_linear_device/.

#[path = "../fused_linear_device/problem.rs"]
mod problem;

use kdfuse::cuda::CudaBackend;
use kdfuse::fused_linear::{compute_cuda, Chunking, LinearInputs, LinearSpec};
use kdfuse::{Divergence, Dtype, LossSpec, Reduction, TopkMode};
use problem::{check, kd, problem, spec, Kind};

pub fn fused_linear_chunkings_f32_bf16(b: &CudaBackend) {
    let device = |i: &LinearInputs, s: &LinearSpec| compute_cuda(b, i, s);
    for (n, h, v) in [(13, 64, 1000), (40, 256, 32_000)] {
        for dtype in [Dtype::F32, Dtype::Bf16] {
            let p = problem(11, (n, h, v), dtype, true, true, true);
            for chunk in [1, n, 6] {
                for kind in [Kind::Linear, Kind::Logits] {
                    check(
                        &format!("N {n} V {v} {dtype} chunk {chunk} {kind:?}"),
                        &p,
                        kind,
                        dtype,
                        &spec(kd(0.3, Reduction::BatchMean), chunk),
                        &device,
                    );
                }
            }
        }
    }
}

pub fn fused_linear_topk_mutual_budget(b: &CudaBackend) {
    let device = |i: &LinearInputs, s: &LinearSpec| compute_cuda(b, i, s);
    let (n, h, v) = (17, 128, 5000);
    for dtype in [Dtype::F32, Dtype::Bf16] {
        let p = problem(12, (n, h, v), dtype, true, true, false);
        for i64s in [false, true] {
            let loss = LossSpec {
                topk_mode: TopkMode::Full,
                ..kd(0.2, Reduction::Mean)
            };
            check(
                &format!("top-k {dtype} i64 {i64s}"),
                &p,
                Kind::Topk(i64s),
                dtype,
                &spec(loss, 5),
                &device,
            );
        }
        let mutual = LossSpec {
            divergence: Divergence::Jsd,
            grad_teacher: true,
            ..kd(0.0, Reduction::BatchMean)
        };
        for kind in [Kind::Linear, Kind::Logits] {
            check(
                &format!("mutual {dtype} {kind:?}"),
                &p,
                kind,
                dtype,
                &spec(mutual.clone(), 4),
                &device,
            );
        }
        // A budget of 3 rows of two logits chunks.
        let budget = LinearSpec {
            chunking: Chunking::MemoryBudget(3 * v * dtype.size() * 2),
            ..spec(kd(0.5, Reduction::Sum), 1)
        };
        let out = compute_cuda(b, &p.inputs(Kind::Linear), &budget).unwrap();
        assert_eq!(out.chunk_rows, 3);
        check(
            &format!("budget {dtype}"),
            &p,
            Kind::Linear,
            dtype,
            &spec(kd(0.5, Reduction::Sum), 3),
            &device,
        );
    }
}
