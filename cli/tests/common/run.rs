//! Helpers for the tests that run the `kdfuse` binary.

use npyz::WriterBuilder;
use std::path::Path;
use std::process::{Command, Output};

/// Runs the `kdfuse` binary with `args`.
pub fn kdfuse(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kdfuse"))
        .args(args)
        .output()
        .expect("runs")
}

/// Writes a C-order .npy file of `shape`.
pub fn write<T: npyz::AutoSerialize + Copy>(path: &Path, data: &[T], shape: &[u64]) {
    let f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .shape(shape)
        .writer(f)
        .begin_nd()
        .unwrap();
    w.extend(data.iter().copied()).unwrap();
    w.finish().unwrap();
}

/// Reads a float32 .npy file: (values, shape).
pub fn read_f32(path: &Path) -> (Vec<f32>, Vec<u64>) {
    let npy =
        npyz::NpyFile::new(std::io::BufReader::new(std::fs::File::open(path).unwrap())).unwrap();
    let shape = npy.shape().to_vec();
    (npy.into_vec::<f32>().unwrap(), shape)
}

/// The command succeeded and printed one JSON object: that object.
pub fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is one JSON object")
}

/// Exit code 2, exactly one line on stderr containing `needle`, no backtrace.
pub fn assert_clean_error(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line expected: {err}"
    );
    assert!(err.contains(needle), "`{needle}` not in: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
}
