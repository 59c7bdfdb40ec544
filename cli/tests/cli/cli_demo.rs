//! `kdfuse demo` end to end: a small run's table, JSON and SVG, and clean
//! one-line errors.

use crate::run;

use run::{assert_clean_error, kdfuse};

const SMALL: &[&str] = &[
    "demo",
    "--device",
    "cpu",
    "--teacher-hidden",
    "64",
    "--teacher-epochs",
    "3",
    "--student-epochs",
    "4",
    "--seeds",
    "2",
];

#[test]
fn small_run_prints_the_table_and_writes_the_plot() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("curves.svg");
    let mut args = SMALL.to_vec();
    args.extend(["--omit-class", "7", "--plot", svg.to_str().unwrap()]);
    let out = kdfuse(&args);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "teacher",
        "64-64-10",
        "student (hard labels)",
        "student (distilled)",
        "64-10-10",
        "gain of distillation",
        "digit 7 (never seen by the students)",
        "not run on a GPU",
        "µs/image",
    ] {
        assert!(text.contains(needle), "`{needle}` not in:\n{text}");
    }
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(plot.starts_with("<svg") && plot.contains("<polyline"));
}

#[test]
fn json_report() {
    let mut args = SMALL.to_vec();
    args.push("--json");
    let out = kdfuse(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["device"], "cpu");
    assert_eq!(v["test_images"], 497);
    let models = v["models"].as_array().unwrap();
    assert_eq!(models.len(), 3);
    assert_eq!(models[0]["params"], 64 * 64 + 64 + 64 * 10 + 10);
    assert_eq!(models[1]["params"], 64 * 10 + 10 + 10 * 10 + 10);
    assert_eq!(models[2]["test_acc_per_seed"].as_array().unwrap().len(), 2);
    assert_eq!(models[2]["curve"].as_array().unwrap().len(), 4);
    let acc = models[0]["test_acc"]["mean"].as_f64().unwrap();
    assert!(acc > 0.5 && acc <= 1.0, "{acc}");
    assert_eq!(v["config"]["seeds"], 2);
}

#[test]
fn bad_arguments_exit_2_with_one_line() {
    assert_clean_error(&kdfuse(&["demo", "--seeds", "0"]), "seeds");
    assert_clean_error(&kdfuse(&["demo", "--omit-class", "10"]), "omit_class");
    assert_clean_error(&kdfuse(&["demo", "--alpha", "1.5"]), "alpha");
    assert_clean_error(&kdfuse(&["demo", "--temperature", "0"]), "temperature");
    assert_clean_error(&kdfuse(&["demo", "--teacher-dropout", "1"]), "dropout");
    assert_clean_error(&kdfuse(&["demo", "--student-hidden", "10,x"]), "width");
    assert_clean_error(&kdfuse(&["demo", "--device", "tpu"]), "device");
    assert_clean_error(&kdfuse(&["demo", "--plot", "curves.png"]), ".svg");
    assert_clean_error(&kdfuse(&["demo", "--train", "1797"]), "train");
    if kdfuse::distill::Device::Cuda.resolve().is_err() {
        assert_clean_error(
            &kdfuse(&["demo", "--device", "cuda"]),
            "CUDA backend unavailable",
        );
    }
}
