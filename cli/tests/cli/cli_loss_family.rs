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
use run::{assert_clean_error, json, kdfuse, read_f32, write};
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

fn run(args: &[String]) -> serde_json::Value {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    json(&kdfuse(&args))
}

fn strs(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
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
                let mut args = strs(&[
                    "loss",
                    "--student",
                    &p(&f.path("s.npy")),
                    "--teacher-topk-indices",
                    &p(&f.path(if i64_indices {
                        "idx64.npy"
                    } else {
                        "idx32.npy"
                    })),
                    "--teacher-topk-values",
                    &p(&f.path(vals_file)),
                    "--topk-mode",
                    mode.as_str(),
                    "--labels",
                    &p(&f.path("l.npy")),
                    "--alpha",
                    "0.25",
                    "--temperature",
                    &temperature.to_string(),
                    "--grad",
                    &p(&g),
                    "--backend",
                    backend,
                ]);
                if tail {
                    args.push("--teacher-logprobs".into());
                }
                let j = run(&args);
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
        let j = run(&strs(&[
            "loss",
            "--student",
            &p(&f.path("s.npy")),
            "--teacher-topk-indices",
            &p(&f.path("idx64.npy")),
            "--teacher-topk-values",
            &p(&f.path("vals.npy")),
            "--topk-mode",
            "support",
            "--row-weights",
            &p(&f.path("w.npy")),
            "--reduction",
            "none",
            "--backend",
            backend,
        ]));
        let rows: Vec<f64> = j["loss"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
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
        let mut args = strs(&[
            "loss",
            "--student",
            &p(&f.path("s.npy")),
            "--teacher",
            &p(&f.path(teacher_file)),
            "--labels",
            &p(&f.path("l.npy")),
            "--divergence",
            spec.divergence.as_str(),
            "--temperature",
            &spec.temperature.to_string(),
            "--alpha",
            &spec.alpha.to_string(),
            "--grad",
            &p(&g),
            "--backend",
            backend,
        ]);
        args.extend(strs(extra));
        let j = run(&args);
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
        let mut a = strs(&[
            "loss",
            "--student",
            &p(&f.path("s.npy")),
            "--teacher",
            &p(&f.path(teacher)),
            "--temperature",
            "2",
            "--backend",
            "oracle",
        ]);
        a.extend(strs(extra));
        run(&a)
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
    let j = run(&strs(&[
        "loss",
        "--student",
        &p(&f.path("s.npy")),
        "--teacher",
        &p(&f.path("t.npy")),
        "--softcap",
        "3",
        "--backend",
        "oracle",
    ]));
    assert_eq!(j["softcap"], 3.0);
    // The cap is not a no-op (logits up to ±5.1 here).
    let plain = run(&strs(&[
        "loss",
        "--student",
        &p(&f.path("s.npy")),
        "--teacher",
        &p(&f.path("t.npy")),
        "--backend",
        "oracle",
    ]));
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
        let j = run(&strs(&[
            "loss",
            "--student",
            &p(&f.path("s.npy")),
            "--teacher",
            &p(&f.path("t.npy")),
            "--row-weights",
            &p(&f.path("w.npy")),
            "--backend",
            backend,
        ]));
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
        for backend in BACKENDS {
            // With --grad and alone: either one asks the backend for gradients.
            for with_grad in [true, false] {
                let _ = std::fs::remove_file(&gt);
                let mut args = strs(&[
                    "loss",
                    "--student",
                    &p(&f.path("s.npy")),
                    "--teacher",
                    &p(&f.path("t.npy")),
                    "--labels",
                    &p(&f.path("l.npy")),
                    "--divergence",
                    divergence.as_str(),
                    if jsd { "--beta" } else { "--reduction" },
                    if jsd { "0.3" } else { "batchmean" },
                    "--temperature",
                    "2",
                    "--alpha",
                    "0.25",
                    "--grad-teacher",
                    &p(&gt),
                    "--backend",
                    backend,
                ]);
                if with_grad {
                    args.extend(strs(&["--grad", &p(&g)]));
                }
                let j = run(&args);
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
    let j = run(&strs(&[
        "loss",
        "--student",
        &p(&f.path("s.npy")),
        "--teacher",
        &p(&f.path("t.npy")),
        "--backend",
        "cpu",
    ]));
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
    let s = p(&f.path("s.npy"));
    let t = p(&f.path("t.npy"));
    let idx = p(&f.path("idx64.npy"));
    let vals = p(&f.path("vals.npy"));
    let extra = |name: &str, data: &[f32], shape: &[u64]| {
        let path = f.path(name);
        write(&path, data, shape);
        p(&path)
    };
    let topk = |extra_args: &[&str]| {
        let mut a = vec![
            "loss",
            "--student",
            &s,
            "--teacher-topk-indices",
            &idx,
            "--teacher-topk-values",
            &vals,
            "--backend",
            "cpu",
        ];
        a.extend_from_slice(extra_args);
        a.iter().map(|x| x.to_string()).collect::<Vec<_>>()
    };
    let err = |args: Vec<String>, needle: &str| {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_clean_error(&kdfuse(&a), needle);
    };
    let dense = |extra_args: &[&str]| {
        let mut a = vec!["loss", "--student", &s, "--teacher", &t, "--backend", "cpu"];
        a.extend_from_slice(extra_args);
        a.iter().map(|x| x.to_string()).collect::<Vec<_>>()
    };

    // Which teacher.
    err(
        strs(&["loss", "--student", &s, "--teacher-topk-values", &vals]),
        "--teacher-topk-indices",
    );
    err(
        strs(&["loss", "--student", &s, "--teacher-topk-indices", &idx]),
        "--teacher-topk-values",
    );
    err(
        strs(&[
            "loss",
            "--student",
            &s,
            "--teacher",
            &t,
            "--teacher-topk-indices",
            &idx,
            "--teacher-topk-values",
            &vals,
        ]),
        "--teacher",
    );
    err(strs(&["loss", "--student", &s]), "--teacher");

    // Shapes.
    let vals_k4 = extra("vals_k4.npy", &[0.0; N * 4], &[n, 4]);
    err(
        strs(&[
            "loss",
            "--student",
            &s,
            "--teacher-topk-indices",
            &idx,
            "--teacher-topk-values",
            &vals_k4,
        ]),
        "shape mismatch",
    );
    let idx_n1 = f.path("idx_n1.npy");
    write(&idx_n1, &vec![0i64; (N + 1) * K], &[n + 1, k]);
    let vals_n1 = extra("vals_n1.npy", &[0.0; (N + 1) * K], &[n + 1, k]);
    err(
        strs(&[
            "loss",
            "--student",
            &s,
            "--teacher-topk-indices",
            &p(&idx_n1),
            "--teacher-topk-values",
            &vals_n1,
        ]),
        "--teacher-topk-indices",
    );
    let idx_1d = f.path("idx_1d.npy");
    write(&idx_1d, &f.idx, &[n * k]);
    err(
        strs(&[
            "loss",
            "--student",
            &s,
            "--teacher-topk-indices",
            &p(&idx_1d),
            "--teacher-topk-values",
            &vals,
        ]),
        "2-D",
    );
    let idx_f = extra(
        "idx_f.npy",
        &f.idx.iter().map(|&x| x as f32).collect::<Vec<_>>(),
        &[n, k],
    );
    err(
        strs(&[
            "loss",
            "--student",
            &s,
            "--teacher-topk-indices",
            &idx_f,
            "--teacher-topk-values",
            &vals,
        ]),
        "int32 or int64",
    );
    let mut dup = f.idx.clone();
    dup[2 * K + 3] = dup[2 * K];
    let idx_dup = f.path("idx_dup.npy");
    write(&idx_dup, &dup, &[n, k]);
    err(
        strs(&[
            "loss",
            "--student",
            &s,
            "--teacher-topk-indices",
            &p(&idx_dup),
            "--teacher-topk-values",
            &vals,
        ]),
        "row 2",
    );
    let mut out_of_range = f.idx.clone();
    out_of_range[3 * K + 1] = V as i64;
    let idx_oor = f.path("idx_oor.npy");
    write(&idx_oor, &out_of_range, &[n, k]);
    err(
        strs(&[
            "loss",
            "--student",
            &s,
            "--teacher-topk-indices",
            &p(&idx_oor),
            "--teacher-topk-values",
            &vals,
        ]),
        "row 3",
    );
    // k > V.
    let wide = V as u64 + 1;
    let idx_wide = f.path("idx_wide.npy");
    write(
        &idx_wide,
        &(0..N * (V + 1)).map(|i| i as i64).collect::<Vec<_>>(),
        &[n, wide],
    );
    let vals_wide = extra("vals_wide.npy", &vec![0.0; N * (V + 1)], &[n, wide]);
    err(
        strs(&[
            "loss",
            "--student",
            &s,
            "--teacher-topk-indices",
            &p(&idx_wide),
            "--teacher-topk-values",
            &vals_wide,
        ]),
        "k = 41",
    );

    // Options.
    for cap in ["0", "-1", "nan", "inf"] {
        err(dense(&["--softcap", cap]), "--softcap");
    }
    err(
        dense(&["--softcap", "2", "--teacher-logprobs"]),
        "--softcap",
    );
    let w_short = extra("w_short.npy", &[1.0; N - 1], &[n - 1]);
    err(dense(&["--row-weights", &w_short]), "--row-weights");
    let w_2d = extra("w_2d.npy", &[1.0; N], &[n, 1]);
    err(dense(&["--row-weights", &w_2d]), "--row-weights");
    let mut w_nan = f.weights.clone();
    w_nan[2] = f32::NAN;
    let w_nan = extra("w_nan.npy", &w_nan, &[n]);
    err(dense(&["--row-weights", &w_nan]), "--row-weights");
    err(topk(&["--topk-mode", "tail"]), "--teacher-logprobs");
    err(
        topk(&[
            "--topk-mode",
            "tail",
            "--teacher-logprobs",
            "--temperature",
            "2",
        ]),
        "temperature",
    );
    err(
        topk(&["--grad-teacher", &p(&f.path("gt.npy"))]),
        "--grad-teacher",
    );
    err(topk(&["--topk-mode", "bogus"]), "--topk-mode");
    err(dense(&["--topk-mode", "support"]), "--topk-mode");
    err(topk(&["--divergence", "jsd"]), "forward-kl");
}
