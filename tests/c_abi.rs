//! The C ABI: the committed header is what cbindgen makes of src/capi/, and a
//! C program (tests/c/abi_test.c), compiled by the system C compiler against
//! include/kdfuse.h and linked with the built libkdfuse.so and libkdfuse.a,
//! computes a loss on the CPU backend that matches the f64 oracle.

use kdfuse::{Backend, Divergence, GradDtype, HostData, KdInputs, Logits, LossSpec, Oracle};
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
         KDFUSE_BLESS=1 cargo test --release --test c_abi"
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
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(Path::parent).unwrap().to_path_buf()
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

#[test]
fn c_program_matches_the_oracle() {
    let (n, v) = (5usize, 37usize);
    let s = lcg(1, n * v);
    let t = lcg(2, n * v);
    let labels: Vec<i64> = vec![3, -100, 36, 0, 17];
    let spec = LossSpec {
        divergence: Divergence::Jsd,
        beta: 0.3,
        temperature: 2.0,
        alpha: 0.25,
        ..Default::default()
    };
    let inputs = KdInputs {
        student: Logits::new(HostData::F32(&s), n, v),
        teacher: Logits::new(HostData::F32(&t), n, v),
        labels: Some(&labels),
        row_weights: None,
    };
    let want = Oracle
        .compute(&inputs, &spec, Some(GradDtype::F32))
        .unwrap();
    let gnorm = want
        .grad
        .unwrap()
        .iter()
        .map(|&g| (g as f64).powi(2))
        .sum::<f64>()
        .sqrt();

    let lib = lib_dir();
    for name in ["libkdfuse.so", "libkdfuse.a"] {
        assert!(
            lib.join(name).exists(),
            "{} is missing: build the library first (cargo build --release)",
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
    for exe in [&dynamic, &fully_static] {
        let out = Command::new(exe)
            .arg(format!("{:.17e}", want.loss))
            .arg(format!("{gnorm:.17e}"))
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{}: {text}", exe.display());
        assert!(text.contains("abi_test: ok"), "{text}");
    }
}
