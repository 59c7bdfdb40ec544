"""One rank of the vocab-parallel tests (test_vocab_parallel.py spawns
``world`` of them): joins a gloo process group, runs every case on its shard
of the same random batch, and compares the loss and its shard's gradients
with the unsharded f64 loss (kdfuse.torch.distill_loss / topk_distill_loss
on float64, the library's oracle) computed on every rank.

    python vp_worker.py RANK WORLD RENDEZVOUS_FILE [fail|hang]

``fail`` makes rank 1 pass a bad argument after the first case, ``hang``
makes it stop answering (a sleep), so that the test can check that a failing
or hung rank ends the run instead of hanging it. The process group's
timeout is ``VP_TIMEOUT`` seconds (default 30). ``VP_DEVICE=cuda`` runs the
shards on CUDA (rank r on GPU r) over NCCL instead of gloo on the CPU; the
references stay on the CPU.
Prints one line per rank: "rank R/W: C cases ok".
"""

import datetime
import os
import sys
import time

import torch
import torch.distributed as dist

import kdfuse.torch as kt

DIVERGENCES = ("forward-kl", "reverse-kl", "jsd", "tvd", "soft-ce")
# docs/DESIGN.md §3: relative L2 of the loss and of the gradient by dtype.
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-5, 4e-3), torch.float16: (1e-5, 1e-3)}


def cuts(v, world, gen, padded_to=None):
    """Shard boundaries: Megatron's even split of a padded vocabulary, or
    uneven random contiguous cuts."""
    if padded_to is not None:
        per = padded_to // world
        return [r * per for r in range(world + 1)]
    points = sorted(torch.randperm(v - 1, generator=gen)[: world - 1].add(1).tolist())
    return [0] + points + [v]


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / max(b.norm().item(), 1e-30)).item()


DEVICE = torch.device("cpu")


def run_case(rank, world, case, gen):
    dtype = case.get("dtype", torch.float32)
    lead = case.get("lead", (2, 3))
    v = case.get("v", 53)
    padded = case.get("padded")
    s = torch.randn(*lead, v, generator=gen) * 2
    t = 0.7 * s + torch.randn(*lead, v, generator=gen) * 1.5 + 0.3
    if case.get("neg_inf"):
        mask = torch.rand(*lead, v, generator=gen) < 0.2
        mask[..., 0] = False
        s[mask] = float("-inf")
        t[mask] = float("-inf")
    s, t = s.to(dtype), t.to(dtype)
    labels = torch.randint(0, v, lead, generator=gen)
    if labels.numel() > 1:
        labels.view(-1)[1] = -100
    weights = torch.rand(lead, generator=gen) * 2 if case.get("weights") else None
    width = padded or v
    b = cuts(v, world, gen, padded)
    lo, hi = b[rank], b[rank + 1]
    # The padded columns hold NaN: reading one would poison the loss.
    pad = torch.full((*lead, width - v), float("nan"), dtype=dtype)
    s_shard = torch.cat([s, pad], -1)[..., lo:hi].to(DEVICE).requires_grad_()
    t_shard = torch.cat([t, pad], -1)[..., lo:hi].to(DEVICE)
    on = labels.to(DEVICE)
    opts = dict(divergence=case["divergence"], temperature=case.get("tau", 2.0),
                alpha=case.get("alpha", 0.0), reduction=case.get("reduction", "batchmean"),
                softcap=case.get("softcap"))
    if case["divergence"] == "jsd":
        opts["beta"] = case.get("beta", 0.3)
    ref_opts = dict(opts, row_weights=weights)
    opts["row_weights"] = None if weights is None else weights.to(DEVICE)
    with_labels = opts["alpha"] > 0 or case.get("labels")
    use_labels = labels if with_labels else None
    dev_labels = on if with_labels else None
    sd = s.double().requires_grad_()
    if case.get("topk"):
        k, mode = case["topk"]
        tail = mode == "tail"
        if tail:
            opts["temperature"] = ref_opts["temperature"] = 1.0
        vals, idx = t.double().topk(k, -1)
        if tail:
            vals = torch.log_softmax(t.double(), -1).gather(-1, idx)
        perm = torch.randperm(k, generator=gen)
        # Values as the shards hold them (rounded to the dtype).
        idx, vals = idx[..., perm], vals[..., perm].to(dtype).double()
        ref = kt.topk_distill_loss(sd, idx, vals, use_labels, topk_mode=mode,
                                   teacher_log_probs=tail, **ref_opts)
        got = kt.vocab_parallel_distill_loss(
            s_shard, None, dev_labels, lo, topk_indices=idx.to(DEVICE),
            topk_values=vals.to(dtype).to(DEVICE), topk_mode=mode, teacher_log_probs=tail,
            vocab_size=v if padded else None, **opts)
    else:
        grad_t = case.get("grad_teacher", False)
        td = t.double().requires_grad_(grad_t)
        t_shard.requires_grad_(grad_t)
        ref = kt.distill_loss(sd, td, use_labels, precision="exact", **ref_opts)
        got = kt.vocab_parallel_distill_loss(s_shard, t_shard, dev_labels, lo,
                                             vocab_size=v if padded else None, **opts)
    upstream = torch.rand(ref.shape, generator=gen, dtype=torch.float64) + 0.5
    if dtype != torch.float32:
        # 16-bit gradients: one rounding (the op's), not a second one by an
        # upstream scale.
        upstream = torch.ones_like(upstream)
    (ref * upstream).sum().backward()
    (got.double() * upstream.to(DEVICE)).sum().backward()
    got = got.detach().cpu()
    gs_all = s_shard.grad.cpu()
    gt_all = t_shard.grad.cpu() if t_shard.grad is not None else None
    ltol, gtol = TOL[dtype]
    what = f"rank {rank}/{world} {case}"
    assert got.shape == ref.shape, f"{what}: shape {got.shape} vs {ref.shape}"
    assert torch.isfinite(got).all(), f"{what}: loss {got}"
    # The loss comes back in the input dtype (as distill_loss's): one rounding.
    err = rel(got, ref)
    ltol = max(ltol, torch.finfo(dtype).eps / 2)
    assert err <= ltol, f"{what}: loss {got} vs {ref} (rel {err:.2e})"
    real = min(hi, v) - lo
    ge = rel(gs_all[..., :max(real, 0)], sd.grad[..., lo:lo + max(real, 0)])
    assert ge <= gtol, f"{what}: student gradient rel {ge:.2e}"
    assert (gs_all[..., max(real, 0):] == 0).all(), f"{what}: padding gradient"
    if not case.get("topk") and case.get("grad_teacher"):
        te = rel(gt_all[..., :max(real, 0)], td.grad[..., lo:lo + max(real, 0)])
        assert te <= gtol, f"{what}: teacher gradient rel {te:.2e}"
    # Every rank holds the same loss, bit for bit.
    mine = got.double().reshape(-1).to(DEVICE)
    if mine.numel():
        all_losses = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(all_losses, mine)
        assert all(torch.equal(x, mine) for x in all_losses), f"{what}: ranks disagree"


def cases():
    out = []
    for d in DIVERGENCES:
        out.append({"divergence": d})
        out.append({"divergence": d, "alpha": 0.3, "labels": True})
        out.append({"divergence": d, "softcap": 5.0, "weights": True, "grad_teacher": True,
                    "reduction": "none", "labels": True})
        out.append({"divergence": d, "dtype": torch.bfloat16, "reduction": "sum", "neg_inf": True})
        out.append({"divergence": d, "padded": 56, "alpha": 0.5, "reduction": "mean"})
    out.append({"divergence": "jsd", "beta": 0.0})
    out.append({"divergence": "jsd", "beta": 1.0, "dtype": torch.float16})
    out.append({"divergence": "forward-kl", "lead": (0,)})
    for mode in ("full", "support", "tail"):
        out.append({"divergence": "forward-kl", "topk": (7, mode), "alpha": 0.2})
        out.append({"divergence": "forward-kl", "topk": (53, mode), "reduction": "none",
                    "labels": True})
    return out


def main():
    rank, world, rdzv = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    mode = sys.argv[4] if len(sys.argv) > 4 else ""
    timeout = datetime.timedelta(seconds=float(os.environ.get("VP_TIMEOUT", "30")))
    backend = "gloo"
    if os.environ.get("VP_DEVICE") == "cuda":
        global DEVICE
        DEVICE = torch.device("cuda", rank)
        torch.cuda.set_device(DEVICE)
        backend = "nccl"
    store = dist.FileStore(rdzv, world)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    gen = torch.Generator().manual_seed(1234)
    todo = cases()
    for i, case in enumerate(todo):
        if mode == "fail" and rank == 1 and i == 1:
            kt.vocab_parallel_distill_loss(torch.zeros(2, 4), torch.zeros(2, 4), None, -1)
        if mode == "hang" and rank == 1 and i == 1:
            time.sleep(3600)
        run_case(rank, world, case, gen)
    dist.barrier()
    print(f"rank {rank}/{world}: {len(todo)} cases ok", flush=True)
    leave(store, world, timeout)


def leave(store, world, timeout):
    """Ends the rank once every rank has finished its last collective,
    without tearing the process group down. The gloo teardown at exit
    aborted a rank now and then ("terminate called without an active
    exception", exit -6) after its cases had passed; the results are
    checked by then, so the worker skips the teardown: the store (not gloo)
    says when all ranks are through, then the process exits at once."""
    store.add("finished", 1)
    deadline = time.monotonic() + timeout.total_seconds()
    while store.add("finished", 0) < world:
        if time.monotonic() > deadline:
            print("a rank did not finish in time", flush=True)
            os._exit(1)
        time.sleep(0.01)
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
