//! `--kernel` / `KDFUSE_KERNEL`: the dense loss kernel's choice, its errors,
//! and `kdfuse info`'s "Loss kernel" section.

use crate::common::logits;
use crate::run::{assert_clean_error, json, temp_paths, write, Cli};

/// Whether a GPU is usable here (else `info` plans for an sm_90).
fn gpu() -> bool {
    kdfuse::cuda::device_count().is_ok_and(|n| n > 0)
}

/// A small `kdfuse loss` case on the CPU-or-CUDA `auto` backend.
fn loss_files() -> (tempfile::TempDir, [std::path::PathBuf; 2]) {
    let (dir, [s, t]) = temp_paths(["s.npy", "t.npy"]);
    write(&s, &logits(1, 3, 40, 2.0), &[3, 40]);
    write(&t, &logits(2, 3, 40, 2.0), &[3, 40]);
    (dir, [s, t])
}

#[test]
fn a_bad_kernel_flag_is_one_line() {
    let (_dir, [s, t]) = loss_files();
    for cli in [
        Cli::line("info --kernel bogus"),
        Cli::line("bench --rows 4 --cols 64 --kernel bogus"),
        Cli::line("profile --rows 4 --cols 64 --kernel fast"),
        Cli::line("linear-loss --student-hidden h.npy --student-weight w.npy --kernel V1"),
        Cli::loss(&s, &t).args(&["--kernel", "bogus"]),
    ] {
        cli.fails_with("must be auto, v1 or single-read");
        cli.fails_with("--kernel");
    }
}

#[test]
fn a_bad_kdfuse_kernel_is_a_clear_error_where_it_is_read() {
    let (_dir, [s, t]) = loss_files();
    for cli in [Cli::line("info"), Cli::loss(&s, &t)] {
        let out = cli
            .command()
            .env("KDFUSE_KERNEL", "bogus")
            .output()
            .unwrap();
        assert_clean_error(&out, "KDFUSE_KERNEL");
        assert_clean_error(&out, "must be auto, v1 or single-read");
    }
    // --kernel overrides it where it is given: `info`, and a loss on the
    // auto backend (which opens CUDA, or falls back to the CPU here).
    for cli in [
        Cli::line("info --kernel v1"),
        Cli::loss(&s, &t).args(&["--kernel", "v1"]),
    ] {
        let out = cli
            .command()
            .env("KDFUSE_KERNEL", "bogus")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    // The CPU backend never reads it.
    let out = Cli::loss(&s, &t)
        .args(&["--backend", "cpu"])
        .command()
        .env("KDFUSE_KERNEL", "bogus")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn info_shows_the_loss_kernel_plans() {
    let out = Cli::line("info")
        .command()
        .env_remove("KDFUSE_KERNEL")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Loss kernel (--kernel / KDFUSE_KERNEL: auto):"),
        "{text}"
    );
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("bf16 V=128256:"))
        .unwrap_or_else(|| panic!("no bf16 V=128256 plan: {text}"));
    for shape in [
        "bf16 V=32000:",
        "bf16 V=262144:",
        "f32 V=128256:",
        "bf16 V=128256, top-k teacher:",
    ] {
        assert!(text.contains(shape), "{shape} missing: {text}");
    }
    if !gpu() {
        assert!(
            text.contains("planned for an sm_90 (no GPU here): compute capability 9.0"),
            "{text}"
        );
        assert!(line.contains("single-read (cluster "), "{line}");
    }
    // Forced v1, and the JSON.
    let out = Cli::line("info --kernel v1 --json").output();
    let j = json(&out);
    assert_eq!(j["loss_kernel"]["choice"], "v1");
    let devices = j["loss_kernel"]["devices"].as_array().unwrap();
    assert!(!devices.is_empty(), "{j}");
    for d in devices {
        for p in d["plans"].as_array().unwrap() {
            assert_eq!(p["describe"], "v1 (forced)", "{p}");
        }
    }
    if !gpu() {
        let j = json(&Cli::line("info --json --kernel single-read").output());
        let d = &j["loss_kernel"]["devices"][0];
        assert_eq!(d["caps"]["max_cluster"], 16, "{d}");
        let bf16 = d["plans"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["dtype"] == "bf16" && p["cols"] == 128256)
            .unwrap();
        assert_eq!(bf16["teacher"], "dense", "{bf16}");
        assert_eq!(bf16["plan"]["kernel"], "single-read", "{bf16}");
        assert!(bf16["plan"]["cluster"].as_u64().unwrap() > 1, "{bf16}");
        // A top-k CTA stages the student alone: fewer CTAs per row.
        let topk = d["plans"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["dtype"] == "bf16" && p["cols"] == 128256 && p["teacher"] == "top-k")
            .unwrap();
        assert_eq!(topk["plan"]["kernel"], "single-read", "{topk}");
        assert!(
            topk["plan"]["cluster"].as_u64() < bf16["plan"]["cluster"].as_u64(),
            "{topk} {bf16}"
        );
    }
}
