"""setuptools glue for pyproject.toml: builds libkdfuse.so with cargo and puts
it into the package (python/kdfuse), and tags the wheel for this platform
(the library is native code; the Python side is ABI-independent ctypes).

cargo is run as `cargo build --release --lib` in this directory, so a tree
already built with `cargo build --release` (scripts/test) is reused as it
is. CARGO_TARGET_DIR and the build.rs variables (KDFUSE_NO_CUDA,
KDFUSE_REQUIRE_KERNELS, ...) are honoured; KDFUSE_LIB_PREBUILT=path ships an
existing libkdfuse.so instead of running cargo.
"""

import os
import pathlib
import shutil
import subprocess
import sysconfig

from setuptools import setup
from setuptools.command.build_py import build_py

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1
    from wheel.bdist_wheel import bdist_wheel

ROOT = pathlib.Path(__file__).resolve().parent


def built_library():
    prebuilt = os.environ.get("KDFUSE_LIB_PREBUILT")
    if prebuilt:
        return pathlib.Path(prebuilt)
    cargo = os.environ.get("CARGO") or shutil.which("cargo") or str(
        pathlib.Path.home() / ".cargo" / "bin" / "cargo")
    if not pathlib.Path(cargo).exists():
        raise RuntimeError("building kdfuse needs cargo (Rust ≥ 1.89, e.g. from rustup) on PATH "
                           "or in $CARGO; or set KDFUSE_LIB_PREBUILT to a built libkdfuse.so")
    subprocess.run([cargo, "build", "--release", "--lib"], cwd=ROOT, check=True)
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target")
    if not target.is_absolute():
        target = ROOT / target
    return target / "release" / "libkdfuse.so"


class BuildPyWithLibrary(build_py):
    def run(self):
        super().run()
        lib = built_library()
        if not lib.exists():
            raise RuntimeError(f"{lib} was not built")
        dest = pathlib.Path(self.build_lib) / "kdfuse" / "libkdfuse.so"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(lib, dest)


class PlatformWheel(bdist_wheel):
    def finalize_options(self):
        super().finalize_options()
        self.root_is_pure = False

    def get_tag(self):
        plat = sysconfig.get_platform().replace("-", "_").replace(".", "_")
        return "py3", "none", plat


setup(cmdclass={"build_py": BuildPyWithLibrary, "bdist_wheel": PlatformWheel})
