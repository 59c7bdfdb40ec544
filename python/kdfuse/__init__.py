"""kdfuse: fused knowledge-distillation losses (Rust + CUDA) for Python.

``kdfuse.info()`` describes the installed library; ``kdfuse.torch`` holds the
PyTorch API (``distill_loss``, ``DistillationLoss``, ``generalized_jsd_loss``)
and imports torch, which this module does not need.
"""

from ._lib import KdfuseArgumentError, KdfuseError

__all__ = ["info", "KdfuseError", "KdfuseArgumentError", "__version__"]
__version__ = "0.1.0"


def info():
    """A dict: the package and library versions, the library's path, the C ABI
    version, the CUDA devices the library sees and whether torch is importable."""
    from . import _lib

    lib_version = _lib.version()
    out = {
        "package": __version__,
        "library": lib_version,
        "library_path": str(_lib.library_path()),
        "abi_version": _lib.ABI_VERSION,
        "cuda_devices": _lib.device_count(),
    }
    try:
        import torch  # noqa: PLC0415 (optional)

        out["torch"] = torch.__version__
    except ImportError:
        out["torch"] = None
    return out
