//! Helpers shared by the integration tests.
#![allow(dead_code)]

use kdfuse::{HostData, KdInputs, Logits};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Random logits of standard deviation `scale`, `rows × cols`, f32.
pub fn logits(seed: u64, rows: usize, cols: usize, scale: f32) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..rows * cols)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale * 1.7)
        .collect()
}

/// Dense f32 inputs.
pub fn inputs<'a>(
    s: &'a [f32],
    t: &'a [f32],
    rows: usize,
    cols: usize,
    labels: Option<&'a [i64]>,
) -> KdInputs<'a> {
    KdInputs {
        student: Logits::new(HostData::F32(s), rows, cols),
        teacher: Logits::new(HostData::F32(t), rows, cols),
        labels,
        row_weights: None,
    }
}

/// A top-k teacher's f32 inputs: the student [rows, cols], `k` indices and
/// values per row.
pub fn topk_inputs<'a>(
    s: &'a [f32],
    rows: usize,
    cols: usize,
    indices: kdfuse::TopkIndices<'a>,
    values: &'a [f32],
    k: usize,
    labels: Option<&'a [i64]>,
) -> kdfuse::TopkInputs<'a> {
    kdfuse::TopkInputs {
        student: Logits::new(HostData::F32(s), rows, cols),
        teacher: kdfuse::TopkTeacher {
            indices,
            values: HostData::F32(values),
            k,
        },
        labels,
        row_weights: None,
    }
}

/// Dense inputs of any dtype, `rows × cols`, without labels or row weights.
pub fn inputs_of<'a>(s: HostData<'a>, t: HostData<'a>, rows: usize, cols: usize) -> KdInputs<'a> {
    KdInputs {
        student: Logits::new(s, rows, cols),
        teacher: Logits::new(t, rows, cols),
        labels: None,
        row_weights: None,
    }
}

/// Largest |a − b| / max(|b|, floor).
pub fn max_rel(a: &[f32], b: &[f32], floor: f32) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(floor))
        .fold(0.0, f32::max)
}

/// Every dtype × divergence group and every dtype × top-k mode group of a
/// sweep was drawn.
#[allow(dead_code)]
pub fn assert_all_groups(report: &kdfuse::check::SweepReport) {
    for dtype in kdfuse::Dtype::ALL {
        for d in kdfuse::Divergence::ALL {
            let g = format!("{dtype}/{d}");
            assert!(report.groups.contains_key(&g), "group {g} not drawn");
        }
        for m in kdfuse::TopkMode::ALL {
            let g = format!("{dtype}/topk-{m}");
            assert!(report.groups.contains_key(&g), "group {g} not drawn");
        }
    }
}

// ------------------------------------------------------- every backend --

/// A backend a [`for_each_backend!`] test runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum On {
    /// The f64 oracle.
    Oracle,
    /// The fast CPU backend.
    Cpu,
    /// The CUDA kernels under the CPU emulation.
    Emu,
    /// The CUDA backend (skipped, visibly, without a usable GPU).
    Cuda,
}

impl On {
    /// The instance of [`for_each_backend!`] named `name`.
    pub fn named(name: &str) -> On {
        match name {
            "oracle" => On::Oracle,
            "cpu" => On::Cpu,
            "emu" => On::Emu,
            "cuda" => On::Cuda,
            other => panic!("no backend `{other}`"),
        }
    }
}

impl std::fmt::Display for On {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            On::Oracle => "oracle",
            On::Cpu => "cpu",
            On::Emu => "emu",
            On::Cuda => "cuda",
        })
    }
}

/// A family of backends: the loss's (`dyn Backend`) or the feature losses'
/// (`dyn FeatureBackend`).
pub trait Family {
    /// The backend of this family on `on`; `None` where the test is skipped.
    fn make(on: On, test: &str) -> Option<Box<Self>>;
}

impl Family for dyn kdfuse::Backend {
    fn make(on: On, test: &str) -> Option<Box<Self>> {
        Some(match on {
            On::Oracle => Box::new(kdfuse::Oracle),
            On::Cpu => Box::new(kdfuse::CpuBackend),
            On::Emu => Box::new(kdfuse::emu::EmuBackend::default()),
            On::Cuda => Box::new(cuda_or_skip(test)?),
        })
    }
}

impl Family for dyn kdfuse::FeatureBackend {
    fn make(on: On, test: &str) -> Option<Box<Self>> {
        Some(match on {
            On::Oracle => Box::new(kdfuse::Oracle),
            On::Cpu => Box::new(kdfuse::CpuBackend),
            On::Emu => Box::new(kdfuse::feature::emu::FeatureEmuBackend::default()),
            On::Cuda => Box::new(cuda_or_skip(test)?),
        })
    }
}

/// The CUDA backend, or `None` after a line `test … skipped (why)` written
/// straight to the process's stderr (past the harness's output capture, so
/// that a skip is never a silent pass). With `KDFUSE_REQUIRE_GPU=1` a missing
/// GPU is a failure, as in tests/gpu.rs; any error other than "CUDA
/// unavailable" is one too.
pub fn cuda_or_skip(test: &str) -> Option<kdfuse::cuda::CudaBackend> {
    use std::io::Write;
    match kdfuse::cuda::CudaBackend::new(0) {
        Ok(b) => Some(b),
        Err(kdfuse::KdError::CudaUnavailable(why)) => {
            let require = std::env::var("KDFUSE_REQUIRE_GPU").is_ok_and(|v| v == "1");
            assert!(!require, "KDFUSE_REQUIRE_GPU=1 but no usable GPU: {why}");
            let line = format!("test {test} ... skipped ({why})\n");
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
            None
        }
        Err(e) => panic!("{test}: the CUDA backend failed: {e}"),
    }
}

/// Runs `body` on the backend `on` of family `F` (the instance `which` of a
/// [`for_each_backend!`] test in module `module`).
pub fn run_on<F: Family + ?Sized>(which: &str, module: &str, body: impl FnOnce(&F, On)) {
    let on = On::named(which);
    // module_path!() starts with the crate's name, the harness's names do not.
    let path = module.split_once("::").map_or(module, |(_, p)| p);
    if let Some(b) = F::make(on, &format!("{path}::{which}")) {
        body(&*b, on);
    }
}

/// One test body, one `#[test]` per backend. The body is an ordinary
/// function taking `&dyn Backend` or `&dyn FeatureBackend` (and, if it needs
/// to know, the [`On`] it runs on); the macro adds a module of the same name
/// with the tests `oracle`, `cpu`, `emu` (the CUDA kernels under the
/// emulation) and `cuda` (ignored unless asked for, see below), or those listed
/// first in brackets:
///
/// ```ignore
/// fn name(b: &dyn Backend) { ... }
/// for_each_backend!(name(b));             // name::oracle, name::cpu, name::emu, name::cuda
/// fn other(b: &dyn FeatureBackend, on: On) { ... }
/// for_each_backend!([cpu, emu, cuda] other(b, on));
/// ```
#[allow(unused_macros)]
macro_rules! for_each_backend {
    ($name:ident($($arg:ident),+)) => {
        $crate::common::for_each_backend!([oracle, cpu, emu, cuda] $name($($arg),+));
    };
    ([$($which:ident),+] $name:ident(b)) => {
        $crate::common::for_each_backend!(@tests [$($which),+] $name |b, _on| super::$name(b));
    };
    ([$($which:ident),+] $name:ident(b, on)) => {
        $crate::common::for_each_backend!(@tests [$($which),+] $name |b, on| super::$name(b, on));
    };
    (@tests [$($which:ident),+] $name:ident $body:expr) => {
        mod $name {
            $( $crate::common::for_each_backend!(@one $which $body); )+
        }
    };
    // The CUDA instance is ignored by a plain `cargo test`, so that the
    // summary counts it as ignored, never as passed, on a machine without a
    // GPU; `-- --include-ignored` runs it (scripts/gpu-check does, with
    // KDFUSE_REQUIRE_GPU=1, where a missing GPU fails it).
    (@one cuda $body:expr) => {
        #[test]
        #[ignore = "CUDA: needs a GPU (cargo test -- --include-ignored; scripts/gpu-check)"]
        fn cuda() {
            $crate::common::run_on("cuda", module_path!(), $body);
        }
    };
    (@one $which:ident $body:expr) => {
        #[test]
        fn $which() {
            $crate::common::run_on(stringify!($which), module_path!(), $body);
        }
    };
}
#[allow(unused_imports)]
pub(crate) use for_each_backend;

/// `result` is an `InvalidArgument` naming `arg` with a message (returned);
/// `who` says where it came from.
pub fn invalid_arg<T: std::fmt::Debug>(result: kdfuse::Result<T>, arg: &str, who: &str) -> String {
    match result {
        Err(kdfuse::KdError::InvalidArgument { arg: a, msg }) => {
            assert_eq!(a, arg, "{who}: wrong argument named ({msg})");
            assert!(!msg.is_empty(), "{who}: an empty message");
            msg
        }
        other => panic!("{who}: expected an error naming `{arg}`, got {other:?}"),
    }
}

/// A case report (`check::CaseReport` or `feature::check::FeatureCaseReport`)
/// passed; the message gives both errors and the case.
#[allow(unused_macros)]
macro_rules! assert_passed {
    ($report:expr, $case:expr $(, $prefix:literal)? $(,)?) => {{
        let r = &$report;
        assert!(
            r.passed,
            concat!($($prefix,)? "loss {:.2e} grad {:.2e}: {}"),
            r.loss_err,
            r.grad_err,
            $case.describe()
        );
    }};
}
#[allow(unused_imports)]
pub(crate) use assert_passed;

/// A sweep report passed; each failure is printed first. With `what`, the
/// assertion's message is `what: N failures`.
#[allow(unused_macros)]
macro_rules! assert_sweep_passed {
    ($report:expr $(, $what:expr)?) => {{
        let report = &$report;
        for f in &report.failures {
            eprintln!(
                "FAIL loss {:.2e} grad {:.2e} {}",
                f.loss_err,
                f.grad_err,
                f.config.describe()
            );
        }
        assert!(
            report.passed()
            $(, "{}: {} failures", $what, report.failures.len())?
        );
    }};
}
#[allow(unused_imports)]
pub(crate) use assert_sweep_passed;

/// The property test `random_cases_within_tolerance`: 96 random cases, each
/// drawn by `random_config(rng, max_cols)` and passing `run_case` on the CPU
/// backend (`kdfuse::check`'s or `kdfuse::feature::check`'s pair).
#[allow(unused_macros)]
macro_rules! cpu_random_cases_within_tolerance {
    ($random_config:path, $run_case:path, $max_cols:expr) => {
        proptest::proptest! {
            #![proptest_config(proptest::prelude::ProptestConfig::with_cases(96))]
            #[test]
            fn random_cases_within_tolerance(seed in proptest::prelude::any::<u64>()) {
                let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
                let config = $random_config(&mut rng, $max_cols);
                let r = $run_case(&kdfuse::CpuBackend, &config).unwrap();
                proptest::prop_assert!(
                    r.passed,
                    "loss_err {:.2e} grad_err {:.2e}: {}",
                    r.loss_err,
                    r.grad_err,
                    config.describe()
                );
            }
        }
    };
}
#[allow(unused_imports)]
pub(crate) use cpu_random_cases_within_tolerance;
