"""Vocab-parallel (tensor-parallel) distillation over ``torch.distributed``.

Each rank of ``group`` holds a contiguous slice of the vocabulary columns of
the student (and teacher) logits, Megatron's layout: rank r has columns
``[vocab_start, vocab_start + V_local)``, the last shard may be shorter, and
columns at or past ``vocab_size`` are padding (not read; zero gradient).
No rank ever sees a whole row: each computes small per-row statistics of its
shard (``KDFUSE_VP_STATS_WIDTH`` = 20 doubles per row), the ranks
all-gather them (one collective; two for JSD and TVD), and each finishes the
loss (the same on every rank) and the gradient of its own shard.

    import torch.distributed as dist
    import kdfuse.torch as kt
    dist.init_process_group("gloo")      # "nccl" for CUDA tensors
    loss = kt.vocab_parallel_distill_loss(s_shard, t_shard, labels, vocab_start)
    loss.backward()                      # s_shard.grad: this shard's gradient

The collective is ``torch.distributed.all_gather`` on ``group`` (NCCL for
CUDA tensors, gloo for CPU tensors). docs/DESIGN.md §8 has the protocol and
the record layout; the C ABI (``kdfuse_vp_*``) serves trainers with their
own collectives.
"""

import ctypes
import math

import torch

from . import _lib

__all__ = ["vocab_parallel_distill_loss", "vocab_parallel_collectives"]


def _dist():
    import torch.distributed as dist  # noqa: PLC0415 (optional)

    return dist


def _world(group):
    """(world size, rank) of ``group``; (1, 0) without an initialised process
    group (and no group given)."""
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("group is given but torch.distributed is not initialised")
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _all_gather(x, group, world):
    """[world, *x.shape]: every rank's ``x`` in rank order."""
    if world == 1:
        return x.unsqueeze(0).clone()  # a copy: `x` is reused by round 2
    parts = [torch.empty_like(x) for _ in range(world)]
    _dist().all_gather(parts, x.contiguous(), group=group)
    return torch.stack(parts).contiguous()


def _vocab_size(vocab_start, v_local, device, group, world):
    """The vocabulary: the end of the last shard (a MAX all-reduce)."""
    end = vocab_start + v_local
    if world == 1:
        return end
    x = torch.tensor([end], dtype=torch.int64, device=device)
    dist = _dist()
    dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return int(x.item())


def vocab_parallel_collectives(divergence="forward-kl", *, beta=None, alpha=0.0):
    """All-gathers one step makes: 2 for JSD (0 < β < 1) and TVD with α < 1, else 1."""
    p = _lib.make_params(_lib.DIVERGENCES[divergence], _lib.C_BATCHMEAN,
                         beta=0.5 if beta is None else beta, alpha=alpha)
    out = ctypes.c_int32(0)
    _lib.check(_lib.load_library().kdfuse_vp_collectives(ctypes.byref(p), ctypes.byref(out)))
    return int(out.value)


def _step(s, t, idx, vals, labels, weights, params, shard, group, world, want_gs, want_gt):
    """The protocol on this rank: (loss, row_losses, grad_s, grad_t) as tensors."""
    lib = _lib.load_library()
    n, vl = s.shape
    dev = s.device
    if n == 0:
        # No rows on any rank (N is the same on every rank): nothing to gather.
        zeros = s.new_zeros((0, vl))
        return (torch.zeros((), dtype=torch.float64, device=dev),
                torch.zeros(0, dtype=torch.float64, device=dev),
                zeros if want_gs else None, zeros.clone() if want_gt else None)
    b = _lib.new_batch(n, vl, _lib.DTYPE_CODES[str(s.dtype).removeprefix("torch.")])
    b.student, b.student_stride = s.data_ptr(), s.stride(0) if n > 1 else vl
    if t is not None:
        b.teacher, b.teacher_stride = t.data_ptr(), t.stride(0) if n > 1 else vl
    if idx is not None:
        b.topk_indices, b.topk_values = idx.data_ptr(), vals.data_ptr()
        b.topk_k = idx.shape[1]
        b.topk_index_dtype = 1 if idx.dtype == torch.int64 else 0
    if labels is not None:
        b.labels = labels.data_ptr()
    if weights is not None:
        b.row_weights = weights.data_ptr()
    gs = torch.empty((n, vl), dtype=s.dtype, device=dev) if want_gs else None
    gt = torch.empty((n, vl), dtype=s.dtype, device=dev) if want_gt else None
    if gs is not None:
        b.grad, b.grad_stride = gs.data_ptr(), vl
    if gt is not None:
        b.grad_teacher, b.grad_teacher_stride = gt.data_ptr(), vl
    # The vocab-parallel finish writes its losses as doubles.
    row_losses = torch.empty(n, dtype=torch.float64, device=dev)
    loss = torch.empty(1, dtype=torch.float64, device=dev)
    valid = torch.empty(1, dtype=torch.int32, device=dev)
    b.row_losses, b.loss, b.valid_rows = row_losses.data_ptr(), loss.data_ptr(), valid.data_ptr()
    rounds = ctypes.c_int32(0)
    _lib.check(lib.kdfuse_vp_collectives(ctypes.byref(params), ctypes.byref(rounds)))
    stats = torch.empty((n, _lib.VP_STATS_WIDTH), dtype=torch.float64, device=dev)
    cuda = dev.type == "cuda"
    if cuda:
        ctx = _lib.context(dev.index or 0)
        stream = ctypes.c_void_p(torch.cuda.current_stream(dev).cuda_stream)

    def round_stats(r, prev):
        p = None if prev is None else prev.data_ptr()
        if cuda:
            return lib.kdfuse_vp_round_stats_cuda(ctx, ctypes.byref(b), ctypes.byref(params),
                                                  ctypes.byref(shard), r, p, world,
                                                  stats.data_ptr(), stream)
        return lib.kdfuse_vp_round_stats_host(ctypes.byref(b), ctypes.byref(params),
                                              ctypes.byref(shard), r, p, world, stats.data_ptr())

    _lib.check(round_stats(1, None))
    g1 = _all_gather(stats, group, world)
    g2 = None
    if rounds.value == 2:
        _lib.check(round_stats(2, g1))
        g2 = _all_gather(stats, group, world)
    p2 = None if g2 is None else g2.data_ptr()
    if cuda:
        _lib.check(lib.kdfuse_vp_finish_cuda(ctx, ctypes.byref(b), ctypes.byref(params),
                                             ctypes.byref(shard), g1.data_ptr(), p2, world,
                                             stream))
    else:
        _lib.check(lib.kdfuse_vp_finish_host(ctypes.byref(b), ctypes.byref(params),
                                             ctypes.byref(shard), g1.data_ptr(), p2, world))
    return loss.reshape(()), row_losses, gs, gt


class _VocabParallelLoss(torch.autograd.Function):
    """Forward: the protocol (the loss and this shard's gradients); backward:
    the saved gradients times the upstream gradient (per row for reduction
    none)."""

    @staticmethod
    def forward(ctx, s, t, vals, run):
        loss, row_losses, gs, gt = run()
        ctx.per_row = run.per_row
        ctx.shapes = (s.shape, None if t is None else t.shape)
        ctx.save_for_backward(gs, gt)
        return row_losses if run.per_row else loss

    @staticmethod
    def backward(ctx, g):
        gs, gt = ctx.saved_tensors
        scale = g.reshape(-1, 1) if ctx.per_row else g

        def scaled(x, shape):
            if x is None:
                return None
            return (x.to(torch.float64) * scale).to(x.dtype).reshape(shape)

        return scaled(gs, ctx.shapes[0]), scaled(gt, ctx.shapes[1]), None, None


def _rows(x):
    """[N, V] with unit column stride (a view when it can be)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(1) != 1 or (x2.shape[0] > 1 and x2.stride(0) < x2.shape[1]):
        x2 = x2.contiguous()
    return x2


def vocab_parallel_distill_loss(student_logits, teacher_logits=None, labels=None,
                                vocab_start=0, group=None, *, vocab_size=None,
                                topk_indices=None, topk_values=None, divergence="forward-kl",
                                beta=None, temperature=1.0, alpha=0.0, reduction="batchmean",
                                ignore_index=-100, num_items_in_batch=None, t2_scaling=True,
                                softcap=None, row_weights=None, topk_mode="full",
                                teacher_log_probs=False):
    """:func:`kdfuse.torch.distill_loss` over vocabulary shards (module docstring).

    Args:
      student_logits: this rank's shard [..., V_local] (float32, bfloat16 or
        float16; CPU tensors with a gloo group, CUDA tensors with NCCL).
      teacher_logits: the teacher's shard, same shape and dtype; or None with
        a top-k teacher (``topk_indices``/``topk_values`` [..., k], global
        indices, the same on every rank; each rank uses the entries in its
        shard). When it requires grad, its shard gets its gradient.
      labels: None or integers of the leading shape: global vocabulary
        indices (or ``ignore_index``), the same on every rank.
      vocab_start: the global index of this shard's first column.
      group: the ``torch.distributed`` process group (default: the world);
        without an initialised process group the call is a world of one.
      vocab_size: the real vocabulary V; columns at or past it are padding.
        Default: the end of the last shard (one small MAX all-reduce), i.e.
        no padding.
      The other options are :func:`kdfuse.torch.distill_loss`'s and
      :func:`kdfuse.torch.topk_distill_loss`'s.

    Returns the loss (0-dim; [...] for reduction none), the same on every
    rank. CPU tensors: f64 arithmetic on the host. CUDA tensors: the kernels
    of kernels/vocab_parallel on the current stream (f32 exponentials, f64
    row statistics); a label or top-k index outside [0, V) then gives a NaN
    loss instead of an error. Bad arguments raise ``ValueError`` /
    ``TypeError`` naming the argument.
    """
    from .torch import _check_logits, _check_rows_arg, _options, _reduce  # noqa: PLC0415

    _check_logits(student_logits, "student_logits")
    s = student_logits
    if s.dtype == torch.float64:
        raise ValueError("student_logits: vocab-parallel takes float32, bfloat16 or float16 "
                         "(it computes in f64 inside)")
    topk = topk_indices is not None or topk_values is not None
    if topk and teacher_logits is not None:
        raise ValueError("give teacher_logits or topk_indices/topk_values, not both")
    if not topk and teacher_logits is None:
        raise ValueError("teacher_logits is needed (or topk_indices and topk_values)")
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"vocab_start must be an int ≥ 0, got {vocab_start!r}")
    if vocab_size is not None and (isinstance(vocab_size, bool)
                                   or not isinstance(vocab_size, int) or vocab_size < 1):
        raise ValueError(f"vocab_size must be None or an int ≥ 1, got {vocab_size!r}")
    if topk_mode not in _lib.TOPK_MODES:
        raise ValueError(f"topk_mode must be one of {list(_lib.TOPK_MODES)}, got {topk_mode!r}")
    beta, temperature, alpha, cap = _options(divergence, beta, temperature, alpha, reduction,
                                             ignore_index, softcap, num_items_in_batch, labels)
    lead = s.shape[:-1]
    dev = s.device
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"student_logits: device must be cpu or cuda, got {dev}")
    t = vals = idx = None
    if topk:
        if topk_indices is None or topk_values is None:
            raise ValueError("a top-k teacher needs both topk_indices and topk_values")
        _check_logits(topk_values, "topk_values")
        if (not isinstance(topk_indices, torch.Tensor)
                or topk_indices.dtype not in (torch.int32, torch.int64)):
            raise ValueError("topk_indices must be an int32 or int64 tensor")
        if topk_indices.shape != topk_values.shape or topk_indices.shape[:-1] != lead:
            raise ValueError(f"topk_indices {tuple(topk_indices.shape)} and topk_values "
                             f"{tuple(topk_values.shape)} must share the shape [..., k] with "
                             f"student_logits' leading shape {tuple(lead)}")
        for name, x in (("topk_indices", topk_indices), ("topk_values", topk_values)):
            if x.device != dev:
                raise ValueError(f"{name} is on {x.device}, student_logits on {dev}")
        if topk_values.dtype != s.dtype:
            raise ValueError(f"topk_values is {topk_values.dtype}, student_logits {s.dtype}")
        vals = topk_values
    else:
        _check_logits(teacher_logits, "teacher_logits")
        t = teacher_logits
        if t.shape != s.shape or t.dtype != s.dtype or t.device != dev:
            raise ValueError(f"teacher_logits ({tuple(t.shape)}, {t.dtype}, {t.device}) must "
                             f"match student_logits ({tuple(s.shape)}, {s.dtype}, {dev})")
    labels = _check_rows_arg(labels, "labels", lead, dev, True)
    row_weights = _check_rows_arg(row_weights, "row_weights", lead, dev, False)
    world, _ = _world(group)
    v_local = s.shape[-1]
    if vocab_size is None:
        vocab_size = _vocab_size(vocab_start, v_local, dev, group, world)
    code, post = _reduce(None, reduction, labels, num_items_in_batch,
                         s.shape[0] if s.dim() > 1 else 1)
    params = _lib.make_params(_lib.DIVERGENCES[divergence], code, beta=beta,
                              temperature=temperature, alpha=alpha, ignore_index=ignore_index,
                              t2_scaling=t2_scaling, softcap=cap,
                              teacher_log_probs=teacher_log_probs, topk_mode=topk_mode)
    grad_on = torch.is_grad_enabled()
    want_gs = grad_on and s.requires_grad
    want_gt = grad_on and t is not None and t.requires_grad
    params.grad_teacher = 1 if want_gt else 0
    shard = _lib.Shard()
    _lib.check(_lib.load_library().kdfuse_shard_init(ctypes.byref(shard), vocab_start,
                                                     vocab_size))
    n = math.prod(lead)
    s2 = _rows(s.detach())
    t2 = None if t is None else _rows(t.detach())
    if topk:
        idx = topk_indices.reshape(n, -1).contiguous()
        vals = vals.detach().reshape(n, -1).contiguous()
    lab = None if labels is None else labels.reshape(-1).to(torch.int64).contiguous()
    w = None if row_weights is None else row_weights.reshape(-1).to(torch.float32).contiguous()

    def run():
        loss, rows, gs, gt = _step(s2, t2, idx, vals, lab, w, params, shard, group, world,
                                   want_gs, want_gt)
        return loss, rows.reshape(lead), gs, gt

    run.per_row = code == _lib.C_NONE
    loss = _VocabParallelLoss.apply(s, t, vals, run)
    loss = loss.to(s.dtype)
    return post(loss) if post is not None else loss
