//! Bad inputs are errors naming the argument, never panics.

use crate::case::Case;
use kdfuse::fused_linear::{self, Chunking, Linear, LinearInputs, LinearTeacher, Matrix};
use kdfuse::{CpuBackend, Dtype, HostData, KdError, Logits, OwnedData, TopkMode};

fn arg_of<T: std::fmt::Debug>(r: kdfuse::Result<T>) -> (&'static str, String) {
    match r {
        Err(KdError::InvalidArgument { arg, msg }) => (arg, msg),
        other => panic!("expected an invalid argument, got {other:?}"),
    }
}

#[test]
fn shapes_dtypes_and_chunking_are_checked() {
    let case = Case::random(7, 4, 5, 20, Dtype::F32);
    let spec = case.linear_spec();
    let run = |inputs: &LinearInputs, chunking: Chunking| {
        let mut s = spec.clone();
        s.chunking = chunking;
        arg_of(fused_linear::compute(&CpuBackend, inputs, &s))
    };
    let ok = case.inputs();
    let short = vec![0f32; 19];
    let wide = vec![0f32; 4 * 6];
    let bf = OwnedData::from_f32(&vec![0.0; 20 * 5], Dtype::Bf16);
    let t = vec![0f32; 4 * 19];

    let mut i = ok;
    i.student.hidden = Matrix::new(HostData::F32(&short), 4, 5);
    assert_eq!(run(&i, Chunking::Rows(2)).0, "student_hidden");
    let mut i = ok;
    i.student.hidden = Matrix::new(HostData::F32(&wide), 4, 6);
    assert_eq!(run(&i, Chunking::Rows(2)).0, "student_weight");
    let mut i = ok;
    i.student.weight = Matrix::new(bf.view(), 20, 5);
    assert_eq!(run(&i, Chunking::Rows(2)).0, "student_weight");
    let mut i = ok;
    i.student.bias = Some(HostData::F32(&short));
    assert_eq!(run(&i, Chunking::Rows(2)).0, "student_bias");
    let mut i = ok;
    i.teacher = LinearTeacher::Logits(Logits::new(HostData::F32(&t), 4, 19));
    assert_eq!(run(&i, Chunking::Rows(2)).0, "teacher_logits");
    let mut i = ok;
    i.labels = Some(&[0, 1, 2]);
    assert_eq!(run(&i, Chunking::Rows(2)).0, "labels");
    let mut i = ok;
    i.labels = Some(&[0, 1, 20, 3]);
    let (arg, msg) = run(&i, Chunking::Rows(2));
    assert_eq!(arg, "labels", "{msg}");
    assert_eq!(run(&ok, Chunking::Rows(0)).0, "chunk_rows");
    let (arg, msg) = run(&ok, Chunking::MemoryBudget(10));
    assert_eq!(arg, "memory_budget");
    assert!(msg.contains("one row"), "{msg}");
    let zero_h: [f32; 0] = [];
    let mut i = ok;
    i.student = Linear::new(
        Matrix::new(HostData::F32(&zero_h), 4, 0),
        Matrix::new(HostData::F32(&zero_h), 20, 0),
        None,
    );
    assert_eq!(run(&i, Chunking::Rows(2)).0, "student_hidden");
}

#[test]
fn the_teacher_is_checked() {
    let mut case = Case::random_with(
        8,
        4,
        5,
        20,
        Dtype::F32,
        Some(crate::case::TeacherKind::Linear),
    );
    case.vt = 19;
    case.t_weight = OwnedData::F32(vec![0.0; 19 * case.ht]);
    case.t_bias = None;
    let spec = case.linear_spec();
    let (arg, msg) = arg_of(fused_linear::compute(&CpuBackend, &case.inputs(), &spec));
    assert_eq!(arg, "teacher_weight", "{msg}");

    let mut case = Case::random_with(
        9,
        4,
        5,
        20,
        Dtype::F32,
        Some(crate::case::TeacherKind::Topk(3, TopkMode::Full)),
    );
    case.idx = vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11];
    case.vals = OwnedData::F32(vec![0.0; 12]);
    case.spec.topk_mode = TopkMode::Full;
    case.spec.teacher_log_probs = false;
    case.spec.softcap = None;
    case.spec.divergence = kdfuse::Divergence::ForwardKl;
    case.spec.beta = 0.5;
    case.spec.temperature = 1.0;
    case.spec.grad_teacher = true;
    let (arg, _) = arg_of(fused_linear::compute(
        &CpuBackend,
        &case.inputs(),
        &case.linear_spec(),
    ));
    assert_eq!(arg, "grad_teacher", "mutual learning needs a dense teacher");
    case.spec.grad_teacher = false;
    case.idx[5] = 4; // a repeated index in row 1
    let mut spec = case.linear_spec();
    spec.chunking = Chunking::Rows(1);
    let (arg, msg) = arg_of(fused_linear::compute(&CpuBackend, &case.inputs(), &spec));
    assert_eq!(arg, "topk_indices");
    assert!(
        msg.starts_with("row 1:"),
        "the batch's row, not the chunk's: {msg}"
    );
    case.vals = OwnedData::F32(vec![0.0; 11]);
    let (arg, _) = arg_of(fused_linear::compute(
        &CpuBackend,
        &case.inputs(),
        &case.linear_spec(),
    ));
    assert_eq!(arg, "topk_values");
}
