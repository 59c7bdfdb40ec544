//! The `kdfuse` binary end to end, on temporary .npy files.

use crate::common;
use crate::run;

use common::logits;
use kdfuse::{
    Backend, Divergence, GradDtype, HostData, KdInputs, Logits, LossSpec, Oracle, Reduction,
};
use run::{assert_clean_error, json, kdfuse, read_f32, temp_paths, write, Cli};
use std::path::{Path, PathBuf};

struct Files {
    _dir: tempfile::TempDir,
    s: PathBuf,
    t: PathBuf,
    l: PathBuf,
    g: PathBuf,
    data: (Vec<f32>, Vec<f32>, Vec<i64>),
}

fn files(n: usize, v: usize, tv: usize) -> Files {
    let dir = tempfile::tempdir().unwrap();
    let s = logits(1, n, v, 2.0);
    let t = logits(2, n, tv, 2.0);
    let labels: Vec<i64> = (0..n as i64)
        .map(|i| if i == 1 { -100 } else { i % v as i64 })
        .collect();
    let f = Files {
        s: dir.path().join("s.npy"),
        t: dir.path().join("t.npy"),
        l: dir.path().join("l.npy"),
        g: dir.path().join("g.npy"),
        data: (s, t, labels),
        _dir: dir,
    };
    write(&f.s, &f.data.0, &[n as u64, v as u64]);
    write(&f.t, &f.data.1, &[n as u64, tv as u64]);
    write(&f.l, &f.data.2, &[n as u64]);
    f
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn loss_and_gradient_match_the_oracle() {
    for divergence in [Divergence::Jsd, Divergence::Tvd, Divergence::SoftCe] {
        cli_loss_against_oracle(divergence);
    }
}

/// `kdfuse loss` end to end (npy in, JSON and gradient npy out) for one
/// divergence, against the f64 oracle.
fn cli_loss_against_oracle(divergence: Divergence) {
    let (n, v) = (4, 50);
    let f = files(n, v, v);
    // β is JSD's alone (the CLI refuses it with another divergence).
    let jsd = divergence == Divergence::Jsd;
    let j = Cli::loss(&f.s, &f.t)
        .path("--labels", &f.l)
        .args(&["--divergence", divergence.as_str()])
        .args(if jsd {
            &["--beta", "0.3"]
        } else {
            &["--reduction", "batchmean"]
        })
        .args(&["--temperature", "2", "--alpha", "0.25"])
        .path("--grad", &f.g)
        .args(&["--backend", "cpu"])
        .json();
    let spec = LossSpec {
        divergence,
        beta: if jsd { 0.3 } else { 0.5 },
        temperature: 2.0,
        alpha: 0.25,
        ..Default::default()
    };
    let inputs = KdInputs {
        student: Logits::new(HostData::F32(&f.data.0), n, v),
        teacher: Logits::new(HostData::F32(&f.data.1), n, v),
        labels: Some(&f.data.2),
        row_weights: None,
    };
    let reference = Oracle
        .compute(&inputs, &spec, Some(GradDtype::F32))
        .unwrap();
    let loss = j["loss"].as_f64().unwrap();
    assert!(
        (loss - reference.loss).abs() <= 1e-5 * reference.loss.abs(),
        "{divergence}: {loss} vs {}",
        reference.loss
    );
    assert_eq!(j["rows"], 4);
    assert_eq!(j["valid_rows"], 3);
    assert_eq!(j["backend"], "cpu");
    assert_eq!(j["dtype"], "f32");
    let (g, shape) = read_f32(&f.g);
    assert_eq!(shape, vec![n as u64, v as u64]);
    let rg = reference.grad.unwrap();
    let err = g
        .iter()
        .zip(&rg)
        .map(|(a, b)| (a - b).powi(2))
        .sum::<f32>()
        .sqrt()
        / rg.iter().map(|b| b * b).sum::<f32>().sqrt();
    assert!(err < 1e-5, "{divergence}: gradient relative L2 {err}");
    assert_eq!(j["divergence"], divergence.as_str());
    assert!(g[v..2 * v].iter().all(|&x| x == 0.0), "ignored row");
}

#[test]
fn auto_backend_falls_back_to_cpu_and_says_so() {
    let f = files(3, 20, 20);
    let out = Cli::loss(&f.s, &f.t).output();
    let j = json(&out);
    if kdfuse::cuda::CudaBackend::new(0).is_err() {
        assert_eq!(j["backend"], "cpu");
        assert!(String::from_utf8_lossy(&out.stderr).contains("using the CPU backend"));
        Cli::loss(&f.s, &f.t)
            .args(&["--backend", "cuda"])
            .fails_with("CUDA");
    } else {
        assert_eq!(j["backend"], "cuda");
    }
}

#[test]
fn padded_teacher_uses_the_first_columns() {
    let (n, v, tv) = (3, 40, 48);
    let f = files(n, v, tv);
    let wide = Cli::loss(&f.s, &f.t).args(&["--backend", "cpu"]).json();
    let sliced: Vec<f32> = (0..n)
        .flat_map(|r| f.data.1[r * tv..r * tv + v].to_vec())
        .collect();
    let t2 = f.s.with_file_name("t2.npy");
    write(&t2, &sliced, &[n as u64, v as u64]);
    let narrow = Cli::loss(&f.s, &t2).args(&["--backend", "cpu"]).json();
    assert_eq!(wide["loss"], narrow["loss"]);
}

#[test]
fn reduction_none_dtypes_and_input_formats() {
    let (n, v) = (3, 30);
    let f = files(n, v, v);
    let j = Cli::loss(&f.s, &f.t)
        .args(&["--reduction", "none", "--backend", "oracle"])
        .json();
    assert_eq!(j["loss"].as_array().unwrap().len(), n);
    // f16 and f64 files, int32 labels, bf16 compute.
    let s16: Vec<half::f16> = f.data.0.iter().map(|&x| half::f16::from_f32(x)).collect();
    let t64: Vec<f64> = f.data.1.iter().map(|&x| x as f64).collect();
    let l32: Vec<i32> = f.data.2.iter().map(|&x| x as i32).collect();
    let (s16p, t64p, l32p) = (
        f.s.with_file_name("s16.npy"),
        f.s.with_file_name("t64.npy"),
        f.s.with_file_name("l32.npy"),
    );
    write(&s16p, &s16, &[n as u64, v as u64]);
    write(&t64p, &t64, &[n as u64, v as u64]);
    write(&l32p, &l32, &[n as u64]);
    for dtype in ["f32", "bf16", "f16"] {
        let j = Cli::loss(&s16p, &t64p)
            .path("--labels", &l32p)
            .args(&["--alpha", "0.5", "--dtype", dtype])
            .args(&["--backend", "cpu", "--reduction", "sum"])
            .json();
        assert_eq!(j["dtype"], dtype);
        assert_eq!(j["reduction"], Reduction::Sum.as_str());
        assert!(j["loss"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn errors_are_one_line_with_exit_code_2() {
    let f = files(3, 10, 10);
    let missing = f.s.with_file_name("nope.npy");
    let other = files(4, 10, 10);
    let narrow = files(3, 8, 8);
    // Bad inputs.
    for (student, teacher, needle) in [
        (&missing, &f.t, "nope.npy"),
        (&f.l, &f.t, "--student"),
        (&f.s, &f.l, "--teacher"),
        (&f.s, &other.t, "shape mismatch"),
        (&f.s, &narrow.t, "fewer than"),
    ] {
        Cli::loss(student, teacher).fails_with(needle);
    }
    // Bad options on good inputs.
    let bad_label = f.s.with_file_name("bad.npy");
    write(&bad_label, &[0i64, 99, 1], &[3]);
    let cases: [(&[&str], &str); 6] = [
        (&["--labels", p(&other.l)], "--labels"),
        (&["--temperature", "-1"], "temperature"),
        (&["--alpha", "0.5"], "labels"),
        (&["--divergence", "kl"], "kl"),
        (&["--beta", "x"], "beta"),
        (&["--labels", p(&bad_label)], "labels"),
    ];
    for (extra, needle) in cases {
        Cli::loss(&f.s, &f.t).args(extra).fails_with(needle);
    }
    Cli::new(&["loss"])
        .path("--student", &f.s)
        .fails_with("--teacher");
    let empty = kdfuse(&[]);
    assert_eq!(empty.status.code(), Some(2));
}

#[test]
fn info_check_and_help() {
    let out = kdfuse(&["info"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("kernels:") && text.contains("GPU"), "{text}");
    let j = json(&kdfuse(&["info", "--json"]));
    assert!(j["architectures"].is_array() && j["gpus"].is_array());
    let check = kdfuse(&["check", "--backend", "cpu", "--cases", "25", "--seed", "3"]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    assert!(String::from_utf8_lossy(&check.stdout).contains("passed"));
    // Every dtype × divergence group, tvd and soft-ce included.
    let text = Cli::line("check --backend cpu --cases 150 --seed 4 --max-vocab 3000").stdout();
    assert!(text.contains("passed"), "{text}");
    for dtype in ["f32", "bf16", "f16"] {
        for div in ["forward-kl", "reverse-kl", "jsd", "tvd", "soft-ce"] {
            assert!(
                text.contains(&format!("{dtype}/{div} ")),
                "{dtype}/{div}: {text}"
            );
        }
    }
    for cmd in [
        &["--help"][..],
        &["info", "--help"],
        &["loss", "--help"],
        &["check", "--help"],
    ] {
        let out = kdfuse(cmd);
        assert!(out.status.success(), "{cmd:?}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("Usage"));
    }
    let loss_help = String::from_utf8_lossy(&kdfuse(&["loss", "--help"]).stdout).into_owned();
    assert!(
        loss_help.contains("first V columns"),
        "the padded-teacher rule is documented"
    );
}

// ------------------------------------------------------------ kdfuse bench --

#[test]
fn bench_cpu_writes_table_json_csv_and_markdown() {
    let (_dir, [j, c, m]) = temp_paths(["b.json", "b.csv", "b.md"]);
    let stdout = Cli::line("bench --backend cpu --rows 3,5 --cols 1000 --dtype bf16,f32")
        .args(&["--divergence", "jsd", "--alpha", "0.5"])
        .path("--json", &j)
        .path("--csv", &c)
        .path("--markdown", &m)
        .args(&["--no-progress"])
        .stdout();
    assert!(stdout.contains("memory copy bandwidth"), "{stdout}");
    assert!(stdout.contains("jsd f32 5x1000 fast α=0.5"), "{stdout}");

    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&j).unwrap()).unwrap();
    assert_eq!(r["backend"], "cpu");
    assert!(r["reference_bandwidth_gbs"].as_f64().unwrap() > 0.0);
    assert!(r["date"].as_str().unwrap().ends_with('Z'));
    assert!(!r["commit"].as_str().unwrap().is_empty());
    assert!(r["host"]["cpu"].is_string());
    let results = r["results"].as_array().unwrap();
    assert_eq!(results.len(), 4);
    for res in results {
        let f = &res["fused"];
        let (rows, cols) = (
            res["config"]["rows"].as_u64().unwrap(),
            res["config"]["cols"].as_u64().unwrap(),
        );
        let in_size = if res["config"]["dtype"] == "bf16" {
            2
        } else {
            4
        };
        // Byte model of the CPU backend: inputs once, an f32 gradient once.
        assert_eq!(
            f["bytes"].as_u64().unwrap(),
            rows * cols * (2 * in_size + 4)
        );
        assert!(f["timing"]["runs"].as_u64().unwrap() >= 20);
        let t = &f["timing"];
        assert!(t["p10_ms"].as_f64() <= t["median_ms"].as_f64());
        assert!(t["median_ms"].as_f64() <= t["p90_ms"].as_f64());
        assert!(f["gbs"].as_f64().unwrap() > 0.0);
        assert!(res["checks"]["passed"].as_bool().unwrap());
    }
    let csv = std::fs::read_to_string(&c).unwrap();
    assert_eq!(csv.lines().count(), 5);
    assert!(csv.starts_with("device,backend,commit,date,divergence"));
    let md = std::fs::read_to_string(&m).unwrap();
    assert!(md.contains("| jsd bf16 3x1000 fast α=0.5 |"), "{md}");

    // bench-report renders the same Markdown from the JSON.
    let rep = kdfuse(&["bench-report", j.to_str().unwrap()]);
    assert!(rep.status.success());
    assert_eq!(String::from_utf8_lossy(&rep.stdout).trim(), md.trim());
}

#[test]
fn bench_and_profile_reject_bad_input_cleanly() {
    for (line, needle) in [
        ("bench --backend cpu --rows 4", "--rows and --cols"),
        ("bench --backend cpu --rows 4 --cols 9 --runs 5", "runs"),
        ("bench --backend cpu --preset huge", "huge"),
        ("bench --preset quick --rows 4", "--rows"),
        (
            "bench --backend cpu --rows 4 --cols 9 --temperature 0",
            "temperature",
        ),
        ("bench --backend cpu --rows 0 --cols 9", "rows"),
        (
            "profile --backend cpu --rows 4,8 --cols 9",
            "one configuration",
        ),
    ] {
        Cli::line(line).fails_with(needle);
    }
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("x.json");
    std::fs::write(&bad, "{}").unwrap();
    assert_clean_error(
        &kdfuse(&["bench-report", bad.to_str().unwrap()]),
        "not a kdfuse bench report",
    );
}

#[test]
fn profile_cpu_prints_timing_and_the_profiler_command() {
    let stdout = Cli::line("profile --backend cpu --rows 4 --cols 2000 --iters 3").stdout();
    assert!(stdout.contains("median"), "{stdout}");
    assert!(stdout.contains("perf record"), "{stdout}");
}

/// Without a usable GPU, `--backend cuda` is one clean error line; with one
/// (GPU machines) this test has nothing to check here: tests/gpu.rs runs it.
#[test]
fn bench_cuda_without_gpu_is_a_clean_error() {
    if kdfuse::cuda::CudaBackend::new(0).is_ok() {
        eprintln!("skipped: a GPU is present");
        return;
    }
    Cli::line("bench --backend cuda --rows 2 --cols 9").fails_with("CUDA");
    Cli::line("profile --rows 2 --cols 9").fails_with("CUDA");
}

/// A reader that goes away (`kdfuse … | head`) ends the command quietly, not
/// with a panic on EPIPE.
#[test]
fn closed_stdout_is_not_a_panic() {
    use std::process::Stdio;
    let mut child = Cli::line("check --backend cpu --cases 400 --verbose --max-vocab 50")
        .command()
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
}
