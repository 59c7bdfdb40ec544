//! `kdfuse bench --topk-select`: a tiny grid's table, JSON and CSV, and bad
//! flags as one-line errors naming the option.

use crate::run;

use run::{temp_paths, Cli};

#[test]
fn bench_topk_select_writes_table_json_and_csv() {
    let (_dir, [j, c]) = temp_paths(["t.json", "t.csv"]);
    let stdout = Cli::line("bench --topk-select --backend cpu --rows 3 --cols 500,700")
        .args(&[
            "--k",
            "4,32",
            "--dtype",
            "f32,bf16",
            "--with-lse",
            "--no-progress",
        ])
        .args(&["--torch-python", "/nonexistent/python"])
        .path("--json", &j)
        .path("--csv", &c)
        .stdout();
    assert!(stdout.contains("host memory copy bandwidth"), "{stdout}");
    assert!(stdout.contains("bf16 3x700 k=32 +lse"), "{stdout}");
    // Skipped variants say so, and why.
    assert!(stdout.contains("cuda skipped: --backend cpu"), "{stdout}");
    assert!(
        stdout.contains("torch skipped: /nonexistent/python"),
        "{stdout}"
    );

    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&j).unwrap()).unwrap();
    assert_eq!(r["benchmark"], "topk-select");
    assert!(r["host"]["memory_bandwidth_gbs"].as_f64().unwrap() > 0.0);
    assert!(r["date"].as_str().unwrap().ends_with('Z'));
    let results = r["results"].as_array().unwrap();
    assert_eq!(results.len(), 8);
    for res in results {
        let cfg = &res["config"];
        let (rows, cols, k) = (
            cfg["rows"].as_u64().unwrap(),
            cfg["cols"].as_u64().unwrap(),
            cfg["k"].as_u64().unwrap(),
        );
        assert_eq!(cfg["with_lse"], true);
        let size = if cfg["dtype"] == "bf16" { 2 } else { 4 };
        // Byte model: the logits read once, the winners and lse written.
        let bytes = rows * cols * size + rows * k * 8 + rows * 4;
        let cpu = &res["cpu"];
        assert_eq!(cpu["bytes"].as_u64().unwrap(), bytes);
        let per = res["bytes_per_element"].as_f64().unwrap();
        assert!((per - bytes as f64 / (rows * cols) as f64).abs() < 1e-9);
        assert!(cpu["timing"]["runs"].as_u64().unwrap() >= 20);
        assert!(res["input_sets"].as_u64().unwrap() >= 1);
        assert!(cpu["gbs"].as_f64().unwrap() > 0.0);
        assert!(cpu["fraction_of_reference"].as_f64().unwrap() > 0.0);
        assert!(res["cuda"].is_null());
        assert_eq!(res["cuda_skipped"], "--backend cpu");
        assert!(res["torch_ms"].is_null());
        assert!(res["torch_skipped"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/python"));
    }
    let csv = std::fs::read_to_string(&c).unwrap();
    let mut lines = csv.lines();
    let header = lines.next().unwrap();
    assert!(header.starts_with("rows,cols,k,dtype,with_lse,bytes_per_element,cpu_median_ms"));
    assert_eq!(lines.count(), 8);
}

#[test]
fn bench_topk_select_rejects_bad_flags_cleanly() {
    for (line, needle) in [
        (
            "bench --topk-select --backend cpu --rows 2 --cols 9 --k 10",
            "`k`",
        ),
        (
            "bench --topk-select --backend cpu --rows 2 --cols 9 --k 0",
            "`k`",
        ),
        (
            "bench --topk-select --backend cpu --rows 0 --cols 9 --k 1",
            "`rows`",
        ),
        (
            "bench --topk-select --backend cpu --rows 2 --cols 9 --k 1 --runs 3",
            "runs",
        ),
        ("bench --topk-select --k x", "--k"),
        ("bench --topk-select --divergence jsd", "--divergence"),
        ("bench --topk-select --preset quick", "--preset"),
        (
            "bench --backend cpu --rows 2 --cols 9 --k 4",
            "--topk-select",
        ),
        (
            "bench --backend cpu --rows 2 --cols 9 --with-lse",
            "--topk-select",
        ),
    ] {
        Cli::line(line).fails_with(needle);
    }
}
