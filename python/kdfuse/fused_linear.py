"""Fused linear + distillation loss: the LM head's GEMM and kdfuse's loss,
chunk by chunk, so that the full N×V logits never exist.

    import kdfuse.torch as kt
    loss = kt.fused_linear_distill_loss(hidden, lm_head.weight, labels,
                                        teacher_hidden=t_hidden,
                                        teacher_weight=t_lm_head.weight,
                                        divergence="jsd", temperature=2.0)
    loss.backward()   # hidden.grad, lm_head.weight.grad

For each chunk of rows the student logits (``F.linear``: torch's GEMM in
the operands' dtype, fp32 accumulation inside it, as a bf16 ``nn.Linear``)
and the teacher's are made, kdfuse's fused loss + gradient runs on them
(reduction sum, the global reduction weight folded into the row weights),
and the gradient G [chunk, V] goes straight through the GEMMs: grad_hidden
= G @ W, grad_W += Gᵀ @ h, grad_b += Σ G (the weight and bias sums in
float32, float64 for float64). The extra memory is O(chunk × V).

The whole computation is one custom op, ``torch.ops.kdfuse.fused_linear_loss``
(a fake kernel and an autograd formula), so ``torch.compile(fullgraph=True)``
traces it as one opaque node.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import _lib
from . import torch as _kt

__all__ = ["fused_linear_distill_loss", "FusedLinearDistillationLoss", "DEFAULT_MEMORY_BUDGET"]

DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes of the per-chunk buffers
_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Bits of grad_mask: which inputs get a gradient.
_GRAD_NAMES = ("student_hidden", "student_weight", "student_bias", "teacher_hidden",
               "teacher_weight", "teacher_bias", "teacher_logits")
_N_INPUTS = 25


def _empty(x):
    return x.new_empty((0,))


_CUDA_OUT_DTYPE = [True]  # torch.mm(..., out_dtype=float32) works for 16-bit CUDA tensors


def _mm_acc(a, b, acc):
    """``a @ b`` as ``acc`` (float32/float64) without rounding to a 16-bit
    dtype in between: the weight gradient sums chunk products, and rounding
    each one to bf16/f16 would add one rounding error per chunk. CUDA: the
    GEMM's fp32 output (cuBLAS, ``out_dtype``); otherwise the operands are
    widened first (exact for 16-bit values; O(chunk × V) extra)."""
    if a.dtype == acc:
        return a @ b
    if a.device.type == "cuda" and _CUDA_OUT_DTYPE[0]:
        try:
            return torch.mm(a, b, out_dtype=acc)
        except (TypeError, RuntimeError, NotImplementedError):
            _CUDA_OUT_DTYPE[0] = False
    return a.to(acc) @ b.to(acc)


@torch.library.custom_op("kdfuse::fused_linear_loss", mutates_args=())
def _fused_linear_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    teacher_hidden: Optional[torch.Tensor],
    teacher_weight: Optional[torch.Tensor],
    teacher_bias: Optional[torch.Tensor],
    teacher_logits: Optional[torch.Tensor],
    topk_indices: Optional[torch.Tensor],
    topk_values: Optional[torch.Tensor],
    labels: Optional[torch.Tensor],
    row_weights: Optional[torch.Tensor],
    divergence: int,
    beta: float,
    temperature: float,
    alpha: float,
    reduction: int,
    batch: int,
    ignore_index: int,
    t2_scaling: bool,
    softcap: float,
    teacher_log_probs: bool,
    topk_mode: int,
    precision: int,
    chunk_size: int,
    grad_mask: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ∂/∂hidden, ∂/∂weight, ∂/∂bias, ∂/∂teacher_hidden,
    ∂/∂teacher_weight, ∂/∂teacher_bias, ∂/∂teacher_logits), each gradient
    [0] unless its bit (in that order, bit 0 = hidden) is set in ``grad_mask``.

    Rows are flattened: ``hidden`` [N, H], ``weight`` [V, H], ``bias`` [V];
    a teacher as ``teacher_hidden`` [N, H_t] + ``teacher_weight`` [V_t ≥ V,
    H_t] (+ ``teacher_bias`` [V_t]), or ``teacher_logits`` [N, V_t ≥ V], or
    ``topk_indices`` + ``topk_values`` [N, k]; the first V teacher columns
    are used. ``labels``, ``row_weights``: [N]. ``reduction``: a C ABI code
    (0 batchmean: Σ / valid rows, or Σ / ``batch`` without labels; 1 sum; 2
    mean: Σ / (valid · V); 3 none: the per-row losses [N], no gradients).
    The loss is float32 (float64 for float64 inputs); gradients have their
    input's dtype and shape. ``chunk_size``: rows per chunk."""
    n, v = hidden.shape[0], weight.shape[0]
    dev, dtype = hidden.device, hidden.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    want = [bool((grad_mask >> i) & 1) for i in range(7)]
    if reduction == _lib.C_NONE and any(want):
        raise ValueError("kdfuse::fused_linear_loss: reduction none gives no gradients "
                         "(the backward re-runs the op with the upstream in the row weights)")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dense = topk_indices is None
    tw = teacher_weight[:v] if teacher_weight is not None else None
    tb = teacher_bias[:v] if teacher_bias is not None else None
    tl = teacher_logits[:, :v] if teacher_logits is not None else None
    grad_student, grad_teacher = any(want[:3]), any(want[3:])
    if grad_teacher and not dense:
        raise ValueError("a top-k teacher has no gradient (mutual needs a dense teacher)")

    # The global reduction weight, a device tensor (no host synchronisation).
    scale = None
    if reduction in (_lib.C_BATCHMEAN, _lib.C_MEAN):
        per = v if reduction == _lib.C_MEAN else 1
        if labels is not None:
            count = (labels != ignore_index).sum().to(acc) * per
            scale = torch.where(count > 0, 1.0 / count.clamp_min(1),
                                torch.zeros((), dtype=acc, device=dev))
        else:
            count = (batch if reduction == _lib.C_BATCHMEAN else n) * per
            # torch.full, not torch.tensor: a fill, no host-to-device copy.
            scale = torch.full((), 1.0 / count if count > 0 else 0.0, dtype=acc, device=dev)
    code = _lib.C_NONE if reduction == _lib.C_NONE else _lib.C_SUM
    precision_name = _kt._PRECISION_NAMES.get(precision, precision)
    if dense:
        params = _lib.make_params(divergence, code, beta=beta, temperature=temperature,
                                  alpha=alpha, ignore_index=ignore_index,
                                  t2_scaling=t2_scaling, softcap=softcap,
                                  grad_teacher=grad_teacher, precision=precision_name)
    else:
        params = _lib.make_params(divergence, code, beta=beta, temperature=temperature,
                                  alpha=alpha, ignore_index=ignore_index,
                                  t2_scaling=t2_scaling, softcap=softcap,
                                  teacher_log_probs=teacher_log_probs, topk_mode=topk_mode)

    single = n <= chunk_size  # one chunk: the weight sums are written directly
    g_h = torch.empty_like(hidden, memory_format=torch.contiguous_format) if want[0] \
        else _empty(hidden)
    g_w = torch.zeros(weight.shape, dtype=acc, device=dev) if want[1] else None
    g_b = torch.zeros(v, dtype=acc, device=dev) if want[2] else None
    g_th = (torch.empty_like(teacher_hidden, memory_format=torch.contiguous_format)
            if want[3] else None)
    g_tw = torch.zeros(v, teacher_weight.shape[1], dtype=acc, device=dev) if want[4] else None
    g_tb = torch.zeros(v, dtype=acc, device=dev) if want[5] else None
    g_tl = torch.zeros_like(teacher_logits, memory_format=torch.contiguous_format) \
        if want[6] else None
    rows = torch.zeros(n, dtype=acc, device=dev) if reduction == _lib.C_NONE else None
    total = torch.zeros((), dtype=acc, device=dev)

    for r0 in range(0, n, chunk_size):
        r1 = min(n, r0 + chunk_size)
        h = hidden[r0:r1]
        s = F.linear(h, weight, bias)
        lab = labels[r0:r1] if labels is not None else None
        rw = row_weights[r0:r1].to(acc) if row_weights is not None else None
        if scale is not None:
            rw = scale.expand(r1 - r0) if rw is None else rw * scale
        if dense:
            th = teacher_hidden[r0:r1] if teacher_hidden is not None else None
            t = F.linear(th, tw, tb) if th is not None else tl[r0:r1]
            loss, g, gt = _kt._call(s, t, None, lab, rw, params, grad_student, grad_teacher,
                                    code)
        else:
            loss, g, _ = _kt._call(s, topk_values[r0:r1], topk_indices[r0:r1], lab, rw, params,
                                   grad_student, False, code)
        del s
        if rows is not None:
            rows[r0:r1] = loss
        else:
            total = total + loss
        if want[0]:
            torch.mm(g, weight, out=g_h[r0:r1])
        if want[1]:
            if single:
                g_w = g.t() @ h
            else:
                g_w += _mm_acc(g.t(), h, acc)
        if want[2]:
            g_b += g.sum(0, dtype=acc)
        if want[3]:
            torch.mm(gt, tw, out=g_th[r0:r1])
        if want[4]:
            if single:
                g_tw = gt.t() @ th
            else:
                g_tw += _mm_acc(gt.t(), th, acc)
        if want[5]:
            g_tb += gt.sum(0, dtype=acc)
        if want[6]:
            g_tl[r0:r1, :v] = gt

    def out(x, like):
        return x.to(like.dtype) if x is not None else _empty(hidden)

    g_w = out(g_w, weight)
    g_b = out(g_b, bias) if want[2] else _empty(hidden)
    if want[4]:
        full = torch.zeros(teacher_weight.shape, dtype=teacher_weight.dtype, device=dev)
        full[:v] = g_tw
        g_tw = full
    else:
        g_tw = _empty(hidden)
    if want[5]:
        full = torch.zeros(teacher_bias.shape, dtype=teacher_bias.dtype, device=dev)
        full[:v] = g_tb
        g_tb = full
    else:
        g_tb = _empty(hidden)
    loss = rows if rows is not None else total
    return (loss, g_h, g_w, g_b, g_th if want[3] else _empty(hidden), g_tw, g_tb,
            g_tl if want[6] else _empty(hidden))


@_fused_linear_loss.register_fake
def _fused_linear_loss_fake(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias,
                            teacher_logits, topk_indices, topk_values, labels, row_weights,
                            divergence, beta, temperature, alpha, reduction, batch,
                            ignore_index, t2_scaling, softcap, teacher_log_probs, topk_mode,
                            precision, chunk_size, grad_mask):
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    loss = hidden.new_empty(hidden.shape[:1] if reduction == _lib.C_NONE else (), dtype=acc)
    srcs = (hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits)
    grads = tuple(x.new_empty(x.shape) if (grad_mask >> i) & 1 else hidden.new_empty((0,))
                  for i, x in enumerate(srcs))
    return (loss,) + grads


def _setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    ctx.per_row = inputs[15] == _lib.C_NONE
    ctx.mask = inputs[24]
    if ctx.per_row:
        # The backward re-runs the op: keep the inputs (tensors and options).
        ctx.save_for_backward(*inputs[:11])
        ctx.options = inputs[11:]
    else:
        ctx.save_for_backward(*output[1:], *inputs[:7])


def _backward(ctx, g_loss, *_unused):
    out = [None] * _N_INPUTS
    needs = [ctx.needs_input_grad[i] for i in range(7)]
    if ctx.per_row:
        saved = list(ctx.saved_tensors)
        mask = sum(1 << i for i in range(7) if needs[i])
        if mask == 0:
            return tuple(out)
        row_weights = saved[10]
        # The upstream per-row gradient folded into the row weights; the
        # weight gradient is a sum over rows, so it cannot be rescaled later.
        up = g_loss if row_weights is None else g_loss * row_weights.to(g_loss.dtype)
        opts = list(ctx.options)
        opts[4] = _lib.C_SUM      # reduction
        opts[13] = mask           # grad_mask
        # Through the autograd.Function (it has setup_context: torch.func).
        res = _FusedLinearLoss.apply(*saved[:10], up, *opts)
        tie = torch.is_grad_enabled()  # create_graph: differentiating these must raise
        for i in range(7):
            if needs[i]:
                out[i] = (_kt._scale(res[1 + i], torch.ones((), dtype=g_loss.dtype,
                                                           device=g_loss.device),
                                     saved[i], False) if tie else res[1 + i])
        return tuple(out)
    saved = ctx.saved_tensors
    grads, srcs = saved[:7], saved[7:]
    for i in range(7):
        if needs[i]:
            if not (ctx.mask >> i) & 1:
                raise RuntimeError(f"kdfuse::fused_linear_loss: called without the gradient "
                                   f"of {_GRAD_NAMES[i]} (grad_mask), so it has none to give")
            out[i] = _kt._scale(grads[i], g_loss, srcs[i], False)
    return tuple(out)


_fused_linear_loss.register_autograd(_backward, setup_context=_setup)

_FusedLinearLoss = _kt._op_function("_FusedLinearLoss", torch.ops.kdfuse.fused_linear_loss,
                                    _setup, _backward,
                                    "The fused linear op under an autograd.Function.")


# ---------------------------------------------------------------------------
# Argument checks.


def _tensor(x, name, optional=True):
    if x is None and optional:
        return None
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{' or None' if optional else ''}, "
                        f"got {type(x).__name__}")
    return x


def _float_like(x, name, dtype, device, what="student_hidden"):
    if x.dtype != dtype:
        raise ValueError(f"{name} has dtype {x.dtype}, {what} {dtype}: one dtype is needed")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, {what} on {device}")


def _chunk_rows(chunk_size, memory_budget, bytes_per_row):
    if chunk_size is not None and memory_budget is not None:
        raise ValueError("give chunk_size or memory_budget, not both")
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise TypeError(f"chunk_size must be an int (rows), got {type(chunk_size).__name__}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return chunk_size
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise TypeError(f"memory_budget must be an int (bytes), got {type(budget).__name__}")
    if budget < bytes_per_row:
        raise ValueError(f"memory_budget {budget} bytes is less than one row's buffers "
                         f"({bytes_per_row} bytes)")
    return budget // bytes_per_row


def fused_linear_distill_loss(student_hidden, student_weight, labels=None, *, student_bias=None,
                              teacher_hidden=None, teacher_weight=None, teacher_bias=None,
                              teacher_logits=None, topk_indices=None, topk_values=None,
                              divergence="forward-kl", beta=None, temperature=1.0, alpha=0.0,
                              reduction="batchmean", ignore_index=-100, t2_scaling=True,
                              softcap=None, row_weights=None, topk_mode="full",
                              teacher_log_probs=False, precision="fast", chunk_size=None,
                              memory_budget=None, mutual=False):
    """:func:`kdfuse.torch.distill_loss` of ``student_hidden @ student_weightᵀ
    (+ student_bias)`` against a teacher, without materialising the N×V logits.

    Args:
      student_hidden: [..., H] float tensor (the rows: every leading index).
      student_weight: [V, H] (an ``nn.Linear``'s ``weight``), the hidden's
        dtype and device. student_bias: None or [V].
      labels: None or integers of the hidden's leading shape (as distill_loss).
      The teacher, exactly one of:
        ``teacher_hidden`` [..., H_t] + ``teacher_weight`` [V_t ≥ V, H_t]
        (+ ``teacher_bias`` [V_t]): its logits are made per chunk too;
        ``teacher_logits`` [..., V_t ≥ V], precomputed;
        ``topk_indices`` + ``topk_values`` [..., k] (an offline top-k teacher,
        as :func:`kdfuse.torch.topk_distill_loss`; the values are cast to the
        student's dtype; ``topk_mode``, ``teacher_log_probs`` apply).
        A wider teacher (V_t > V) is cut to its first V columns. The teacher
        tensors must have the student's dtype and device.
      divergence, beta, temperature, alpha, ignore_index, t2_scaling, softcap,
      row_weights, precision: as :func:`kdfuse.torch.distill_loss`.
      reduction: batchmean (Σ / valid tokens with labels; Σ / the first
        dimension of ``student_hidden`` without, as distill_loss and
        ``kl_div``), token_mean (Σ / valid tokens always), mean (Σ / (valid
        tokens · V)), sum, or none (the per-token losses [...]). The weight
        is a device tensor (no host synchronisation); with no valid token the
        loss and every gradient are 0.
      chunk_size: rows per chunk (int ≥ 1); or memory_budget: bytes for the
        per-chunk buffers (student logits, gradient, teacher logits made
        from teacher_hidden, teacher gradient with ``mutual``: V elements of
        the dtype each, per row, plus V float32 with 16-bit dtypes for the
        widened gradient of the weight sum); default 1 GiB. Not both.
      mutual: the teacher gets its gradient too (teacher_hidden,
        teacher_weight, teacher_bias, or teacher_logits; whichever require
        grad). Not with a top-k teacher. Otherwise the teacher is detached.

    The loss and all gradients are computed in the forward (one pass over
    the chunks); the backward scales them by the upstream gradient. With
    reduction ``none`` the weight gradient cannot be rescaled per row
    afterwards, so the forward computes only the per-row losses and the
    backward runs the chunk loop again with the upstream per-row gradient
    folded into the row weights (two passes of GEMMs).

    Returns the loss in the student's dtype (0-dim, or [...] for none).
    Bad arguments raise ``ValueError`` / ``TypeError`` naming the argument.
    """
    h = _tensor(student_hidden, "student_hidden", optional=False)
    w = _tensor(student_weight, "student_weight", optional=False)
    if h.dim() < 1:
        raise ValueError("student_hidden must be [..., H], got a scalar")
    if h.dtype not in _FLOATS:
        raise ValueError(f"student_hidden must be float32, bfloat16, float16 or float64, got "
                         f"{h.dtype}")
    dtype, dev = h.dtype, h.device
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"student_hidden must be on the CPU or CUDA, got {dev}")
    if dtype == torch.float64 and dev.type != "cpu":
        raise ValueError("student_hidden: float64 runs on the CPU only (the f64 oracle)")
    lead, hdim = h.shape[:-1], h.shape[-1]
    n = math.prod(lead)
    if w.dim() != 2 or w.shape[1] != hdim or w.shape[0] == 0:
        raise ValueError(f"student_weight must be [V, H] with V ≥ 1 and student_hidden's H = "
                         f"{hdim}, got {tuple(w.shape)}")
    _float_like(w, "student_weight", dtype, dev)
    v = w.shape[0]
    b = _tensor(student_bias, "student_bias")
    if b is not None:
        if tuple(b.shape) != (v,):
            raise ValueError(f"student_bias must be [V] = [{v}], got {tuple(b.shape)}")
        _float_like(b, "student_bias", dtype, dev)

    th = _tensor(teacher_hidden, "teacher_hidden")
    tw = _tensor(teacher_weight, "teacher_weight")
    tb = _tensor(teacher_bias, "teacher_bias")
    tl = _tensor(teacher_logits, "teacher_logits")
    idx = _tensor(topk_indices, "topk_indices")
    vals = _tensor(topk_values, "topk_values")
    forms = [name for name, given in (("teacher_hidden", th is not None or tw is not None
                                       or tb is not None),
                                      ("teacher_logits", tl is not None),
                                      ("topk_indices", idx is not None or vals is not None))
             if given]
    if len(forms) != 1:
        raise ValueError("exactly one teacher is needed: teacher_hidden + teacher_weight "
                         "(+ teacher_bias), teacher_logits, or topk_indices + topk_values; got "
                         + (" and ".join(forms) if forms else "none"))
    if not isinstance(mutual, bool):
        raise TypeError(f"mutual must be a bool, got {type(mutual).__name__}")
    if mutual and idx is not None:
        raise ValueError("mutual: a top-k teacher is fixed data and gets no gradient")
    teacher_rows = 0  # teacher logits made per chunk (bytes-per-row count)
    if forms[0] == "teacher_hidden":
        if th is None or tw is None:
            missing = "teacher_hidden" if th is None else "teacher_weight"
            raise ValueError(f"{missing} is needed with the hidden-state teacher "
                             "(teacher_hidden + teacher_weight)")
        if th.dim() < 1 or th.shape[:-1] != lead:
            raise ValueError(f"teacher_hidden must be [..., H_t] with student_hidden's "
                             f"leading shape {tuple(lead)}, got {tuple(th.shape)}")
        _float_like(th, "teacher_hidden", dtype, dev)
        if tw.dim() != 2 or tw.shape[1] != th.shape[-1] or tw.shape[0] < v:
            raise ValueError(f"teacher_weight must be [V_t, H_t] with V_t ≥ V = {v} and "
                             f"teacher_hidden's H_t = {th.shape[-1]}, got {tuple(tw.shape)}")
        _float_like(tw, "teacher_weight", dtype, dev)
        if tb is not None:
            if tuple(tb.shape) != (tw.shape[0],):
                raise ValueError(f"teacher_bias must be [V_t] = [{tw.shape[0]}], got "
                                 f"{tuple(tb.shape)}")
            _float_like(tb, "teacher_bias", dtype, dev)
        teacher_rows = 1
    elif forms[0] == "teacher_logits":
        if tl.dim() < 1 or tl.shape[:-1] != lead or tl.shape[-1] < v:
            raise ValueError(f"teacher_logits must be [..., V_t] with V_t ≥ V = {v} and "
                             f"student_hidden's leading shape {tuple(lead)}, got "
                             f"{tuple(tl.shape)}")
        _float_like(tl, "teacher_logits", dtype, dev)
    else:
        if idx is None or vals is None:
            raise ValueError(f"{'topk_values' if vals is None else 'topk_indices'} is needed "
                             "with a top-k teacher (topk_indices + topk_values)")
        if idx.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"topk_indices must be int32 or int64, got {idx.dtype}")
        if not vals.dtype.is_floating_point:
            raise ValueError(f"topk_values must be floating point, got {vals.dtype}")
        if idx.dim() < 1 or idx.shape != vals.shape or idx.shape[:-1] != lead:
            raise ValueError(f"topk_indices {tuple(idx.shape)} and topk_values "
                             f"{tuple(vals.shape)} must share the shape [..., k] with "
                             f"student_hidden's leading shape {tuple(lead)}")
        for name, x in (("topk_indices", idx), ("topk_values", vals)):
            if x.device != dev:
                raise ValueError(f"{name} is on {x.device}, student_hidden on {dev}")
        if topk_mode not in _lib.TOPK_MODES:
            raise ValueError(f"topk_mode must be one of {list(_lib.TOPK_MODES)}, got "
                             f"{topk_mode!r}")
        vals = vals.detach().to(dtype)
    beta, temperature, alpha, cap = _kt._options(divergence, beta, temperature, alpha,
                                                 reduction, ignore_index, softcap, None, labels)
    labels = _kt._check_rows_arg(labels, "labels", lead, dev, True)
    row_weights = _kt._check_rows_arg(row_weights, "row_weights", lead, dev, False)
    if precision not in _lib.PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(_lib.PRECISIONS)}, got {precision!r}")
    elt = torch.empty((), dtype=dtype).element_size()
    per_row = v * elt * (2 + teacher_rows + (1 if mutual else 0))
    if elt == 2:
        per_row += v * 4  # the float32 copy of the gradient for the weight sum (see _mm_acc)
    chunk = _chunk_rows(chunk_size, memory_budget, per_row)

    code = {"batchmean": _lib.C_BATCHMEAN, "token_mean": _lib.C_BATCHMEAN, "sum": _lib.C_SUM,
            "mean": _lib.C_MEAN, "none": _lib.C_NONE}[reduction]
    # batchmean without labels divides by the first dimension (distill_loss,
    # kl_div); token_mean by the rows.
    batch = (h.shape[0] if h.dim() > 1 else 1) if reduction == "batchmean" else n
    if not mutual:
        th, tw, tb, tl = (x.detach() if x is not None else None for x in (th, tw, tb, tl))
    rows = lambda x: x.reshape(n, x.shape[-1]) if x is not None else None  # noqa: E731
    flat = lambda x: x.reshape(n) if x is not None else None  # noqa: E731
    srcs = (h, w, b, th, tw, tb, tl)
    grad_on = torch.is_grad_enabled()
    mask = 0
    if reduction != "none":
        mask = sum(1 << i for i, x in enumerate(srcs)
                   if grad_on and x is not None and x.requires_grad)
    out = _FusedLinearLoss.apply(
        rows(h), w, b, rows(th), tw, tb, rows(tl), rows(idx), rows(vals), flat(labels),
        flat(row_weights), _lib.DIVERGENCES[divergence], beta, temperature, alpha, code, batch,
        ignore_index, bool(t2_scaling), cap, bool(teacher_log_probs),
        _lib.TOPK_MODES.get(topk_mode, 1), _lib.PRECISIONS[precision], chunk, mask)
    loss = out[0]
    if reduction == "none":
        loss = loss.reshape(lead)
    return loss.to(dtype)


class FusedLinearDistillationLoss(torch.nn.Module):
    """:func:`fused_linear_distill_loss` as a module: the options are set once.

        crit = FusedLinearDistillationLoss(divergence="jsd", temperature=2.0,
                                           chunk_size=1024)
        loss = crit(hidden, lm_head.weight, labels,
                    teacher_hidden=t_hidden, teacher_weight=t_head.weight)
    """

    def __init__(self, *, divergence="forward-kl", beta=None, temperature=1.0, alpha=0.0,
                 reduction="batchmean", ignore_index=-100, t2_scaling=True, softcap=None,
                 topk_mode="full", teacher_log_probs=False, precision="fast", chunk_size=None,
                 memory_budget=None, mutual=False):
        super().__init__()
        _kt._options(divergence, beta, temperature, alpha, reduction, ignore_index, softcap,
                     None, 0 if alpha > 0 else None)
        if precision not in _lib.PRECISIONS:
            raise ValueError(
                f"precision must be one of {sorted(_lib.PRECISIONS)}, got {precision!r}")
        if topk_mode not in _lib.TOPK_MODES:
            raise ValueError(f"topk_mode must be one of {list(_lib.TOPK_MODES)}, got "
                             f"{topk_mode!r}")
        _chunk_rows(chunk_size, memory_budget, 1)
        self.divergence, self.beta, self.temperature = divergence, beta, temperature
        self.alpha, self.reduction, self.ignore_index = alpha, reduction, ignore_index
        self.t2_scaling, self.softcap, self.topk_mode = t2_scaling, softcap, topk_mode
        self.teacher_log_probs, self.precision = teacher_log_probs, precision
        self.chunk_size, self.memory_budget, self.mutual = chunk_size, memory_budget, mutual

    def forward(self, student_hidden, student_weight, labels=None, *, student_bias=None,
                teacher_hidden=None, teacher_weight=None, teacher_bias=None,
                teacher_logits=None, topk_indices=None, topk_values=None, row_weights=None):
        """The loss of ``student_hidden @ student_weightᵀ (+ student_bias)``
        against the given teacher (see :func:`fused_linear_distill_loss`)."""
        return fused_linear_distill_loss(
            student_hidden, student_weight, labels, student_bias=student_bias,
            teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
            teacher_bias=teacher_bias, teacher_logits=teacher_logits,
            topk_indices=topk_indices, topk_values=topk_values, divergence=self.divergence,
            beta=self.beta, temperature=self.temperature, alpha=self.alpha,
            reduction=self.reduction, ignore_index=self.ignore_index,
            t2_scaling=self.t2_scaling, softcap=self.softcap, row_weights=row_weights,
            topk_mode=self.topk_mode, teacher_log_probs=self.teacher_log_probs,
            precision=self.precision, chunk_size=self.chunk_size,
            memory_budget=self.memory_budget, mutual=self.mutual)

    def extra_repr(self):
        return (f"divergence={self.divergence!r}, beta={self.beta}, "
                f"temperature={self.temperature}, alpha={self.alpha}, "
                f"reduction={self.reduction!r}, chunk_size={self.chunk_size}, "
                f"memory_budget={self.memory_budget}, mutual={self.mutual}")


# kdfuse.torch exports these (set here too for when this module was imported
# first: kdfuse.torch then skips its own import of them).
_kt.fused_linear_distill_loss = fused_linear_distill_loss
_kt.FusedLinearDistillationLoss = FusedLinearDistillationLoss
