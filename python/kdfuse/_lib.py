"""libkdfuse through ctypes: the C ABI of include/kdfuse.h, without torch.

The library is looked for in ``$KDFUSE_LIB``, then beside this file (where
``pip install .`` puts it), then in the source tree's ``target/release``
(for a checkout used through ``PYTHONPATH=python``).
"""

import ctypes
import os
import pathlib
import threading

ABI_VERSION = 5
DIVERGENCES = {"forward-kl": 0, "reverse-kl": 1, "jsd": 2, "tvd": 3, "soft-ce": 4}
# The C ABI's precision codes (KdfusePrecision): the GPU kernels' arithmetic.
PRECISIONS = {"fast": 0, "exact": 1}

# The C ABI's reduction codes (KdfuseReduction).
C_BATCHMEAN, C_SUM, C_MEAN, C_NONE = 0, 1, 2, 3
TOPK_MODES = {"support": 0, "full": 1, "tail": 2}
# KdfuseDtype codes by torch dtype name.
DTYPE_CODES = {"float32": 0, "bfloat16": 1, "float16": 2, "float64": 3}
STATUS_INVALID_ARGUMENT = 1

# Field names of the C structs, as the Python API calls them (error messages).
_ARG_NAMES = [
    ("feature_batch.student", "student_features"),
    ("feature_batch.teacher", "teacher_features"),
    ("feature_batch.", ""),
    ("batch.student_stride", "student_logits"),
    ("batch.teacher_stride", "teacher_logits"),
    ("batch.topk_indices", "topk_indices"),
    ("batch.topk_values", "topk_values"),
    ("batch.topk_k", "topk_indices"),
    ("batch.row_weights", "row_weights"),
    ("batch.student", "student_logits"),
    ("batch.teacher", "teacher_logits"),
    ("batch.labels", "labels"),
    ("shard.vocab_start", "vocab_start"),
    ("shard.vocab_size", "vocab_size"),
    ("params.", ""),
]


class KdfuseError(RuntimeError):
    """A kdfuse call failed; the message is the library's (it names the argument)."""


class KdfuseArgumentError(KdfuseError, ValueError):
    """The library refused an argument (status INVALID_ARGUMENT); also a ``ValueError``."""


# The C types of the structs' fields, by the names the tables below use.
_CTYPES = {"u32": ctypes.c_uint32, "i32": ctypes.c_int32, "i64": ctypes.c_int64,
           "f64": ctypes.c_double, "ptr": ctypes.c_void_p}


def _fields(*groups):
    """ctypes ``_fields_`` from groups "TYPE name name ...", in declaration order."""
    return [(name, _CTYPES[t]) for t, *names in map(str.split, groups) for name in names]


class Params(ctypes.Structure):
    """``KdfuseParams`` of include/kdfuse.h (version 3)."""

    _fields_ = _fields(
        "u32 size version",
        "i32 divergence reduction",
        "f64 beta temperature alpha grad_scale",
        "i64 ignore_index",
        "i32 t2_scaling reserved",
        "f64 softcap",
        "i32 teacher_log_probs grad_teacher topk_mode reserved2 precision reserved3",
    )


class Batch(ctypes.Structure):
    """``KdfuseBatch`` of include/kdfuse.h (version 2)."""

    _fields_ = _fields(
        "u32 size version",
        "i64 rows cols student_stride teacher_stride grad_stride",
        "i32 dtype grad_dtype",
        "ptr student teacher labels grad row_losses loss valid_rows row_weights",
        "ptr grad_teacher",
        "i64 grad_teacher_stride",
        "ptr topk_indices topk_values",
        "i64 topk_k",
        "i32 topk_index_dtype validate_topk",
    )


class FeatureBatch(ctypes.Structure):
    """``KdfuseFeatureBatch`` of include/kdfuse.h (version 2)."""

    _fields_ = _fields(
        "u32 size version",
        "i32 kind reduction",
        "f64 eps grad_scale",
        "i64 rows width student_channels teacher_channels",
        "i64 student_stride teacher_stride grad_student_stride grad_teacher_stride",
        "i32 dtype grad_dtype",
        "ptr student teacher grad_student grad_teacher row_losses loss workspace",
    )


FEATURE_KINDS = {"mse": 0, "cosine": 1, "attention": 2}

# Vocab-parallel statistics records (KDFUSE_VP_STATS_WIDTH doubles per row).
VP_STATS_WIDTH = 20


class Shard(ctypes.Structure):
    """``KdfuseShard`` of include/kdfuse.h (version 1)."""

    _fields_ = _fields("u32 size version", "i64 vocab_start vocab_size")

_lib = None
_lib_path = None
_lock = threading.Lock()
_contexts = {}


def library_candidates():
    """Where the library is looked for, in order."""
    here = pathlib.Path(__file__).resolve().parent
    out = []
    if os.environ.get("KDFUSE_LIB"):
        out.append(pathlib.Path(os.environ["KDFUSE_LIB"]))
    out.append(here / "libkdfuse.so")
    out.append(here.parent.parent / "target" / "release" / "libkdfuse.so")
    return out


def _declare(lib):
    lib.kdfuse_version.restype = ctypes.c_char_p
    lib.kdfuse_last_error.restype = ctypes.c_char_p
    sigs = {
        "kdfuse_params_default": [ctypes.POINTER(Params)],
        "kdfuse_batch_init": [ctypes.POINTER(Batch), ctypes.c_int64, ctypes.c_int64,
                              ctypes.c_int32],
        "kdfuse_device_count": [ctypes.POINTER(ctypes.c_int32)],
        "kdfuse_context_create": [ctypes.c_int32, ctypes.POINTER(ctypes.c_void_p)],
        "kdfuse_context_destroy": [ctypes.c_void_p],
        "kdfuse_compute_cuda": [ctypes.c_void_p, ctypes.POINTER(Batch), ctypes.POINTER(Params),
                                ctypes.c_void_p],
        "kdfuse_compute_host": [ctypes.POINTER(Batch), ctypes.POINTER(Params)],
        "kdfuse_compute_host_f64": [ctypes.POINTER(Batch), ctypes.POINTER(Params)],
        "kdfuse_compute_topk_host_f64": [ctypes.POINTER(Batch), ctypes.POINTER(Params)],
        "kdfuse_feature_batch_init": [ctypes.POINTER(FeatureBatch), ctypes.c_int32,
                                      ctypes.c_int64, ctypes.c_int64, ctypes.c_int32],
        "kdfuse_feature_workspace_len": [ctypes.POINTER(FeatureBatch),
                                         ctypes.POINTER(ctypes.c_int64)],
        "kdfuse_feature_compute_host": [ctypes.POINTER(FeatureBatch)],
        "kdfuse_feature_compute_cuda": [ctypes.c_void_p, ctypes.POINTER(FeatureBatch),
                                        ctypes.c_void_p],
        "kdfuse_shard_init": [ctypes.POINTER(Shard), ctypes.c_int64, ctypes.c_int64],
        "kdfuse_vp_collectives": [ctypes.POINTER(Params), ctypes.POINTER(ctypes.c_int32)],
        "kdfuse_vp_round_stats_host": [ctypes.POINTER(Batch), ctypes.POINTER(Params),
                                       ctypes.POINTER(Shard), ctypes.c_int32, ctypes.c_void_p,
                                       ctypes.c_int64, ctypes.c_void_p],
        "kdfuse_vp_finish_host": [ctypes.POINTER(Batch), ctypes.POINTER(Params),
                                  ctypes.POINTER(Shard), ctypes.c_void_p, ctypes.c_void_p,
                                  ctypes.c_int64],
        "kdfuse_vp_round_stats_cuda": [ctypes.c_void_p, ctypes.POINTER(Batch),
                                       ctypes.POINTER(Params), ctypes.POINTER(Shard),
                                       ctypes.c_int32, ctypes.c_void_p, ctypes.c_int64,
                                       ctypes.c_void_p, ctypes.c_void_p],
        "kdfuse_vp_finish_cuda": [ctypes.c_void_p, ctypes.POINTER(Batch), ctypes.POINTER(Params),
                                  ctypes.POINTER(Shard), ctypes.c_void_p, ctypes.c_void_p,
                                  ctypes.c_int64, ctypes.c_void_p],
        "kdfuse_topk_select_host": [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64,
                                    ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p],
        "kdfuse_topk_select_cuda": [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32,
                                    ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                    ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p],
    }
    for name, args in sigs.items():
        f = getattr(lib, name)
        f.argtypes = args
        f.restype = ctypes.c_int32


def load_library():
    """libkdfuse, loaded once (see the module's docstring for where from)."""
    global _lib, _lib_path
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is not None:
            return _lib
        tried = library_candidates()
        where = next((p for p in tried if p.exists()), None)
        if where is None:
            raise KdfuseError(
                "libkdfuse.so not found (looked in: " + ", ".join(map(str, tried))
                + "); install the package with `pip install .`, or build it with "
                "`cargo build --release` and set KDFUSE_LIB")
        lib = ctypes.CDLL(str(where))
        # The newest entry point: an older library lacks it.
        if not hasattr(lib, "kdfuse_topk_select_cuda"):
            raise KdfuseError(f"{where} is an older libkdfuse (no kdfuse_topk_select_cuda); "
                              "rebuild it")
        _declare(lib)
        _lib, _lib_path = lib, where
        return lib


def library_path():
    """The path of the loaded library (loads it)."""
    load_library()
    return _lib_path


def _python_names(msg):
    for c_name, py_name in _ARG_NAMES:
        msg = msg.replace(c_name, py_name)
    return msg


def check(status):
    """Raises ``KdfuseArgumentError`` / ``KdfuseError`` with the library's message unless 0."""
    if status != 0:
        msg = _python_names(load_library().kdfuse_last_error().decode("utf-8", "replace"))
        if status == STATUS_INVALID_ARGUMENT:
            raise KdfuseArgumentError(msg)
        raise KdfuseError(msg)


def make_params(divergence, reduction, *, beta=0.5, temperature=1.0, alpha=0.0,
                ignore_index=-100, t2_scaling=True, softcap=0.0, grad_teacher=False,
                teacher_log_probs=False, topk_mode="full", precision="fast"):
    """A filled ``Params``: the library's defaults, then these values (codes)."""
    lib = load_library()
    p = Params()
    check(lib.kdfuse_params_default(ctypes.byref(p)))
    p.divergence = int(divergence)
    p.reduction = int(reduction)
    p.beta = float(beta)
    p.temperature = float(temperature)
    p.alpha = float(alpha)
    p.ignore_index = int(ignore_index)
    p.t2_scaling = 1 if t2_scaling else 0
    p.softcap = float(softcap)
    p.grad_teacher = 1 if grad_teacher else 0
    p.teacher_log_probs = 1 if teacher_log_probs else 0
    p.topk_mode = TOPK_MODES[topk_mode] if isinstance(topk_mode, str) else int(topk_mode)
    if precision not in PRECISIONS:
        raise KdfuseArgumentError(
            f"precision: expected one of {sorted(PRECISIONS)}, got {precision!r}")
    p.precision = PRECISIONS[precision]
    return p


def new_batch(rows, cols, dtype_code):
    """A ``Batch`` from kdfuse_batch_init (dtype code of ``DTYPE_CODES``; f64 set after)."""
    lib = load_library()
    b = Batch()
    check(lib.kdfuse_batch_init(ctypes.byref(b), rows, cols, 0))
    b.dtype = b.grad_dtype = dtype_code
    return b


def context(device_index):
    """The library's CUDA context for a device (created once)."""
    lib = load_library()
    with _lock:
        if device_index not in _contexts:
            ctx = ctypes.c_void_p()
            check(lib.kdfuse_context_create(int(device_index), ctypes.byref(ctx)))
            _contexts[device_index] = ctx
        return _contexts[device_index]


def device_count():
    """CUDA devices the library sees (0 without a driver)."""
    lib = load_library()
    n = ctypes.c_int32(0)
    lib.kdfuse_device_count(ctypes.byref(n))
    return int(n.value)


def version():
    """The library's version string."""
    return load_library().kdfuse_version().decode()
