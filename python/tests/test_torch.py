"""Tests of kdfuse.torch (the custom ops and the Python API) on CPU tensors,
and on CUDA tensors where a GPU is visible (skipped, with the reason,
elsewhere; KDFUSE_REQUIRE_GPU=1 turns the skip into a failure).

The reference formulas (TRL's generalized JSD, the kl_div + cross-entropy
Hinton recipe) are written here in plain torch, from their definitions.

    scripts/test-python            # what CI runs (installs the pinned torch)
    python -m unittest discover -v -s python/tests   # with torch and kdfuse importable
"""

import itertools
import math
import os
import subprocess
import sys
import unittest

import torch
import torch.nn.functional as F

import kdfuse
import kdfuse.torch as kt

REQUIRE_GPU = os.environ.get("KDFUSE_REQUIRE_GPU") == "1"
HAVE_CUDA = torch.cuda.is_available()
NO_GPU = "no CUDA GPU visible to torch: the CUDA path of kdfuse.torch is not tested here"
BETAS = (0.0, 0.1, 0.5, 0.9, 1.0)


def trl_jsd(s, t, labels=None, beta=0.5, tau=1.0, reduction="batchmean"):
    """TRL's generalized JSD, from its definition: m = β·p + (1 − β)·q,
    D = β·KL(p‖m) + (1 − β)·KL(q‖m) (β = 0: KL(p‖q); β = 1: KL(q‖p)), p the
    teacher's and q the student's softmax at τ, no τ² factor; elementwise
    terms, −100 labels dropped, then kl_div's reductions (batchmean: over
    the first dimension, or over the valid tokens with labels)."""
    lq = F.log_softmax(s / tau, dim=-1)
    lp = F.log_softmax(t / tau, dim=-1)
    if beta == 0.0:
        terms = lp.exp() * (lp - lq)
    elif beta == 1.0:
        terms = lq.exp() * (lq - lp)
    else:
        lm = torch.logaddexp(lp + math.log(beta), lq + math.log(1.0 - beta))
        terms = beta * lp.exp() * (lp - lm) + (1.0 - beta) * lq.exp() * (lq - lm)
    if labels is not None:
        keep = labels != -100
        terms = terms[keep]
        count = keep.sum()
    else:
        count = terms.shape[0]
    if reduction == "batchmean":
        return terms.sum() / count
    if reduction == "sum":
        return terms.sum()
    if reduction == "mean":
        return terms.mean()
    return terms  # none: elementwise


def hinton(s, t, labels, tau, alpha):
    """α·CE(s, labels) + (1 − α)·τ²·KL(p_τ‖q_τ) with kl_div's batchmean."""
    kl = F.kl_div(F.log_softmax(s / tau, dim=-1), F.log_softmax(t / tau, dim=-1),
                  reduction="batchmean", log_target=True)
    return alpha * F.cross_entropy(s, labels) + (1 - alpha) * tau * tau * kl


def make(shape, dtype=torch.float32, seed=0, scale=2.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(shape, generator=g, dtype=torch.float64) * scale)
    t = 0.7 * s + 0.7 * scale * torch.randn(shape, generator=g, dtype=torch.float64)
    return s.to(device=device, dtype=dtype), t.to(device=device, dtype=dtype)


def labels_for(lead, v, seed=1, ignore_every=3, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, v, lead, generator=g)
    flat = y.view(-1)
    flat[::ignore_every] = -100
    return y.to(device)


def topk_teacher(t, k, log_probs=False):
    """The top-k indices of teacher logits ``t`` and its values there (logits,
    or log-probs of the full softmax)."""
    idx = torch.topk(t, k, dim=-1).indices
    src = F.log_softmax(t, dim=-1) if log_probs else t
    return idx, torch.gather(src, -1, idx)


def grads(loss_fn, *xs):
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    loss = loss_fn(*xs)
    gs = torch.autograd.grad(loss.sum(), xs)
    return loss.detach(), gs


class TestPackage(unittest.TestCase):
    def test_info_in_a_fresh_interpreter(self):
        out = subprocess.run([sys.executable, "-c", "import kdfuse; print(kdfuse.info())"],
                             capture_output=True, text=True, check=True).stdout
        self.assertIn("'library': '0.1.0'", out)
        self.assertIn("libkdfuse.so", out)

    def test_ops_are_registered(self):
        for name in ("dense_loss", "topk_loss", "scale_grad"):
            self.assertTrue(hasattr(torch.ops.kdfuse, name), name)


class TestTrlReference(unittest.TestCase):
    """kdfuse.torch.generalized_jsd_loss against TRL's formula, every β, τ,
    reduction, with and without −100 labels, [B, T, V] and [N, V]."""

    def check(self, shape, dtype, rtol, atol):
        s0, t0 = make(shape, dtype)
        y = labels_for(shape[:-1], shape[-1])
        for beta, tau, reduction, lab in itertools.product(
                BETAS, (1.0, 2.0), ("batchmean", "sum", "mean", "none"), (None, y)):
            with self.subTest(beta=beta, tau=tau, reduction=reduction, labels=lab is not None):
                got, (gs, gt) = grads(lambda s, t: kt.generalized_jsd_loss(
                    s, t, lab, beta=beta, temperature=tau, reduction=reduction), s0, t0)
                want, (ws, wt) = grads(lambda s, t: trl_jsd(
                    s, t, lab, beta=beta, tau=tau, reduction=reduction), s0, t0)
                if reduction == "none":
                    # kdfuse: per-token losses (0 where ignored); TRL: elementwise.
                    self.assertEqual(got.shape, shape[:-1])
                    if lab is None:
                        torch.testing.assert_close(got, want.sum(-1), rtol=rtol, atol=atol)
                    else:
                        keep = lab != -100
                        torch.testing.assert_close(got[keep], want.sum(-1), rtol=rtol,
                                                   atol=atol)
                        self.assertTrue(bool((got[~keep] == 0).all()))
                else:
                    self.assertEqual(got.shape, ())
                    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
                torch.testing.assert_close(gs, ws, rtol=rtol, atol=atol)
                torch.testing.assert_close(gt, wt, rtol=rtol, atol=atol)

    def test_btv_float32(self):
        self.check((2, 5, 17), torch.float32, 2e-5, 2e-6)

    def test_nv_float32(self):
        self.check((7, 33), torch.float32, 2e-5, 2e-6)

    def test_btv_float64_is_exact(self):
        self.check((2, 3, 11), torch.float64, 1e-10, 1e-12)

    def test_batchmean_without_labels_divides_by_the_first_dimension(self):
        s, t = make((3, 4, 9))
        got = kt.distill_loss(s, t, temperature=2.0)
        want = 4.0 * F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1),
                              reduction="batchmean", log_target=True)
        torch.testing.assert_close(got, want)
        per_token = kt.distill_loss(s, t, temperature=2.0, reduction="token_mean")
        torch.testing.assert_close(per_token, want / 4)

    def test_bf16_inputs(self):
        s, t = make((4, 6, 50), torch.bfloat16)
        y = labels_for((4, 6), 50)
        got = kt.generalized_jsd_loss(s, t, y, beta=0.3)
        want = trl_jsd(s.float(), t.float(), y, beta=0.3)
        self.assertEqual(got.dtype, torch.bfloat16)
        torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-3)


class TestHintonRecipe(unittest.TestCase):
    def test_kl_div_plus_cross_entropy(self):
        for shape, tau, alpha in itertools.product(((6, 21), (2, 4, 13)), (1.0, 2.0, 4.0),
                                                   (0.0, 0.5, 0.9)):
            with self.subTest(shape=shape, tau=tau, alpha=alpha):
                s0, t0 = make(shape)
                y = labels_for(shape[:-1], shape[-1], ignore_every=10 ** 9)
                y.view(-1)[0] = 3  # no ignored label: the recipe's CE and KL share N
                got, (gs, gt) = grads(lambda s, t: kt.distill_loss(
                    s, t, y, temperature=tau, alpha=alpha), s0, t0)
                want, (ws, wt) = grads(lambda s, t: hinton(
                    s.reshape(-1, shape[-1]), t.reshape(-1, shape[-1]), y.reshape(-1), tau,
                    alpha), s0, t0)
                torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6)
                torch.testing.assert_close(gs, ws, rtol=2e-5, atol=2e-6)
                torch.testing.assert_close(gt, wt, rtol=2e-5, atol=2e-6)

    def test_module_equals_functional(self):
        s, t = make((3, 5, 12))
        y = labels_for((3, 5), 12)
        crit = kt.DistillationLoss(divergence="jsd", beta=0.2, temperature=1.5, alpha=0.3)
        self.assertIn("jsd", repr(crit))
        torch.testing.assert_close(
            crit(s, t, y), kt.distill_loss(s, t, y, divergence="jsd", beta=0.2,
                                           temperature=1.5, alpha=0.3))


class TestAutograd(unittest.TestCase):
    def options(self):
        y = labels_for((2, 3), 7, ignore_every=4)
        w = torch.tensor([[1.0, 0.5, 2.0], [0.0, 1.5, 1.0]], dtype=torch.float64)
        for div in kt.DIVERGENCES:
            yield dict(divergence=div, temperature=1.7)
        yield dict(divergence="jsd", beta=0.3, labels=y, alpha=0.4)
        for red in ("sum", "mean", "none", "token_mean", "batchmean"):
            yield dict(divergence="reverse-kl", reduction=red, labels=y)
        yield dict(divergence="forward-kl", softcap=3.0, row_weights=w, labels=y)
        yield dict(divergence="forward-kl", num_items_in_batch=5)

    def each_option(self, options, check):
        """``check(opts, labels)`` for each option set, its labels taken out, in a subTest."""
        for opts in options:
            opts = dict(opts)
            labels = opts.pop("labels", None)
            with self.subTest(**{k: v for k, v in opts.items() if k != "row_weights"}):
                check(opts, labels)

    def assertGradcheck(self, loss_fn, *xs):
        self.assertTrue(torch.autograd.gradcheck(
            loss_fn, tuple(x.clone().requires_grad_(True) for x in xs),
            eps=1e-6, atol=1e-7, rtol=1e-5))

    def test_gradcheck_float64_student_and_teacher(self):
        s, t = make((2, 3, 7), torch.float64)
        self.each_option(self.options(), lambda opts, labels: self.assertGradcheck(
            lambda a, b: kt.distill_loss(a, b, labels, **opts), s, t))

    def test_gradgradcheck_raises_a_clear_error(self):
        s, t = make((2, 5), torch.float64)
        with self.assertRaisesRegex(RuntimeError, "second derivatives are not implemented"):
            torch.autograd.gradgradcheck(lambda a: kt.distill_loss(a, t),
                                         (s.requires_grad_(True),))

    def test_backward_twice_with_retain_graph(self):
        s, t = make((4, 9))
        s.requires_grad_(True)
        loss = kt.distill_loss(s, t, divergence="jsd", temperature=2.0)
        loss.backward(retain_graph=True)
        first = s.grad.clone()
        loss.backward(retain_graph=True)
        torch.testing.assert_close(s.grad, 2 * first)
        a = torch.autograd.grad(loss, s, retain_graph=True)[0]
        b = torch.autograd.grad(loss, s, retain_graph=True)[0]
        torch.testing.assert_close(a, first)
        torch.testing.assert_close(b, first)
        c = torch.autograd.grad(3.0 * loss, s)[0]
        torch.testing.assert_close(c, 3 * first)

    def test_torch_func_grad(self):
        s, t = make((3, 11))
        y = labels_for((3,), 11)
        f = lambda a, b: kt.distill_loss(a, b, y, divergence="tvd", alpha=0.2)  # noqa: E731
        gs, gt = torch.func.grad(f, argnums=(0, 1))(s, t)
        _, (ws, wt) = grads(f, s, t)
        torch.testing.assert_close(gs, ws)
        torch.testing.assert_close(gt, wt)

    def test_vmap_and_per_sample_gradients(self):
        s_all, t_all = make((3, 2, 4, 9), torch.float64)
        y_all = labels_for((3, 2, 4), 9)
        y_all[1] = -100  # an entry with no token that counts
        for reduction in ("batchmean", "token_mean", "mean", "sum", "none"):
            with self.subTest(reduction=reduction):
                def f(s, t, y):
                    return kt.distill_loss(s, t, y, divergence="jsd", beta=0.3, alpha=0.2,
                                           reduction=reduction).sum()

                got = torch.vmap(f)(s_all, t_all, y_all)
                grads_got = torch.vmap(torch.func.grad(f, argnums=(0, 1)))(s_all, t_all, y_all)
                for i in range(3):
                    torch.testing.assert_close(got[i], f(s_all[i], t_all[i], y_all[i]))
                    want = torch.func.grad(f, argnums=(0, 1))(s_all[i], t_all[i], y_all[i])
                    torch.testing.assert_close(grads_got[0][i], want[0])
                    torch.testing.assert_close(grads_got[1][i], want[1])

    def topk_options(self):
        y = labels_for((2, 3), 9, ignore_every=4)
        w = torch.tensor([[1.0, 0.5, 2.0], [0.0, 1.5, 1.0]], dtype=torch.float64)
        for mode in ("full", "support"):
            yield dict(topk_mode=mode, temperature=1.7)
        yield dict(topk_mode="tail", teacher_log_probs=True)
        yield dict(topk_mode="full", labels=y, alpha=0.4, softcap=3.0, row_weights=w)
        for red in ("sum", "mean", "none", "token_mean", "batchmean"):
            yield dict(topk_mode="support", reduction=red, labels=y)
        yield dict(topk_mode="full", num_items_in_batch=5)

    def test_topk_gradcheck_float64(self):
        s, t = make((2, 3, 9), torch.float64)

        def check(opts, labels):
            idx, vals = topk_teacher(t, 4, opts.get("teacher_log_probs", False))
            out = kt.topk_distill_loss(s, idx, vals, labels, **opts)
            self.assertEqual(out.dtype, torch.float64)
            self.assertGradcheck(lambda a: kt.topk_distill_loss(a, idx, vals, labels, **opts), s)
        self.each_option(self.topk_options(), check)

    def test_topk_float64_matches_float32_and_the_dense_oracle(self):
        s, t = make((3, 2, 10), torch.float64)
        y = labels_for((3, 2), 10)
        idx, vals = topk_teacher(t, 4)
        got, (gs,) = grads(lambda a: kt.topk_distill_loss(a, idx, vals, y, alpha=0.3,
                                                          temperature=2.0), s)
        masked = torch.full_like(t, float("-inf")).scatter(-1, idx, vals)
        want, (ws,) = grads(lambda a: kt.distill_loss(a, masked, y, alpha=0.3,
                                                      temperature=2.0), s)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gs, ws, rtol=1e-12, atol=1e-12)
        got32, (gs32,) = grads(lambda a: kt.topk_distill_loss(a, idx.int(), vals.float(), y,
                                                              alpha=0.3, temperature=2.0),
                               s.float())
        torch.testing.assert_close(got32.double(), got, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gs32.double(), gs, rtol=1e-4, atol=1e-6)

    def test_topk_gradgradcheck_raises_a_clear_error(self):
        s, t = make((2, 6), torch.float64)
        idx, vals = topk_teacher(t, 3)
        with self.assertRaisesRegex(RuntimeError, "second derivatives are not implemented"):
            torch.autograd.gradgradcheck(lambda a: kt.topk_distill_loss(a, idx, vals),
                                         (s.requires_grad_(True),))

    def test_topk_vmap_and_per_sample_gradients(self):
        s_all, t_all = make((3, 2, 4, 9), torch.float64)
        idx_all, vals_all = topk_teacher(t_all, 3)
        y_all = labels_for((3, 2, 4), 9)
        y_all[1] = -100  # an entry with no token that counts
        for reduction in ("batchmean", "token_mean", "mean", "sum", "none"):
            with self.subTest(reduction=reduction):
                def f(s, idx, vals, y):
                    return kt.topk_distill_loss(s, idx, vals, y, alpha=0.2, temperature=1.5,
                                                topk_mode="support", reduction=reduction).sum()

                args = (s_all, idx_all, vals_all, y_all)
                got = torch.vmap(f)(*args)
                grads_got = torch.vmap(torch.func.grad(f))(*args)
                for i in range(3):
                    one = tuple(x[i] for x in args)
                    torch.testing.assert_close(got[i], f(*one))
                    torch.testing.assert_close(grads_got[i], torch.func.grad(f)(*one))
        # An unbatched teacher shared by every entry, float32 and int32 indices.
        s32 = s_all.float()
        idx, vals = idx_all[0].int(), vals_all[0].float()

        def g(s):
            return kt.topk_distill_loss(s, idx, vals)

        got = torch.vmap(g)(s32)
        for i in range(3):
            torch.testing.assert_close(got[i], g(s32[i]))

    def test_teacher_gradient_only_when_asked(self):
        s, t = make((3, 8))
        s.requires_grad_(True)
        kt.distill_loss(s, t).backward()
        self.assertIsNone(t.grad)
        t.requires_grad_(True)
        loss = kt.distill_loss(s.detach(), t, divergence="reverse-kl")
        loss.backward()
        _, (_, want) = grads(lambda a, b: trl_jsd(a, b, beta=1.0), s, t)
        torch.testing.assert_close(t.grad, want)

    def test_none_reduction_backward_weights_rows(self):
        s0, t0 = make((2, 3, 6), torch.float64)
        up = torch.arange(6, dtype=torch.float64).reshape(2, 3)
        got, (gs, _) = grads(lambda s, t: kt.distill_loss(s, t, reduction="none") * up, s0, t0)
        want, (ws, _) = grads(lambda s, t: trl_jsd(s, t, beta=0.0, reduction="none").sum(-1)
                              * up, s0, t0)
        torch.testing.assert_close(gs, ws)


class TestCompileAndOpcheck(unittest.TestCase):
    def test_opcheck_dense(self):
        for dtype in (torch.float32, torch.float64):
            s, t = make((3, 10), dtype)
            y = labels_for((3,), 10)
            samples = [
                (s.clone().requires_grad_(True), t, None, None, 0, 0.5, 1.0, 0.0, 0, -100,
                 True, 0.0, True, False, 0),
                (s.clone().requires_grad_(True), t.clone().requires_grad_(True), y, None, 2,
                 0.3, 2.0, 0.5, 3, -100, False, 0.0, True, True, 1),
                (s, t, y, torch.rand(3, dtype=dtype), 1, 0.5, 1.0, 0.0, 2, -100, True, 5.0,
                 False, False, 0),
            ]
            for args in samples:
                with self.subTest(dtype=dtype, reduction=args[8]):
                    torch.library.opcheck(torch.ops.kdfuse.dense_loss.default, args)

    def test_opcheck_topk(self):
        s, _ = make((4, 12))
        idx = torch.stack([torch.randperm(12)[:5] for _ in range(4)])
        vals = torch.randn(4, 5)
        args = (s.requires_grad_(True), idx, vals, None, None, 0, 0.5, 1.0, 0.0, 0, -100, True,
                0.0, False, 1, True)
        torch.library.opcheck(torch.ops.kdfuse.topk_loss.default, args)
        args = (s.detach().double().requires_grad_(True), idx, vals.double(), None, None, 0,
                0.5, 1.0, 0.0, 3, -100, True, 0.0, False, 0, True)
        torch.library.opcheck(torch.ops.kdfuse.topk_loss.default, args)

    def test_compile_fullgraph_forward_and_backward(self):
        torch._dynamo.reset()

        def step(s, t, y):
            return kt.distill_loss(s, t, y, divergence="jsd", beta=0.4, temperature=2.0,
                                   alpha=0.25)

        compiled = torch.compile(step, fullgraph=True)
        s0, t0 = make((2, 6, 16))
        y = labels_for((2, 6), 16)
        got, (gs, gt) = grads(lambda s, t: compiled(s, t, y), s0, t0)
        want, (ws, wt) = grads(lambda s, t: step(s, t, y), s0, t0)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(gs, ws)
        torch.testing.assert_close(gt, wt)
        explained = torch._dynamo.explain(step)(s0, t0, y)
        self.assertEqual(explained.graph_break_count, 0)

    def test_compile_fullgraph_module_batchmean_over_b(self):
        torch._dynamo.reset()
        crit = kt.DistillationLoss(temperature=3.0)
        compiled = torch.compile(crit, fullgraph=True, backend="aot_eager")
        s0, t0 = make((3, 4, 10))
        got, (gs,) = grads(lambda s: compiled(s, t0), s0)
        want, (ws,) = grads(lambda s: crit(s, t0), s0)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(gs, ws)


class TestInputs(unittest.TestCase):
    def test_any_strides_and_expanded_teacher(self):
        base_s, base_t = make((4, 3, 10))
        s = base_s.transpose(0, 1)  # [3, 4, 10], non-contiguous rows
        t_row = base_t[0, :1]       # [1, 10]
        t = t_row.expand(3, 4, 10)  # stride 0 in both leading dimensions
        self.assertEqual(t.stride()[:2], (0, 0))
        got, (gs,) = grads(lambda a: kt.distill_loss(a, t, temperature=2.0), s)
        want, (ws,) = grads(lambda a: kt.distill_loss(a, t.contiguous(), temperature=2.0),
                            s.contiguous())
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(gs, ws)
        self.assertEqual(gs.shape, s.shape)
        col = make((10, 6))[0].t()  # [6, 10] with column stride 6
        got = kt.distill_loss(col, col.contiguous().flip(0))
        torch.testing.assert_close(got, kt.distill_loss(col.contiguous(),
                                                        col.contiguous().flip(0)))

    def test_wider_teacher(self):
        s, t = make((3, 8))
        wide = torch.cat([t, torch.randn(3, 5)], dim=-1)
        torch.testing.assert_close(kt.distill_loss(s, wide), kt.distill_loss(s, t))

    def test_empty_batch(self):
        for shape in ((0, 7), (2, 0, 7)):
            with self.subTest(shape=shape):
                s = torch.zeros(shape, requires_grad=True)
                t = torch.zeros(shape)
                loss = kt.distill_loss(s, t)
                self.assertEqual(loss.item(), 0.0)
                loss.backward()
                self.assertEqual(s.grad.shape, s.shape)
                self.assertEqual(kt.distill_loss(s, t, reduction="none").shape, shape[:-1])

    def test_mixed_dtypes_promote(self):
        s, t = make((3, 9), torch.bfloat16)
        t32 = t.float()
        s.requires_grad_(True)
        loss = kt.distill_loss(s, t32)
        self.assertEqual(loss.dtype, torch.float32)
        loss.backward()
        self.assertEqual(s.grad.dtype, torch.bfloat16)
        torch.testing.assert_close(loss, kt.distill_loss(s.detach().float(), t32))
        self.assertEqual(kt.distill_loss(s.detach(), t).dtype, torch.bfloat16)
        self.assertEqual(kt.distill_loss(s.detach().half(), t).dtype, torch.float32)
        self.assertEqual(kt.distill_loss(s.detach().double(), t32).dtype, torch.float64)

    def test_num_items_in_batch(self):
        s, t = make((2, 5, 9))
        y = labels_for((2, 5), 9)
        got = kt.distill_loss(s, t, y, num_items_in_batch=7)
        torch.testing.assert_close(got, kt.distill_loss(s, t, y, reduction="sum") / 7)
        n = torch.tensor(7)
        torch.testing.assert_close(kt.distill_loss(s, t, y, num_items_in_batch=n), got)

    def test_softcap_and_row_weights(self):
        s, t = make((4, 9), torch.float64)
        cap = 2.5
        got = kt.distill_loss(s, t, softcap=cap)
        want = kt.distill_loss(cap * torch.tanh(s / cap), cap * torch.tanh(t / cap))
        torch.testing.assert_close(got, want)
        w = torch.tensor([1.0, 0.0, 2.0, 0.5], dtype=torch.float64)
        per = kt.distill_loss(s, t, reduction="none")
        torch.testing.assert_close(kt.distill_loss(s, t, row_weights=w), (per * w).sum() / 4)

    def test_topk_full_mode_equals_a_masked_dense_teacher(self):
        s, t = make((3, 10))
        idx = torch.topk(t, 4, dim=-1).indices
        vals = torch.gather(t, -1, idx)
        masked = torch.full_like(t, float("-inf")).scatter(-1, idx, vals)
        got, (gs,) = grads(lambda a: kt.topk_distill_loss(a, idx, vals), s)
        want, (ws,) = grads(lambda a: kt.distill_loss(a, masked), s)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gs, ws, rtol=1e-5, atol=1e-6)

    def test_both_precisions_agree(self):
        s, t = make((3, 300))
        for div in ("forward-kl", "reverse-kl", "jsd", "tvd", "soft-ce"):
            with self.subTest(divergence=div):
                a = s.clone().requires_grad_(True)
                b = s.clone().requires_grad_(True)
                fast = kt.distill_loss(a, t, divergence=div)
                exact = kt.distill_loss(b, t, divergence=div, precision="exact")
                fast.backward()
                exact.backward()
                torch.testing.assert_close(fast, exact, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
        crit = kt.DistillationLoss(precision="exact")
        self.assertIn("precision='exact'", repr(crit))
        with self.assertRaisesRegex(ValueError, "precision"):
            kt.DistillationLoss(precision="half")

    def test_bad_inputs_raise_naming_the_argument(self):
        s, t = make((3, 8))
        y = labels_for((3,), 8)
        cases = [
            (dict(student_logits=s, teacher_logits=t[:, :5]), ValueError, "teacher_logits"),
            (dict(student_logits=s, teacher_logits=t[:2]), ValueError, "teacher_logits"),
            (dict(student_logits=s.long(), teacher_logits=t), ValueError, "student_logits"),
            (dict(student_logits=torch.tensor(1.0), teacher_logits=t), ValueError,
             "student_logits"),
            (dict(student_logits=s, teacher_logits=t, labels=y.float()), ValueError, "labels"),
            (dict(student_logits=s, teacher_logits=t, labels=y[:2]), ValueError, "labels"),
            (dict(student_logits=s, teacher_logits=t, labels=torch.tensor([0, 8, 1])),
             ValueError, "labels"),
            (dict(student_logits=s, teacher_logits=t, beta=0.2), ValueError, "beta"),
            (dict(student_logits=s, teacher_logits=t, divergence="jsd", beta=1.5), ValueError,
             "beta"),
            (dict(student_logits=s, teacher_logits=t, temperature=0.0), ValueError,
             "temperature"),
            (dict(student_logits=s, teacher_logits=t, temperature=1e30), ValueError,
             "temperature"),
            (dict(student_logits=s, teacher_logits=t, alpha=0.5), ValueError, "labels"),
            (dict(student_logits=s, teacher_logits=t, divergence="kl"), ValueError,
             "divergence"),
            (dict(student_logits=s, teacher_logits=t, reduction="avg"), ValueError,
             "reduction"),
            (dict(student_logits=s, teacher_logits=t, reduction="sum", num_items_in_batch=3),
             ValueError, "num_items_in_batch"),
            (dict(student_logits=s, teacher_logits=t, softcap=0.0), ValueError, "softcap"),
            (dict(student_logits=s, teacher_logits=t,
                  row_weights=torch.tensor([1.0, float("nan"), 1.0])), ValueError,
             "row_weights"),
            (dict(student_logits=s.tolist(), teacher_logits=t), TypeError, "student_logits"),
            (dict(student_logits=s, teacher_logits=t, precision="fp8"), ValueError,
             "precision"),
        ]
        for kwargs, exc, name in cases:
            with self.subTest(name=name, kwargs=sorted(kwargs)):
                with self.assertRaisesRegex(exc, name):
                    kt.distill_loss(**kwargs)
        with self.assertRaisesRegex(ValueError, "topk_indices"):
            kt.topk_distill_loss(s, torch.tensor([[0, 0], [1, 2], [3, 4]]), torch.zeros(3, 2))

    def test_the_ops_check_their_inputs_too(self):
        s, t = make((3, 8))
        op = torch.ops.kdfuse.dense_loss
        tail = (0, 0.5, 1.0, 0.0, 0, -100, True, 0.0, False, False, 0)
        for args, name in [((s, t[:2], None, None), "teacher_logits"),
                           ((s, t.double(), None, None), "teacher_logits"),
                           ((s, t, torch.zeros(2, dtype=torch.long), None), "labels"),
                           ((s, t, torch.zeros(3), None), "labels"),
                           ((s, t, None, torch.ones(4)), "row_weights"),
                           ((s.long(), t.long(), None, None), "student_logits")]:
            with self.subTest(name=name):
                with self.assertRaisesRegex(ValueError, name):
                    op(*args, *tail)
        idx = torch.zeros(2, 2, dtype=torch.long)
        with self.assertRaisesRegex(ValueError, "topk_indices"):
            torch.ops.kdfuse.topk_loss(s, idx, torch.zeros(2, 2), None, None, 0, 0.5, 1.0, 0.0,
                                       0, -100, True, 0.0, False, 1, False)

    def test_library_errors_are_value_errors_naming_the_argument(self):
        s, t = make((2, 4))
        with self.assertRaises(kdfuse.KdfuseArgumentError) as ctx:
            kt.distill_loss(s, t, torch.tensor([0, 9]))
        self.assertIsInstance(ctx.exception, ValueError)
        self.assertIn("labels", str(ctx.exception))


@unittest.skipUnless(HAVE_CUDA or REQUIRE_GPU, NO_GPU)
class TestCuda(unittest.TestCase):
    def test_cuda_matches_cpu(self):
        for dtype in (torch.float32, torch.bfloat16):
            s, t = make((2, 64, 1000), dtype)
            y = labels_for((2, 64), 1000)
            for opts in (dict(divergence="jsd", beta=0.3), dict(temperature=2.0, alpha=0.5)):
                got, (gs, gt) = grads(lambda a, b: kt.distill_loss(a, b, y.cuda(), **opts),
                                      s.cuda(), t.cuda())
                want, (ws, wt) = grads(lambda a, b: kt.distill_loss(a, b, y, **opts), s, t)
                tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(
                    rtol=2e-2, atol=2e-3)
                torch.testing.assert_close(got.cpu(), want, **tol)
                torch.testing.assert_close(gs.cpu(), ws, **tol)
                torch.testing.assert_close(gt.cpu(), wt, **tol)

    def test_cuda_compile_fullgraph_on_a_side_stream(self):
        s, t = make((4, 32, 500), device="cuda")
        f = torch.compile(lambda a, b: kt.distill_loss(a, b, divergence="jsd"), fullgraph=True)
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            got, (gs,) = grads(lambda a: f(a, t), s)
        stream.synchronize()
        want, (ws,) = grads(lambda a: kt.distill_loss(a, t, divergence="jsd"), s)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(gs, ws)


if __name__ == "__main__":
    unittest.main()
