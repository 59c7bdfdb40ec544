//! `.safetensors` inputs and the teacher cache, end to end: `kdfuse
//! teacher-cache build`, then `kdfuse loss --teacher-cache`, which must equal
//! `kdfuse loss` given the same top-k as `.npy` arrays bit for bit; the
//! cache's crash safety (a writer killed mid-shard) and its bad input.

use crate::common;
use crate::run;

use kdfuse_cli::teacher_cache::{CacheReader, TopkRows};
use run::{write, Cli};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Rows of the teacher, as [B, T, V] = [2, 7, 64].
const B: usize = 2;
const T: usize = 7;
const N: usize = B * T;
const V: usize = 64;
const K: usize = 6;

/// Logits rounded to multiples of 0.5: many ties, which the selection breaks
/// by the lower index.
fn tied_logits(seed: u64, rows: usize) -> Vec<f32> {
    common::logits(seed, rows, V, 2.0)
        .into_iter()
        .map(|x| (x * 2.0).round() / 2.0)
        .collect()
}

/// The test's own top-k: per row a full sort, values descending, ties by
/// lower index.
fn topk(x: &[f32], k: usize) -> (Vec<i32>, Vec<f32>) {
    let (mut idx, mut val) = (Vec::new(), Vec::new());
    for row in x.chunks(V) {
        let mut order: Vec<usize> = (0..V).collect();
        order.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap().then(a.cmp(&b)));
        for &c in &order[..k] {
            idx.push(c as i32);
            val.push(row[c]);
        }
    }
    (idx, val)
}

/// Writes a .safetensors file of `(name, dtype, shape, little-endian bytes)`.
fn write_st(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(&str, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (*n, TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn f32_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn bf16_bytes(x: &[f32]) -> Vec<u8> {
    x.iter()
        .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
        .collect()
}

/// A temporary directory with the teacher `t.npy` ([B, T, V]) and the
/// student `s.npy` ([N, V]).
struct Files {
    dir: tempfile::TempDir,
    t: Vec<f32>,
    s: Vec<f32>,
}

impl Files {
    fn new() -> Files {
        let dir = tempfile::tempdir().unwrap();
        let t = tied_logits(3, N);
        let s = common::logits(4, N, V, 2.0);
        write(
            &dir.path().join("t.npy"),
            &t,
            &[B as u64, T as u64, V as u64],
        );
        write(&dir.path().join("s.npy"), &s, &[N as u64, V as u64]);
        Files { dir, t, s }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `kdfuse teacher-cache build --logits t.npy -k K --out DIR …`.
    fn build(&self, out: &str, extra: &[&str]) -> Cli {
        Cli::new(&["teacher-cache", "build", "-k", &K.to_string()])
            .path("--logits", self.path("t.npy"))
            .path("--out", self.path(out))
            .args(extra)
    }

    /// `kdfuse loss` on the CPU with student `s`.
    fn loss(&self, s: &str) -> Cli {
        Cli::new(&["loss", "--backend", "cpu"]).path("--student", self.path(s))
    }

    /// Writes rows [lo, hi) of the student and of a top-k pair as .npy files
    /// `NAME-s.npy`, `NAME-idx.npy`, `NAME-val.npy`.
    fn write_rows(&self, name: &str, lo: usize, hi: usize, idx: &[i32], val: &[f32]) {
        let n = (hi - lo) as u64;
        let s = &self.s[lo * V..hi * V];
        write(&self.path(&format!("{name}-s.npy")), s, &[n, V as u64]);
        let (a, b) = (lo * K, hi * K);
        write(
            &self.path(&format!("{name}-idx.npy")),
            &idx[a..b],
            &[n, K as u64],
        );
        write(
            &self.path(&format!("{name}-val.npy")),
            &val[a..b],
            &[n, K as u64],
        );
    }
}

/// Runs `kdfuse loss` from the cache and from the .npy pair `name-*` with
/// `flags`, each with `--grad`: the losses and the gradient files are equal,
/// byte for byte.
fn assert_same_loss(f: &Files, name: &str, cache: &str, rows: Option<&str>, flags: &[&str]) {
    let g_cache = f.path(&format!("{name}-gc.npy"));
    let g_npy = f.path(&format!("{name}-gn.npy"));
    let mut c = f
        .loss(&format!("{name}-s.npy"))
        .path("--teacher-cache", f.path(cache))
        .path("--grad", &g_cache)
        .args(flags);
    if let Some(r) = rows {
        c = c.args(&["--rows", r]);
    }
    let jc = c.json();
    let jn = f
        .loss(&format!("{name}-s.npy"))
        .path("--teacher-topk-indices", f.path(&format!("{name}-idx.npy")))
        .path("--teacher-topk-values", f.path(&format!("{name}-val.npy")))
        .path("--grad", &g_npy)
        .args(flags)
        .json();
    assert_eq!(jc["teacher"], "cache", "{jc}");
    let n = jc["rows"].as_u64().unwrap();
    let (lo, hi) = (jc["cache_rows"][0].as_u64(), jc["cache_rows"][1].as_u64());
    assert_eq!(hi.zip(lo).map(|(h, l)| h - l), Some(n), "{jc}");
    assert_eq!(jn["teacher"], "topk", "{jn}");
    for key in [
        "loss",
        "rows",
        "k",
        "valid_rows",
        "topk_mode",
        "teacher_logprobs",
    ] {
        assert_eq!(jc[key], jn[key], "{name} {flags:?}: {key}: {jc} vs {jn}");
    }
    assert_eq!(
        std::fs::read(&g_cache).unwrap(),
        std::fs::read(&g_npy).unwrap(),
        "{name} {flags:?}: the gradients differ"
    );
}

/// The acceptance test: dense logits → `teacher-cache build` → `kdfuse loss
/// --teacher-cache` equals `kdfuse loss` with the same top-k as .npy arrays,
/// bit for bit, over shard boundaries, in each mode, for f32 and bf16 values.
#[test]
fn cache_loss_equals_npy_topk_bit_for_bit() {
    let f = Files::new();
    let (idx, val) = topk(&f.t, K);
    let j = f.build("c32", &["--shard-rows", "4"]).json();
    assert_eq!(j["total_rows"], N);
    assert_eq!(j["shards"], N.div_ceil(4));
    // The stored selection is the test's own.
    let r = CacheReader::open(&f.path("c32")).unwrap();
    let all = r.read_rows(0, N as u64).unwrap();
    assert_eq!(
        (all.indices.as_slice(), all.values.as_slice()),
        (&idx[..], &val[..])
    );
    assert!(all.lse.is_none());

    f.write_rows("all", 0, N, &idx, &val);
    f.write_rows("mid", 3, 10, &idx, &val);
    for mode in ["full", "support"] {
        let flags = ["--topk-mode", mode, "--temperature", "2"];
        assert_same_loss(&f, "all", "c32", None, &flags);
        assert_same_loss(&f, "mid", "c32", Some("3:10"), &flags);
    }
    assert_same_loss(&f, "all", "c32", Some(":"), &["--dtype", "bf16"]);

    // bf16 values: the .npy values rounded to bf16 give the same loss.
    f.build("c16", &["--shard-rows", "5", "--values-dtype", "bf16"])
        .json();
    let val16: Vec<f32> = val
        .iter()
        .map(|&x| half::bf16::from_f32(x).to_f32())
        .collect();
    f.write_rows("b16", 0, N, &idx, &val16);
    assert_same_loss(&f, "b16", "c16", None, &["--reduction", "sum"]);
}

/// `--logprobs --with-lse`: values are logit − lse, the lse that of the row
/// over all V; the tail mode runs on them (log-probs implied by the cache).
#[test]
fn a_logprob_cache_with_lse_feeds_the_tail_mode() {
    let f = Files::new();
    f.build(
        "lp",
        &[
            "--shard-rows",
            "3",
            "--logprobs",
            "--with-lse",
            "--teacher-name",
            "t0",
        ],
    )
    .json();
    let r = CacheReader::open(&f.path("lp")).unwrap();
    assert_eq!(r.meta().teacher, "t0");
    let TopkRows {
        indices,
        values,
        lse,
        ..
    } = r.read_rows(0, N as u64).unwrap();
    let lse = lse.unwrap();
    let (idx, val) = topk(&f.t, K);
    assert_eq!(indices, idx);
    for (row, x) in f.t.chunks(V).enumerate() {
        let m = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        let want = m + x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
        assert!((lse[row] as f64 - want).abs() < 1e-5, "row {row}");
        for j in 0..K {
            assert_eq!(values[row * K + j], val[row * K + j] - lse[row]);
        }
    }
    // A row range across shards reads as the slice of the whole.
    let part = r.read_rows(2, 8).unwrap();
    assert_eq!(part.indices, indices[2 * K..8 * K]);
    assert_eq!(part.lse.unwrap(), lse[2..8]);

    f.write_rows("lp", 0, N, &indices, &values);
    assert_same_loss(
        &f,
        "lp",
        "lp",
        None,
        &["--topk-mode", "tail", "--teacher-logprobs"],
    );
    // Implied by the cache: the same without the flag.
    let j = f
        .loss("lp-s.npy")
        .path("--teacher-cache", f.path("lp"))
        .args(&["--topk-mode", "tail"])
        .json();
    assert_eq!(j["teacher_logprobs"], true, "{j}");
}

/// `--temperature T`: the values and the lse are those of logits / T (the
/// same indices: dividing by T > 0 keeps the order), T is in the metadata,
/// and `kdfuse loss`, which tempers the teacher itself, refuses the cache.
#[test]
fn a_tempered_cache_holds_logits_over_t() {
    let f = Files::new();
    let j = f
        .build("tt", &["--temperature", "2.5", "--with-lse"])
        .json();
    assert_eq!(j["temperature"], 2.5, "{j}");
    let r = CacheReader::open(&f.path("tt")).unwrap();
    assert_eq!(r.meta().temperature, Some(2.5));
    let rows = r.read_rows(0, N as u64).unwrap();
    let scaled: Vec<f32> = f.t.iter().map(|&x| x / 2.5f32).collect();
    let (idx, val) = topk(&scaled, K);
    assert_eq!(rows.indices, idx);
    assert_eq!(rows.values, val);
    let lse = rows.lse.unwrap();
    for (row, x) in scaled.chunks(V).enumerate() {
        let m = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        let want = m + x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
        assert!((lse[row] as f64 - want).abs() < 1e-5, "row {row}");
    }
    f.loss("s.npy")
        .path("--teacher-cache", f.path("tt"))
        .fails_with("temperature 2.5");
    for bad in ["0", "-1", "nan", "inf"] {
        f.build("bad", &[&format!("--temperature={bad}")])
            .fails_with("--temperature");
    }
}

/// Appending continues the cache after its last row; the rows read back are
/// those of both runs.
#[test]
fn a_cache_can_be_appended_to() {
    let f = Files::new();
    f.build("c", &["--shard-rows", "4"]).json();
    let j = f.build("c", &["--shard-rows", "5", "--append"]).json();
    assert_eq!(
        (j["rows_added"].as_u64(), j["total_rows"].as_u64()),
        (Some(N as u64), Some(2 * N as u64))
    );
    let r = CacheReader::open(&f.path("c")).unwrap();
    let (idx, _) = topk(&f.t, K);
    let rows = r.read_rows(N as u64 - 2, N as u64 + 3).unwrap();
    assert_eq!(rows.indices[..2 * K], idx[(N - 2) * K..]);
    assert_eq!(rows.indices[2 * K..], idx[..3 * K]);
    let j = Cli::new(&["teacher-cache", "info", f.path("c").to_str().unwrap()]).json();
    assert_eq!(j["total_rows"], 2 * N);
    assert_eq!(j["shards"].as_array().unwrap().len(), 4 + 3);
}

/// A writer killed in the middle of a shard: the cache reads back exactly
/// the finished shards, the temporary file is no part of it, and appending
/// resumes after them (removing the temporary file).
#[test]
fn a_killed_writer_leaves_only_complete_shards() {
    let f = Files::new();
    let dir = f.path("k");
    let mut child = f
        .build("k", &["--shard-rows", "3"])
        .command()
        .env("KDFUSE_TEACHER_CACHE_STALL_AT_SHARD", "2")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let temporaries = || -> Vec<String> {
        std::fs::read_dir(&dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".tmp"))
                    .collect()
            })
            .unwrap_or_default()
    };
    let start = Instant::now();
    while !temporaries().iter().any(|n| n.starts_with(".shard-00002")) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the writer never stalled"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the writer ended early"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The temporary file is half written; the stall comes after its sync.
    std::thread::sleep(Duration::from_millis(100));
    child.kill().unwrap();
    child.wait().unwrap();

    assert_eq!(temporaries().len(), 1, "{:?}", temporaries());
    let r = CacheReader::open(&dir).unwrap();
    assert_eq!(r.rows(), 6);
    assert_eq!(r.index().shards.len(), 2);
    let (idx, val) = topk(&f.t, K);
    let rows = r.read_rows(0, 6).unwrap();
    assert_eq!(
        (rows.indices, rows.values),
        (idx[..6 * K].to_vec(), val[..6 * K].to_vec())
    );
    assert!(r.read_rows(0, 7).is_err());
    // `kdfuse loss` sees the 6 rows.
    f.write_rows("k6", 0, 6, &idx, &val);
    assert_same_loss(&f, "k6", "k", None, &[]);

    // Resuming: the temporary file goes, the rows follow the finished ones.
    let j = f.build("k", &["--shard-rows", "3", "--append"]).json();
    assert_eq!(j["total_rows"], 6 + N);
    assert!(temporaries().is_empty(), "{:?}", temporaries());
    let r = CacheReader::open(&dir).unwrap();
    assert_eq!(r.read_rows(6, 6 + N as u64).unwrap().indices, idx);
}

/// .safetensors inputs everywhere `kdfuse loss` reads arrays: the same loss
/// as from .npy (F32, BF16 and F16 logits, N-D shapes, I32/I64 indices and
/// labels), the tensor named by `--tensor` or the file's only one.
#[test]
fn safetensors_inputs_equal_npy_inputs() {
    let f = Files::new();
    let labels: Vec<i64> = (0..N as i64).map(|i| (i * 7) % V as i64).collect();
    write(&f.path("l.npy"), &labels, &[N as u64]);
    let t16: Vec<f32> =
        f.t.iter()
            .map(|&x| half::bf16::from_f32(x).to_f32())
            .collect();
    write(&f.path("t16.npy"), &t16, &[N as u64, V as u64]);
    let lab32: Vec<u8> = labels
        .iter()
        .flat_map(|&l| (l as i32).to_le_bytes())
        .collect();
    // One file holding the student [B, T, V], both teachers and the labels.
    write_st(
        &f.path("all.safetensors"),
        &[
            ("student", Dtype::F32, vec![B, T, V], f32_bytes(&f.s)),
            ("teacher", Dtype::F32, vec![B, T, V], f32_bytes(&f.t)),
            ("teacher16", Dtype::BF16, vec![N, V], bf16_bytes(&f.t)),
            ("labels", Dtype::I32, vec![N], lab32),
        ],
    );
    let flags = ["--alpha", "0.3", "--temperature", "1.5"];
    let npy = |t: &str| {
        f.loss("s.npy")
            .path("--teacher", f.path(t))
            .path("--labels", f.path("l.npy"))
            .args(&flags)
            .json()
    };
    let st = |teacher: &str| {
        let all = f.path("all.safetensors");
        Cli::new(&["loss", "--backend", "cpu"])
            .path("--student", &all)
            .path("--teacher", &all)
            .path("--labels", &all)
            .args(&["--tensor", "student=student", "--tensor", "labels=labels"])
            .args(&["--tensor", &format!("teacher={teacher}")])
            .args(&flags)
            .json()
    };
    assert_eq!(st("teacher")["loss"], npy("t.npy")["loss"]);
    assert_eq!(st("teacher16")["loss"], npy("t16.npy")["loss"]);

    // The only tensor of a file needs no --tensor; F16 and I64.
    let s16: Vec<u8> =
        f.s.iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect();
    let s16_f32: Vec<f32> =
        f.s.iter()
            .map(|&x| half::f16::from_f32(x).to_f32())
            .collect();
    write(&f.path("s16.npy"), &s16_f32, &[N as u64, V as u64]);
    write_st(
        &f.path("s16.safetensors"),
        &[("x", Dtype::F16, vec![N, V], s16)],
    );
    let (idx, val) = topk(&f.t, K);
    let idx64: Vec<u8> = idx.iter().flat_map(|&i| (i as i64).to_le_bytes()).collect();
    write_st(
        &f.path("idx.safetensors"),
        &[("i", Dtype::I64, vec![B, T, K], idx64)],
    );
    write_st(
        &f.path("val.safetensors"),
        &[("v", Dtype::F32, vec![B, T, K], f32_bytes(&val))],
    );
    f.write_rows("p", 0, N, &idx, &val);
    let topk_loss = |s: &str, i: &str, v: &str| {
        f.loss(s)
            .path("--teacher-topk-indices", f.path(i))
            .path("--teacher-topk-values", f.path(v))
            .json()["loss"]
            .clone()
    };
    assert_eq!(
        topk_loss("s16.safetensors", "idx.safetensors", "val.safetensors"),
        topk_loss("s16.npy", "p-idx.npy", "p-val.npy")
    );
    // feature-loss reads .safetensors too: the F16 student against its .npy twin.
    let feat = |s: &str| {
        Cli::feature_loss(f.path(s), f.path("s.npy"), "mse")
            .args(&["--backend", "cpu"])
            .json()["loss"]
            .clone()
    };
    assert_eq!(feat("s16.safetensors"), feat("s16.npy"));
    assert!(feat("s16.npy").as_f64().is_some_and(|l| l > 0.0));
    // teacher-cache build from a safetensors [B, T, V] equals one from .npy.
    f.build("c1", &[]).json();
    Cli::new(&[
        "teacher-cache",
        "build",
        "-k",
        &K.to_string(),
        "--tensor",
        "teacher",
    ])
    .path("--logits", f.path("all.safetensors"))
    .path("--out", f.path("c2"))
    .json();
    let read = |c: &str| {
        CacheReader::open(&f.path(c))
            .unwrap()
            .read_rows(0, N as u64)
            .unwrap()
    };
    assert_eq!(read("c1"), read("c2"));
}

/// The cache that python/kdfuse/teacher_cache.py wrote
/// (python/tests/fixtures/teacher_cache_py: log-probs with lse of fixed
/// logits) reads back here, and `kdfuse loss` takes it.
#[test]
fn a_python_written_cache_reads_back() {
    let dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../python/tests/fixtures/teacher_cache_py");
    let r = CacheReader::open(&dir).unwrap();
    let (n, v, k) = (10usize, 40usize, 5usize);
    assert_eq!(
        (r.rows(), r.meta().k, r.meta().vocab_size),
        (n as u64, k, v)
    );
    let x: Vec<f32> = (0..n * v)
        .map(|i| (((i / v) * 7 + (i % v) * 13) % 17) as f32 * 0.5 - 4.0)
        .collect();
    let rows = r.read_rows(0, n as u64).unwrap();
    let lse = rows.lse.as_ref().unwrap();
    for (row, xr) in x.chunks(v).enumerate() {
        let mut order: Vec<usize> = (0..v).collect();
        order.sort_by(|&a, &b| xr[b].partial_cmp(&xr[a]).unwrap().then(a.cmp(&b)));
        for j in 0..k {
            assert_eq!(rows.indices[row * k + j], order[j] as i32, "row {row}");
            assert_eq!(
                rows.values[row * k + j],
                xr[order[j]] - lse[row],
                "row {row}"
            );
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let s = common::logits(9, n, v, 1.0);
    write(&tmp.path().join("s.npy"), &s, &[n as u64, v as u64]);
    let j = Cli::new(&["loss", "--backend", "cpu", "--topk-mode", "tail"])
        .path("--student", tmp.path().join("s.npy"))
        .path("--teacher-cache", &dir)
        .json();
    assert!(j["loss"].as_f64().is_some_and(f64::is_finite), "{j}");
}

/// A crash between a shard's rename and the index's: the shard is on disk
/// but not listed. Readers do not see it; the next append writes over it.
#[test]
fn an_unindexed_shard_is_not_part_of_the_cache() {
    let f = Files::new();
    f.build("u", &["--shard-rows", "8"]).json();
    let dir = f.path("u");
    std::fs::write(dir.join("shard-00002.safetensors"), b"left by a crash").unwrap();
    let r = CacheReader::open(&dir).unwrap();
    assert_eq!((r.rows(), r.index().shards.len()), (N as u64, 2));
    f.build("u", &["--shard-rows", "100", "--append"]).json();
    let r = CacheReader::open(&dir).unwrap();
    assert_eq!((r.rows(), r.index().shards.len()), (2 * N as u64, 3));
    let (idx, _) = topk(&f.t, K);
    assert_eq!(r.read_rows(N as u64, 2 * N as u64).unwrap().indices, idx);
}

/// N-D logits are rows: a [B, T, V] student and teacher give the loss of
/// their [B·T, V] reshapes, and the gradients keep the inputs' shapes.
#[test]
fn n_d_logits_are_rows_and_gradients_keep_their_shape() {
    let f = Files::new();
    write(&f.path("s3.npy"), &f.s, &[B as u64, T as u64, V as u64]);
    write(&f.path("t2.npy"), &f.t, &[N as u64, V as u64]);
    let run = |s: &str, t: &str, g: &str, gt: &str| {
        f.loss(s)
            .path("--teacher", f.path(t))
            .path("--grad", f.path(g))
            .path("--grad-teacher", f.path(gt))
            .json()["loss"]
            .clone()
    };
    assert_eq!(
        run("s3.npy", "t.npy", "g3.npy", "gt3.npy"),
        run("s.npy", "t2.npy", "g2.npy", "gt2.npy")
    );
    let (g3, shape3) = run::read_f32(&f.path("g3.npy"));
    let (g2, shape2) = run::read_f32(&f.path("g2.npy"));
    assert_eq!(
        (shape3, shape2),
        (vec![B as u64, T as u64, V as u64], vec![N as u64, V as u64])
    );
    assert_eq!(g3, g2);
    let (gt3, shape) = run::read_f32(&f.path("gt3.npy"));
    assert_eq!(shape, vec![B as u64, T as u64, V as u64]);
    assert_eq!(gt3, run::read_f32(&f.path("gt2.npy")).0);
}
