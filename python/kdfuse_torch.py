"""kdfuse from PyTorch: the fused distillation loss as a ``torch.autograd.Function``.

Pure Python over kdfuse's C ABI (``include/kdfuse.h``) through ctypes: no
compilation beyond ``cargo build --release``. The library is looked for in
``$KDFUSE_LIB``, then in this repository's ``target/release``.

    from kdfuse_torch import distill_loss
    loss = distill_loss(student_logits, teacher_logits, labels,
                        divergence="jsd", beta=0.5, temperature=2.0, alpha=0.5)
    loss.backward()          # student_logits.grad, from the same fused launch

CUDA tensors (f32, bf16, f16; any leading shape, flattened to rows; the last
dimension contiguous) run the fused kernel on the current torch stream, with
no host synchronisation; CPU tensors run kdfuse's CPU backend. The gradient
is computed in the forward launch and kept for ``backward``, which only
multiplies it by the upstream gradient (one elementwise pass).
"""

import ctypes
import os
import pathlib
import threading

__all__ = ["distill_loss", "load_library", "KdfuseError", "DIVERGENCES", "REDUCTIONS"]

ABI_VERSION = 2
DIVERGENCES = {"forward-kl": 0, "reverse-kl": 1, "jsd": 2, "tvd": 3, "soft-ce": 4}
REDUCTIONS = {"batchmean": 0, "sum": 1, "mean": 2}
DTYPE_CODES = {"float32": 0, "bfloat16": 1, "float16": 2}


class KdfuseError(RuntimeError):
    """A kdfuse call failed; the message is the library's (it names the argument)."""


class Params(ctypes.Structure):
    """``KdfuseParams`` of include/kdfuse.h."""

    _fields_ = [
        ("size", ctypes.c_uint32),
        ("version", ctypes.c_uint32),
        ("divergence", ctypes.c_int32),
        ("reduction", ctypes.c_int32),
        ("beta", ctypes.c_double),
        ("temperature", ctypes.c_double),
        ("alpha", ctypes.c_double),
        ("grad_scale", ctypes.c_double),
        ("ignore_index", ctypes.c_int64),
        ("t2_scaling", ctypes.c_int32),
        ("reserved", ctypes.c_int32),
        # Version 2 (kdfuse_params_default writes the whole struct).
        ("softcap", ctypes.c_double),
        ("teacher_log_probs", ctypes.c_int32),
        ("grad_teacher", ctypes.c_int32),
        ("topk_mode", ctypes.c_int32),
        ("reserved2", ctypes.c_int32),
    ]


class Batch(ctypes.Structure):
    """``KdfuseBatch`` of include/kdfuse.h."""

    _fields_ = [
        ("size", ctypes.c_uint32),
        ("version", ctypes.c_uint32),
        ("rows", ctypes.c_int64),
        ("cols", ctypes.c_int64),
        ("student_stride", ctypes.c_int64),
        ("teacher_stride", ctypes.c_int64),
        ("grad_stride", ctypes.c_int64),
        ("dtype", ctypes.c_int32),
        ("grad_dtype", ctypes.c_int32),
        ("student", ctypes.c_void_p),
        ("teacher", ctypes.c_void_p),
        ("labels", ctypes.c_void_p),
        ("grad", ctypes.c_void_p),
        ("row_losses", ctypes.c_void_p),
        ("loss", ctypes.c_void_p),
        ("valid_rows", ctypes.c_void_p),
        # Version 2 (kdfuse_batch_init writes the whole struct).
        ("row_weights", ctypes.c_void_p),
        ("grad_teacher", ctypes.c_void_p),
        ("grad_teacher_stride", ctypes.c_int64),
        ("topk_indices", ctypes.c_void_p),
        ("topk_values", ctypes.c_void_p),
        ("topk_k", ctypes.c_int64),
        ("topk_index_dtype", ctypes.c_int32),
        ("validate_topk", ctypes.c_int32),
    ]


_lib = None
_lib_lock = threading.Lock()
_contexts = {}


def _default_library_path():
    root = pathlib.Path(__file__).resolve().parent.parent
    return root / "target" / "release" / "libkdfuse.so"


def load_library(path=None):
    """Loads libkdfuse (once): ``path``, else ``$KDFUSE_LIB``, else target/release."""
    global _lib
    with _lib_lock:
        if _lib is not None and path is None:
            return _lib
        where = pathlib.Path(path or os.environ.get("KDFUSE_LIB") or _default_library_path())
        if not where.exists():
            raise KdfuseError(
                f"{where}: libkdfuse not found; run `cargo build --release` or set KDFUSE_LIB"
            )
        lib = ctypes.CDLL(str(where))
        lib.kdfuse_version.restype = ctypes.c_char_p
        lib.kdfuse_last_error.restype = ctypes.c_char_p
        lib.kdfuse_params_default.argtypes = [ctypes.POINTER(Params)]
        lib.kdfuse_batch_init.argtypes = [
            ctypes.POINTER(Batch), ctypes.c_int64, ctypes.c_int64, ctypes.c_int32,
        ]
        lib.kdfuse_device_count.argtypes = [ctypes.POINTER(ctypes.c_int32)]
        lib.kdfuse_context_create.argtypes = [ctypes.c_int32, ctypes.POINTER(ctypes.c_void_p)]
        lib.kdfuse_context_destroy.argtypes = [ctypes.c_void_p]
        lib.kdfuse_compute_cuda.argtypes = [
            ctypes.c_void_p, ctypes.POINTER(Batch), ctypes.POINTER(Params), ctypes.c_void_p,
        ]
        lib.kdfuse_compute_host.argtypes = [ctypes.POINTER(Batch), ctypes.POINTER(Params)]
        for f in (
            lib.kdfuse_params_default, lib.kdfuse_batch_init, lib.kdfuse_device_count,
            lib.kdfuse_context_create, lib.kdfuse_context_destroy, lib.kdfuse_compute_cuda,
            lib.kdfuse_compute_host,
        ):
            f.restype = ctypes.c_int32
        if path is None:
            _lib = lib
        return lib


def check(lib, status):
    """Raises KdfuseError with the library's message unless ``status`` is 0."""
    if status != 0:
        raise KdfuseError(lib.kdfuse_last_error().decode("utf-8", "replace"))


def make_params(lib, divergence="forward-kl", beta=None, temperature=1.0, alpha=0.0,
                reduction="batchmean", ignore_index=-100, t2_scaling=True, softcap=None):
    """A filled ``Params`` (the library's defaults, then these values).

    ``beta``: the JSD weight, jsd only (None: the library's default 0.5).
    ``softcap``: None (off) or C > 0, logits x ← C·tanh(x/C) first. Values
    the library cannot use (e.g. a temperature whose τ² overflows fp32) raise
    ``KdfuseError`` when the loss is computed."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {sorted(DIVERGENCES)}, got {divergence!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {sorted(REDUCTIONS)}, got {reduction!r}")
    if beta is not None and divergence != "jsd":
        raise ValueError(f"beta is the JSD weight: {divergence} does not use it")
    if softcap is not None and float(softcap) == 0.0:
        # 0 means off in the C ABI: say None instead of passing 0 silently.
        raise ValueError("softcap must be None (off) or > 0, got 0")
    p = Params()
    check(lib, lib.kdfuse_params_default(ctypes.byref(p)))
    p.divergence = DIVERGENCES[divergence]
    p.reduction = REDUCTIONS[reduction]
    if beta is not None:
        p.beta = float(beta)
    p.temperature, p.alpha = float(temperature), float(alpha)
    p.ignore_index = int(ignore_index)
    p.t2_scaling = 1 if t2_scaling else 0
    # 0 means off in the C ABI; any other value is checked by the library.
    p.softcap = 0.0 if softcap is None else float(softcap)
    return p


def _context(lib, device):
    if device not in _contexts:
        ctx = ctypes.c_void_p()
        check(lib, lib.kdfuse_context_create(int(device), ctypes.byref(ctx)))
        _contexts[device] = ctx
    return _contexts[device]


def _as_rows(x, name):
    """``x`` viewed as [N, V] with a unit last stride (no copy when possible)."""
    if x.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension")
    v = x.shape[-1]
    x2 = x.reshape(-1, v)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


def _torch():
    import torch  # noqa: PLC0415 (the module imports without torch)

    return torch


def _run(student, teacher, labels, params, want_grad, row_weights=None):
    """One fused call: (loss [1] f32, grad [N, V] or None)."""
    torch = _torch()
    lib = load_library()
    s, t = _as_rows(student, "student_logits"), _as_rows(teacher, "teacher_logits")
    if s.dtype != t.dtype:
        raise ValueError(f"student and teacher dtypes differ: {s.dtype} vs {t.dtype}")
    if s.device != t.device:
        raise ValueError(f"student and teacher devices differ: {s.device} vs {t.device}")
    dname = str(s.dtype).removeprefix("torch.")
    if dname not in DTYPE_CODES:
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {s.dtype}")
    n, v = s.shape
    if t.shape[1] < v or t.shape[0] != n:
        raise ValueError(f"teacher shape {tuple(t.shape)} does not cover student {tuple(s.shape)}")
    dev = s.device
    b = Batch()
    check(lib, lib.kdfuse_batch_init(ctypes.byref(b), n, v, DTYPE_CODES[dname]))
    b.student_stride, b.teacher_stride = s.stride(0) if n > 1 else v, t.stride(0) if n > 1 else v
    lab = None
    if labels is not None:
        lab = labels.reshape(-1).to(device=dev, dtype=torch.int64).contiguous()
        if lab.numel() != n:
            raise ValueError(f"labels has {lab.numel()} elements for {n} rows")
    w = None
    if row_weights is not None:
        w = torch.as_tensor(row_weights).reshape(-1).to(device=dev, dtype=torch.float32)
        w = w.contiguous()
        if w.numel() != n:
            raise ValueError(f"row_weights has {w.numel()} elements for {n} rows")
    grad = torch.empty((n, v), dtype=s.dtype, device=dev) if want_grad else None
    row_losses = torch.empty(max(n, 1), dtype=torch.float32, device=dev)
    loss = torch.empty(1, dtype=torch.float32, device=dev)
    valid = torch.empty(1, dtype=torch.int32, device=dev)
    b.student, b.teacher = s.data_ptr(), t.data_ptr()
    b.labels = lab.data_ptr() if lab is not None else None
    b.row_weights = w.data_ptr() if w is not None else None
    b.grad = grad.data_ptr() if grad is not None else None
    b.row_losses, b.loss, b.valid_rows = row_losses.data_ptr(), loss.data_ptr(), valid.data_ptr()
    if dev.type == "cuda":
        stream = torch.cuda.current_stream(dev).cuda_stream
        check(lib, lib.kdfuse_compute_cuda(_context(lib, dev.index or 0), ctypes.byref(b),
                                           ctypes.byref(params), ctypes.c_void_p(stream)))
    elif dev.type == "cpu":
        check(lib, lib.kdfuse_compute_host(ctypes.byref(b), ctypes.byref(params)))
    else:
        raise ValueError(f"device must be cuda or cpu, got {dev}")
    # The buffers the launch reads must outlive it: keep them with the outputs.
    return loss, grad, (s, t, lab, w, row_losses, valid)


def _function():
    torch = _torch()

    class DistillLoss(torch.autograd.Function):
        @staticmethod
        def forward(ctx, student, teacher, labels, params, row_weights):
            loss, grad, keep = _run(student, teacher, labels, params, student.requires_grad,
                                    row_weights)
            ctx.keep = keep
            ctx.shape = student.shape
            if grad is not None:
                ctx.save_for_backward(grad)
            return loss.reshape(())

        @staticmethod
        def backward(ctx, grad_output):
            if not ctx.saved_tensors:
                return None, None, None, None, None
            (grad,) = ctx.saved_tensors
            g = grad.mul_(grad_output.to(grad.dtype)).reshape(ctx.shape)
            return g, None, None, None, None

    return DistillLoss


_fn = None


def distill_loss(student_logits, teacher_logits, labels=None, *, divergence="forward-kl",
                 beta=None, temperature=1.0, alpha=0.0, reduction="batchmean",
                 ignore_index=-100, t2_scaling=True, softcap=None, row_weights=None):
    """``α·CE(labels) + (1−α)·c·D(teacher‖student)`` reduced over rows (docs/DESIGN.md §1).

    ``student_logits`` and ``teacher_logits``: [..., V] tensors of one dtype
    (float32, bfloat16, float16) on one device (CUDA: the fused kernel on the
    current stream; CPU: kdfuse's CPU backend); a teacher with more columns
    (a padded vocabulary) contributes its first V. ``labels``: [...] integers
    (needed when ``alpha > 0``; ``ignore_index`` rows count nothing).
    ``divergence``: forward-kl, reverse-kl, jsd (``beta``, default 0.5; jsd only), tvd or
    soft-ce. ``c`` is τ²
    unless ``t2_scaling`` is False. ``softcap``: None or C > 0, logits
    x ← C·tanh(x/C) before anything else. ``row_weights``: None or N floats
    (one per row after flattening) multiplying each row's loss; the
    reduction's denominator stays the valid-row count. Returns a 0-dim float32 tensor; its
    backward gives the gradient for ``student_logits`` only. Arguments the library refuses
    (named in the message) raise ``KdfuseError``; malformed ones ``ValueError``.
    """
    global _fn
    if _fn is None:
        _fn = _function()
    params = make_params(load_library(), divergence, beta, temperature, alpha, reduction,
                         ignore_index, t2_scaling, softcap)
    return _fn.apply(student_logits, teacher_logits, labels, params, row_weights)
