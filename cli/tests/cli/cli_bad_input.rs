//! Bad input through the `kdfuse` binary: each must be one clean error line
//! (exit 2, no panic), never a silently wrong or ignored value; and outputs
//! that cannot be written leave nothing half-written behind.

use crate::common;
use crate::run;

use run::{assert_clean_error, json, kdfuse, write, Cli};
use std::path::PathBuf;
use std::process::{Command, Stdio};

const N: usize = 4;
const V: usize = 1000;

/// A temporary directory with a student and a teacher `[N, V]`.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let s = common::logits(1, N, V, 2.0);
        let t = common::logits(2, N, V, 2.0);
        write(&dir.path().join("s.npy"), &s, &[N as u64, V as u64]);
        write(&dir.path().join("t.npy"), &t, &[N as u64, V as u64]);
        Files { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn p(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_string()
    }

    /// `kdfuse loss` of s.npy and t.npy on the CPU.
    fn cpu_loss(&self) -> Cli {
        Cli::loss(self.path("s.npy"), self.path("t.npy")).args(&["--backend", "cpu"])
    }

    /// `kdfuse loss` of s.npy and t.npy on the CPU, with `extra` flags.
    fn loss(&self, extra: &[&str]) -> std::process::Output {
        self.cpu_loss().args(extra).output()
    }

    /// The directory's file names.
    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

#[test]
fn parameters_beyond_fp32_are_refused() {
    let f = Files::new();
    // 1e19 printed a loss of 9.05e10, 1e20 one of −inf.
    for tau in ["1e19", "1e20", "1e-20"] {
        assert_clean_error(&f.loss(&["--temperature", tau]), "temperature");
    }
    // 1e-50 ran uncapped (while the JSON said 1e-50); 1e39 gave NaN.
    for cap in ["1e-50", "1e39"] {
        assert_clean_error(&f.loss(&["--softcap", cap]), "--softcap");
    }
    let j = json(&f.loss(&["--temperature", "1e6", "--softcap", "1e30"]));
    assert!(j["loss"].is_f64(), "{j}");
}

#[test]
fn an_empty_batch_has_a_loss_of_zero() {
    let f = Files::new();
    let empty: [f32; 0] = [];
    write(&f.path("s0.npy"), &empty, &[0, 7]);
    for reduction in ["batchmean", "sum", "mean"] {
        let out = Cli::loss(f.path("s0.npy"), f.path("s0.npy"))
            .args(&["--backend", "cpu", "--reduction", reduction])
            .output();
        let j = json(&out);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!text.contains("-0"), "{reduction}: {text}");
        assert_eq!(j["loss"].as_f64(), Some(0.0), "{reduction}: {text}");
    }
}

#[test]
fn attention_map_size_that_overflows_is_refused() {
    let f = Files::new();
    let empty: [f32; 0] = [];
    // [0, 1, 2^32, 2^32]: no element, but H·W wraps u64 (the gradient file
    // written from it could not be read back).
    write(&f.path("a.npy"), &empty, &[0, 1, 1 << 32, 1 << 32]);
    Cli::feature_loss(f.path("a.npy"), f.path("a.npy"), "attention")
        .args(&["--backend", "cpu"])
        .path("--grad", f.path("g.npy"))
        .fails_with("overflows");
    assert!(!f.path("g.npy").exists());
}

#[test]
fn a_stdout_that_cannot_be_written_is_an_error() {
    let f = Files::new();
    for cli in [f.cpu_loss(), Cli::line("info")] {
        let out = cli
            .command()
            .stdout(std::fs::File::create("/dev/full").unwrap())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert_clean_error(&out, "stdout");
    }
}

#[test]
fn outputs_must_not_be_one_file_or_an_input() {
    let f = Files::new();
    let g = f.p("g.npy");
    let same = format!("{}/./g.npy", f.dir.path().display());
    assert_clean_error(
        &f.loss(&["--grad", &g, "--grad-teacher", &same]),
        "--grad and --grad-teacher",
    );
    assert!(!f.path("g.npy").exists());
    let s = f.p("s.npy");
    assert_clean_error(&f.loss(&["--grad", &s]), "--student");
    let t = f.p("t.npy");
    assert_clean_error(&f.loss(&["--grad-teacher", &t]), "--teacher");
    Cli::feature_loss(&s, &t, "mse")
        .args(&["--grad", &g, "--grad-teacher", &g])
        .fails_with("same file");
}

/// `kdfuse loss … --grad G` under a file-size limit below the gradient's
/// size: the write fails; G keeps its old content and no temporary file is
/// left (it was truncated before).
#[test]
fn a_failed_write_leaves_no_truncated_file() {
    let f = Files::new();
    let g = f.path("g.npy");
    std::fs::write(&g, b"old content").unwrap();
    let before = f.names();
    let cmd = format!(
        "trap '' XFSZ; ulimit -f 4; exec '{}' loss --student '{}' --teacher '{}' --backend cpu --grad '{}'",
        env!("CARGO_BIN_EXE_kdfuse"),
        f.p("s.npy"),
        f.p("t.npy"),
        g.display()
    );
    let out = Command::new("sh").arg("-c").arg(&cmd).output().unwrap();
    assert_clean_error(&out, "g.npy");
    assert_eq!(std::fs::read(&g).unwrap(), b"old content");
    assert_eq!(f.names(), before, "a temporary file was left behind");
    // Without the limit, the same command replaces the file.
    let j = json(&f.loss(&["--grad", g.to_str().unwrap()]));
    assert_eq!(j["grad"].as_str(), g.to_str());
    assert_eq!(run::read_f32(&g).1, vec![N as u64, V as u64]);
}

#[test]
fn check_with_no_case_is_an_error() {
    assert_clean_error(&kdfuse(&["check", "--cases", "0"]), "--cases");
    assert_clean_error(
        &kdfuse(&["check", "--cases", "0", "--feature-cases", "0"]),
        "--cases",
    );
}

/// Progress on a terminal only: nothing on a piped stderr; the case count on
/// a terminal (`script` gives the command one, where it is installed).
#[test]
fn check_shows_progress_on_a_terminal_only() {
    let args = "check --backend cpu --cases 3 --feature-cases 1 --max-vocab 64";
    let out = Cli::line(args).output();
    assert!(out.status.success());
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = format!("'{}' {args}", env!("CARGO_BIN_EXE_kdfuse"));
    match Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .output()
    {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                text.contains("/4 cases"),
                "no progress on a terminal: {text}"
            );
        }
        _ => eprintln!("skipped the terminal half: `script` is not usable here"),
    }
}

#[test]
fn profile_names_its_own_flags() {
    let out = kdfuse(&["profile", "--backend", "cpu"]);
    assert_clean_error(&out, "--rows and --cols");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("--preset"));
}

#[test]
fn flags_that_would_be_ignored_are_refused() {
    let f = Files::new();
    Cli::line("profile --backend cpu --variant eager --rows 2 --cols 64")
        .fails_with("--variant eager");
    for d in ["forward-kl", "reverse-kl", "tvd", "soft-ce"] {
        assert_clean_error(&f.loss(&["--divergence", d, "--beta", "0.3"]), "--beta");
        // Even the default value, given explicitly.
        assert_clean_error(&f.loss(&["--divergence", d, "--beta", "0.5"]), "--beta");
    }
    json(&f.loss(&["--divergence", "jsd", "--beta", "0.3"]));
    Cli::line("bench --backend cpu --rows 2 --cols 64 --beta 0.3").fails_with("--beta");
    Cli::feature_loss(f.path("s.npy"), f.path("t.npy"), "mse")
        .args(&["--eps", "1e-6"])
        .fails_with("--eps");
}

/// JSON has no NaN or inf: such a loss is `null`, its spelling in
/// `nonfinite` (README, "JSON output").
#[test]
fn nonfinite_losses_are_null_with_their_spelling() {
    let f = Files::new();
    let mut s = common::logits(1, 2, 4, 1.0);
    s[0] = f32::NAN;
    write(&f.path("nan.npy"), &s, &[2, 4]);
    let t = common::logits(2, 2, 4, 1.0);
    write(&f.path("t4.npy"), &t, &[2, 4]);
    let run = |reduction: &str| {
        Cli::loss(f.path("nan.npy"), f.path("t4.npy"))
            .args(&["--backend", "cpu", "--reduction", reduction])
            .json()
    };
    let j = run("batchmean");
    assert!(j["loss"].is_null(), "{j}");
    assert_eq!(j["nonfinite"]["loss"], "nan", "{j}");
    let j = run("none");
    assert!(j["loss"][0].is_null() && j["loss"][1].is_f64(), "{j}");
    assert_eq!(j["nonfinite"]["loss[0]"], "nan", "{j}");
    assert!(j["nonfinite"].get("loss[1]").is_none(), "{j}");
    // Finite losses: no `nonfinite` field.
    let j = json(&f.loss(&[]));
    assert!(j.get("nonfinite").is_none(), "{j}");
}

/// Writes a .safetensors file of `(name, dtype, shape, bytes)`.
fn write_st(path: &std::path::Path, tensors: &[(&str, safetensors::Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<_> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                *n,
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// Bad .safetensors inputs and `--tensor` values: one line naming the
/// option and what was expected.
#[test]
fn bad_safetensors_inputs_are_refused() {
    use safetensors::Dtype;
    let f = Files::new();
    let floats: Vec<u8> = common::logits(1, N, V, 2.0)
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let two = f.path("two.safetensors");
    write_st(
        &two,
        &[
            ("a", Dtype::F32, vec![N, V], floats.clone()),
            ("b", Dtype::F32, vec![N, V], floats.clone()),
        ],
    );
    let t = f.path("t.npy");
    let loss = |s: &std::path::Path| Cli::loss(s, &t).args(&["--backend", "cpu"]);
    // Two tensors and no --tensor: the names listed.
    loss(&two).fails_with("--student holds 2 tensors (a, b): name one with --tensor");
    loss(&two)
        .args(&["--tensor", "c"])
        .fails_with("no tensor `c` (--tensor); it holds: a, b");
    json(&loss(&two).args(&["--tensor", "b"]).output());
    json(&loss(&two).args(&["--tensor", "student=a"]).output());
    // --tensor that would be ignored, or names no input.
    assert_clean_error(
        &f.loss(&["--tensor", "a"]),
        "no input is a .safetensors file",
    );
    loss(&two)
        .args(&["--tensor", "studnet=a"])
        .fails_with("`studnet` is not an input of this command");
    loss(&two)
        .args(&["--tensor", "teacher=a"])
        .fails_with("--teacher is not a .safetensors file");
    // Dtypes: integers for logits, floats for labels or indices.
    let ints: Vec<u8> = (0..N * V).flat_map(|i| (i as i32).to_le_bytes()).collect();
    write_st(
        &f.path("i.safetensors"),
        &[("x", Dtype::I32, vec![N, V], ints)],
    );
    loss(&f.path("i.safetensors"))
        .fails_with("--student has unsupported dtype I32 (expected F32, BF16, F16 or F64)");
    let fl: Vec<u8> = (0..N).flat_map(|i| (i as f32).to_le_bytes()).collect();
    write_st(&f.path("lf.safetensors"), &[("x", Dtype::F32, vec![N], fl)]);
    f.cpu_loss()
        .path("--labels", f.path("lf.safetensors"))
        .fails_with("--labels has unsupported dtype F32 (expected I32 or I64)");
    // Shapes: 1-D logits, 2-D labels.
    write_st(
        &f.path("s1.safetensors"),
        &[("x", Dtype::F32, vec![N * V], floats.clone())],
    );
    loss(&f.path("s1.safetensors")).fails_with("--student must be 2-D [N, V]");
    let l2: Vec<u8> = (0..N as i64).flat_map(|i| i.to_le_bytes()).collect();
    write_st(
        &f.path("l2.safetensors"),
        &[("x", Dtype::I64, vec![2, N / 2], l2)],
    );
    f.cpu_loss()
        .path("--labels", f.path("l2.safetensors"))
        .fails_with("--labels must be 1-D [N]");
    // Not a safetensors file at all, or a truncated one.
    std::fs::write(f.path("junk.safetensors"), b"not a safetensors file").unwrap();
    loss(&f.path("junk.safetensors")).fails_with("not a valid .safetensors file (--student)");
    let bytes = std::fs::read(&two).unwrap();
    std::fs::write(f.path("cut.safetensors"), &bytes[..bytes.len() - 5]).unwrap();
    loss(&f.path("cut.safetensors")).fails_with("not a valid .safetensors file (--student)");
}

/// The teacher cache's bad input: conflicting teachers, bad row ranges,
/// damaged caches, an append that does not match.
#[test]
fn bad_teacher_caches_are_refused() {
    let f = Files::new();
    let c = f.path("c");
    let build = |extra: &[&str]| {
        Cli::new(&["teacher-cache", "build", "-k", "5"])
            .path("--logits", f.path("t.npy"))
            .path("--out", &c)
            .args(extra)
    };
    build(&["--shard-rows", "3"]).json();
    let cached = || {
        Cli::new(&["loss", "--backend", "cpu"])
            .path("--student", f.path("s.npy"))
            .path("--teacher-cache", &c)
    };
    json(&cached().output());
    cached()
        .path("--teacher", f.path("t.npy"))
        .fails_with("--teacher-cache and --teacher exclude each other");
    cached()
        .path("--teacher-topk-indices", f.path("t.npy"))
        .fails_with("--teacher-cache and --teacher-topk-indices");
    f.cpu_loss()
        .args(&["--rows", "0:2"])
        .fails_with("--rows selects rows of a --teacher-cache");
    for (rows, needle) in [
        (
            "1:4",
            "--student has 4 rows, --teacher-cache rows 1:4 are 3",
        ),
        ("2:9", "--rows 2:9: out of range"),
        ("3:1", "--rows 3:1: out of range"),
        ("a:b", "--rows a:b: not a number"),
        ("3", "--rows 3: no `:`"),
    ] {
        cached().args(&["--rows", rows]).fails_with(needle);
    }
    cached()
        .args(&["--teacher-logprobs"])
        .fails_with("--teacher-logprobs: the cache");
    cached()
        .args(&["--grad-teacher", f.p("gt.npy").as_str()])
        .fails_with("--grad-teacher");
    // Building: an existing cache, a metadata mismatch on append, k > V, NaN.
    build(&[]).fails_with("already holds a teacher cache");
    build(&["--append", "--values-dtype", "bf16"]).fails_with("values_dtype = f32, not bf16");
    Cli::new(&["teacher-cache", "build", "-k", "1001"])
        .path("--logits", f.path("t.npy"))
        .path("--out", f.path("c2"))
        .fails_with("-k 1001 exceeds the vocabulary of --logits (V = 1000)");
    let mut nan = common::logits(2, N, V, 2.0);
    nan[V + 7] = f32::NAN;
    write(&f.path("nan.npy"), &nan, &[N as u64, V as u64]);
    Cli::new(&["teacher-cache", "build", "-k", "3"])
        .path("--logits", f.path("nan.npy"))
        .path("--out", f.path("c3"))
        .fails_with("row 1, column 7 is NaN");
    // Damaged caches: no directory, a bad index, a truncated or missing shard.
    Cli::new(&["loss", "--backend", "cpu"])
        .path("--student", f.path("s.npy"))
        .path("--teacher-cache", f.path("nowhere"))
        .fails_with("cannot read the teacher cache's index");
    let index = c.join("teacher_cache.index.json");
    let good = std::fs::read_to_string(&index).unwrap();
    std::fs::write(&index, good.replace("\"end\": 3", "\"end\": 2")).unwrap();
    cached().fails_with("expected a non-empty range from 2");
    std::fs::write(&index, "{").unwrap();
    cached().fails_with("not a valid index");
    std::fs::write(&index, &good).unwrap();
    // A header whose offsets do not match the shapes, the file's length
    // consistent with it: the first tensor 4 bytes short, the second 4 long.
    let shard0 = c.join("shard-00000.safetensors");
    let bytes = std::fs::read(&shard0).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let offsets = |h: &serde_json::Value, t: &str| {
        let o = &h[t]["data_offsets"];
        (o[0].as_u64().unwrap(), o[1].as_u64().unwrap())
    };
    let (first, second) = if offsets(&header, "indices").0 == 0 {
        ("indices", "values")
    } else {
        ("values", "indices")
    };
    let (a0, a1) = offsets(&header, first);
    let (b0, b1) = offsets(&header, second);
    assert_eq!(a1, b0, "{header}");
    header[first]["data_offsets"] = serde_json::json!([a0, a1 - 4]);
    header[second]["data_offsets"] = serde_json::json!([b0 - 4, b1]);
    let mut forged = serde_json::to_vec(&header).unwrap();
    forged.resize(forged.len().div_ceil(8) * 8, b' ');
    let mut file = (forged.len() as u64).to_le_bytes().to_vec();
    file.extend(&forged);
    file.extend(&bytes[8 + n..]);
    std::fs::write(&shard0, &file).unwrap();
    // (safetensors checks the offsets against the shapes as it reads the header.)
    cached().fails_with("not a safetensors header: invalid shape, data type, or offset");
    std::fs::write(&shard0, &bytes).unwrap();
    json(&cached().output());
    let shard = c.join("shard-00001.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 1]).unwrap();
    cached().fails_with("a truncated or altered shard");
    std::fs::remove_file(&shard).unwrap();
    cached().fails_with("a shard the index lists cannot be opened");
}
