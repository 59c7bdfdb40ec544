//! `kdfuse loss` with the loss-family options: a top-k teacher (three modes,
//! int32 and int64 indices), teacher log-probs, soft-capping, row weights and
//! the teacher gradient, each run on the `oracle` and the `cpu` backend and
//! compared with the library called directly (the f64 oracle); then bad input,
//! which must be one clean error line. (The `cpu` runs need the CPU
//! backend's loss-family implementation; the `oracle` runs pass on the f64
//! oracle alone.)

use crate::common;
use crate::run;

use common::logits;
use kdfuse::{
    Backend, Divergence, GradDtype, HostData, KdInputs, KdOutput, Logits, LossSpec, Oracle,
    TopkIndices, TopkInputs, TopkMode, TopkTeacher,
};
use run::{read_f32, row_losses, write, Cli};
use std::path::{Path, PathBuf};

const N: usize = 5;
const V: usize = 40;
const K: usize = 6;
const BACKENDS: [&str; 2] = ["oracle", "cpu"];

/// Temporary .npy files of one batch, and the data written to them.
struct Files {
    dir: tempfile::TempDir,
    s: Vec<f32>,
    t: Vec<f32>,
    /// The teacher's log-softmax rows (its log-probs).
    t_logp: Vec<f32>,
    labels: Vec<i64>,
    weights: Vec<f32>,
    /// The teacher's top-K entries per row (largest first).
    idx: Vec<i64>,
    /// The teacher's logits there.
    vals: Vec<f32>,
    /// The teacher's log-probs there.
    vals_logp: Vec<f32>,
}

impl Files {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `kdfuse loss` of s.npy and the dense teacher `teacher`.
    fn loss(&self, teacher: &str) -> Cli {
        Cli::loss(self.path("s.npy"), self.path(teacher))
    }

    /// `kdfuse loss` of s.npy and the top-k teacher in `indices` and `values`.
    fn topk(&self, indices: &str, values: &str) -> Cli {
        Cli::new(&["loss"])
            .path("--student", self.path("s.npy"))
            .path("--teacher-topk-indices", self.path(indices))
            .path("--teacher-topk-values", self.path(values))
    }
}

fn p(path: &Path) -> String {
    path.to_str().unwrap().to_string()
}

fn log_softmax(row: &[f32]) -> Vec<f32> {
    let m = row.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(x as f64));
    let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
    row.iter().map(|&x| (x as f64 - lse) as f32).collect()
}

fn files() -> Files {
    let dir = tempfile::tempdir().unwrap();
    let s = logits(11, N, V, 2.0);
    let t = logits(12, N, V, 2.0);
    let t_logp: Vec<f32> = t.chunks(V).flat_map(log_softmax).collect();
    let labels: Vec<i64> = (0..N as i64)
        .map(|i| if i == 1 { -100 } else { (7 * i) % V as i64 })
        .collect();
    let weights: Vec<f32> = (0..N).map(|i| 0.5 + 0.25 * i as f32).collect();
    let mut idx = Vec::with_capacity(N * K);
    for r in 0..N {
        let row = &t[r * V..(r + 1) * V];
        let mut order: Vec<usize> = (0..V).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        idx.extend(order[..K].iter().map(|&j| j as i64));
    }
    let vals: Vec<f32> = idx
        .iter()
        .enumerate()
        .map(|(e, &j)| t[(e / K) * V + j as usize])
        .collect();
    let vals_logp: Vec<f32> = idx
        .iter()
        .enumerate()
        .map(|(e, &j)| t_logp[(e / K) * V + j as usize])
        .collect();
    let f = Files {
        dir,
        s,
        t,
        t_logp,
        labels,
        weights,
        idx,
        vals,
        vals_logp,
    };
    let (n, v, k) = (N as u64, V as u64, K as u64);
    write(&f.path("s.npy"), &f.s, &[n, v]);
    write(&f.path("t.npy"), &f.t, &[n, v]);
    write(&f.path("tlogp.npy"), &f.t_logp, &[n, v]);
    write(&f.path("l.npy"), &f.labels, &[n]);
    write(&f.path("w.npy"), &f.weights, &[n]);
    write(&f.path("idx64.npy"), &f.idx, &[n, k]);
    let idx32: Vec<i32> = f.idx.iter().map(|&x| x as i32).collect();
    write(&f.path("idx32.npy"), &idx32, &[n, k]);
    write(&f.path("vals.npy"), &f.vals, &[n, k]);
    write(&f.path("vals_logp.npy"), &f.vals_logp, &[n, k]);
    f
}

/// √Σ(a−b)² / √Σb² (0 when both are zero).
fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let d: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum();
    let r: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
    if r == 0.0 {
        d.sqrt()
    } else {
        (d / r).sqrt()
    }
}

/// The loss in the JSON report and the gradient file against the library's
/// output (tolerances of docs/DESIGN.md §3, f32).
fn assert_matches(what: &str, j: &serde_json::Value, grad: Option<&Path>, want: &KdOutput) {
    let loss = j["loss"].as_f64().unwrap_or_else(|| panic!("{what}: {j}"));
    assert!(
        (loss - want.loss).abs() <= 1e-5 * want.loss.abs() + 1e-7,
        "{what}: loss {loss} vs {}",
        want.loss
    );
    assert_eq!(j["valid_rows"], want.valid_rows, "{what}");
    if let Some(path) = grad {
        let (g, shape) = read_f32(path);
        assert_eq!(shape, vec![N as u64, V as u64], "{what}");
        let err = rel_l2(&g, want.grad.as_ref().expect("reference gradient"));
        assert!(err < 1e-5, "{what}: gradient relative L2 {err}");
    }
}

// ----------------------------------------------------------------- top-k --

#[test]
fn topk_teacher_matches_the_library() {
    let f = files();
    let g = f.path("g.npy");
    let idx32: Vec<i32> = f.idx.iter().map(|&x| x as i32).collect();
    for mode in TopkMode::ALL {
        let tail = mode == TopkMode::Tail;
        let (vals_file, vals) = if tail {
            ("vals_logp.npy", &f.vals_logp)
        } else {
            ("vals.npy", &f.vals)
        };
        let temperature = if tail { 1.0 } else { 2.0 };
        let spec = LossSpec {
            temperature,
            alpha: 0.25,
            topk_mode: mode,
            teacher_log_probs: tail,
            ..Default::default()
        };
        for i64_indices in [false, true] {
            let indices = if i64_indices {
                TopkIndices::I64(&f.idx)
            } else {
                TopkIndices::I32(&idx32)
            };
            let inputs = TopkInputs {
                student: Logits::new(HostData::F32(&f.s), N, V),
                teacher: TopkTeacher {
                    indices,
                    values: HostData::F32(vals),
                    k: K,
                },
                labels: Some(&f.labels),
                row_weights: None,
            };
            let want = Oracle
                .compute_topk(&inputs, &spec, Some(GradDtype::F32))
                .unwrap();
            for backend in BACKENDS {
                let idx_file = if i64_indices {
                    "idx64.npy"
                } else {
                    "idx32.npy"
                };
                let mut cli = f
                    .topk(idx_file, vals_file)
                    .args(&["--topk-mode", mode.as_str()])
                    .path("--labels", f.path("l.npy"))
                    .args(&["--alpha", "0.25", "--temperature", &temperature.to_string()])
                    .path("--grad", &g)
                    .args(&["--backend", backend]);
                if tail {
                    cli = cli.args(&["--teacher-logprobs"]);
                }
                let j = cli.json();
                let what = format!("top-k {mode} i64={i64_indices} on {backend}");
                assert_matches(&what, &j, Some(&g), &want);
                assert_eq!(j["teacher"], "topk", "{what}");
                assert_eq!(j["k"], K, "{what}");
                assert_eq!(j["topk_mode"], mode.as_str(), "{what}");
                assert_eq!(j["teacher_logprobs"], tail, "{what}");
                assert_eq!(j["backend"], backend, "{what}");
            }
        }
    }
}

#[test]
fn topk_with_row_weights_and_reduction_none() {
    let f = files();
    let spec = LossSpec {
        reduction: kdfuse::Reduction::None,
        topk_mode: TopkMode::Support,
        ..Default::default()
    };
    let inputs = TopkInputs {
        student: Logits::new(HostData::F32(&f.s), N, V),
        teacher: TopkTeacher {
            indices: TopkIndices::I64(&f.idx),
            values: HostData::F32(&f.vals),
            k: K,
        },
        labels: None,
        row_weights: Some(&f.weights),
    };
    let want = Oracle.compute_topk(&inputs, &spec, None).unwrap();
    for backend in BACKENDS {
        let j = f
            .topk("idx64.npy", "vals.npy")
            .args(&["--topk-mode", "support"])
            .path("--row-weights", f.path("w.npy"))
            .args(&["--reduction", "none", "--backend", backend])
            .json();
        let rows = row_losses(&j);
        assert_eq!(rows.len(), N);
        for (r, (a, b)) in rows.iter().zip(&want.row_losses).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs() + 1e-7,
                "{backend} row {r}: {a} vs {b}"
            );
        }
        assert_eq!(j["row_weights"], p(&f.path("w.npy")));
    }
}

// ------------------------------------------------------- dense options --

/// One dense-teacher option: CLI flags and the spec/inputs they mean.
fn dense_case(
    f: &Files,
    what: &str,
    extra: &[&str],
    spec: LossSpec,
    teacher: &[f32],
    weights: bool,
) {
    let g = f.path("g.npy");
    let inputs = KdInputs {
        student: Logits::new(HostData::F32(&f.s), N, V),
        teacher: Logits::new(HostData::F32(teacher), N, V),
        labels: Some(&f.labels),
        row_weights: weights.then_some(&f.weights[..]),
    };
    let want = Oracle
        .compute(&inputs, &spec, Some(GradDtype::F32))
        .unwrap();
    let teacher_file = if spec.teacher_log_probs {
        "tlogp.npy"
    } else {
        "t.npy"
    };
    for backend in BACKENDS {
        let j = f
            .loss(teacher_file)
            .path("--labels", f.path("l.npy"))
            .args(&["--divergence", spec.divergence.as_str()])
            .args(&["--temperature", &spec.temperature.to_string()])
            .args(&["--alpha", &spec.alpha.to_string()])
            .path("--grad", &g)
            .args(&["--backend", backend])
            .args(extra)
            .json();
        let what = format!("{what} on {backend}");
        assert_matches(&what, &j, Some(&g), &want);
        assert_eq!(j["teacher"], "dense", "{what}");
        assert!(j.get("k").is_none(), "{what}");
    }
}

#[test]
fn teacher_logprobs_match_the_library_and_the_logits() {
    let f = files();
    for divergence in [Divergence::ForwardKl, Divergence::Jsd] {
        let spec = LossSpec {
            divergence,
            temperature: 2.0,
            alpha: 0.25,
            teacher_log_probs: true,
            ..Default::default()
        };
        dense_case(
            &f,
            &format!("{divergence} log-probs"),
            &["--teacher-logprobs"],
            spec,
            &f.t_logp,
            false,
        );
    }
    // A dense row of log-probs is a logit row shifted by a constant
    // (docs/DESIGN.md §1): the same loss as from the logits.
    let base = |teacher: &str, extra: &[&str]| {
        f.loss(teacher)
            .args(&["--temperature", "2", "--backend", "oracle"])
            .args(extra)
            .json()
    };
    let from_logits = base("t.npy", &[]);
    let from_logp = base("tlogp.npy", &["--teacher-logprobs"]);
    assert_eq!(from_logp["teacher_logprobs"], true);
    assert_eq!(from_logits["teacher_logprobs"], false);
    let (a, b) = (
        from_logits["loss"].as_f64().unwrap(),
        from_logp["loss"].as_f64().unwrap(),
    );
    assert!((a - b).abs() <= 1e-6 * a.abs(), "{a} vs {b}");
}

#[test]
fn softcap_matches_the_library() {
    let f = files();
    for (divergence, cap) in [
        (Divergence::ForwardKl, 3.0),
        (Divergence::ReverseKl, 1.5),
        (Divergence::Tvd, 2.0),
    ] {
        let spec = LossSpec {
            divergence,
            temperature: 1.5,
            alpha: 0.5,
            softcap: Some(cap),
            ..Default::default()
        };
        dense_case(
            &f,
            &format!("{divergence} softcap {cap}"),
            &["--softcap", &cap.to_string()],
            spec,
            &f.t,
            false,
        );
    }
    let j = f
        .loss("t.npy")
        .args(&["--softcap", "3", "--backend", "oracle"])
        .json();
    assert_eq!(j["softcap"], 3.0);
    // The cap is not a no-op (logits up to ±5.1 here).
    let plain = f.loss("t.npy").args(&["--backend", "oracle"]).json();
    assert_ne!(j["loss"], plain["loss"], "softcap changed nothing");
}

#[test]
fn row_weights_match_the_library() {
    let f = files();
    for divergence in [Divergence::ForwardKl, Divergence::Jsd, Divergence::SoftCe] {
        let spec = LossSpec {
            divergence,
            temperature: 2.0,
            alpha: 0.25,
            ..Default::default()
        };
        dense_case(
            &f,
            &format!("{divergence} row weights"),
            &["--row-weights", &p(&f.path("w.npy"))],
            spec,
            &f.t,
            true,
        );
    }
    // Weights ≠ 1 change the loss; the reduction's denominator stays the
    // valid-row count (docs/DESIGN.md §1): batchmean of weighted rows.
    let spec = LossSpec::default();
    let inputs = KdInputs {
        student: Logits::new(HostData::F32(&f.s), N, V),
        teacher: Logits::new(HostData::F32(&f.t), N, V),
        labels: None,
        row_weights: None,
    };
    let plain = Oracle.compute(&inputs, &spec, None).unwrap();
    let weighted: f64 = plain
        .row_losses
        .iter()
        .zip(&f.weights)
        .map(|(l, &w)| l * w as f64)
        .sum::<f64>()
        / N as f64;
    for backend in BACKENDS {
        let j = f
            .loss("t.npy")
            .path("--row-weights", f.path("w.npy"))
            .args(&["--backend", backend])
            .json();
        let loss = j["loss"].as_f64().unwrap();
        assert!(
            (loss - weighted).abs() <= 1e-5 * weighted,
            "{backend}: {loss} vs Σ wℓ / N = {weighted}"
        );
    }
}

#[test]
fn teacher_gradient_matches_the_library() {
    let f = files();
    let (g, gt) = (f.path("g.npy"), f.path("gt.npy"));
    for divergence in [
        Divergence::ForwardKl,
        Divergence::ReverseKl,
        Divergence::Jsd,
    ] {
        // β is JSD's alone (the CLI refuses it with another divergence).
        let jsd = divergence == Divergence::Jsd;
        let spec = LossSpec {
            divergence,
            beta: if jsd { 0.3 } else { 0.5 },
            temperature: 2.0,
            alpha: 0.25,
            grad_teacher: true,
            ..Default::default()
        };
        let inputs = KdInputs {
            student: Logits::new(HostData::F32(&f.s), N, V),
            teacher: Logits::new(HostData::F32(&f.t), N, V),
            labels: Some(&f.labels),
            row_weights: None,
        };
        let want = Oracle
            .compute(&inputs, &spec, Some(GradDtype::F32))
            .unwrap();
        let want_gt = want.grad_teacher.clone().expect("oracle teacher gradient");
        let beta_or_reduction: &[&str] = if jsd {
            &["--beta", "0.3"]
        } else {
            &["--reduction", "batchmean"]
        };
        for backend in BACKENDS {
            // With --grad and alone: either one asks the backend for gradients.
            for with_grad in [true, false] {
                let _ = std::fs::remove_file(&gt);
                let mut cli = f
                    .loss("t.npy")
                    .path("--labels", f.path("l.npy"))
                    .args(&["--divergence", divergence.as_str()])
                    .args(beta_or_reduction)
                    .args(&["--temperature", "2", "--alpha", "0.25"])
                    .path("--grad-teacher", &gt)
                    .args(&["--backend", backend]);
                if with_grad {
                    cli = cli.path("--grad", &g);
                }
                let j = cli.json();
                let what = format!("{divergence} teacher gradient on {backend} grad={with_grad}");
                assert_matches(&what, &j, with_grad.then_some(g.as_path()), &want);
                let (got, shape) = read_f32(&gt);
                assert_eq!(shape, vec![N as u64, V as u64], "{what}");
                let err = rel_l2(&got, &want_gt);
                assert!(err < 1e-5, "{what}: relative L2 {err}");
                assert_eq!(j["grad_teacher"], p(&gt), "{what}");
                if !with_grad {
                    assert!(j["grad"].is_null(), "{what}");
                }
            }
        }
    }
}

#[test]
fn new_json_fields_default_to_off() {
    let f = files();
    let j = f.loss("t.npy").args(&["--backend", "cpu"]).json();
    assert_eq!(j["teacher"], "dense");
    assert!(j["softcap"].is_null());
    assert_eq!(j["teacher_logprobs"], false);
    assert!(j["row_weights"].is_null());
    assert!(j["grad"].is_null());
    assert!(j["grad_teacher"].is_null());
    assert!(j.get("topk_mode").is_none());
}

// ------------------------------------------------------------ bad input --

#[test]
fn bad_input_is_one_clean_line() {
    let f = files();
    let (n, k) = (N as u64, K as u64);
    let extra = |name: &str, data: &[f32], shape: &[u64]| {
        let path = f.path(name);
        write(&path, data, shape);
        p(&path)
    };
    let dense = || f.loss("t.npy").args(&["--backend", "cpu"]);
    let topk = || f.topk("idx64.npy", "vals.npy").args(&["--backend", "cpu"]);
    let student = || Cli::new(&["loss"]).path("--student", f.path("s.npy"));

    // Which teacher.
    student()
        .path("--teacher-topk-values", f.path("vals.npy"))
        .fails_with("--teacher-topk-indices");
    student()
        .path("--teacher-topk-indices", f.path("idx64.npy"))
        .fails_with("--teacher-topk-values");
    f.topk("idx64.npy", "vals.npy")
        .path("--teacher", f.path("t.npy"))
        .fails_with("--teacher");
    student().fails_with("--teacher");

    // Shapes: files `idx_*.npy` and `vals_*.npy` of one fault each.
    extra("vals_k4.npy", &[0.0; N * 4], &[n, 4]);
    write(&f.path("idx_n1.npy"), &vec![0i64; (N + 1) * K], &[n + 1, k]);
    extra("vals_n1.npy", &[0.0; (N + 1) * K], &[n + 1, k]);
    write(&f.path("idx_1d.npy"), &f.idx, &[n * k]);
    let idx_f: Vec<f32> = f.idx.iter().map(|&x| x as f32).collect();
    extra("idx_f.npy", &idx_f, &[n, k]);
    let mut dup = f.idx.clone();
    dup[2 * K + 3] = dup[2 * K];
    write(&f.path("idx_dup.npy"), &dup, &[n, k]);
    let mut out_of_range = f.idx.clone();
    out_of_range[3 * K + 1] = V as i64;
    write(&f.path("idx_oor.npy"), &out_of_range, &[n, k]);
    // k > V.
    let wide = V as u64 + 1;
    let idx_wide: Vec<i64> = (0..N * (V + 1)).map(|i| i as i64).collect();
    write(&f.path("idx_wide.npy"), &idx_wide, &[n, wide]);
    extra("vals_wide.npy", &vec![0.0; N * (V + 1)], &[n, wide]);
    for (indices, values, needle) in [
        ("idx64.npy", "vals_k4.npy", "shape mismatch"),
        ("idx_n1.npy", "vals_n1.npy", "--teacher-topk-indices"),
        ("idx_1d.npy", "vals.npy", "2-D"),
        ("idx_f.npy", "vals.npy", "int32 or int64"),
        ("idx_dup.npy", "vals.npy", "row 2"),
        ("idx_oor.npy", "vals.npy", "row 3"),
        ("idx_wide.npy", "vals_wide.npy", "k = 41"),
    ] {
        f.topk(indices, values).fails_with(needle);
    }

    // Options.
    for cap in ["0", "-1", "nan", "inf"] {
        dense().args(&["--softcap", cap]).fails_with("--softcap");
    }
    dense()
        .args(&["--softcap", "2", "--teacher-logprobs"])
        .fails_with("--softcap");
    let w_short = extra("w_short.npy", &[1.0; N - 1], &[n - 1]);
    let w_2d = extra("w_2d.npy", &[1.0; N], &[n, 1]);
    let mut w_nan = f.weights.clone();
    w_nan[2] = f32::NAN;
    let w_nan = extra("w_nan.npy", &w_nan, &[n]);
    for weights in [w_short, w_2d, w_nan] {
        dense()
            .args(&["--row-weights", &weights])
            .fails_with("--row-weights");
    }
    let cases: [(&[&str], &str); 4] = [
        (&["--topk-mode", "tail"], "--teacher-logprobs"),
        (
            &[
                "--topk-mode",
                "tail",
                "--teacher-logprobs",
                "--temperature",
                "2",
            ],
            "temperature",
        ),
        (&["--topk-mode", "bogus"], "--topk-mode"),
        (&["--divergence", "jsd"], "forward-kl"),
    ];
    for (flags, needle) in cases {
        topk().args(flags).fails_with(needle);
    }
    topk()
        .path("--grad-teacher", f.path("gt.npy"))
        .fails_with("--grad-teacher");
    dense()
        .args(&["--topk-mode", "support"])
        .fails_with("--topk-mode");
}
