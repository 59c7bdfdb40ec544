//! Build script: compiles the kernels' shared math for the host (cc) and every
//! `kernels/*.cu` into one fatbin (nvcc), embedded in the library.
//!
//! nvcc is looked for, in order: `KDFUSE_NVCC` / `NVCC` (taken as given),
//! `CUDA_HOME/bin/nvcc`, `CUDA_PATH/bin/nvcc`, `nvcc` on `PATH`, then the
//! per-user cache that `scripts/install-cuda-toolchain` fills. Apart from an
//! explicit `KDFUSE_NVCC`/`NVCC`, only CUDA 13.0 counts (DESIGN.md §7: PTX from
//! a newer nvcc is rejected by the reference driver). Without nvcc the crate
//! still builds, with a cargo warning, and the CUDA backend reports
//! "built without CUDA kernels". A kernel that spills or uses local memory
//! fails the build, and so does a missing nvcc when `KDFUSE_REQUIRE_KERNELS=1`
//! (scripts/test sets it).

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const PINNED_RELEASE: &str = "13.0";
/// SASS targets always built; newer ones are added when the toolchain lists them.
const BASE_ARCHES: &[&str] = &["sm_80", "sm_86", "sm_89", "sm_90"];
const NEWER_ARCHES: &[&str] = &["sm_100", "sm_120"];
const PTX_ARCH: &str = "compute_80";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    for var in [
        "KDFUSE_NVCC",
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "KDFUSE_NO_CUDA",
        "KDFUSE_CACHE_DIR",
        "XDG_CACHE_HOME",
        "KDFUSE_REQUIRE_KERNELS",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    build_host_math();

    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let meta = match find_nvcc() {
        Ok(nvcc) => build_fatbin(&nvcc, &out),
        Err(why) => {
            if env::var_os("KDFUSE_REQUIRE_KERNELS").is_some_and(|v| v == "1") {
                panic!("KDFUSE_REQUIRE_KERNELS=1 but {why}; run scripts/install-cuda-toolchain");
            }
            println!("cargo:warning=kdfuse: building without CUDA kernels: {why}");
            println!("cargo:warning=kdfuse: run scripts/install-cuda-toolchain to install the pinned CUDA {PINNED_RELEASE} compiler");
            // Rerun once the toolchain appears in the cache.
            println!("cargo:rerun-if-changed={}", cache_dir().display());
            Meta::without_kernels(&why)
        }
    };
    meta.write(&out);
}

/// kd_host.cpp and feature_host.cpp: the kernels' row arithmetic, compiled for
/// the CPU; and the kernels under a CPU emulation of CUDA, for the tests.
fn build_host_math() {
    cc::Build::new()
        .cpp(true)
        .file("kernels/kd_host.cpp")
        .file("kernels/feature_host.cpp")
        .include("kernels")
        .flag_if_supported("-std=c++17")
        .flag_if_supported("-fno-fast-math")
        .flag_if_supported("-ffp-contract=off")
        .opt_level(3)
        .warnings(true)
        .compile("kd_host");
    // kd_fused.cu and eager.cu themselves on the CPU, through
    // kernels/emu/cuda_emu.h: lets the tests run the kernels' parallel code
    // without a GPU.
    cc::Build::new()
        .cpp(true)
        .file("kernels/emu/kd_emu.cpp")
        .file("kernels/emu/eager_emu.cpp")
        .file("kernels/emu/mlp_emu.cpp")
        .file("kernels/emu/feature_emu.cpp")
        .include("kernels")
        .std("c++20")
        .flag_if_supported("-fno-strict-aliasing")
        .flag_if_supported("-Wno-unknown-pragmas")
        .flag_if_supported("-pthread")
        .opt_level(2)
        .warnings(true)
        .compile("kd_emu");
}

fn cache_dir() -> PathBuf {
    if let Some(d) = env::var_os("KDFUSE_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("kdfuse");
    }
    let home = env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/tmp".into());
    home.join(".cache").join("kdfuse")
}

fn nvcc_release(nvcc: &Path) -> Option<String> {
    let out = Command::new(nvcc).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let idx = text.find("release ")?;
    let rest = &text[idx + 8..];
    Some(rest.split(',').next()?.trim().to_string())
}

fn find_nvcc() -> Result<PathBuf, String> {
    if env::var_os("KDFUSE_NO_CUDA").is_some_and(|v| v != "0" && !v.is_empty()) {
        return Err("KDFUSE_NO_CUDA is set".into());
    }
    for var in ["KDFUSE_NVCC", "NVCC"] {
        if let Some(p) = env::var_os(var) {
            let p = PathBuf::from(p);
            return match nvcc_release(&p) {
                Some(rel) => {
                    if rel != PINNED_RELEASE {
                        println!("cargo:warning=kdfuse: {var}={} is CUDA {rel}, not the pinned {PINNED_RELEASE}", p.display());
                    }
                    Ok(p)
                }
                None => Err(format!("{var}={} does not run as nvcc", p.display())),
            };
        }
    }
    let mut candidates: Vec<PathBuf> = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(p) = env::var_os(var) {
            candidates.push(PathBuf::from(p).join("bin").join("nvcc"));
        }
    }
    if let Some(path) = env::var_os("PATH") {
        candidates.extend(env::split_paths(&path).map(|d| d.join("nvcc")));
    }
    let venv = cache_dir().join(format!("cuda-{PINNED_RELEASE}"));
    if let Ok(entries) = fs::read_dir(venv.join("lib")) {
        for e in entries.flatten() {
            candidates.push(e.path().join("site-packages/nvidia/cu13/bin/nvcc"));
        }
    }
    let mut seen = Vec::new();
    for c in candidates.into_iter().filter(|c| c.is_file()) {
        match nvcc_release(&c) {
            Some(rel) if rel == PINNED_RELEASE => return Ok(c),
            Some(rel) => seen.push(format!("{} (CUDA {rel})", c.display())),
            None => seen.push(format!("{} (does not run)", c.display())),
        }
    }
    if seen.is_empty() {
        Err("no nvcc found".into())
    } else {
        Err(format!(
            "no CUDA {PINNED_RELEASE} nvcc found; skipped: {}",
            seen.join(", ")
        ))
    }
}

fn build_fatbin(nvcc: &Path, out: &Path) -> Meta {
    let kernels_dir = fs::canonicalize("kernels").expect("kernels/ exists");
    let mut sources: Vec<PathBuf> = fs::read_dir(&kernels_dir)
        .expect("read kernels/")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    // One translation unit of all kernel files gives one fatbin.
    let mut unit = String::from("// generated by build.rs\n");
    for s in &sources {
        writeln!(unit, "#include \"{}\"", s.display()).unwrap();
    }
    let unit_path = out.join("kdfuse_kernels.cu");
    fs::write(&unit_path, unit).unwrap();

    let listed = Command::new(nvcc)
        .arg("--list-gpu-code")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let mut arches: Vec<&str> = BASE_ARCHES.to_vec();
    arches.extend(
        NEWER_ARCHES
            .iter()
            .filter(|a| listed.lines().any(|l| l.trim() == **a)),
    );

    let fatbin = out.join("kdfuse.fatbin");
    let mut cmd = Command::new(nvcc);
    cmd.arg("-fatbin")
        .arg("-O3")
        .arg("-std=c++17")
        .arg("-Xptxas")
        .arg("-v")
        .arg("-I")
        .arg(&kernels_dir);
    for a in &arches {
        cmd.arg(format!("-gencode=arch=compute_{},code={a}", &a[3..]));
    }
    cmd.arg(format!("-gencode=arch={PTX_ARCH},code={PTX_ARCH}"));
    cmd.arg("-o").arg(&fatbin).arg(&unit_path);
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", nvcc.display()));
    let report = String::from_utf8_lossy(&output.stderr).into_owned();
    fs::write(out.join("ptxas.txt"), &report).unwrap();
    if !output.status.success() {
        panic!("nvcc failed on kernels/:\n{report}");
    }
    let offenders = ptxas_offenders(&report);
    if !offenders.is_empty() {
        panic!(
            "kernels spill registers or use local memory (DESIGN.md: not allowed):\n  {}",
            offenders.join("\n  ")
        );
    }
    let mut all_arches: Vec<String> = arches.iter().map(|s| s.to_string()).collect();
    all_arches.push(PTX_ARCH.to_string());
    Meta {
        fatbin: Some(fatbin),
        arches: all_arches,
        toolchain: format!("nvcc {}", nvcc_release(nvcc).unwrap_or_default()),
        no_kernels_reason: None,
        ptxas_report: report,
    }
}

/// Kernels whose ptxas report shows a stack frame or spills, as
/// "name (arch): line".
fn ptxas_offenders(report: &str) -> Vec<String> {
    let mut bad = Vec::new();
    let mut current = String::new();
    for line in report.lines() {
        if let Some(i) = line.find("Compiling entry function '") {
            current = line[i + 26..].replace('\'', "");
        }
        if line.contains("bytes stack frame") {
            let nums: Vec<u64> = line
                .split(|c: char| !c.is_ascii_digit())
                .filter(|s| !s.is_empty())
                .filter_map(|s| s.parse().ok())
                .collect();
            if nums.iter().any(|&n| n > 0) {
                bad.push(format!("{current}: {}", line.trim()));
            }
        }
        if line.contains("lmem") && !line.contains(" 0 bytes lmem") {
            bad.push(format!("{current}: {}", line.trim()));
        }
    }
    bad
}

struct Meta {
    fatbin: Option<PathBuf>,
    arches: Vec<String>,
    toolchain: String,
    no_kernels_reason: Option<String>,
    ptxas_report: String,
}

impl Meta {
    fn without_kernels(why: &str) -> Self {
        Meta {
            fatbin: None,
            arches: Vec::new(),
            toolchain: String::new(),
            no_kernels_reason: Some(why.to_string()),
            ptxas_report: String::new(),
        }
    }

    fn write(&self, out: &Path) {
        let report_path = out.join("ptxas.txt");
        if self.fatbin.is_none() {
            fs::write(&report_path, &self.ptxas_report).unwrap();
        }
        let mut s = String::from("// generated by build.rs\n");
        match &self.fatbin {
            Some(p) => writeln!(s, "pub const FATBIN: &[u8] = include_bytes!({:?});", p).unwrap(),
            None => s.push_str("pub const FATBIN: &[u8] = &[];\n"),
        }
        writeln!(s, "pub const ARCHES: &[&str] = &{:?};", self.arches).unwrap();
        writeln!(s, "pub const TOOLCHAIN: &str = {:?};", self.toolchain).unwrap();
        writeln!(
            s,
            "pub const NO_KERNELS_REASON: Option<&str> = {:?};",
            self.no_kernels_reason
        )
        .unwrap();
        writeln!(
            s,
            "pub const PTXAS_REPORT: &str = include_str!({:?});",
            report_path
        )
        .unwrap();
        fs::write(out.join("kernels_meta.rs"), s).unwrap();
    }
}
