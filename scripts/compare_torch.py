#!/usr/bin/env python3
"""kdfuse against what PyTorch users run today, on the same GPU, tensors and run.

For each configuration (rows N, vocabulary V, dtype, divergence) it times the
forward + backward of the distillation loss in:
  eager    PyTorch's usual recipe: log_softmax, kl_div (JSD: logsumexp of the
           mixture, two kl_div), τ² scaling, batchmean;
  compile  torch.compile of the same function;
  liger    Liger Kernel when importable: LigerKLDIVLoss fed by torch's
           log_softmax (forward KL), LigerJSD (jsd);
  kdfuse   kdfuse.torch.distill_loss (the fused kernel through the C ABI; on the
           CPU, kdfuse's CPU backend).
On a CUDA GPU (the default when torch sees one) times are CUDA events; with
--device cpu (the default otherwise) they are wall-clock times of the CPU
backends, the peak memory is not measured, and the defaults shrink to a size
that a CPU runs in seconds.
All compute the same loss; the script checks that they agree with kdfuse
(loss and gradient), and reports the median time (CUDA events, warm-up, input
sets rotated), p10/p90, the peak extra memory of one step
(torch.cuda.max_memory_allocated above what was allocated before it) and
kdfuse's speed-up over each. Results go to --json (and --markdown).

    pip install .   # or PYTHONPATH=python KDFUSE_LIB=target/release/libkdfuse.so
    python3 scripts/compare_torch.py \\
        --rows 8192 --vocabs 32000,128256 --dtypes bf16,f32 --divergences forward-kl,jsd \\
        --json compare.json --markdown compare.md
"""

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

try:
    import kdfuse.torch as kt
except ImportError:  # a source tree: python/ with KDFUSE_LIB or target/release
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "python"))
    import kdfuse.torch as kt  # noqa: E402
from kdfuse import _lib  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32, "f16": torch.float16}


def eager_loss(divergence, beta, tau):
    """The unfused recipe, in fp32 after the temperature (what trainers write)."""

    def f(s, t):
        lq = F.log_softmax(s.float() / tau, dim=-1)
        lp = F.log_softmax(t.float() / tau, dim=-1)
        if divergence == "forward-kl":
            d = F.kl_div(lq, lp, reduction="batchmean", log_target=True)
        elif divergence == "reverse-kl":
            d = F.kl_div(lp, lq, reduction="batchmean", log_target=True)
        else:
            lm = torch.logsumexp(torch.stack([lp + math.log(beta), lq + math.log(1 - beta)]), dim=0)
            d = (beta * F.kl_div(lm, lp, reduction="sum", log_target=True)
                 + (1 - beta) * F.kl_div(lm, lq, reduction="sum", log_target=True)) / s.shape[0]
        return d * (tau * tau)

    return f


def liger_loss(divergence, beta, tau):
    """Liger Kernel's modules, or (None, why)."""
    try:
        from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss
    except Exception as e:  # not installed, or incompatible with this torch
        return None, f"liger_kernel not importable: {type(e).__name__}: {e}"
    if divergence == "forward-kl":
        kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)

        def f(s, t):
            lq = F.log_softmax(s.float() / tau, dim=-1)
            lp = F.log_softmax(t.float() / tau, dim=-1)
            return kl(lq, lp) * (tau * tau)

        return f, None
    if divergence == "jsd":
        jsd = LigerJSD(beta=beta)

        def f(s, t):
            lq = F.log_softmax(s.float() / tau, dim=-1)
            lp = F.log_softmax(t.float() / tau, dim=-1)
            return jsd(lq, lp) * (tau * tau)

        return f, None
    return None, f"no Liger module for {divergence}"


def kdfuse_loss(divergence, beta, tau):
    def f(s, t):
        # β is JSD's alone: the wrapper refuses it with another divergence.
        return kt.distill_loss(s, t, divergence=divergence,
                               beta=beta if divergence == "jsd" else None, temperature=tau)

    return f


def make_sets(n, v, dtype, count, seed, device):
    g = torch.Generator(device=device).manual_seed(seed)
    sets = []
    for _ in range(count):
        s = torch.randn(n, v, device=device, generator=g) * 2.0
        t = 0.8 * s + 0.6 * 2.0 * torch.randn(n, v, device=device, generator=g)
        sets.append((s.to(dtype).requires_grad_(True), t.to(dtype)))
    return sets


def step(fn, s, t):
    s.grad = None
    loss = fn(s, t)
    loss.backward()
    return loss


def time_impl(fn, sets, warmup, runs, device):
    for i in range(warmup):
        step(fn, *sets[i % len(sets)])
    if device == "cpu":
        ms = []
        for i in range(runs):
            t0 = time.perf_counter()
            step(fn, *sets[i % len(sets)])
            ms.append((time.perf_counter() - t0) * 1e3)
        ms.sort()
    else:
        torch.cuda.synchronize()
        events = []
        for i in range(runs):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step(fn, *sets[i % len(sets)])
            b.record()
            events.append((a, b))
        torch.cuda.synchronize()
        ms = sorted(a.elapsed_time(b) for a, b in events)

    def q(p):
        x = p * (len(ms) - 1)
        lo, hi = math.floor(x), math.ceil(x)
        return ms[lo] + (ms[hi] - ms[lo]) * (x - lo)

    return {"median_ms": q(0.5), "p10_ms": q(0.1), "p90_ms": q(0.9), "runs": len(ms)}


def peak_extra_bytes(fn, s, t, device):
    if device == "cpu":
        return None  # no allocator statistics on the CPU
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(fn, s, t)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def mb(x):
    return "—" if x is None else f"{x / 1e6:.0f}"


def git_commit():
    if os.environ.get("KDFUSE_COMMIT"):
        return os.environ["KDFUSE_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except Exception:
        return "unknown"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"),
                    default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", type=int, help="default 8192 (cuda), 64 (cpu)")
    ap.add_argument("--vocabs", help="default 32000,128256 (cuda), 4096 (cpu)")
    ap.add_argument("--dtypes", help="default bf16,f32 (cuda), f32 (cpu)")
    ap.add_argument("--divergences", default="forward-kl,jsd")
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--impls", default="eager,compile,liger,kdfuse")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=pathlib.Path)
    ap.add_argument("--markdown", type=pathlib.Path)
    a = ap.parse_args()
    dev = a.device
    if dev == "cuda" and not torch.cuda.is_available():
        sys.exit("compare_torch: --device cuda but no CUDA GPU is visible to torch")
    cpu = dev == "cpu"
    a.rows = a.rows or (64 if cpu else 8192)
    a.vocabs = a.vocabs or ("4096" if cpu else "32000,128256")
    a.dtypes = a.dtypes or ("f32" if cpu else "bf16,f32")
    if a.runs < 20:
        sys.exit("compare_torch: --runs must be at least 20")
    impls = a.impls.split(",")
    if cpu:
        l2 = 32 << 20
        device_name, capability = platform.processor() or platform.machine(), None
    else:
        props = torch.cuda.get_device_properties(0)
        l2 = getattr(props, "L2_cache_size", 50 << 20)
        device_name, capability = torch.cuda.get_device_name(0), f"{props.major}.{props.minor}"
    meta = {
        "tool": "scripts/compare_torch.py",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "device": f"{device_name} ({dev})",
        "compute_capability": capability,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "kdfuse": _lib.version(),
        "runs": a.runs,
        "warmup": a.warmup,
    }
    try:
        import liger_kernel  # noqa: F401
        from importlib.metadata import version
        meta["liger_kernel"] = version("liger-kernel")
    except Exception:
        meta["liger_kernel"] = None
    results = []
    for dname in a.dtypes.split(","):
        for v in [int(x) for x in a.vocabs.split(",")]:
            for div in a.divergences.split(","):
                n, dtype = a.rows, DTYPES[dname]
                set_bytes = 2 * n * v * dtype.itemsize
                count = max(1, min(8, math.ceil(4 * l2 / set_bytes)))
                sets = make_sets(n, v, dtype, count, a.seed, dev)
                cfg = {"rows": n, "cols": v, "dtype": dname, "divergence": div, "beta": a.beta,
                       "temperature": a.temperature, "input_sets": count}
                fns = {}
                skipped = {}
                for name in impls:
                    if name == "eager":
                        fns[name] = eager_loss(div, a.beta, a.temperature)
                    elif name == "compile":
                        fns[name] = torch.compile(eager_loss(div, a.beta, a.temperature))
                    elif name == "liger":
                        f, why = liger_loss(div, a.beta, a.temperature)
                        if f is None:
                            skipped[name] = why
                        else:
                            fns[name] = f
                    elif name == "kdfuse":
                        fns[name] = kdfuse_loss(div, a.beta, a.temperature)
                # The reference for agreement: kdfuse's loss and gradient on set 0.
                s0, t0 = sets[0]
                ref_loss = step(fns["kdfuse"], s0, t0).item() if "kdfuse" in fns else None
                ref_grad = s0.grad.float().clone() if ref_loss is not None else None
                tol = 1e-4 if dname == "f32" else 2e-2
                rows = {}
                for name, fn in fns.items():
                    r = {"impl": name, **cfg}
                    try:
                        loss = step(fn, s0, t0).item()
                        r["loss"] = loss
                        if ref_loss is not None:
                            g = s0.grad.float()
                            r["loss_rel_diff"] = abs(loss - ref_loss) / max(abs(ref_loss), 1e-30)
                            r["grad_rel_diff"] = ((g - ref_grad).norm() / ref_grad.norm()).item()
                            r["agrees"] = r["loss_rel_diff"] <= tol and r["grad_rel_diff"] <= tol
                        r.update(time_impl(fn, sets, a.warmup, a.runs, dev))
                        r["peak_extra_bytes"] = peak_extra_bytes(fn, s0, t0, dev)
                    except Exception as e:  # an implementation that fails is reported, not fatal
                        r["error"] = f"{type(e).__name__}: {e}"
                    rows[name] = r
                    print(f"  {name:8s} {dname} {v} {div}: "
                          + (f"{r['median_ms']:.3f} ms" if "median_ms" in r else r.get("error", "")),
                          file=sys.stderr)
                k = rows.get("kdfuse", {}).get("median_ms")
                for name, r in rows.items():
                    if k and "median_ms" in r:
                        r["kdfuse_speedup"] = r["median_ms"] / k
                    results.append(r)
                for name, why in skipped.items():
                    results.append({"impl": name, **cfg, "skipped": why})
                del sets, s0, t0, ref_grad
                if not cpu:
                    torch.cuda.empty_cache()
    report = {**meta, "results": results}
    if a.json:
        a.json.write_text(json.dumps(report, indent=2))
    where = meta["device"] + (f" (sm_{capability.replace('.', '')})" if capability else "")
    lines = [f"#### {where}, torch {meta['torch']}, "
             f"Liger {meta['liger_kernel'] or 'not available'}, commit `{meta['commit']}`, "
             f"{meta['date']}",
             "",
             "| configuration | impl | median ms (p10–p90) | peak extra MB | kdfuse speed-up | agrees |",
             "|---|---|---:|---:|---:|---|"]
    bad = 0
    for r in results:
        name = f"{r['divergence']} {r['dtype']} {r['rows']}x{r['cols']}"
        if "median_ms" in r:
            agrees = {True: "yes", False: "NO", None: "—"}[r.get("agrees")]
            bad += r.get("agrees") is False
            lines.append(f"| {name} | {r['impl']} | {r['median_ms']:.3f} ({r['p10_ms']:.3f}–"
                         f"{r['p90_ms']:.3f}) | {mb(r['peak_extra_bytes'])} | "
                         f"{r.get('kdfuse_speedup', float('nan')):.2f}× | {agrees} |")
        else:
            lines.append(f"| {name} | {r['impl']} | {r.get('skipped') or r.get('error')} | | | |")
    table = "\n".join(lines) + "\n"
    if a.markdown:
        a.markdown.write_text(table)
    print(table)
    if bad:
        print(f"compare_torch: {bad} implementation(s) disagree with kdfuse", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
