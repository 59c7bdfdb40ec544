//! The device chunk loop of `fused_linear` (the one `compute_cuda` runs:
//! uploads, pointer offsets, strides, the accumulation order, the batch's
//! valid count read by every chunk's launch, one reduction) under the CUDA
//! emulation, against `fused_linear::compute` on the oracle. Small problems:
//! the emulation runs every CUDA thread as a std::thread.

mod problem;

use kdfuse::fused_linear::{self, compute_emulated, Chunking, LinearSpec, LinearTeacher};
use kdfuse::tensor::TopkIndices;
use kdfuse::{Divergence, Dtype, LossSpec, Oracle, Reduction, TopkMode};
use problem::{compare, kd, problem, spec, Kind, Problem};

fn check(what: &str, p: &Problem, kind: Kind, dtype: Dtype, spec: &LinearSpec) {
    problem::check(what, p, kind, dtype, spec, &compute_emulated);
}

#[test]
fn linear_teacher_chunkings_f32_and_bf16() {
    let (n, h, v) = (11, 24, 70);
    for dtype in [Dtype::F32, Dtype::Bf16] {
        let p = problem(1, (n, h, v), dtype, true, true, false);
        for chunk in [1, 4, n, 64] {
            check(
                &format!("{dtype} chunk {chunk}"),
                &p,
                Kind::Linear,
                dtype,
                &spec(kd(0.3, Reduction::BatchMean), chunk),
            );
        }
    }
}

#[test]
fn logits_teacher_reductions_and_row_weights() {
    let (n, h, v) = (9, 16, 96);
    let p = problem(2, (n, h, v), Dtype::F32, false, true, true);
    for reduction in [
        Reduction::BatchMean,
        Reduction::Mean,
        Reduction::Sum,
        Reduction::None,
    ] {
        check(
            &format!("{reduction:?}"),
            &p,
            Kind::Logits,
            Dtype::F32,
            &spec(kd(0.5, reduction), 4),
        );
    }
    // No labels: every row counts (N, not the chunk's rows).
    let p = problem(3, (n, h, v), Dtype::F32, true, false, false);
    check(
        "no labels",
        &p,
        Kind::Logits,
        Dtype::F32,
        &spec(kd(0.0, Reduction::BatchMean), 2),
    );
}

#[test]
fn topk_teacher_int32_and_int64() {
    let (n, h, v) = (7, 12, 64);
    for (dtype, i64s) in [(Dtype::F32, false), (Dtype::Bf16, true)] {
        let p = problem(4, (n, h, v), dtype, true, true, false);
        let loss = LossSpec {
            topk_mode: TopkMode::Full,
            ..kd(0.2, Reduction::BatchMean)
        };
        check(
            &format!("topk {dtype} i64 {i64s}"),
            &p,
            Kind::Topk(i64s),
            dtype,
            &spec(loss, 3),
        );
    }
}

#[test]
fn mutual_learning_linear_and_logits() {
    let (n, h, v) = (8, 16, 50);
    let loss = LossSpec {
        divergence: Divergence::Jsd,
        grad_teacher: true,
        ..kd(0.0, Reduction::BatchMean)
    };
    for dtype in [Dtype::F32, Dtype::Bf16] {
        let p = problem(5, (n, h, v), dtype, true, true, false);
        check(
            &format!("mutual linear {dtype}"),
            &p,
            Kind::Linear,
            dtype,
            &spec(loss.clone(), 3),
        );
        check(
            &format!("mutual logits {dtype}"),
            &p,
            Kind::Logits,
            dtype,
            &spec(loss.clone(), 5),
        );
    }
}

#[test]
fn loss_only_and_memory_budget() {
    let (n, h, v) = (10, 8, 40);
    let p = problem(6, (n, h, v), Dtype::F32, true, true, true);
    let s = LinearSpec {
        loss: kd(0.4, Reduction::BatchMean),
        chunking: Chunking::Rows(3),
        grads: false,
    };
    check("loss only", &p, Kind::Linear, Dtype::F32, &s);
    // 3 rows of two f32 logits chunks: 3 · 40 · 4 · 2 bytes.
    let s = LinearSpec {
        loss: kd(0.4, Reduction::BatchMean),
        chunking: Chunking::MemoryBudget(3 * 40 * 4 * 2 + 7),
        grads: true,
    };
    let inputs = p.inputs(Kind::Linear);
    let dev = compute_emulated(&inputs, &s).unwrap();
    assert_eq!(dev.chunk_rows, 3);
    let host = fused_linear::compute(&Oracle, &inputs, &spec(s.loss.clone(), 3)).unwrap();
    compare("budget", &dev, &host, Dtype::F32);
}

/// `device_peak_bytes`: every upload and allocation of the call, counted as
/// `compute_cuda` allocates them; only the chunk buffer depends on the
/// chunking.
#[test]
fn device_peak_bytes_counts_every_buffer() {
    let (n, h, v) = (9, 16, 96);
    let p = problem(10, (n, h, v), Dtype::F32, false, false, false);
    let inputs = p.inputs(Kind::Logits);
    let fixed = n * h * 4 // hidden states
        + v * h * 4 // head
        + n * p.stride * 4 // teacher logits (strided: the whole buffer)
        + n * h * 4 // ∂hidden
        + v * h * 4 // ∂W
        + n * 4 // row losses
        + 16 // loss (4 bytes, allocated as 16)
        + 16; // valid count (likewise)
    let mut peaks = Vec::new();
    for chunk in [4, n] {
        let out = compute_emulated(&inputs, &spec(kd(0.0, Reduction::BatchMean), chunk)).unwrap();
        // One student logits chunk; no teacher chunk (logits), no ones
        // column (no bias).
        assert_eq!(
            out.device_peak_bytes,
            Some(fixed + chunk * v * 4),
            "chunk {chunk}"
        );
        peaks.push(out.device_peak_bytes.unwrap());
    }
    assert_eq!(peaks[1] - peaks[0], (n - 4) * v * 4);
    // The host path does not report one.
    let host = fused_linear::compute(&Oracle, &inputs, &spec(kd(0.0, Reduction::BatchMean), 4));
    assert_eq!(host.unwrap().device_peak_bytes, None);
}

#[test]
fn all_rows_ignored_and_empty_chunks() {
    let (n, h, v) = (5, 8, 33);
    let mut p = problem(7, (n, h, v), Dtype::F32, true, true, false);
    p.labels = Some(vec![-100; n]);
    check(
        "all ignored",
        &p,
        Kind::Linear,
        Dtype::F32,
        &spec(kd(0.5, Reduction::BatchMean), 2),
    );
}

#[test]
fn bad_inputs_are_errors() {
    let p = problem(8, (4, 8, 20), Dtype::F32, false, true, false);
    let inputs = p.inputs(Kind::Linear);
    let e = compute_emulated(&inputs, &spec(kd(0.5, Reduction::BatchMean), 0)).unwrap_err();
    assert!(e.to_string().contains("chunk_rows"), "{e}");
    let mut bad = p.idx32.clone();
    bad[5] = 99;
    let mut inputs = p.inputs(Kind::Topk(false));
    if let LinearTeacher::Topk(t) = &mut inputs.teacher {
        t.indices = TopkIndices::I32(&bad);
    }
    let e = compute_emulated(&inputs, &spec(kd(0.0, Reduction::BatchMean), 2)).unwrap_err();
    assert!(e.to_string().contains("topk_indices"), "{e}");
    let s = LinearSpec {
        chunking: Chunking::MemoryBudget(10),
        ..spec(kd(0.5, Reduction::BatchMean), 1)
    };
    let e = compute_emulated(&p.inputs(Kind::Linear), &s).unwrap_err();
    assert!(e.to_string().contains("memory_budget"), "{e}");
}

#[test]
fn raw_args_are_checked_before_anything_runs() {
    use kdfuse::fused_linear::{check_raw, RawHead, RawHeadGrads, RawLinearArgs, RawTeacher};
    let head = RawHead {
        hidden: 0x100,
        weight: 0x200,
        bias: 0,
        hidden_size: 8,
        weight_rows: 20,
    };
    let good = RawLinearArgs {
        dtype: Dtype::F32,
        rows: 4,
        vocab: 20,
        student: head,
        teacher: RawTeacher::Linear(RawHead {
            weight_rows: 24,
            ..head
        }),
        labels: 0,
        row_weights: 0,
        row_losses: 0x300,
        loss: 0x400,
        valid_rows: 0x500,
        student_grads: Some(RawHeadGrads {
            hidden: 0x600,
            weight: 0x700,
            bias: 0,
        }),
        teacher_grads: None,
        teacher_logits_grad: 0,
    };
    let s = spec(kd(0.0, Reduction::BatchMean), 2);
    check_raw(&good, &s).unwrap();
    let err = |a: RawLinearArgs, s: &LinearSpec, field: &str| {
        let e = check_raw(&a, s).unwrap_err().to_string();
        assert!(e.contains(field), "{field}: {e}");
    };
    err(
        RawLinearArgs {
            valid_rows: 0,
            ..good
        },
        &s,
        "valid_rows",
    );
    err(
        RawLinearArgs {
            student: RawHead { hidden: 0, ..head },
            ..good
        },
        &s,
        "student_hidden",
    );
    err(
        RawLinearArgs {
            teacher: RawTeacher::Linear(RawHead {
                weight_rows: 19,
                ..head
            }),
            ..good
        },
        &s,
        "teacher_weight",
    );
    err(
        RawLinearArgs {
            student: RawHead {
                bias: 0x800,
                ..head
            },
            ..good
        },
        &s,
        "student_grad_bias",
    );
    err(
        RawLinearArgs {
            student_grads: None,
            ..good
        },
        &s,
        "student_grad_hidden",
    );
    err(
        RawLinearArgs {
            teacher: RawTeacher::Topk {
                indices: 0x900,
                indices_i64: false,
                values: 0xa00,
                k: 21,
            },
            ..good
        },
        &s,
        "topk_k",
    );
    let mutual = spec(
        LossSpec {
            grad_teacher: true,
            ..kd(0.0, Reduction::BatchMean)
        },
        2,
    );
    err(good, &mutual, "teacher_grad_hidden");
    err(
        RawLinearArgs {
            teacher: RawTeacher::Logits {
                logits: 0xb00,
                row_stride: 20,
            },
            ..good
        },
        &mutual,
        "teacher_grad_logits",
    );
    err(
        RawLinearArgs {
            teacher: RawTeacher::Logits {
                logits: 0xb00,
                row_stride: 19,
            },
            ..good
        },
        &s,
        "teacher_stride",
    );
}
