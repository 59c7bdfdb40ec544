//! `kdfuse feature-loss` end to end on temporary .npy files, its error lines,
//! and the feature groups of `kdfuse check`.

use crate::run;

use run::{assert_clean_error, json, kdfuse, read_f32, row_losses, write, Cli};

use kdfuse::{
    FeatureBackend, FeatureGrads, FeatureInputs, FeatureKind, FeatureSpec, Features, GradDtype,
    HostData, Oracle, Reduction,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};

fn random(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-2.0..2.0)).collect()
}

struct Dir {
    dir: tempfile::TempDir,
}

impl Dir {
    fn new() -> Self {
        Dir {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    /// Writes random f32 features of `shape` to `name`; returns the path and data.
    fn features(&self, name: &str, shape: &[u64], seed: u64) -> (PathBuf, Vec<f32>) {
        let data = random(seed, shape.iter().product::<u64>() as usize);
        let p = self.path(name);
        write(&p, &data, shape);
        (p, data)
    }
}

fn rel_l2(a: &[f32], b: &[f32]) -> f32 {
    let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    let den: f32 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

#[test]
fn rows_losses_and_both_gradients_match_the_oracle() {
    let (n, h) = (4, 37);
    let d = Dir::new();
    let (fs, s) = d.features("s.npy", &[n as u64, h as u64], 1);
    let (ft, t) = d.features("t.npy", &[n as u64, h as u64], 2);
    let (g, gt) = (d.path("g.npy"), d.path("gt.npy"));
    for kind in [FeatureKind::Mse, FeatureKind::Cosine] {
        let j = Cli::feature_loss(&fs, &ft, kind.as_str())
            .path("--grad", &g)
            .path("--grad-teacher", &gt)
            .args(&["--backend", "cpu"])
            .json();
        let inputs = FeatureInputs {
            student: Features::new(HostData::F32(&s), n, h),
            teacher: Features::new(HostData::F32(&t), n, h),
        };
        let reference = Oracle
            .feature_loss(
                &inputs,
                &FeatureSpec::new(kind),
                FeatureGrads::both(GradDtype::F32),
            )
            .unwrap();
        let loss = j["loss"].as_f64().unwrap();
        assert!(
            (loss - reference.loss).abs() <= 1e-5 * reference.loss,
            "{kind}: {loss} vs {}",
            reference.loss
        );
        assert_eq!(j["kind"], kind.as_str());
        assert_eq!(j["backend"], "cpu");
        assert_eq!(j["reduction"], "mean");
        assert_eq!(j["rows"], n);
        let (gs, shape) = read_f32(&g);
        assert_eq!(shape, vec![n as u64, h as u64]);
        assert!(rel_l2(&gs, reference.grad_student.as_ref().unwrap()) < 1e-5);
        let (gtv, _) = read_f32(&gt);
        assert!(rel_l2(&gtv, reference.grad_teacher.as_ref().unwrap()) < 1e-5);
    }
}

#[test]
fn attention_maps_of_rank_three_and_four() {
    let d = Dir::new();
    // Student [2, 3, 4, 5] (4-D), teacher [2, 6, 20] (3-D): channels differ.
    let (fs, s) = d.features("s.npy", &[2, 3, 4, 5], 3);
    let (ft, t) = d.features("t.npy", &[2, 6, 20], 4);
    let (g, gt) = (d.path("g.npy"), d.path("gt.npy"));
    let j = Cli::feature_loss(&fs, &ft, "attention")
        .args(&["--reduction", "none"])
        .path("--grad", &g)
        .path("--grad-teacher", &gt)
        .args(&["--backend", "oracle"])
        .json();
    let inputs = FeatureInputs {
        student: Features::maps(HostData::F32(&s), 2, 3, 20),
        teacher: Features::maps(HostData::F32(&t), 2, 6, 20),
    };
    let spec = FeatureSpec {
        reduction: Reduction::None,
        ..FeatureSpec::new(FeatureKind::Attention)
    };
    let reference = Oracle
        .feature_loss(&inputs, &spec, FeatureGrads::both(GradDtype::F32))
        .unwrap();
    assert_eq!(row_losses(&j), reference.row_losses);
    assert_eq!(j["eps"], 1e-12);
    assert_eq!(j["student_shape"], serde_json::json!([2, 3, 4, 5]));
    let (gs, shape) = read_f32(&g);
    assert_eq!(
        shape,
        vec![2, 3, 4, 5],
        "the gradient has the input's shape"
    );
    assert_eq!(&gs, reference.grad_student.as_ref().unwrap());
    assert_eq!(read_f32(&gt).1, vec![2, 6, 20]);
}

#[test]
fn dtype_eps_and_auto_backend() {
    let d = Dir::new();
    let (fs, _) = d.features("s.npy", &[3, 16], 5);
    let (ft, _) = d.features("t.npy", &[3, 16], 6);
    let run = |extra: &[&str]| Cli::feature_loss(&fs, &ft, "cosine").args(extra).output();
    let auto = run(&[]);
    let j = json(&auto);
    if kdfuse::cuda::CudaBackend::new(0).is_err() {
        assert_eq!(j["backend"], "cpu");
        assert!(String::from_utf8_lossy(&auto.stderr).contains("using the CPU backend"));
        assert_clean_error(&run(&["--backend", "cuda"]), "CUDA");
    }
    let bf16 = json(&run(&["--dtype", "bf16", "--backend", "cpu"]));
    assert_eq!(bf16["dtype"], "bf16");
    let f32_loss = json(&run(&["--backend", "cpu"]))["loss"].as_f64().unwrap();
    let bf16_loss = bf16["loss"].as_f64().unwrap();
    assert!(bf16_loss != f32_loss && (bf16_loss - f32_loss).abs() < 1e-2 * f32_loss);
    // A huge ε clamps every norm: the loss changes.
    let clamped = json(&run(&["--eps", "1e6", "--backend", "cpu"]));
    assert_eq!(clamped["eps"], 1e6);
    assert!((clamped["loss"].as_f64().unwrap() - 1.0).abs() < 1e-6);
}

#[test]
fn error_lines() {
    let d = Dir::new();
    let (s2, _) = d.features("s2.npy", &[3, 8], 7);
    let (t2, _) = d.features("t2.npy", &[3, 9], 8);
    let (t4, _) = d.features("t4.npy", &[4, 8], 9);
    let (m3, _) = d.features("m3.npy", &[3, 2, 8], 10);
    let (m3b, _) = d.features("m3b.npy", &[3, 5, 7], 11);
    let labels = d.path("l.npy");
    write(&labels, &[1i64, 2, 3], &[3]);
    let run = |s: &Path, t: &Path, kind: &str, extra: &[&str]| {
        Cli::feature_loss(s, t, kind)
            .args(&["--backend", "cpu"])
            .args(extra)
            .output()
    };
    assert_clean_error(&run(&s2, &t2, "mse", &[]), "shape mismatch");
    assert_clean_error(&run(&s2, &t4, "cosine", &[]), "shape mismatch");
    assert_clean_error(&run(&m3, &m3, "mse", &[]), "must be 2-D [N, H]");
    assert_clean_error(&run(&s2, &s2, "attention", &[]), "must be 3-D");
    assert_clean_error(&run(&m3, &m3b, "attention", &[]), "spatial size");
    assert_clean_error(&run(&s2, &labels, "mse", &[]), "unsupported dtype");
    assert_clean_error(&run(&s2, &d.path("missing.npy"), "mse", &[]), "cannot open");
    assert_clean_error(&run(&s2, &s2, "cosine", &["--eps", "-1"]), "`eps`");
    assert_clean_error(&run(&s2, &s2, "cosine", &["--eps", "nan"]), "`eps`");
    assert_clean_error(&run(&s2, &s2, "l1", &[]), "invalid value");
    assert_clean_error(
        &run(&s2, &s2, "mse", &["--reduction", "avg"]),
        "invalid value",
    );
    // H = 0.
    let empty = d.path("e.npy");
    write::<f32>(&empty, &[], &[3, 0]);
    assert_clean_error(&run(&empty, &empty, "mse", &[]), "`student`");
    let help = kdfuse(&["feature-loss", "--help"]);
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("--grad-teacher"));
}

#[test]
fn check_covers_the_feature_losses() {
    let text =
        Cli::line("check --backend cpu --cases 6 --feature-cases 40 --seed 4 --max-vocab 5000")
            .stdout();
    assert!(text.contains("feature losses, backend cpu vs oracle: 40 cases"));
    for group in ["f32/mse", "bf16/cosine", "f16/attention"] {
        assert!(text.contains(group), "{group} missing: {text}");
    }
    assert!(text.trim_end().ends_with("passed"));
}
