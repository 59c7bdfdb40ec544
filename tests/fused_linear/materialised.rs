//! The chunked loss equals the loss of the materialised logits: per backend,
//! the fused path against one call of the same backend on the whole batch's
//! logits (so any difference is the chunking's), and the oracle's fused
//! path against the oracle at the tolerances of docs/DESIGN.md §3.

use crate::case::{f64s, reference, rel_l2, Case, TeacherKind};
use kdfuse::emu::EmuBackend;
use kdfuse::fused_linear::{self, Chunking, LinearOutput, TeacherGrads};
use kdfuse::{Backend, CpuBackend, Dtype, Oracle, Precision};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Tolerance of a chunked result against the same backend unchunked: the
/// same row arithmetic, the head gradients summed in another order (fp32
/// GEMM against f64 sums).
const SAME_BACKEND: f64 = 1e-5;

fn check(case: &Case, backend: &dyn Backend, what: &str) -> LinearOutput {
    let out = fused_linear::compute(backend, &case.inputs(), &case.linear_spec())
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let r = reference(case, backend).unwrap_or_else(|e| panic!("{what}: reference: {e}"));
    let ctx = || format!("{what}: {case:?}");
    // The host path allocates no device memory.
    assert_eq!(out.device_peak_bytes, None, "host path: {}", ctx());
    let floor = 1e-6;
    let e = rel_l2(&out.row_losses, &r.row_losses, floor);
    assert!(e <= SAME_BACKEND, "row losses off by {e:e}: {}", ctx());
    let e = rel_l2(&[out.loss], &[r.loss], floor);
    assert!(
        e <= SAME_BACKEND,
        "loss {} vs {} ({e:e}): {}",
        out.loss,
        r.loss,
        ctx()
    );
    let s = out.student.as_ref().expect("student gradients");
    let (gh, gw, gb) = &r.student;
    for (name, x, rf) in [("hidden", &s.hidden, gh), ("weight", &s.weight, gw)] {
        let e = rel_l2(&f64s(x), rf, 1e-7);
        assert!(e <= SAME_BACKEND, "∂{name} off by {e:e}: {}", ctx());
    }
    match (&s.bias, case.bias.is_some()) {
        (Some(b), true) => {
            let e = rel_l2(&f64s(b), gb, 1e-7);
            assert!(e <= SAME_BACKEND, "∂bias off by {e:e}: {}", ctx());
        }
        (None, false) => {}
        (b, _) => panic!("bias gradient {b:?} for bias {:?}", case.bias.is_some()),
    }
    match (&out.teacher, &r.teacher_head, &r.teacher_logits) {
        (None, None, None) => {}
        (Some(TeacherGrads::Linear(t)), Some((gh, gw, gb)), None) => {
            for (name, x, rf) in [
                ("teacher hidden", &t.hidden, gh),
                ("teacher weight", &t.weight, gw),
            ] {
                let e = rel_l2(&f64s(x), rf, 1e-7);
                assert!(e <= SAME_BACKEND, "∂{name} off by {e:e}: {}", ctx());
            }
            if let Some(b) = &t.bias {
                let e = rel_l2(&f64s(b), gb, 1e-7);
                assert!(e <= SAME_BACKEND, "∂teacher bias off by {e:e}: {}", ctx());
            }
        }
        (Some(TeacherGrads::Logits(g)), None, Some(rf)) => {
            let e = rel_l2(&f64s(g), &f64s(rf), 1e-7);
            assert!(e <= SAME_BACKEND, "∂teacher logits off by {e:e}: {}", ctx());
        }
        (o, h, l) => panic!(
            "teacher gradients {:?} vs reference {:?}/{:?}: {}",
            o.is_some(),
            h.is_some(),
            l.is_some(),
            ctx()
        ),
    }
    out
}

/// A random case of at most `max_n` rows and `max_v` columns, sometimes
/// with mutual learning (a dense teacher and the exact kernels).
fn draw(rng: &mut StdRng, max_n: usize, max_v: usize, dtype: Dtype) -> Case {
    let n = rng.random_range(0..=max_n);
    let h = [1, 3, 8, 13, 24, 40][rng.random_range(0..6)];
    let v = rng.random_range(1..=max_v);
    let mut case = Case::random(rng.random(), n, h, v, dtype);
    if case.teacher != TeacherKind::Linear && !matches!(case.teacher, TeacherKind::Logits) {
        return case;
    }
    if rng.random_bool(0.3) {
        case.spec.grad_teacher = true;
    }
    case
}

#[test]
fn oracle_chunked_equals_oracle_materialised() {
    let mut rng = StdRng::seed_from_u64(11);
    for i in 0..300 {
        let dtype = [Dtype::F32, Dtype::Bf16, Dtype::F16][i % 3];
        let case = draw(&mut rng, 11, 70, dtype);
        check(&case, &Oracle, "oracle");
    }
}

#[test]
fn cpu_chunked_equals_cpu_materialised() {
    let mut rng = StdRng::seed_from_u64(12);
    for i in 0..400 {
        let dtype = [Dtype::F32, Dtype::Bf16, Dtype::F16][i % 3];
        let mut case = draw(&mut rng, 13, 600, dtype);
        if i % 2 == 1 {
            case.spec.precision = Precision::Exact;
        }
        check(&case, &CpuBackend, "cpu");
    }
}

#[test]
fn cpu_chunked_large_rows() {
    // Rows far above a block, and fewer rows than threads in a chunk (the
    // CPU backend then splits a row's segments).
    let mut rng = StdRng::seed_from_u64(13);
    for (i, v) in [5000, 40_000, 70_001].into_iter().enumerate() {
        let mut case = Case::random(rng.random(), 5, 9, v, [Dtype::F32, Dtype::Bf16][i % 2]);
        case.chunking = Chunking::Rows(2);
        check(&case, &CpuBackend, "cpu large");
    }
}

#[test]
fn emulated_kernels_chunked_equal_materialised() {
    let mut rng = StdRng::seed_from_u64(14);
    for i in 0..24 {
        let dtype = [Dtype::F32, Dtype::Bf16][i % 2];
        let case = draw(&mut rng, 6, 160, dtype);
        check(&case, &EmuBackend::default(), "emulated");
    }
}

#[test]
fn chunkings_agree_with_each_other() {
    // Chunk 1, chunk N, a chunk that does not divide N and a budget give
    // the same loss and gradients, with ignored rows on chunk boundaries.
    let mut case = Case::random_with(21, 10, 13, 257, Dtype::F32, Some(TeacherKind::Linear));
    case.labels = Some(vec![3, 5, -100, -100, 7, 1, -100, 9, 2, -100]);
    case.spec.alpha = 0.4;
    case.spec.divergence = kdfuse::Divergence::Jsd;
    case.spec.beta = 0.3;
    case.spec.topk_mode = Default::default();
    case.spec.temperature = 2.0;
    case.spec.teacher_log_probs = false;
    let mut outs = Vec::new();
    for chunking in [
        Chunking::Rows(1),
        Chunking::Rows(3),
        Chunking::Rows(4),
        Chunking::Rows(10),
        Chunking::Rows(64),
        Chunking::MemoryBudget(257 * 12 * 3),
    ] {
        case.chunking = chunking;
        let out = check(&case, &CpuBackend, &format!("{chunking:?}"));
        outs.push((chunking, out));
    }
    assert_eq!(outs[0].1.chunk_rows, 1);
    assert_eq!(outs[3].1.chunk_rows, 10);
    assert_eq!(outs[4].1.chunk_rows, 10, "a chunk above N is N");
    assert_eq!(outs[5].1.chunk_rows, 3, "the budget holds 3 rows");
    let first = &outs[0].1;
    assert_eq!(first.valid_rows, 6);
    for (c, o) in &outs[1..] {
        assert!(
            (o.loss - first.loss).abs() <= 1e-6 * first.loss.abs(),
            "{c:?}: {} vs {}",
            o.loss,
            first.loss
        );
    }
}

#[test]
fn a_nan_row_poisons_its_loss_and_every_weight_gradient() {
    let mut case = Case::random_with(31, 6, 8, 50, Dtype::F32, Some(TeacherKind::Logits));
    case.spec.topk_mode = Default::default();
    case.spec.teacher_log_probs = false;
    case.spec.grad_teacher = false;
    case.row_weights = None;
    case.labels = None;
    case.chunking = Chunking::Rows(4);
    if let kdfuse::OwnedData::F32(h) = &mut case.hidden {
        h[4 * 8 + 2] = f32::NAN;
    }
    let out = check(&case, &CpuBackend, "nan");
    assert!(out.loss.is_nan());
    assert!(out.row_losses[4].is_nan());
    assert!(out
        .row_losses
        .iter()
        .enumerate()
        .all(|(r, l)| r == 4 || l.is_finite()));
    let s = out.student.unwrap();
    assert!(s.hidden[4 * 8..5 * 8].iter().all(|x| x.is_nan()));
    assert!(s.hidden[..4 * 8].iter().all(|x| x.is_finite()));
    assert!(
        s.weight.iter().all(|x| x.is_nan()),
        "every W row meets the NaN row"
    );
}

#[test]
fn loss_only_and_an_empty_batch() {
    let case = Case::random(41, 5, 7, 33, Dtype::Bf16);
    let mut spec = case.linear_spec();
    spec.grads = false;
    let out = fused_linear::compute(&CpuBackend, &case.inputs(), &spec).unwrap();
    assert!(out.student.is_none() && out.teacher.is_none());
    let full = fused_linear::compute(&CpuBackend, &case.inputs(), &case.linear_spec()).unwrap();
    assert_eq!(out.loss.to_bits(), full.loss.to_bits());

    let empty = Case::random(42, 0, 7, 33, Dtype::F32);
    let out = fused_linear::compute(&CpuBackend, &empty.inputs(), &empty.linear_spec()).unwrap();
    assert_eq!(out.loss, 0.0);
    assert!(out.row_losses.is_empty());
    let s = out.student.unwrap();
    assert!(s.hidden.is_empty() && s.weight.iter().all(|&x| x == 0.0));
}
