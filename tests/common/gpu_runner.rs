//! The runner of the GPU test binaries (harness = false): each test takes
//! the CUDA backend of device 0; without a usable GPU every test prints
//! "skipped" with the reason, and with KDFUSE_REQUIRE_GPU=1 that is a
//! failure. Arguments that do not start with '-' select tests by substring.

use kdfuse::cuda::CudaBackend;
use kdfuse::KdError;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::ExitCode;

/// One GPU test.
pub type Test = fn(&CudaBackend);

/// Runs the selected `tests` on device 0 and reports each one.
pub fn run(tests: &[(&str, Test)]) -> ExitCode {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let selected: Vec<_> = tests
        .iter()
        .filter(|(n, _)| filter.is_empty() || filter.iter().any(|f| n.contains(f.as_str())))
        .collect();
    println!("\nrunning {} GPU tests", selected.len());
    let require = std::env::var("KDFUSE_REQUIRE_GPU").is_ok_and(|v| v == "1");
    let backend = match CudaBackend::new(0) {
        Ok(b) => b,
        Err(e) => {
            let why = match &e {
                KdError::CudaUnavailable(m) => m.clone(),
                other => other.to_string(),
            };
            for (name, _) in &selected {
                println!("test {name} ... skipped ({why})");
            }
            if require {
                println!("KDFUSE_REQUIRE_GPU=1 but no usable GPU: {why}");
                println!("0 passed, {} failed", selected.len());
                return ExitCode::FAILURE;
            }
            println!(
                "GPU tests: 0 passed, 0 failed, {} skipped (no GPU)",
                selected.len()
            );
            return ExitCode::SUCCESS;
        }
    };
    let (mut passed, mut failed) = (0, 0);
    for (name, test) in &selected {
        let t0 = std::time::Instant::now();
        match catch_unwind(AssertUnwindSafe(|| test(&backend))) {
            Ok(()) => {
                passed += 1;
                println!("test {name} ... ok ({:.1} s)", t0.elapsed().as_secs_f64());
            }
            Err(_) => {
                failed += 1;
                println!("test {name} ... FAILED");
            }
        }
    }
    println!("GPU tests: {passed} passed, {failed} failed");
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
