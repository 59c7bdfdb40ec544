//! Build script: compiles the kernels' shared math for the host (cc) and every
//! `kernels/{kd,feature,app,vocab_parallel,topk_select}/*.cu` into one fatbin (nvcc), embedded in the library.
//!
//! nvcc is looked for, in order: `KDFUSE_NVCC` / `NVCC` (taken as given),
//! `CUDA_HOME/bin/nvcc`, `CUDA_PATH/bin/nvcc`, `nvcc` on `PATH`, then the
//! per-user cache that `scripts/install-cuda-toolchain` fills. Any CUDA ≥ 12.4
//! counts: SASS for every architecture of `ARCHES` that it knows, PTX from the
//! oldest. When none is found, this script runs `scripts/install-cuda-toolchain`
//! itself (the pinned CUDA 13.0 from PyPI into the per-user cache, once per
//! user), unless `KDFUSE_NO_CUDA=1` or cargo is offline; then the crate builds
//! without kernels, with a warning that says how to get them, and
//! `KDFUSE_REQUIRE_KERNELS=1` (scripts/test) turns that into an error.
//!
//! The fatbin is cached per user, keyed by a hash of the kernel sources, the
//! nvcc version and the flags, so that check, clippy, test, bench and run
//! builds, other profiles and other clones reuse one compile. A kernel that
//! spills or uses local memory fails the build, from the cache too.

use sha2::{Digest, Sha256};
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Instant, SystemTime};

const PINNED_RELEASE: &str = "13.0";
/// The oldest CUDA release accepted (the kernels' intrinsics and flags).
const MIN_RELEASE: (u32, u32) = (12, 4);
/// SASS targets, each built when the toolchain lists it.
const ARCHES: &[&str] = &["sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120"];
/// Bump when the cached files or their meaning change.
const CACHE_FORMAT: &str = "kdfuse-fatbin-cache-1";
/// Fatbins kept in the cache (the least recently used are removed).
const CACHE_KEEP: usize = 6;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-changed=scripts/install-cuda-toolchain");
    for var in [
        "KDFUSE_NVCC",
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "KDFUSE_NO_CUDA",
        "KDFUSE_CACHE_DIR",
        "XDG_CACHE_HOME",
        "CARGO_NET_OFFLINE",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    build_host_math();

    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let meta = match find_or_install_nvcc() {
        Ok(nvcc) => build_fatbin(&nvcc, &out),
        Err(why) => {
            // Only a build without kernels depends on this variable: with
            // kernels it changes nothing, so it must not trigger a rebuild.
            println!("cargo:rerun-if-env-changed=KDFUSE_REQUIRE_KERNELS");
            if env::var_os("KDFUSE_REQUIRE_KERNELS").is_some_and(|v| v == "1") {
                panic!("KDFUSE_REQUIRE_KERNELS=1 but {why}; run scripts/install-cuda-toolchain");
            }
            println!("cargo:warning=kdfuse: building without CUDA kernels: {why}");
            println!("cargo:warning=kdfuse: to embed them, run scripts/install-cuda-toolchain (or install CUDA >= {}.{}) and rebuild", MIN_RELEASE.0, MIN_RELEASE.1);
            // Rerun once the toolchain appears in the cache.
            println!("cargo:rerun-if-changed={}", cache_dir().display());
            Meta::without_kernels(&why)
        }
    };
    meta.write(&out);
}

/// kd/kd_host*.cpp and feature/feature_host.cpp: the kernels' row arithmetic, compiled for
/// the CPU (and vocab_parallel/vp_host.cpp, topk_select/select_host.cpp: the layouts
/// of the vocab-parallel and selection launch contracts, for their tests); and the kernels under a CPU emulation of CUDA, for the tests.
fn build_host_math() {
    cc::Build::new()
        .cpp(true)
        .file("kernels/kd/kd_host.cpp")
        .file("kernels/kd/kd_host_fast.cpp")
        .file("kernels/feature/feature_host.cpp")
        .file("kernels/vocab_parallel/vp_host.cpp")
        .file("kernels/topk_select/select_host.cpp")
        .include("kernels")
        .flag_if_supported("-std=c++17")
        .flag_if_supported("-fno-fast-math")
        .flag_if_supported("-ffp-contract=off")
        // Comparisons and selects that may meet a NaN do not trap: without
        // it GCC keeps the fast path's selects as branches and the loops of
        // kd_host_fast.cpp do not vectorize. No result changes.
        .flag_if_supported("-fno-trapping-math")
        .opt_level(3)
        .warnings(true)
        .compile("kd_host");
    // kd_fused.cu, eager.cu, mlp.cu, feature.cu, vp.cu and select.cu themselves on the CPU, through
    // kernels/emu/cuda_emu.h: lets the tests run the kernels' parallel code
    // without a GPU. Only with the `emulation` feature (the tests'), so the
    // library a trainer links carries none of it.
    if std::env::var_os("CARGO_FEATURE_EMULATION").is_none() {
        return;
    }
    cc::Build::new()
        .cpp(true)
        .file("kernels/emu/kd_emu.cpp")
        .file("kernels/emu/eager_emu.cpp")
        .file("kernels/emu/mlp_emu.cpp")
        .file("kernels/emu/feature_emu.cpp")
        .file("kernels/emu/vp_emu.cpp")
        .file("kernels/emu/select_emu.cpp")
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

fn flag_set(var: &str) -> bool {
    env::var_os(var).is_some_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// A line for the person at the terminal, while cargo hides the script's
/// output: written to the controlling terminal when there is one (nothing in
/// CI logs or pipes), and to the script's captured stderr.
fn progress(msg: &str) {
    eprintln!("kdfuse: {msg}");
    if let Ok(mut tty) = fs::OpenOptions::new().write(true).open("/dev/tty") {
        let _ = writeln!(tty, "\r\x1b[2K    kdfuse: {msg}");
    }
}

/// `--version` output of an nvcc, and its release as (major, minor).
fn nvcc_version(nvcc: &Path) -> Option<(String, (u32, u32))> {
    let out = Command::new(nvcc).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let idx = text.find("release ")?;
    let rel = text[idx + 8..].split(',').next()?.trim();
    let (major, minor) = rel.split_once('.')?;
    Some((text.clone(), (major.parse().ok()?, minor.parse().ok()?)))
}

fn release_str(r: (u32, u32)) -> String {
    format!("{}.{}", r.0, r.1)
}

fn find_or_install_nvcc() -> Result<PathBuf, String> {
    if flag_set("KDFUSE_NO_CUDA") {
        return Err("KDFUSE_NO_CUDA is set".into());
    }
    match find_nvcc() {
        Ok(p) => Ok(p),
        Err(why) if flag_set("CARGO_NET_OFFLINE") || flag_set("KDFUSE_OFFLINE") => Err(format!(
            "{why}; offline, so the pinned CUDA {PINNED_RELEASE} compiler was not installed"
        )),
        Err(why) => install_toolchain().map_err(|e| format!("{why}; {e}")),
    }
}

/// Runs scripts/install-cuda-toolchain (the pinned compiler from PyPI into the
/// per-user cache) and returns the nvcc it prints.
fn install_toolchain() -> Result<PathBuf, String> {
    let script = Path::new("scripts/install-cuda-toolchain");
    if !script.is_file() {
        return Err("scripts/install-cuda-toolchain is missing".into());
    }
    progress(&format!(
        "no CUDA >= {}.{} compiler found: installing the pinned CUDA {PINNED_RELEASE} nvcc from PyPI into {} (once per user, about 300 MB)",
        MIN_RELEASE.0,
        MIN_RELEASE.1,
        cache_dir().display()
    ));
    let t = Instant::now();
    let out = Command::new("bash")
        .arg(script)
        .env("KDFUSE_CACHE_DIR", cache_dir())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run bash scripts/install-cuda-toolchain: {e}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(format!(
            "installing the pinned CUDA {PINNED_RELEASE} compiler failed (offline?): {}",
            tail.join(" | ")
        ));
    }
    let nvcc = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    progress(&format!(
        "installed the pinned CUDA {PINNED_RELEASE} compiler ({}) in {:.0} s; later builds reuse it",
        nvcc.display(),
        t.elapsed().as_secs_f64()
    ));
    Ok(nvcc)
}

fn find_nvcc() -> Result<PathBuf, String> {
    for var in ["KDFUSE_NVCC", "NVCC"] {
        if let Some(p) = env::var_os(var) {
            let p = PathBuf::from(p);
            return match nvcc_version(&p) {
                Some((_, rel)) => {
                    if rel < MIN_RELEASE {
                        return Err(format!(
                            "{var}={} is CUDA {}, older than the oldest supported {}",
                            p.display(),
                            release_str(rel),
                            release_str(MIN_RELEASE)
                        ));
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
        match nvcc_version(&c) {
            Some((_, rel)) if rel >= MIN_RELEASE => return Ok(c),
            Some((_, rel)) => seen.push(format!("{} (CUDA {})", c.display(), release_str(rel))),
            None => seen.push(format!("{} (does not run)", c.display())),
        }
    }
    if seen.is_empty() {
        Err("no nvcc found".into())
    } else {
        Err(format!(
            "no CUDA >= {} nvcc found; skipped: {}",
            release_str(MIN_RELEASE),
            seen.join(", ")
        ))
    }
}

/// The files nvcc reads: every .cu, .cuh and .h under kernels/ but the CPU
/// emulation's, as (path relative to kernels/, contents), sorted.
fn kernel_sources(dir: &Path) -> Vec<(String, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, acc: &mut Vec<(String, Vec<u8>)>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if p.is_dir() {
                if rel != "emu" {
                    walk(root, &p, acc);
                }
            } else if p
                .extension()
                .is_some_and(|x| x == "cu" || x == "cuh" || x == "h")
            {
                acc.push((rel, fs::read(&p).expect("read a kernel source")));
            }
        }
    }
    let mut acc = Vec::new();
    walk(dir, dir, &mut acc);
    acc.sort();
    acc
}

fn build_fatbin(nvcc: &Path, out: &Path) -> Meta {
    let kernels_dir = fs::canonicalize("kernels").expect("kernels/ exists");
    let sources = kernel_sources(&kernels_dir);
    // One translation unit of all kernel files (kd/, feature/, app/,
    // vocab_parallel/, topk_select/) gives
    // one fatbin.
    let mut unit = String::from("// generated by build.rs\n");
    for (rel, _) in sources.iter().filter(|(r, _)| r.ends_with(".cu")) {
        writeln!(unit, "#include \"{rel}\"").unwrap();
    }
    let unit_path = out.join("kdfuse_kernels.cu");
    fs::write(&unit_path, &unit).unwrap();

    let (version_text, release) = nvcc_version(nvcc).unwrap_or_default();
    let listed = Command::new(nvcc)
        .arg("--list-gpu-code")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let arches: Vec<&str> = ARCHES
        .iter()
        .copied()
        .filter(|a| listed.lines().any(|l| l.trim() == *a))
        .collect();
    if arches.is_empty() {
        panic!(
            "{} (CUDA {}) lists none of the architectures {}",
            nvcc.display(),
            release_str(release),
            ARCHES.join(", ")
        );
    }
    // PTX for the oldest architecture, JIT-compiled on anything newer.
    let ptx_arch = format!("compute_{}", &arches[0][3..]);
    let mut flags: Vec<String> = ["-fatbin", "-O3", "-std=c++17", "-Xptxas", "-v"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for a in &arches {
        flags.push(format!("-gencode=arch=compute_{},code={a}", &a[3..]));
    }
    flags.push(format!("-gencode=arch={ptx_arch},code={ptx_arch}"));

    let mut hasher = Sha256::new();
    hasher.update(CACHE_FORMAT);
    hasher.update(&version_text);
    hasher.update(flags.join(" "));
    hasher.update(&unit);
    for (rel, data) in &sources {
        hasher.update((rel.len() as u64).to_le_bytes());
        hasher.update(rel);
        hasher.update((data.len() as u64).to_le_bytes());
        hasher.update(data);
    }
    let key: String = hasher
        .finalize()
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect();

    let fatbin = out.join("kdfuse.fatbin");
    let report_path = out.join("ptxas.txt");
    let cache = if flag_set("KDFUSE_NO_KERNEL_CACHE") {
        None
    } else {
        KernelCache::open(&key)
    };
    let hit = cache
        .as_ref()
        .is_some_and(|c| c.fetch(&fatbin, &report_path));
    if !hit {
        let threads = env::var("NUM_JOBS")
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
        progress(&format!(
            "compiling the CUDA kernels for {} with {} (CUDA {}, {threads} threads; once per kernel content: minutes, about 1 min of CPU per architecture)",
            arches.join(", "),
            nvcc.display(),
            release_str(release)
        ));
        let t = Instant::now();
        let output = Command::new(nvcc)
            .args(&flags)
            .arg(format!("--threads={threads}"))
            .arg("-I")
            .arg(&kernels_dir)
            .arg("-o")
            .arg(&fatbin)
            .arg(&unit_path)
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", nvcc.display()));
        let report = String::from_utf8_lossy(&output.stderr).into_owned();
        fs::write(&report_path, &report).unwrap();
        if !output.status.success() {
            panic!("nvcc failed on kernels/:\n{report}");
        }
        let secs = t.elapsed().as_secs_f64();
        progress(&format!(
            "compiled the CUDA kernels in {secs:.0} s{}",
            cache
                .as_ref()
                .map(|c| format!("; cached in {}", c.dir.display()))
                .unwrap_or_default()
        ));
        check_no_spills(&report);
        if let Some(c) = &cache {
            c.store(&fatbin, &report_path);
        }
    }
    let report = fs::read_to_string(&report_path).unwrap();
    check_no_spills(&report);
    let mut all_arches: Vec<String> = arches.iter().map(|s| s.to_string()).collect();
    all_arches.push(ptx_arch);
    Meta {
        fatbin: Some(fatbin),
        arches: all_arches,
        toolchain: format!("nvcc {}", release_str(release)),
        cache_key: key,
        no_kernels_reason: None,
        ptxas_report: report,
    }
}

fn check_no_spills(report: &str) {
    let offenders = ptxas_offenders(report);
    if !offenders.is_empty() {
        panic!(
            "kernels spill registers or use local memory (not allowed: docs/DESIGN.md §7):\n  {}",
            offenders.join("\n  ")
        );
    }
}

/// One fatbin per content hash under `<cache>/kernels/`: `<key>.fatbin` and
/// `<key>.ptxas.txt`, written to a temporary name and renamed, under a lock
/// file so that concurrent builds (cargo runs check and build profiles side
/// by side) compile once.
struct KernelCache {
    dir: PathBuf,
    key: String,
    _lock: fs::File,
}

impl KernelCache {
    fn open(key: &str) -> Option<Self> {
        let dir = cache_dir().join("kernels");
        fs::create_dir_all(&dir).ok()?;
        let lock = fs::File::create(dir.join(format!("{key}.lock"))).ok()?;
        // Blocks while another build compiles the same content.
        lock.lock().ok()?;
        Some(KernelCache {
            dir,
            key: key.to_string(),
            _lock: lock,
        })
    }

    fn path(&self, ext: &str) -> PathBuf {
        self.dir.join(format!("{}.{ext}", self.key))
    }

    fn fetch(&self, fatbin: &Path, report: &Path) -> bool {
        let (src, rep) = (self.path("fatbin"), self.path("ptxas.txt"));
        if !src.is_file() || !rep.is_file() {
            return false;
        }
        let ok = fs::copy(&src, fatbin).is_ok() && fs::copy(&rep, report).is_ok();
        if ok {
            // Marks it recently used, for pruning.
            if let Ok(f) = fs::File::options().append(true).open(&src) {
                let _ = f.set_modified(SystemTime::now());
            }
        }
        ok
    }

    fn store(&self, fatbin: &Path, report: &Path) {
        let put = |from: &Path, to: PathBuf| {
            let tmp = to.with_extension(format!("tmp{}", std::process::id()));
            if fs::copy(from, &tmp).is_ok() {
                let _ = fs::rename(&tmp, &to);
            }
            let _ = fs::remove_file(&tmp);
        };
        put(report, self.path("ptxas.txt"));
        put(fatbin, self.path("fatbin"));
        self.prune();
    }

    /// Keeps the `CACHE_KEEP` most recently used fatbins.
    fn prune(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        let mut fatbins: Vec<(SystemTime, PathBuf)> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "fatbin"))
            .filter_map(|p| Some((fs::metadata(&p).ok()?.modified().ok()?, p)))
            .collect();
        fatbins.sort_by_key(|f| std::cmp::Reverse(f.0));
        for (_, p) in fatbins.into_iter().skip(CACHE_KEEP) {
            let _ = fs::remove_file(p.with_extension("ptxas.txt"));
            let _ = fs::remove_file(p.with_extension("lock"));
            let _ = fs::remove_file(&p);
        }
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
    cache_key: String,
    no_kernels_reason: Option<String>,
    ptxas_report: String,
}

impl Meta {
    fn without_kernels(why: &str) -> Self {
        Meta {
            fatbin: None,
            arches: Vec::new(),
            toolchain: String::new(),
            cache_key: String::new(),
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
        writeln!(s, "pub const KERNEL_HASH: &str = {:?};", self.cache_key).unwrap();
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
