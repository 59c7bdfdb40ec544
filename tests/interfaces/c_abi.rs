//! The C ABI: the committed header is what cbindgen makes of src/capi/, and a
//! C program (tests/c/abi_test.c), compiled by the system C compiler against
//! include/kdfuse.h and linked with the built libkdfuse.so and libkdfuse.a,
//! computes a loss on the CPU backend that matches the f64 oracle, through
//! version-2 and version-1 (smaller) structs; the version-2 fields (soft-cap,
//! row weights, teacher gradient, top-k teacher) are checked numerically by
//! a second run.

use crate::common::topk_inputs;
use kdfuse::{
    Backend, Divergence, GradDtype, HostData, KdInputs, Logits, LossSpec, Oracle, TopkIndices,
    TopkMode,
};
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn generated_header() -> String {
    let config = cbindgen::Config::from_file(root().join("cbindgen.toml")).expect("cbindgen.toml");
    let mut out = Vec::new();
    cbindgen::Builder::new()
        .with_config(config)
        .with_src(root().join("src/capi/mod.rs"))
        .with_src(root().join("src/capi/types.rs"))
        .generate()
        .expect("cbindgen parses src/capi")
        .write(&mut out);
    String::from_utf8(out).expect("utf-8 header")
}

#[test]
fn header_matches_the_rust_source() {
    let path = root().join("include/kdfuse.h");
    let fresh = generated_header();
    if std::env::var("KDFUSE_BLESS").is_ok_and(|v| v == "1") {
        std::fs::write(&path, &fresh).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "include/kdfuse.h disagrees with src/capi/; regenerate it with \
         KDFUSE_BLESS=1 cargo test --release --test interfaces c_abi"
    );
}

/// The C program's generator: x ← 6364136223846793005·x + 1442695040888963407,
/// value = (top 24 bits / 2^24 − 0.5) · 6.
fn lcg(seed: u64, n: usize) -> Vec<f32> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / 16_777_216.0 - 0.5) * 6.0
        })
        .collect()
}

/// target/<profile>/, where the library artifacts are.
/// target/<profile>/deps: the libkdfuse.so and .a built with this test (the
/// copies one level up are only refreshed by `cargo build`).
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().to_path_buf()
}

fn compile(args: &[&str], out: &Path) {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .args(args)
        .arg("-o")
        .arg(out)
        .status()
        .unwrap_or_else(|e| panic!("cannot run the C compiler `{cc}`: {e}"));
    assert!(status.success(), "{cc} {args:?} failed");
}

/// Runs a C program linked with this build's library: (success, its stdout
/// and stderr). cargo puts target/release (an older copy, refreshed by
/// `cargo build`) on LD_LIBRARY_PATH, which outranks the rpath: it is
/// pointed at this build.
fn run_program(exe: &Path, args: &[String]) -> (bool, String) {
    let out = Command::new(exe)
        .env("LD_LIBRARY_PATH", lib_dir())
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn norm(x: &[f32]) -> f64 {
    x.iter().map(|&g| (g as f64).powi(2)).sum::<f64>().sqrt()
}

const N: usize = 5;
const V: usize = 37;
const K: usize = 4;

/// The C program's batch: student, teacher, labels, and its JSD spec.
fn batch() -> (Vec<f32>, Vec<f32>, Vec<i64>, LossSpec) {
    let spec = LossSpec {
        divergence: Divergence::Jsd,
        beta: 0.3,
        temperature: 2.0,
        alpha: 0.25,
        ..Default::default()
    };
    (lcg(1, N * V), lcg(2, N * V), vec![3, -100, 36, 0, 17], spec)
}

/// The C program, built against include/kdfuse.h and linked with
/// libkdfuse.so and (fully) with libkdfuse.a: (its directory, both programs).
fn c_programs() -> (tempfile::TempDir, [PathBuf; 2]) {
    let lib = lib_dir();
    for name in ["libkdfuse.so", "libkdfuse.a"] {
        assert!(
            lib.join(name).exists(),
            "{} is missing: build the library with the tests (cargo test --release)",
            lib.join(name).display()
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let src = root().join("tests/c/abi_test.c");
    let inc = format!("-I{}", root().join("include").display());
    let dynamic = dir.path().join("abi_dynamic");
    compile(
        &[
            "-std=c11",
            "-Wall",
            "-Wextra",
            "-Werror",
            &inc,
            src.to_str().unwrap(),
            &format!("-L{}", lib.display()),
            &format!("-Wl,-rpath,{}", lib.display()),
            "-lkdfuse",
            "-lm",
        ],
        &dynamic,
    );
    let fully_static = dir.path().join("abi_static");
    compile(
        &[
            "-std=c11",
            &inc,
            src.to_str().unwrap(),
            lib.join("libkdfuse.a").to_str().unwrap(),
            "-lstdc++",
            "-lpthread",
            "-ldl",
            "-lm",
        ],
        &fully_static,
    );
    (dir, [dynamic, fully_static])
}

/// Runs both programs with `expected` (the oracle's values) as arguments.
fn run_c(expected: &[f64], marker: &str) {
    let (_dir, programs) = c_programs();
    let args: Vec<String> = expected.iter().map(|x| format!("{x:.17e}")).collect();
    for exe in &programs {
        let (ok, text) = run_program(exe, &args);
        assert!(ok, "{}: {text}", exe.display());
        assert!(text.contains("abi_test: ok"), "{text}");
        assert!(text.contains(marker), "{text}");
    }
}

/// The oracle's loss and gradient norm of the program's first batch.
fn dense_reference() -> [f64; 2] {
    let (s, t, labels, spec) = batch();
    let inputs = KdInputs {
        student: Logits::new(HostData::F32(&s), N, V),
        teacher: Logits::new(HostData::F32(&t), N, V),
        labels: Some(&labels),
        row_weights: None,
    };
    let want = Oracle
        .compute(&inputs, &spec, Some(GradDtype::F32))
        .unwrap();
    [want.loss, norm(want.grad.as_ref().unwrap())]
}

/// Version-2 structs and version-1 ones (the same result), and every error
/// path of both versions' fields.
#[test]
fn c_program_matches_the_oracle() {
    run_c(&dense_reference(), "abi_test: ok");
}

/// The version-2 fields numerically: soft-capping with row weights and the
/// teacher gradient, and a top-k teacher (int32 indices, full mode).
#[test]
fn c_program_version_2_fields_match_the_oracle() {
    let (s, t, labels, spec) = batch();
    let weights: Vec<f32> = (0..N).map(|r| 0.5 + 0.25 * r as f32).collect();
    let capped = LossSpec {
        softcap: Some(4.0),
        grad_teacher: true,
        ..spec.clone()
    };
    let inputs = KdInputs {
        student: Logits::new(HostData::F32(&s), N, V),
        teacher: Logits::new(HostData::F32(&t), N, V),
        labels: Some(&labels),
        row_weights: Some(&weights),
    };
    let cap = Oracle
        .compute(&inputs, &capped, Some(GradDtype::F32))
        .unwrap();
    // The C program's top-k teacher: K distinct indices per row and the
    // teacher's logits there.
    let idx: Vec<i32> = (0..N)
        .flat_map(|r| (0..K).map(move |i| ((r * 7 + i * 5) % V) as i32))
        .collect();
    let vals: Vec<f32> = idx
        .iter()
        .enumerate()
        .map(|(e, &j)| t[(e / K) * V + j as usize])
        .collect();
    let topk_spec = LossSpec {
        divergence: Divergence::ForwardKl,
        beta: 0.5,
        topk_mode: TopkMode::Full,
        ..spec
    };
    let topk_inputs = topk_inputs(&s, N, V, TopkIndices::I32(&idx), &vals, K, Some(&labels));
    let topk = Oracle
        .compute_topk(&topk_inputs, &topk_spec, Some(GradDtype::F32))
        .unwrap();
    let [loss, gnorm] = dense_reference();
    run_c(
        &[
            loss,
            gnorm,
            cap.loss,
            norm(cap.grad.as_ref().unwrap()),
            norm(cap.grad_teacher.as_ref().expect("oracle teacher gradient")),
            topk.loss,
            norm(topk.grad.as_ref().unwrap()),
        ],
        "version-2 fields checked",
    );
}

/// `tests/c/<name>.c` built against include/kdfuse.h and linked with
/// libkdfuse.so, run without arguments: its output, after checking that it
/// succeeded and printed "<name>: ok".
fn run_dynamic_c_program(name: &str) -> String {
    let lib = lib_dir();
    assert!(
        lib.join("libkdfuse.so").exists(),
        "build the library with the tests (cargo test --release)"
    );
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join(name);
    let src = root().join("tests/c").join(format!("{name}.c"));
    compile(
        &[
            "-std=c11",
            "-Wall",
            "-Wextra",
            "-Werror",
            &format!("-I{}", root().join("include").display()),
            src.to_str().unwrap(),
            &format!("-L{}", lib.display()),
            &format!("-Wl,-rpath,{}", lib.display()),
            "-lkdfuse",
            "-lm",
        ],
        &exe,
    );
    let (ok, text) = run_program(&exe, &[]);
    assert!(ok && text.contains(&format!("{name}: ok")), "{text}");
    text
}

/// Bad input through the C ABI (tests/c/abi_bad_input.c): unknown struct
/// versions, misaligned outputs, a wrapping element count, parameters beyond
/// fp32, β with another divergence; an empty batch's loss is +0.
#[test]
fn c_program_bad_input_is_refused() {
    run_dynamic_c_program("abi_bad_input");
}

/// Vocab-parallel distillation through the C ABI (tests/c/abi_vp.c): two
/// shards (one padded), JSD in two rounds with α > 0, against the unsharded
/// f64 entry point; the calls' errors (the device calls' too, with a GPU).
#[test]
fn c_program_vocab_parallel_matches_the_unsharded_loss() {
    print!("{}", run_dynamic_c_program("abi_vp"));
}

/// The fused linear + distillation loss through the C ABI
/// (tests/c/abi_linear.c): kdfuse_linear_loss_host against
/// kdfuse_compute_host on the logits materialised in C and naive gradient
/// GEMMs, chunked; its bad inputs named.
#[test]
fn c_program_fused_linear_matches_materialised_logits() {
    print!("{}", run_dynamic_c_program("abi_linear"));
}
