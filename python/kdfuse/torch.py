"""kdfuse for PyTorch: the fused distillation loss as ``torch.library`` custom ops.

    import kdfuse.torch as kt
    loss = kt.distill_loss(student_logits, teacher_logits, labels,
                           divergence="jsd", beta=0.5, temperature=2.0)
    loss.backward()

The ops (``torch.ops.kdfuse.dense_loss``, ``torch.ops.kdfuse.topk_loss``)
have fake kernels and autograd formulas, so ``torch.compile(fullgraph=True)``
traces them without graph breaks. The loss and its gradients come from one
fused call in the forward; the backward multiplies the saved gradient by
the upstream gradient, out of place (``retain_graph`` and repeated
``autograd.grad`` calls give the same result each time). Second derivatives
are not implemented: differentiating a kdfuse gradient raises a
``RuntimeError`` that says so.

Devices: CUDA tensors run the fused kernel on the current device and stream
(no host synchronisation); CPU tensors run kdfuse's CPU backend (float32,
bfloat16, float16) or, for float64, the library's f64 oracle (exact
definitions, for ``gradcheck``). The README's Python section documents every
option.
"""

import ctypes
import math
from typing import Optional

import torch

from . import _lib

__all__ = [
    "distill_loss",
    "topk_distill_loss",
    "generalized_jsd_loss",
    "DistillationLoss",
    "feature_loss",
    "FeatureDistillationLoss",
    "vocab_parallel_distill_loss",
    "vocab_parallel_collectives",
    "topk_teacher",
    "fused_linear_distill_loss",
    "FusedLinearDistillationLoss",
    "REDUCTIONS",
    "DIVERGENCES",
]

DIVERGENCES = tuple(_lib.DIVERGENCES)
REDUCTIONS = ("batchmean", "sum", "mean", "none", "token_mean")
_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_NO_DOUBLE_BACKWARD = (
    "kdfuse: second derivatives are not implemented (the fused op computes first-order "
    "gradients only); differentiate a plain-PyTorch loss instead for double backward"
)


def _rows(x):
    """``x`` as [N, V] with unit column stride and row stride ≥ V (a view when it can)."""
    v = x.shape[-1]
    x2 = x.reshape(-1, v)
    if x2.shape[0] > 1 and (x2.stride(1) != 1 or x2.stride(0) < v):
        x2 = x2.contiguous()
    elif x2.shape[0] <= 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    return x2


def _row_stride(x2):
    return x2.stride(0) if x2.shape[0] > 1 else x2.shape[1]


def _check_op_inputs(student, teacher, topk_indices, labels, row_weights):
    """What the ops need before any pointer reaches the library (the ops are
    public: torch.ops.kdfuse.* called directly must not read out of bounds)."""
    if student.dim() < 1 or student.dtype not in _FLOATS:
        raise ValueError(f"student_logits must be a float tensor [..., V], got {student.dtype} "
                         f"{tuple(student.shape)}")
    lead = student.shape[:-1]
    name = "topk_values" if topk_indices is not None else "teacher_logits"
    if teacher.dtype != student.dtype or teacher.device != student.device:
        raise ValueError(f"{name} must have student_logits' dtype and device "
                         f"({student.dtype}, {student.device}), got {teacher.dtype}, "
                         f"{teacher.device}")
    if topk_indices is None:
        if teacher.shape != student.shape:
            raise ValueError(f"teacher_logits has shape {tuple(teacher.shape)}, student_logits "
                             f"{tuple(student.shape)}: the op needs one shape")
    else:
        if (topk_indices.dtype not in (torch.int32, torch.int64)
                or topk_indices.device != student.device):
            raise ValueError("topk_indices must be int32 or int64 on student_logits' device")
        if (topk_indices.shape != teacher.shape or topk_indices.dim() != student.dim()
                or topk_indices.shape[:-1] != lead):
            raise ValueError(f"topk_indices {tuple(topk_indices.shape)} and topk_values "
                             f"{tuple(teacher.shape)} must be [..., k] with student_logits' "
                             f"leading shape {tuple(lead)}")
    if labels is not None and (labels.dtype.is_floating_point or labels.dtype.is_complex):
        raise ValueError(f"labels must hold integers, got {labels.dtype}")
    for arg, x in (("labels", labels), ("row_weights", row_weights)):
        if x is not None and (x.shape != lead or x.device != student.device):
            raise ValueError(f"{arg} must have the leading shape {tuple(lead)} on "
                             f"{student.device}, got {tuple(x.shape)} on {x.device}")


def _call(student, teacher, topk_indices, labels, row_weights, params, grad_student,
          grad_teacher, reduction):
    """One fused library call: (loss, grad_student, grad_teacher), see dense_loss."""
    _check_op_inputs(student, teacher, topk_indices, labels, row_weights)
    f64 = student.dtype == torch.float64
    loss_dtype = torch.float64 if f64 else torch.float32
    dev = student.device
    lead = student.shape[:-1]
    v = student.shape[-1]
    n = math.prod(lead)
    gs = (torch.empty(student.shape, dtype=student.dtype, device=dev) if grad_student
          else student.new_empty((0,)))
    gt = (torch.empty(teacher.shape, dtype=teacher.dtype, device=dev) if grad_teacher
          else student.new_empty((0,)))
    loss_shape = lead if reduction == _lib.C_NONE else ()
    if n == 0:
        gs.zero_()
        gt.zero_()
        return torch.zeros(loss_shape, dtype=loss_dtype, device=dev), gs, gt
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"student_logits: device must be cpu or cuda, got {dev}")
    if f64 and dev.type != "cpu":
        raise ValueError("student_logits: float64 runs on the CPU only (the f64 oracle); "
                         "use float32, bfloat16 or float16 on CUDA")
    s = _rows(student)
    b = _lib.new_batch(n, v, _lib.DTYPE_CODES[str(student.dtype).removeprefix("torch.")])
    b.student, b.student_stride = s.data_ptr(), _row_stride(s)
    keep = [s]
    if teacher is not None and topk_indices is None:
        t = _rows(teacher)
        b.teacher, b.teacher_stride = t.data_ptr(), _row_stride(t)
        keep.append(t)
    if topk_indices is not None:
        idx = topk_indices.reshape(n, -1).contiguous()
        vals = teacher.reshape(n, -1).contiguous()
        b.topk_indices, b.topk_values = idx.data_ptr(), vals.data_ptr()
        b.topk_k = idx.shape[1]
        b.topk_index_dtype = 1 if idx.dtype == torch.int64 else 0
        keep += [idx, vals]
    if labels is not None:
        lab = labels.reshape(-1).to(device=dev, dtype=torch.int64).contiguous()
        b.labels = lab.data_ptr()
        keep.append(lab)
    if row_weights is not None:
        w = row_weights.reshape(-1).to(device=dev, dtype=loss_dtype).contiguous()
        b.row_weights = w.data_ptr()
        keep.append(w)
    if grad_student:
        b.grad, b.grad_stride = gs.data_ptr(), v
    if grad_teacher:
        b.grad_teacher, b.grad_teacher_stride = gt.data_ptr(), v
    row_losses = torch.empty(n, dtype=loss_dtype, device=dev)
    loss = torch.empty(1, dtype=loss_dtype, device=dev)
    valid = torch.empty(1, dtype=torch.int32, device=dev)
    b.row_losses, b.loss, b.valid_rows = row_losses.data_ptr(), loss.data_ptr(), valid.data_ptr()
    lib = _lib.load_library()
    if dev.type == "cuda":
        stream = torch.cuda.current_stream(dev).cuda_stream
        _lib.check(lib.kdfuse_compute_cuda(_lib.context(dev.index or 0), ctypes.byref(b),
                                           ctypes.byref(params), ctypes.c_void_p(stream)))
    elif f64 and topk_indices is not None:
        _lib.check(lib.kdfuse_compute_topk_host_f64(ctypes.byref(b), ctypes.byref(params)))
    elif f64:
        _lib.check(lib.kdfuse_compute_host_f64(ctypes.byref(b), ctypes.byref(params)))
    else:
        _lib.check(lib.kdfuse_compute_host(ctypes.byref(b), ctypes.byref(params)))
    if reduction == _lib.C_NONE:
        return row_losses.reshape(lead), gs, gt
    return loss.reshape(()), gs, gt


# ---------------------------------------------------------------------------
# C ABI precision codes back to their names (make_params takes names).
_PRECISION_NAMES = {v: k for k, v in _lib.PRECISIONS.items()}


# The custom ops.


@torch.library.custom_op("kdfuse::dense_loss", mutates_args=())
def _dense_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: Optional[torch.Tensor],
    row_weights: Optional[torch.Tensor],
    divergence: int,
    beta: float,
    temperature: float,
    alpha: float,
    reduction: int,
    ignore_index: int,
    t2_scaling: bool,
    softcap: float,
    grad_student: bool,
    grad_teacher: bool,
    precision: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ∂loss/∂student or [0], ∂loss/∂teacher or [0]) of kdfuse's dense loss.

    ``student``, ``teacher``: [..., V], one dtype, one device, one shape.
    ``reduction``: a C ABI code (0 batchmean = Σ/valid rows, 1 sum, 2 mean =
    Σ/(valid·V), 3 none = the per-row losses, shape [...]). The loss is
    float32 (float64 for float64 inputs); the gradients have the inputs'
    dtype and shape, contiguous. ``precision``: a C ABI code (0 fast, 1
    exact: the kernels' arithmetic, on the GPU and the CPU backend)."""
    params = _lib.make_params(divergence, reduction, beta=beta, temperature=temperature,
                              alpha=alpha, ignore_index=ignore_index, t2_scaling=t2_scaling,
                              softcap=softcap, grad_teacher=grad_teacher,
                              precision=_PRECISION_NAMES.get(precision, precision))
    return _call(student, teacher, None, labels, row_weights, params, grad_student,
                 grad_teacher, reduction)


@_dense_loss.register_fake
def _dense_loss_fake(student, teacher, labels, row_weights, divergence, beta, temperature,
                     alpha, reduction, ignore_index, t2_scaling, softcap, grad_student,
                     grad_teacher, precision):
    return _fake_outputs(student, teacher, reduction, grad_student, grad_teacher)


def _fake_outputs(student, teacher, reduction, grad_student, grad_teacher):
    loss_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    shape = student.shape[:-1] if reduction == _lib.C_NONE else ()
    loss = student.new_empty(shape, dtype=loss_dtype)
    gs = student.new_empty(student.shape) if grad_student else student.new_empty((0,))
    gt = teacher.new_empty(teacher.shape) if grad_teacher else student.new_empty((0,))
    return loss, gs, gt


@torch.library.custom_op("kdfuse::topk_loss", mutates_args=())
def _topk_loss(
    student: torch.Tensor,
    topk_indices: torch.Tensor,
    topk_values: torch.Tensor,
    labels: Optional[torch.Tensor],
    row_weights: Optional[torch.Tensor],
    divergence: int,
    beta: float,
    temperature: float,
    alpha: float,
    reduction: int,
    ignore_index: int,
    t2_scaling: bool,
    softcap: float,
    teacher_log_probs: bool,
    topk_mode: int,
    grad_student: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, ∂loss/∂student or [0]) of kdfuse's loss against a top-k teacher.

    ``topk_indices`` [..., k] (int32/int64) and ``topk_values`` [..., k]
    (the student's dtype) for a student [..., V]; otherwise as dense_loss
    (float64 on the CPU: the f64 oracle)."""
    params = _lib.make_params(divergence, reduction, beta=beta, temperature=temperature,
                              alpha=alpha, ignore_index=ignore_index, t2_scaling=t2_scaling,
                              softcap=softcap, teacher_log_probs=teacher_log_probs,
                              topk_mode=topk_mode)
    loss, gs, _ = _call(student, topk_values, topk_indices, labels, row_weights, params,
                        grad_student, False, reduction)
    return loss, gs


@_topk_loss.register_fake
def _topk_loss_fake(student, topk_indices, topk_values, labels, row_weights, divergence, beta,
                    temperature, alpha, reduction, ignore_index, t2_scaling, softcap,
                    teacher_log_probs, topk_mode, grad_student):
    loss, gs, _ = _fake_outputs(student, student, reduction, grad_student, False)
    return loss, gs


@torch.library.custom_op("kdfuse::scale_grad", mutates_args=())
def _scale_grad(grad: torch.Tensor, upstream: torch.Tensor, origin: torch.Tensor,
                per_row: bool) -> torch.Tensor:
    """``grad · upstream`` (per row: ``upstream`` broadcast over ``grad``'s
    trailing dimensions), a new tensor of
    ``grad``'s dtype. ``origin`` (the input ``grad`` is the gradient of) is
    not read: it ties the result to it, so that differentiating the result
    raises instead of silently missing the second-order term."""
    up = upstream.reshape(tuple(upstream.shape) + (1,) * (grad.dim() - upstream.dim())) \
        if per_row else upstream
    return (grad * up).to(grad.dtype)


@_scale_grad.register_fake
def _scale_grad_fake(grad, upstream, origin, per_row):
    return torch.empty_like(grad)


def _scale_grad_backward(ctx, g):
    raise RuntimeError(_NO_DOUBLE_BACKWARD)


_scale_grad.register_autograd(_scale_grad_backward)


class _ScaleGrad(torch.autograd.Function):
    """The scale_grad op under an autograd.Function (torch.func, as _DenseLoss)."""

    generate_vmap_rule = True  # the ops' vmap rules (register_vmap)

    @staticmethod
    def forward(grad, upstream, origin, per_row):
        with torch.no_grad():
            return torch.ops.kdfuse.scale_grad(grad, upstream, origin, per_row)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    backward = staticmethod(_scale_grad_backward)


def _scale(grad, upstream, origin, per_row):
    return _ScaleGrad.apply(grad, upstream, origin, per_row)


def _two_sided_autograd(op, reduction_at, flags_at, n_inputs):
    """setup_context and backward of an op returning (loss, ∂/∂student,
    ∂/∂teacher) for inputs (student, teacher, ...): the gradients were made
    by the forward call; the backward scales them by the upstream gradient
    (out of place). `reduction_at`: the index of the reduction code among the
    inputs (per-row losses when it is "none"); `flags_at`: of the
    grad_student, grad_teacher flags."""

    def setup(ctx, inputs, output):
        _, gs, gt = output
        ctx.mark_non_differentiable(gs, gt)
        ctx.per_row = inputs[reduction_at] == _lib.C_NONE
        ctx.flags = (inputs[flags_at], inputs[flags_at + 1])
        ctx.save_for_backward(gs, gt, inputs[0], inputs[1])

    def backward(ctx, g_loss, _g_gs, _g_gt):
        gs, gt, student, teacher = ctx.saved_tensors
        out = [None] * n_inputs
        for i, (name, g, x) in enumerate((("student", gs, student), ("teacher", gt, teacher))):
            if ctx.needs_input_grad[i]:
                if not ctx.flags[i]:
                    raise RuntimeError(f"kdfuse::{op}: called with grad_{name}=False, "
                                       f"so it has no {name} gradient to give")
                out[i] = _scale(g, g_loss, x, ctx.per_row)
        return tuple(out)

    return setup, backward


_dense_setup, _dense_backward = _two_sided_autograd("dense_loss", 8, 12, 15)
_dense_loss.register_autograd(_dense_backward, setup_context=_dense_setup)


# ---------------------------------------------------------------------------
# vmap rules: the vmapped dimension becomes more rows of one call (the losses
# are per row), reduced per entry afterwards.


def _batched(x, d, size):
    if x is None:
        return None
    if d is None:
        return x.unsqueeze(0).expand(size, *x.shape)
    return x.movedim(d, 0)


def _reduce_entries(rows, gs, gt, reduction, size, valid, count):
    """Per vmap entry: rows [size, ...] of row losses (and the gradients of
    their sum) → the entry's reduction, gradients scaled to match."""
    if reduction == _lib.C_NONE:
        return rows, gs, gt
    total = rows.reshape(size, -1).sum(1)
    if reduction == _lib.C_SUM:
        return total, gs, gt
    denom = valid.to(rows.dtype) * (count if reduction == _lib.C_MEAN else 1)
    w = torch.where(denom > 0, 1.0 / denom.clamp_min(1), torch.zeros_like(denom))

    def scale(g):
        if g.numel() == 0:
            return g
        return (g * w.reshape((size,) + (1,) * (g.dim() - 1)).to(g.dtype)).to(g.dtype)

    return total * w, scale(gs), scale(gt)


@torch.library.register_vmap("kdfuse::dense_loss")
def _dense_loss_vmap(info, in_dims, student, teacher, labels, row_weights, divergence, beta,
                     temperature, alpha, reduction, ignore_index, t2_scaling, softcap,
                     grad_student, grad_teacher, precision):
    n = info.batch_size
    s, t = _batched(student, in_dims[0], n), _batched(teacher, in_dims[1], n)
    lab, w = _batched(labels, in_dims[2], n), _batched(row_weights, in_dims[3], n)
    rows, gs, gt = torch.ops.kdfuse.dense_loss(
        s, t, lab, w, divergence, beta, temperature, alpha, _lib.C_NONE, ignore_index,
        t2_scaling, softcap, grad_student, grad_teacher, precision)
    valid = _valid_per_entry(lab, ignore_index, s, n)
    out = _reduce_entries(rows, gs, gt, reduction, n, valid, s.shape[-1])
    return out, (0, 0 if grad_student else None, 0 if grad_teacher else None)


def _valid_per_entry(labels, ignore_index, s, size):
    """The rows that count in each vmap entry of logits ``s`` [size, ..., V]."""
    if labels is not None:
        return (labels != ignore_index).reshape(size, -1).sum(1)
    return torch.full((size,), math.prod(s.shape[1:-1]), device=s.device)


@torch.library.register_vmap("kdfuse::topk_loss")
def _topk_loss_vmap(info, in_dims, student, topk_indices, topk_values, labels, row_weights,
                    divergence, beta, temperature, alpha, reduction, ignore_index, t2_scaling,
                    softcap, teacher_log_probs, topk_mode, grad_student):
    n = info.batch_size
    s = _batched(student, in_dims[0], n)
    idx, vals = _batched(topk_indices, in_dims[1], n), _batched(topk_values, in_dims[2], n)
    lab, w = _batched(labels, in_dims[3], n), _batched(row_weights, in_dims[4], n)
    rows, gs = torch.ops.kdfuse.topk_loss(
        s, idx, vals, lab, w, divergence, beta, temperature, alpha, _lib.C_NONE, ignore_index,
        t2_scaling, softcap, teacher_log_probs, topk_mode, grad_student)
    valid = _valid_per_entry(lab, ignore_index, s, n)
    loss, gs, _ = _reduce_entries(rows, gs, gs.new_empty((0,)), reduction, n, valid,
                                  s.shape[-1])
    return (loss, gs), (0, 0 if grad_student else None)


@torch.library.register_vmap("kdfuse::scale_grad")
def _scale_grad_vmap(info, in_dims, grad, upstream, origin, per_row):
    n = info.batch_size
    g, up = _batched(grad, in_dims[0], n), _batched(upstream, in_dims[1], n)
    return torch.ops.kdfuse.scale_grad(g, up, origin, True), 0


def _op_function(name, op, setup, backward, doc, vmap=False):
    """An autograd.Function running ``op`` with the op's own setup and
    backward: what the Python API calls, because ``torch.func`` transforms
    (grad, vjp, ...) take an autograd.Function with ``setup_context`` but not
    the Function that ``register_autograd`` generates. ``torch.compile``
    traces either."""

    def forward(*args):
        # The Function is the autograd here, not the op's registration.
        with torch.no_grad():
            return op(*args)

    attrs = {
        "__doc__": doc,
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup),
        "backward": staticmethod(backward),
    }
    if vmap:
        attrs["generate_vmap_rule"] = True  # the ops' vmap rules (register_vmap)
    return type(name, (torch.autograd.Function,), attrs)


_DenseLoss = _op_function("_DenseLoss", torch.ops.kdfuse.dense_loss, _dense_setup,
                          _dense_backward, "The dense op under an autograd.Function.",
                          vmap=True)


def _topk_setup(ctx, inputs, output):
    _, gs = output
    ctx.mark_non_differentiable(gs)
    ctx.per_row = inputs[9] == _lib.C_NONE
    ctx.flag = inputs[15]
    ctx.save_for_backward(gs, inputs[0])


def _topk_backward(ctx, g_loss, _g_gs):
    gs, student = ctx.saved_tensors
    d_s = None
    if ctx.needs_input_grad[0]:
        if not ctx.flag:
            raise RuntimeError("kdfuse::topk_loss: called with grad_student=False, "
                               "so it has no student gradient to give")
        d_s = _scale(gs, g_loss, student, ctx.per_row)
    if ctx.needs_input_grad[2]:
        raise RuntimeError("kdfuse::topk_loss: a top-k teacher is fixed data; its values "
                           "have no gradient (detach them)")
    return (d_s,) + (None,) * 15


_topk_loss.register_autograd(_topk_backward, setup_context=_topk_setup)


_TopkLoss = _op_function("_TopkLoss", torch.ops.kdfuse.topk_loss, _topk_setup,
                         _topk_backward, "The top-k op under an autograd.Function.",
                         vmap=True)


# ---------------------------------------------------------------------------
# The Python API.


def _check_logits(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension ([..., V]), got a scalar")
    if x.dtype not in _FLOATS:
        raise ValueError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
    if x.shape[-1] == 0:
        raise ValueError(f"{name}: the vocabulary (last) dimension must not be empty")


def _options(divergence, beta, temperature, alpha, reduction, ignore_index, softcap,
             num_items_in_batch, labels):
    if divergence not in _lib.DIVERGENCES:
        raise ValueError(f"divergence must be one of {list(DIVERGENCES)}, got {divergence!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(REDUCTIONS)}, got {reduction!r}")
    if beta is not None and divergence != "jsd":
        raise ValueError(f"beta is the JSD weight: divergence {divergence!r} does not use it")
    beta = 0.5 if beta is None else beta
    for name, x in (("beta", beta), ("temperature", temperature), ("alpha", alpha)):
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise TypeError(f"{name} must be a number, got {type(x).__name__}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha > 0 and labels is None:
        raise ValueError("labels are needed when alpha > 0 (the hard-label cross-entropy)")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0
                                    and math.isfinite(softcap)):
        raise ValueError(f"softcap must be None (off) or a finite number > 0, got {softcap!r}")
    if num_items_in_batch is not None and reduction not in ("batchmean", "token_mean"):
        raise ValueError("num_items_in_batch replaces the batchmean/token_mean denominator; "
                         f"it does not go with reduction={reduction!r}")
    return float(beta), float(temperature), float(alpha), 0.0 if softcap is None else float(
        softcap)


def _check_rows_arg(x, name, lead, device, integer):
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(x).__name__}")
    if integer and (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool):
        raise ValueError(f"{name} must hold integers, got {x.dtype}")
    if not integer and not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be floating point, got {x.dtype}")
    if tuple(x.shape) != tuple(lead):
        raise ValueError(f"{name} has shape {tuple(x.shape)}; the logits' leading shape is "
                         f"{tuple(lead)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, the logits on {device}")
    return x


def _reduce(fused, reduction, labels, num_items_in_batch, batch):
    """The public reduction from the C ABI's: returns (C code, post-function)."""
    if num_items_in_batch is not None:
        return _lib.C_SUM, lambda x: x / num_items_in_batch
    if reduction == "batchmean" and labels is None:
        # kl_div's and TRL's batchmean divides by the first dimension (B of
        # [B, T, V]); with labels TRL divides by the valid tokens.
        return _lib.C_SUM, lambda x: x / max(batch, 1)
    return {"batchmean": _lib.C_BATCHMEAN, "token_mean": _lib.C_BATCHMEAN,
            "sum": _lib.C_SUM, "mean": _lib.C_MEAN, "none": _lib.C_NONE}[reduction], None


def distill_loss(student_logits, teacher_logits, labels=None, *, divergence="forward-kl",
                 beta=None, temperature=1.0, alpha=0.0, reduction="batchmean",
                 ignore_index=-100, num_items_in_batch=None, t2_scaling=True, softcap=None,
                 row_weights=None, precision="fast"):
    """``α·CE(labels) + (1 − α)·c·D(teacher‖student)``, reduced (README, Python section).

    Args:
      student_logits: [..., V] float tensor ([N, V] or [B, T, V], any strides).
      teacher_logits: as the student, or wider ([..., V'] with V' ≥ V: its
        first V columns are used); any strides (an expanded teacher is fine).
        Dtypes are promoted as PyTorch does (``torch.promote_types``). When it
        requires grad, it gets its gradient too (mutual learning).
      labels: None or integers of the leading shape; rows whose label is
        ``ignore_index`` count nothing (neither term).
      divergence: forward-kl (KL(p‖q), p the teacher), reverse-kl, jsd
        (generalized JSD with weight ``beta``: 0 = forward KL, 1 = reverse KL,
        TRL's convention), tvd or soft-ce.
      beta: the JSD weight (default 0.5); jsd only.
      temperature: τ > 0; both distributions are softened by it.
      alpha: weight of the hard-label cross-entropy (at τ = 1; needs labels).
      reduction: batchmean (Σ / B, B the first dimension, as ``kl_div``;
        Σ / valid tokens when labels are given, as TRL), token_mean (Σ /
        valid tokens always), mean (Σ / (valid tokens · V), as ``kl_div`` and
        TRL), sum, or none (the per-token losses, shape [...], 0 where ignored).
      ignore_index: the label of rows that count nothing (default −100).
      num_items_in_batch: None, or a number or tensor: the loss is then
        Σ / num_items_in_batch (transformers' gradient accumulation);
        batchmean and token_mean only.
      t2_scaling: multiply the soft term by τ² (c = τ², Hinton's scaling;
        False for TRL's generalized_jsd_loss).
      softcap: None or C > 0: logits x ← C·tanh(x/C) first (both sides).
      row_weights: None or floats of the leading shape multiplying each
        token's loss (the denominators stay the same).
      precision: "fast" (default) or "exact": the kernels' arithmetic, on
        CUDA and the CPU (docs/DESIGN.md §3; fast covers every divergence
        without softcap or a teacher gradient, exact runs elsewhere).

    Returns the loss in the promoted input dtype (0-dim, or [...] for none).
    Bad arguments raise ``ValueError`` / ``TypeError`` naming the argument.
    """
    _check_logits(student_logits, "student_logits")
    _check_logits(teacher_logits, "teacher_logits")
    beta, temperature, alpha, cap = _options(divergence, beta, temperature, alpha, reduction,
                                             ignore_index, softcap, num_items_in_batch, labels)
    s, t = student_logits, teacher_logits
    if s.device != t.device:
        raise ValueError(f"teacher_logits is on {t.device}, student_logits on {s.device}")
    v = s.shape[-1]
    if t.shape[:-1] != s.shape[:-1] or t.shape[-1] < v:
        raise ValueError(f"teacher_logits has shape {tuple(t.shape)}, which does not cover "
                         f"student_logits {tuple(s.shape)} (same leading shape, ≥ V columns)")
    if t.shape[-1] > v:
        t = t[..., :v]
    lead = s.shape[:-1]
    labels = _check_rows_arg(labels, "labels", lead, s.device, True)
    row_weights = _check_rows_arg(row_weights, "row_weights", lead, s.device, False)
    dtype = torch.promote_types(s.dtype, t.dtype)
    s, t = s.to(dtype), t.to(dtype)
    code, post = _reduce(None, reduction, labels, num_items_in_batch,
                         s.shape[0] if s.dim() > 1 else 1)
    if precision not in _lib.PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(_lib.PRECISIONS)}, got {precision!r}")
    grad_on = torch.is_grad_enabled()
    loss, _, _ = _DenseLoss.apply(
        s, t, labels, row_weights, _lib.DIVERGENCES[divergence], beta, temperature, alpha,
        code, ignore_index, bool(t2_scaling), cap, grad_on and s.requires_grad,
        grad_on and t.requires_grad, _lib.PRECISIONS[precision])
    loss = loss.to(dtype)
    return post(loss) if post is not None else loss


def topk_distill_loss(student_logits, topk_indices, topk_values, labels=None, *,
                      divergence="forward-kl", beta=None, temperature=1.0, alpha=0.0,
                      reduction="batchmean", ignore_index=-100, num_items_in_batch=None,
                      t2_scaling=True, softcap=None, row_weights=None, topk_mode="full",
                      teacher_log_probs=False):
    """As :func:`distill_loss` against a top-k teacher: ``topk_indices`` [..., k]
    (int32/int64, distinct within a row, in [0, V)) and ``topk_values`` [..., k]
    (logits, or log-probs with ``teacher_log_probs``). ``topk_mode``: full
    (the teacher is zero off its support; default), support (both
    renormalised over the k entries) or tail (k + 1 buckets; needs log-probs
    and τ = 1). The values get no gradient. float32/bfloat16/float16, and
    float64 on the CPU (the library's f64 oracle, for ``gradcheck``); float64
    CUDA tensors are an error, as for :func:`distill_loss`."""
    _check_logits(student_logits, "student_logits")
    _check_logits(topk_values, "topk_values")
    if not isinstance(topk_indices, torch.Tensor) or topk_indices.dtype not in (torch.int32,
                                                                                 torch.int64):
        raise ValueError("topk_indices must be an int32 or int64 tensor")
    if topk_mode not in _lib.TOPK_MODES:
        raise ValueError(f"topk_mode must be one of {list(_lib.TOPK_MODES)}, got {topk_mode!r}")
    beta, temperature, alpha, cap = _options(divergence, beta, temperature, alpha, reduction,
                                             ignore_index, softcap, num_items_in_batch, labels)
    s = student_logits
    lead = s.shape[:-1]
    if topk_indices.shape != topk_values.shape or topk_indices.shape[:-1] != lead:
        raise ValueError(f"topk_indices {tuple(topk_indices.shape)} and topk_values "
                         f"{tuple(topk_values.shape)} must share the shape [..., k] with "
                         f"student_logits' leading shape {tuple(lead)}")
    for name, x in (("topk_indices", topk_indices), ("topk_values", topk_values)):
        if x.device != s.device:
            raise ValueError(f"{name} is on {x.device}, student_logits on {s.device}")
    labels = _check_rows_arg(labels, "labels", lead, s.device, True)
    row_weights = _check_rows_arg(row_weights, "row_weights", lead, s.device, False)
    dtype = torch.promote_types(s.dtype, topk_values.dtype)
    if dtype == torch.float64 and s.device.type != "cpu":
        raise ValueError("student_logits: float64 runs on the CPU only (the f64 oracle); "
                         "use float32, bfloat16 or float16 on CUDA")
    s, vals = s.to(dtype), topk_values.to(dtype)
    code, post = _reduce(None, reduction, labels, num_items_in_batch,
                         s.shape[0] if s.dim() > 1 else 1)
    loss, _ = _TopkLoss.apply(
        s, topk_indices, vals, labels, row_weights, _lib.DIVERGENCES[divergence], beta,
        temperature, alpha, code, ignore_index, bool(t2_scaling), cap, bool(teacher_log_probs),
        _lib.TOPK_MODES[topk_mode], torch.is_grad_enabled() and s.requires_grad)
    loss = loss.to(dtype)
    return post(loss) if post is not None else loss


def generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5,
                         temperature=1.0, reduction="batchmean"):
    """A drop-in for TRL's ``GKDTrainer.generalized_jsd_loss`` (same arguments,
    same value): generalized JSD with weight β (0 = forward KL, 1 = reverse
    KL), no τ² factor, −100 labels ignored. One difference: reduction none
    gives the per-token losses [...] (0 where ignored), not TRL's per-element
    [M, V] tensor."""
    return distill_loss(student_logits, teacher_logits, labels, divergence="jsd", beta=beta,
                        temperature=temperature, reduction=reduction, t2_scaling=False)


class DistillationLoss(torch.nn.Module):
    """:func:`distill_loss` as a module: the options are set once.

        crit = DistillationLoss(divergence="jsd", beta=0.5, temperature=2.0)
        loss = crit(student_logits, teacher_logits, labels)
    """

    def __init__(self, *, divergence="forward-kl", beta=None, temperature=1.0, alpha=0.0,
                 reduction="batchmean", ignore_index=-100, t2_scaling=True, softcap=None,
                 precision="fast"):
        super().__init__()
        if precision not in _lib.PRECISIONS:
            raise ValueError(
                f"precision must be one of {sorted(_lib.PRECISIONS)}, got {precision!r}")
        self.precision = precision
        _options(divergence, beta, temperature, alpha, reduction, ignore_index, softcap, None,
                 0 if alpha > 0 else None)
        self.divergence, self.beta, self.temperature = divergence, beta, temperature
        self.alpha, self.reduction, self.ignore_index = alpha, reduction, ignore_index
        self.t2_scaling, self.softcap = t2_scaling, softcap

    def forward(self, student_logits, teacher_logits, labels=None, num_items_in_batch=None,
                row_weights=None):
        return distill_loss(student_logits, teacher_logits, labels,
                            divergence=self.divergence, beta=self.beta,
                            temperature=self.temperature, alpha=self.alpha,
                            reduction=self.reduction, ignore_index=self.ignore_index,
                            num_items_in_batch=num_items_in_batch, t2_scaling=self.t2_scaling,
                            softcap=self.softcap, row_weights=row_weights,
                            precision=self.precision)

    def extra_repr(self):
        return (f"divergence={self.divergence!r}, beta={self.beta}, "
                f"temperature={self.temperature}, alpha={self.alpha}, "
                f"reduction={self.reduction!r}, t2_scaling={self.t2_scaling}, "
                f"softcap={self.softcap}, precision={self.precision!r}")


# ---------------------------------------------------------------------------
# Feature losses.


def _feature_rows(x, n, length):
    """``x`` as [n, length] with unit column stride and row stride ≥ length."""
    x2 = x.reshape(n, length)
    if x2.stride(1) != 1 or (n > 1 and x2.stride(0) < length):
        x2 = x2.contiguous()
    return x2


def _feature_geometry(student, teacher, kind):
    """(rows N, width, C_s, C_t, loss shape of reduction none)."""
    if kind == _lib.FEATURE_KINDS["attention"]:
        if student.dim() < 3 or teacher.dim() != student.dim() \
                or student.shape[0] != teacher.shape[0] or student.shape[2:] != teacher.shape[2:]:
            raise ValueError(f"teacher_features {tuple(teacher.shape)} and student_features "
                             f"{tuple(student.shape)} must be maps [N, C, ...] with the same N "
                             "and spatial shape (C may differ)")
        width = math.prod(student.shape[2:])
        return student.shape[0], width, student.shape[1], teacher.shape[1], student.shape[:1]
    if student.dim() < 1 or teacher.shape != student.shape:
        raise ValueError(f"teacher_features has shape {tuple(teacher.shape)}, student_features "
                         f"{tuple(student.shape)}: mse and cosine need one shape [..., H]")
    return math.prod(student.shape[:-1]), student.shape[-1], 1, 1, student.shape[:-1]


@torch.library.custom_op("kdfuse::feature_loss", mutates_args=())
def _feature_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    kind: int,
    reduction: int,
    eps: float,
    grad_student: bool,
    grad_teacher: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ∂loss/∂student or [0], ∂loss/∂teacher or [0]) of a feature loss.

    ``kind``: 0 mse, 1 cosine (rows [..., H], one shape), 2 attention (maps
    [N, C, ...], C may differ). ``reduction``: a C ABI code (2 mean, the
    kind's; 0 batchmean Σ/N; 1 sum; 3 none, the per-row losses). ``eps``: 0
    = the kind's default. Loss float32 (float64 for float64 inputs)."""
    if student.dtype not in _FLOATS or teacher.dtype != student.dtype \
            or teacher.device != student.device:
        raise ValueError("student_features and teacher_features must be float tensors of one "
                         f"dtype and device, got {student.dtype} on {student.device} and "
                         f"{teacher.dtype} on {teacher.device}")
    n, width, cs, ct, none_shape = _feature_geometry(student, teacher, kind)
    f64 = student.dtype == torch.float64
    loss_dtype = torch.float64 if f64 else torch.float32
    dev = student.device
    gs = (torch.empty(student.shape, dtype=student.dtype, device=dev) if grad_student
          else student.new_empty((0,)))
    gt = (torch.empty(teacher.shape, dtype=teacher.dtype, device=dev) if grad_teacher
          else student.new_empty((0,)))
    if n == 0:
        gs.zero_()
        gt.zero_()
        shape = none_shape if reduction == _lib.C_NONE else ()
        return torch.zeros(shape, dtype=loss_dtype, device=dev), gs, gt
    if width == 0 or cs == 0 or ct == 0:
        raise ValueError("student_features and teacher_features must not have empty rows")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"student_features: device must be cpu or cuda, got {dev}")
    if f64 and dev.type != "cpu":
        raise ValueError("student_features: float64 runs on the CPU only (the f64 oracle)")
    s = _feature_rows(student, n, cs * width)
    t = _feature_rows(teacher, n, ct * width)
    lib = _lib.load_library()
    b = _lib.FeatureBatch()
    code = _lib.DTYPE_CODES[str(student.dtype).removeprefix("torch.")]
    _lib.check(lib.kdfuse_feature_batch_init(ctypes.byref(b), kind, n, width, code))
    b.reduction, b.eps = reduction, eps
    b.student_channels, b.teacher_channels = cs, ct
    b.student, b.student_stride = s.data_ptr(), s.stride(0) if n > 1 else cs * width
    b.teacher, b.teacher_stride = t.data_ptr(), t.stride(0) if n > 1 else ct * width
    b.grad_student_stride, b.grad_teacher_stride = cs * width, ct * width
    if grad_student:
        b.grad_student = gs.data_ptr()
    if grad_teacher:
        b.grad_teacher = gt.data_ptr()
    row_losses = torch.empty(n, dtype=loss_dtype, device=dev)
    loss = torch.empty(1, dtype=loss_dtype, device=dev)
    b.row_losses, b.loss = row_losses.data_ptr(), loss.data_ptr()
    if dev.type == "cuda":
        need = ctypes.c_int64(0)
        _lib.check(lib.kdfuse_feature_workspace_len(ctypes.byref(b), ctypes.byref(need)))
        work = torch.empty(max(int(need.value), 1), dtype=torch.float32, device=dev)
        b.workspace = work.data_ptr()
        stream = torch.cuda.current_stream(dev).cuda_stream
        _lib.check(lib.kdfuse_feature_compute_cuda(_lib.context(dev.index or 0), ctypes.byref(b),
                                                   ctypes.c_void_p(stream)))
    else:
        _lib.check(lib.kdfuse_feature_compute_host(ctypes.byref(b)))
    if reduction == _lib.C_NONE:
        return row_losses.reshape(none_shape), gs, gt
    return loss.reshape(()), gs, gt


@_feature_loss.register_fake
def _feature_loss_fake(student, teacher, kind, reduction, eps, grad_student, grad_teacher):
    *_, none_shape = _feature_geometry(student, teacher, kind)
    loss_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    loss = student.new_empty(none_shape if reduction == _lib.C_NONE else (), dtype=loss_dtype)
    gs = student.new_empty(student.shape) if grad_student else student.new_empty((0,))
    gt = teacher.new_empty(teacher.shape) if grad_teacher else student.new_empty((0,))
    return loss, gs, gt


_feature_setup, _feature_backward = _two_sided_autograd("feature_loss", 3, 5, 7)


_feature_loss.register_autograd(_feature_backward, setup_context=_feature_setup)


@torch.library.register_vmap("kdfuse::feature_loss")
def _feature_loss_vmap(info, in_dims, student, teacher, kind, reduction, eps, grad_student,
                       grad_teacher):
    n = info.batch_size
    s, t = _batched(student, in_dims[0], n), _batched(teacher, in_dims[1], n)
    # One entry's geometry, checked on shapes only (meta tensors).
    rows_each, width, cs, _, none_shape = _feature_geometry(
        torch.empty(s.shape[1:], device="meta"), torch.empty(t.shape[1:], device="meta"), kind)
    attention = kind == _lib.FEATURE_KINDS["attention"]
    # mse/cosine rows are every leading index, the vmapped one included;
    # attention maps [n, N, C, ...] become [n·N, C, ...].
    s2, t2 = (s.flatten(0, 1), t.flatten(0, 1)) if attention else (s, t)
    rows, gs, gt = torch.ops.kdfuse.feature_loss(s2, t2, kind, _lib.C_NONE, eps, grad_student,
                                                 grad_teacher)
    rows = rows.reshape((n,) + tuple(none_shape))
    if grad_student:
        gs = gs.reshape(s.shape)
    if grad_teacher:
        gt = gt.reshape(t.shape)
    valid = torch.full((n,), rows_each, device=s.device)
    # The elements per row that the kind's mean averages over (as the library's).
    count = {_lib.FEATURE_KINDS["mse"]: cs * width, _lib.FEATURE_KINDS["cosine"]: 1}.get(
        kind, width)
    out = _reduce_entries(rows, gs, gt, reduction, n, valid, count)
    return out, (0, 0 if grad_student else None, 0 if grad_teacher else None)


_FeatureLoss = _op_function("_FeatureLoss", torch.ops.kdfuse.feature_loss, _feature_setup,
                            _feature_backward, "The feature op under an autograd.Function.",
                            vmap=True)


FEATURE_KINDS = tuple(_lib.FEATURE_KINDS)
FEATURE_REDUCTIONS = ("mean", "batchmean", "sum", "none")


def feature_loss(student_features, teacher_features, *, kind="mse", reduction="mean", eps=None):
    """A feature-distillation loss (README, "Feature distillation").

    Args:
      student_features, teacher_features: mse and cosine: one shape [..., H]
        (rows: every leading index); attention: maps [N, C, ...] with the same
        N and spatial shape (C may differ). Any strides; dtypes promoted as
        PyTorch does; the teacher gets its gradient when it requires grad.
      kind: mse (Σ (s − t)² per row), cosine (1 − cos(s, t), norms clamped at
        ε) or attention (attention transfer, Zagoruyko & Komodakis).
      reduction: mean (the kind's: mse ``F.mse_loss``, i.e. / (N·H); cosine /
        N; attention / (N·S), S the spatial size), batchmean (Σ / N), sum, or
        none (the per-row losses, shape [...] or [N]).
      eps: None (the kind's default: 1e-8 cosine, as ``F.cosine_similarity``;
        1e-12 attention, as ``F.normalize``) or ε > 0; not for mse.

    Returns the loss in the promoted input dtype.
    """
    _check_logits(student_features, "student_features")
    _check_logits(teacher_features, "teacher_features")
    if kind not in _lib.FEATURE_KINDS:
        raise ValueError(f"kind must be one of {list(FEATURE_KINDS)}, got {kind!r}")
    if reduction not in FEATURE_REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(FEATURE_REDUCTIONS)}, got "
                         f"{reduction!r}")
    if eps is not None:
        if kind == "mse":
            raise ValueError("eps is the norm clamp of cosine and attention: mse has none")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (
                math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be None or a finite number > 0, got {eps!r}")
    s, t = student_features, teacher_features
    if s.device != t.device:
        raise ValueError(f"teacher_features is on {t.device}, student_features on {s.device}")
    code = _lib.FEATURE_KINDS[kind]
    _feature_geometry(s, t, code)
    dtype = torch.promote_types(s.dtype, t.dtype)
    s, t = s.to(dtype), t.to(dtype)
    red = {"mean": _lib.C_MEAN, "batchmean": _lib.C_BATCHMEAN, "sum": _lib.C_SUM,
           "none": _lib.C_NONE}[reduction]
    grad_on = torch.is_grad_enabled()
    loss, _, _ = _FeatureLoss.apply(s, t, code, red, 0.0 if eps is None else float(eps),
                                    grad_on and s.requires_grad, grad_on and t.requires_grad)
    return loss.to(dtype)


class FeatureDistillationLoss(torch.nn.Module):
    """:func:`feature_loss` as a module (the options set once). A projector
    between student and teacher widths, if needed, is the caller's (e.g. an
    ``nn.Linear`` applied to the student features first).

        crit = FeatureDistillationLoss(kind="cosine")
        loss = crit(student_hidden, teacher_hidden)
    """

    def __init__(self, *, kind="mse", reduction="mean", eps=None):
        super().__init__()
        if kind not in _lib.FEATURE_KINDS:
            raise ValueError(f"kind must be one of {list(FEATURE_KINDS)}, got {kind!r}")
        if reduction not in FEATURE_REDUCTIONS:
            raise ValueError(f"reduction must be one of {list(FEATURE_REDUCTIONS)}, got "
                             f"{reduction!r}")
        self.kind, self.reduction, self.eps = kind, reduction, eps

    def forward(self, student_features, teacher_features):
        return feature_loss(student_features, teacher_features, kind=self.kind,
                            reduction=self.reduction, eps=self.eps)

    def extra_repr(self):
        return f"kind={self.kind!r}, reduction={self.reduction!r}, eps={self.eps}"


# Vocab-parallel distillation (kdfuse/vocab_parallel.py), at the end: it uses
# this module's argument checks.
from .vocab_parallel import vocab_parallel_collectives, vocab_parallel_distill_loss  # noqa: E402


_SELECT_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def topk_teacher(logits, k, with_lse=False):
    """The ``k`` largest logits of every row, for an offline teacher cache.

    ``logits`` is a CPU or CUDA tensor ``[..., V]`` (float32, bfloat16 or
    float16, any strides); ``1 <= k <= min(V, 4096)``. Returns ``(values, indices)``,
    or ``(values, indices, lse)`` with ``with_lse``: ``values`` float32
    ``[..., k]`` (the input elements exactly), ``indices`` int32 ``[..., k]``
    (what ``topk_distill_loss`` takes), per row by value descending with
    equal values by the lower index (deterministic, unlike ``torch.topk``),
    and ``lse`` float32 ``[...]``, the natural log-sum-exp of each whole
    row. ``-inf`` and ``+inf`` are ordinary values; a row holding a NaN
    raises ``KdfuseArgumentError`` naming the row. Runs kdfuse's CPU
    selection, or on a CUDA tensor the CUDA kernel on the current stream
    (``kdfuse_topk_select_cuda``; the outputs on the same device), which then
    waits for the stream once to read the kernel's NaN-row report
    (docs/DESIGN.md §9); not differentiable.
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if logits.dtype not in _SELECT_DTYPES:
        raise ValueError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    if logits.device.type not in ("cpu", "cuda"):
        raise ValueError(f"logits must be a CPU or CUDA tensor, got {logits.device}")
    if logits.dim() < 1:
        raise ValueError("logits must have at least one dimension ([..., V]), got a scalar")
    lead, v = logits.shape[:-1], logits.shape[-1]
    x2 = _rows(logits.detach())
    n = x2.shape[0]
    kk = max(k, 0)
    dev = logits.device
    values = torch.empty(n, kk, dtype=torch.float32, device=dev)
    indices = torch.empty(n, kk, dtype=torch.int32, device=dev)
    lse = torch.empty(n, dtype=torch.float32, device=dev) if with_lse else None
    lib = _lib.load_library()
    ptr = lambda t: t.data_ptr() if (t is not None and n) else None  # noqa: E731
    if dev.type == "cuda":
        # The kernel cannot fail on a NaN row: it writes the first such row
        # to bad_row (UINT64_MAX, all bits set, for none; int64 -1 here).
        bad_row = torch.empty(1, dtype=torch.int64, device=dev)
        stream = torch.cuda.current_stream(dev).cuda_stream
        _lib.check(lib.kdfuse_topk_select_cuda(
            _lib.context(dev.index or 0), ptr(x2), _SELECT_DTYPES[logits.dtype], n, v,
            _row_stride(x2), k, ptr(indices), ptr(values), ptr(lse), bad_row.data_ptr(),
            ctypes.c_void_p(stream)))
        bad = int(bad_row.item())
        if bad != -1:
            raise _lib.KdfuseArgumentError(
                f"invalid argument `logits`: row {bad} contains NaN "
                "(top-k selection needs ordered values)")
    else:
        _lib.check(lib.kdfuse_topk_select_host(
            ptr(x2), _SELECT_DTYPES[logits.dtype], n, v, _row_stride(x2), k,
            ptr(indices), ptr(values), ptr(lse)))
    out = (values.reshape(*lead, kk), indices.reshape(*lead, kk))
    if with_lse:
        out = out + (lse.reshape(lead),)
    return out


# Fused linear + distillation loss (kdfuse/fused_linear.py), at the end: it
# uses this module's ops and argument checks. When kdfuse.fused_linear is the
# module being imported (it imports this one first), it sets the two names
# here itself at its end.
if "kdfuse.fused_linear" not in __import__("sys").modules:
    from .fused_linear import FusedLinearDistillationLoss, fused_linear_distill_loss  # noqa
