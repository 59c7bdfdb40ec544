//! Helpers for the tests that run the `kdfuse` binary.

use npyz::WriterBuilder;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A new temporary directory and the paths of `names` in it (not created).
pub fn temp_paths<const N: usize>(names: [&str; N]) -> (tempfile::TempDir, [PathBuf; N]) {
    let dir = tempfile::tempdir().unwrap();
    let paths = names.map(|name| dir.path().join(name));
    (dir, paths)
}

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

/// A `kdfuse` command line, built up flag by flag; [`Cli::output`] runs it.
#[derive(Clone, Debug)]
pub struct Cli {
    args: Vec<String>,
}

impl Cli {
    /// `kdfuse ARGS…`.
    pub fn new(args: &[&str]) -> Cli {
        Cli {
            args: args.iter().map(|a| a.to_string()).collect(),
        }
    }

    /// `kdfuse LINE`, `line` split at white space (no quoting: for fixed
    /// words, never for paths).
    pub fn line(line: &str) -> Cli {
        Cli {
            args: line.split_whitespace().map(str::to_string).collect(),
        }
    }

    /// `kdfuse loss --student S --teacher T`.
    pub fn loss(student: impl AsRef<Path>, teacher: impl AsRef<Path>) -> Cli {
        Cli::new(&["loss"])
            .path("--student", student)
            .path("--teacher", teacher)
    }

    /// `kdfuse feature-loss --student S --teacher T --kind KIND`.
    pub fn feature_loss(student: impl AsRef<Path>, teacher: impl AsRef<Path>, kind: &str) -> Cli {
        Cli::new(&["feature-loss"])
            .path("--student", student)
            .path("--teacher", teacher)
            .args(&["--kind", kind])
    }

    /// These arguments appended.
    pub fn args(mut self, more: &[&str]) -> Cli {
        self.args.extend(more.iter().map(|a| a.to_string()));
        self
    }

    /// `FLAG PATH` appended.
    pub fn path(mut self, flag: &str, path: impl AsRef<Path>) -> Cli {
        let path = path.as_ref().to_str().expect("a UTF-8 path");
        self.args.extend([flag.to_string(), path.to_string()]);
        self
    }

    /// The command, to run with other stdio.
    pub fn command(&self) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_kdfuse"));
        command.args(&self.args);
        command
    }

    /// Runs the command.
    pub fn output(&self) -> Output {
        self.command().output().expect("runs")
    }

    /// Runs the command, which must succeed: its stdout.
    pub fn stdout(&self) -> String {
        let out = self.output();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{self:?}: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// Runs the command, which must succeed and print one JSON object.
    pub fn json(&self) -> serde_json::Value {
        json(&self.output())
    }

    /// Runs the command, which must fail with one clean line containing
    /// `needle` ([`assert_clean_error`]).
    pub fn fails_with(&self, needle: &str) {
        assert_clean_error(&self.output(), needle);
    }
}

/// The per-row losses of a `--reduction none` JSON report.
pub fn row_losses(j: &serde_json::Value) -> Vec<f64> {
    let rows = j["loss"]
        .as_array()
        .unwrap_or_else(|| panic!("no row losses: {j}"));
    rows.iter().map(|x| x.as_f64().unwrap()).collect()
}
