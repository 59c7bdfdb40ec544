//! `kdfuse linear-loss` end to end: its loss and gradients equal those of
//! the materialised computation — `kdfuse loss` on logits the test computes
//! from the same hidden states and heads, with the head gradients derived
//! from `kdfuse loss`'s logit gradient — for a dense-logits, a linear-head
//! and a top-k teacher and a teacher cache; and its bad arguments.

use crate::common;
use crate::run;

use run::{read_f32, write, Cli};
use std::path::{Path, PathBuf};

/// Hidden states as [B, T, H] = [2, 5, 8]; V = 40; teacher H_t = 6.
const B: usize = 2;
const T: usize = 5;
const N: usize = B * T;
const H: usize = 8;
const HT: usize = 6;
const V: usize = 40;
const K: usize = 7;

struct Files {
    dir: tempfile::TempDir,
    hs: Vec<f32>,
    ws: Vec<f32>,
    bs: Vec<f32>,
    ht: Vec<f32>,
    wt: Vec<f32>,
    bt: Vec<f32>,
}

/// `out[r, v] = Σ_k h[r, k]·w[v, k] + b[v]` in f64, rounded to f32.
fn logits(h: &[f32], w: &[f32], b: Option<&[f32]>, hid: usize, v: usize) -> Vec<f32> {
    let n = h.len() / hid;
    let mut out = vec![0.0f32; n * v];
    for r in 0..n {
        for c in 0..v {
            let mut acc = b.map_or(0.0, |b| f64::from(b[c]));
            for k in 0..hid {
                acc += f64::from(h[r * hid + k]) * f64::from(w[c * hid + k]);
            }
            out[r * v + c] = acc as f32;
        }
    }
    out
}

/// The head gradients of a logit gradient `g` [N, V]: (G·W, Gᵀ·h, Σ G).
fn head_grads(g: &[f32], h: &[f32], w: &[f32], hid: usize, v: usize) -> [Vec<f32>; 3] {
    let n = g.len() / v;
    let mut gh = vec![0.0f32; n * hid];
    let mut gw = vec![0.0f32; v * hid];
    let mut gb = vec![0.0f32; v];
    for r in 0..n {
        for k in 0..hid {
            gh[r * hid + k] = (0..v)
                .map(|c| f64::from(g[r * v + c]) * f64::from(w[c * hid + k]))
                .sum::<f64>() as f32;
        }
    }
    for c in 0..v {
        for k in 0..hid {
            gw[c * hid + k] = (0..n)
                .map(|r| f64::from(g[r * v + c]) * f64::from(h[r * hid + k]))
                .sum::<f64>() as f32;
        }
        gb[c] = (0..n).map(|r| f64::from(g[r * v + c])).sum::<f64>() as f32;
    }
    [gh, gw, gb]
}

/// The test's own top-k of `x` [N, V]: values descending, ties by index.
fn topk(x: &[f32], k: usize) -> (Vec<i64>, Vec<f32>) {
    let (mut idx, mut val) = (Vec::new(), Vec::new());
    for row in x.chunks(V) {
        let mut order: Vec<usize> = (0..V).collect();
        order.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap().then(a.cmp(&b)));
        for &c in &order[..k] {
            idx.push(c as i64);
            val.push(row[c]);
        }
    }
    (idx, val)
}

impl Files {
    fn new() -> Files {
        let dir = tempfile::tempdir().unwrap();
        let f = Files {
            hs: common::logits(1, N, H, 1.0),
            ws: common::logits(2, V, H, 0.6),
            bs: common::logits(3, 1, V, 0.5),
            ht: common::logits(4, N, HT, 1.0),
            wt: common::logits(5, V + 3, HT, 0.8),
            bt: common::logits(6, 1, V + 3, 0.5),
            dir,
        };
        let d = |p: &str| f.path(p);
        write(&d("hs.npy"), &f.hs, &[B as u64, T as u64, H as u64]);
        write(&d("ws.npy"), &f.ws, &[V as u64, H as u64]);
        write(&d("bs.npy"), &f.bs, &[V as u64]);
        write(&d("ht.npy"), &f.ht, &[B as u64, T as u64, HT as u64]);
        write(&d("wt.npy"), &f.wt, &[V as u64 + 3, HT as u64]);
        write(&d("bt.npy"), &f.bt, &[V as u64 + 3]);
        // Materialised logits: the student's, and the linear teacher's
        // (its head is 3 rows wider: the first V are used).
        write(
            &d("s.npy"),
            &f.student_logits(),
            &[B as u64, T as u64, V as u64],
        );
        let t = logits(&f.ht, &f.wt[..V * HT], Some(&f.bt[..V]), HT, V);
        write(&d("t.npy"), &t, &[B as u64, T as u64, V as u64]);
        let (idx, val) = topk(&t, K);
        write(&d("idx.npy"), &idx, &[N as u64, K as u64]);
        write(&d("val.npy"), &val, &[N as u64, K as u64]);
        let labels: Vec<i64> = (0..N as i64)
            .map(|i| if i == 3 { -100 } else { (i * 7) % V as i64 })
            .collect();
        write(&d("labels.npy"), &labels, &[N as u64]);
        f
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn student_logits(&self) -> Vec<f32> {
        logits(&self.hs, &self.ws, Some(&self.bs), H, V)
    }

    /// `kdfuse linear-loss` with the student's hidden states, head and bias.
    fn linear(&self) -> Cli {
        Cli::new(&["linear-loss"])
            .path("--student-hidden", self.path("hs.npy"))
            .path("--student-weight", self.path("ws.npy"))
            .path("--student-bias", self.path("bs.npy"))
    }

    /// `kdfuse loss` on the materialised student logits.
    fn loss(&self) -> Cli {
        Cli::new(&["loss", "--backend", "cpu"]).path("--student", self.path("s.npy"))
    }
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}");
    let err = common::max_rel(got, want, 1e-3);
    assert!(err <= 2e-4, "{what}: max relative error {err}");
}

fn assert_loss(lin: &serde_json::Value, mat: &serde_json::Value) {
    let (a, b) = (lin["loss"].as_f64().unwrap(), mat["loss"].as_f64().unwrap());
    assert!(
        (a - b).abs() <= 1e-5 * b.abs().max(1e-6),
        "linear-loss {a} vs loss {b}"
    );
}

/// The student's gradients under `dir` against those derived from
/// `kdfuse loss`'s logit gradient `g`.
fn assert_student_grads(f: &Files, dir: &Path, g: &Path) {
    let (g, _) = read_f32(g);
    let [gh, gw, gb] = head_grads(&g, &f.hs, &f.ws, H, V);
    let (h, shape) = read_f32(&dir.join("grad_hidden.npy"));
    assert_eq!(shape, [B as u64, T as u64, H as u64]);
    assert_close("grad_hidden", &h, &gh);
    let (w, shape) = read_f32(&dir.join("grad_weight.npy"));
    assert_eq!(shape, [V as u64, H as u64]);
    assert_close("grad_weight", &w, &gw);
    let (b, shape) = read_f32(&dir.join("grad_bias.npy"));
    assert_eq!(shape, [V as u64]);
    assert_close("grad_bias", &b, &gb);
}

#[test]
fn dense_logits_teacher_equals_materialised() {
    let f = Files::new();
    let opts = [
        "--divergence",
        "jsd",
        "--temperature",
        "2",
        "--alpha",
        "0.3",
        "--softcap",
        "20",
    ];
    let lin = f
        .linear()
        .path("--teacher-logits", f.path("t.npy"))
        .path("--labels", f.path("labels.npy"))
        .path("--grad-out", f.path("g1"))
        .args(&["--chunk-rows", "3", "--mutual"])
        .args(&opts)
        .json();
    assert_eq!(lin["chunk_rows"], 3);
    assert_eq!(lin["chunks"], 4);
    assert_eq!(lin["teacher"], "logits");
    let mat = f
        .loss()
        .path("--teacher", f.path("t.npy"))
        .path("--labels", f.path("labels.npy"))
        .path("--grad", f.path("g.npy"))
        .path("--grad-teacher", f.path("gt.npy"))
        .args(&opts)
        .json();
    assert_loss(&lin, &mat);
    assert_student_grads(&f, &f.path("g1"), &f.path("g.npy"));
    let (gt, shape) = read_f32(&f.path("g1/teacher_grad_logits.npy"));
    assert_eq!(shape, [B as u64, T as u64, V as u64]);
    assert_close("teacher_grad_logits", &gt, &read_f32(&f.path("gt.npy")).0);
}

#[test]
fn linear_teacher_equals_materialised_with_mutual_gradients() {
    let f = Files::new();
    for (backend, chunking) in [
        ("cpu", ["--memory-budget", "2KiB"]),
        ("oracle", ["--chunk-rows", "4"]),
    ] {
        let out = f.path(&format!("g-{backend}"));
        let lin = f
            .linear()
            .args(&["--backend", backend])
            .path("--teacher-hidden", f.path("ht.npy"))
            .path("--teacher-weight", f.path("wt.npy"))
            .path("--teacher-bias", f.path("bt.npy"))
            .path("--grad-out", &out)
            .args(&chunking)
            .args(&["--mutual", "--reduction", "sum"])
            .json();
        assert_eq!(lin["teacher"], "linear");
        if backend == "cpu" {
            // 2 KiB over 3 × V × 4 bytes per row (student and teacher
            // logits, the student's gradient) and the teacher's gradient.
            assert_eq!(lin["bytes_per_row"], 4 * V * 4);
            assert_eq!(lin["chunk_rows"], 2048 / (4 * V * 4));
        }
        let mat = f
            .loss()
            .path("--teacher", f.path("t.npy"))
            .path("--grad", f.path("g.npy"))
            .path("--grad-teacher", f.path("gt.npy"))
            .args(&["--reduction", "sum"])
            .json();
        assert_loss(&lin, &mat);
        assert_student_grads(&f, &out, &f.path("g.npy"));
        // The teacher's head gradients from ∂L/∂teacher logits; its head's
        // rows ≥ V get none.
        let (gt, _) = read_f32(&f.path("gt.npy"));
        let [gh, gw, gb] = head_grads(&gt, &f.ht, &f.wt[..V * HT], HT, V);
        let (h, shape) = read_f32(&out.join("teacher_grad_hidden.npy"));
        assert_eq!(shape, [B as u64, T as u64, HT as u64]);
        assert_close("teacher_grad_hidden", &h, &gh);
        let (w, shape) = read_f32(&out.join("teacher_grad_weight.npy"));
        assert_eq!(shape, [V as u64 + 3, HT as u64]);
        assert_close("teacher_grad_weight", &w[..V * HT], &gw);
        assert!(w[V * HT..].iter().all(|&x| x == 0.0));
        let (b, _) = read_f32(&out.join("teacher_grad_bias.npy"));
        assert_close("teacher_grad_bias", &b[..V], &gb);
    }
}

#[test]
fn topk_teacher_equals_materialised() {
    let f = Files::new();
    for mode in ["full", "support"] {
        let out = f.path(&format!("g-{mode}"));
        let lin = f
            .linear()
            .path("--topk-indices", f.path("idx.npy"))
            .path("--topk-values", f.path("val.npy"))
            .path("--grad-out", &out)
            .args(&["--chunk-rows", "4", "--topk-mode", mode])
            .json();
        assert_eq!(lin["teacher"], "topk");
        assert_eq!(lin["k"], K);
        let mat = f
            .loss()
            .path("--teacher-topk-indices", f.path("idx.npy"))
            .path("--teacher-topk-values", f.path("val.npy"))
            .path("--grad", f.path("g.npy"))
            .args(&["--topk-mode", mode])
            .json();
        assert_loss(&lin, &mat);
        assert_student_grads(&f, &out, &f.path("g.npy"));
    }
}

#[test]
fn teacher_cache_equals_materialised() {
    let f = Files::new();
    Cli::new(&["teacher-cache", "build", "-k", &K.to_string()])
        .path("--logits", f.path("t.npy"))
        .path("--out", f.path("cache"))
        .json();
    // Rows 2..8 of the batch: the student's hidden states of those rows.
    let rows = 2..8;
    write(
        &f.path("hs-rows.npy"),
        &f.hs[rows.start * H..rows.end * H],
        &[rows.len() as u64, H as u64],
    );
    let s = f.student_logits();
    write(
        &f.path("s-rows.npy"),
        &s[rows.start * V..rows.end * V],
        &[rows.len() as u64, V as u64],
    );
    let lin = Cli::new(&["linear-loss"])
        .path("--student-hidden", f.path("hs-rows.npy"))
        .path("--student-weight", f.path("ws.npy"))
        .path("--student-bias", f.path("bs.npy"))
        .path("--teacher-cache", f.path("cache"))
        .args(&["--rows", "2:8", "--chunk-rows", "4"])
        .path("--grad-out", f.path("gc"))
        .json();
    assert_eq!(lin["teacher"], "cache");
    assert_eq!(lin["cache_rows"], serde_json::json!([2, 8]));
    let mat = Cli::new(&["loss", "--backend", "cpu"])
        .path("--student", f.path("s-rows.npy"))
        .path("--teacher-cache", f.path("cache"))
        .args(&["--rows", "2:8"])
        .path("--grad", f.path("g.npy"))
        .json();
    assert_loss(&lin, &mat);
    let (g, _) = read_f32(&f.path("g.npy"));
    let [gh, gw, gb] = head_grads(&g, &f.hs[rows.start * H..rows.end * H], &f.ws, H, V);
    assert_close(
        "grad_hidden",
        &read_f32(&f.path("gc/grad_hidden.npy")).0,
        &gh,
    );
    assert_close(
        "grad_weight",
        &read_f32(&f.path("gc/grad_weight.npy")).0,
        &gw,
    );
    assert_close("grad_bias", &read_f32(&f.path("gc/grad_bias.npy")).0, &gb);
}

#[test]
fn chunking_does_not_change_the_result() {
    let f = Files::new();
    let run = |chunk: &[&str], out: &str| {
        let j = f
            .linear()
            .path("--teacher-logits", f.path("t.npy"))
            .path("--grad-out", f.path(out))
            .args(chunk)
            .json();
        (
            j["loss"].as_f64().unwrap(),
            read_f32(&f.path(out).join("grad_weight.npy")).0,
        )
    };
    let (l1, w1) = run(&["--chunk-rows", "1"], "a");
    let (l2, w2) = run(&[], "b");
    let (l3, w3) = run(&["--memory-budget", "1000"], "c");
    assert!((l1 - l2).abs() <= 1e-6 * l2.abs() && (l3 - l2).abs() <= 1e-6 * l2.abs());
    assert_close("chunk 1 vs all", &w1, &w2);
    assert_close("budget vs all", &w3, &w2);
}

#[test]
fn bad_arguments_fail_cleanly() {
    let f = Files::new();
    let t = || f.linear().path("--teacher-logits", f.path("t.npy"));
    t().args(&["--chunk-rows", "2", "--memory-budget", "1MiB"])
        .fails_with("--chunk-rows and --memory-budget exclude each other");
    t().args(&["--chunk-rows", "0"])
        .fails_with("--chunk-rows must be ≥ 1");
    t().args(&["--memory-budget", "12 parsecs"])
        .fails_with("--memory-budget");
    t().args(&["--memory-budget", "100"])
        .fails_with("invalid argument `--memory-budget`");
    // Without a usable GPU, cuda is a clean error (with one, it runs).
    let out = t().args(&["--backend", "cuda"]).output();
    if !out.status.success() {
        run::assert_clean_error(&out, "`--backend`: cuda is not usable here");
    }
    t().args(&["--mutual"]).fails_with("--mutual");
    t().args(&["--alpha", "0.5"]).fails_with("labels");
    f.linear().fails_with("a teacher is required");
    t().path("--topk-indices", f.path("idx.npy"))
        .path("--topk-values", f.path("val.npy"))
        .fails_with("exclude each other");
    f.linear()
        .path("--teacher-hidden", f.path("ht.npy"))
        .fails_with("--teacher-hidden needs --teacher-weight");
    f.linear()
        .path("--topk-indices", f.path("idx.npy"))
        .fails_with("--topk-indices needs --topk-values");
    f.linear()
        .path("--topk-indices", f.path("idx.npy"))
        .path("--topk-values", f.path("val.npy"))
        .path("--grad-out", f.path("x"))
        .args(&["--mutual"])
        .fails_with("--mutual needs a teacher given as a head or as logits");
    t().args(&["--rows", "0:4"])
        .fails_with("--rows selects rows of a --teacher-cache");
    // Shapes: the head's H against the hidden states', the teacher's rows.
    Cli::new(&["linear-loss"])
        .path("--student-hidden", f.path("hs.npy"))
        .path("--student-weight", f.path("wt.npy"))
        .path("--teacher-logits", f.path("t.npy"))
        .fails_with("--student-weight has 6 columns, --student-hidden H = 8");
    Cli::new(&["linear-loss"])
        .path("--student-hidden", f.path("hs.npy"))
        .path("--student-weight", f.path("hs.npy"))
        .path("--teacher-logits", f.path("t.npy"))
        .fails_with("--student-weight must be 2-D");
    f.linear()
        .path("--teacher-logits", f.path("idx.npy"))
        .fails_with("--teacher-logits");
    f.linear()
        .path("--teacher-logits", f.path("labels.npy"))
        .fails_with("--teacher-logits");
    t().path("--labels", f.path("bs.npy"))
        .fails_with("--labels");
    Cli::new(&["linear-loss"])
        .path("--student-hidden", f.path("hs.npy"))
        .path("--student-weight", f.path("ws.npy"))
        .path("--student-bias", f.path("bt.npy"))
        .path("--teacher-logits", f.path("t.npy"))
        .fails_with("--student-bias has 43 entries");
    Cli::new(&["linear-loss"])
        .path("--student-hidden", f.path("missing.npy"))
        .path("--student-weight", f.path("ws.npy"))
        .path("--teacher-logits", f.path("t.npy"))
        .fails_with("--student-hidden");
    t().path("--grad-out", f.path("."))
        .path("--labels", f.path("grad_hidden.npy"))
        .fails_with("--grad-out");
    // A top-k index out of range: the library's check, named by its flag.
    let mut idx: Vec<i64> = vec![0; N * K];
    for (i, x) in idx.iter_mut().enumerate() {
        *x = (i % K) as i64;
    }
    idx[5] = V as i64 + 1;
    write(&f.path("bad-idx.npy"), &idx, &[N as u64, K as u64]);
    f.linear()
        .path("--topk-indices", f.path("bad-idx.npy"))
        .path("--topk-values", f.path("val.npy"))
        .fails_with("--topk-indices");
}

#[test]
fn bench_linear_runs_both_modes_in_child_processes() {
    let (_dir, [json, csv]) = run::temp_paths(["lin.json", "lin.csv"]);
    let out = Cli::line(
        "bench --linear --rows 64 --hidden 16 --vocab 500 --reps 2 --chunk-rows 16 --no-progress",
    )
    .path("--json", &json)
    .path("--csv", &csv)
    .stdout();
    assert!(
        out.contains("| 64 | 16 | 500 | f32 | linear-head | 16 × 4 |"),
        "{out}"
    );
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(r["benchmark"], "fused-linear");
    let x = &r["results"][0];
    assert_eq!(x["fused"]["chunks"], 4);
    assert_eq!(x["unfused"]["chunks"], 1);
    assert_eq!(x["fused"]["times_ms"].as_array().unwrap().len(), 2);
    assert_eq!(x["fused"]["loss"], x["unfused"]["loss"]);
    // The binary's counting allocator reports a heap peak.
    assert!(x["fused"]["heap_peak_extra_bytes"].as_u64().unwrap() > 0);
    assert!(x["time_ratio"].as_f64().unwrap() > 0.0);
    // The GPU modes ran, or the report says why not.
    match x["cuda"].as_object() {
        None => {
            let why = x["cuda_skipped"].as_str().expect("cuda_skipped");
            assert!(why.starts_with("no usable GPU ("), "{why}");
            assert!(out.contains(&format!("cuda skipped: {why}")), "{out}");
        }
        Some(g) => {
            assert!(x["cuda_skipped"].is_null());
            let (f, u) = (&g["fused"], &g["unfused"]);
            assert_eq!((&f["chunks"], &u["chunks"]), (&4.into(), &1.into()));
            // The same buffers but the chunk: the unfused peak is 48 rows
            // of two f32 logits chunks larger.
            let peak = |m: &serde_json::Value| m["device_peak_bytes"].as_u64().unwrap();
            assert_eq!(peak(u) - peak(f), 48 * 500 * 4 * 2);
            let (lf, lu) = (f["loss"].as_f64().unwrap(), u["loss"].as_f64().unwrap());
            assert!((lf - lu).abs() <= 1e-4 * lu.abs(), "{lf} {lu}");
            assert!(out.contains("on the GPU"), "{out}");
        }
    }
    let csv = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(csv.lines().count(), 2, "{csv}");
    assert!(
        csv.lines().next().unwrap().ends_with(",cuda_skipped"),
        "{csv}"
    );
    // The report reads back.
    let printed = Cli::new(&["bench-report", json.to_str().unwrap()]).stdout();
    assert!(printed.contains("fused linear + distillation"), "{printed}");
    // --backend cpu: skipped on any machine, visibly.
    let out = Cli::line(
        "bench --linear --backend cpu --rows 8 --hidden 4 --vocab 50 --reps 1 --no-progress",
    )
    .path("--json", &json)
    .stdout();
    assert!(out.contains("cuda skipped: --backend cpu"), "{out}");
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(r["results"][0]["cuda_skipped"], "--backend cpu");
    assert!(r["results"][0]["cuda"].is_null());
    assert!(r["note"]
        .as_str()
        .unwrap()
        .contains("cuda skipped: --backend cpu"));
    Cli::line("bench --linear --chunk-rows 2 --memory-budget 1MiB").fails_with("--memory-budget");
    Cli::line("bench --linear --memory-budget lots").fails_with("--memory-budget");
    Cli::line("bench --linear --reps 0").fails_with("--reps must be ≥ 1");
    Cli::line("bench --linear --topk-select").fails_with("--topk-select");
}
