"""Tests of kdfuse.torch's feature losses (feature_loss,
FeatureDistillationLoss, the op kdfuse::feature_loss) against the formulas
written here in plain torch; CUDA tensors where a GPU is visible (skipped,
with the reason, elsewhere)."""

import os
import unittest

import torch
import torch.nn.functional as F

import kdfuse.torch as kt

HAVE_CUDA = torch.cuda.is_available() or os.environ.get("KDFUSE_REQUIRE_GPU") == "1"


def attention_map(x):
    """Zagoruyko & Komodakis: the channel mean of x², flattened, L2-normalised."""
    q = x.pow(2).mean(1).reshape(x.shape[0], -1)
    return q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)


def reference(s, t, kind, reduction):
    """Per-row losses from the definitions, then the reduction."""
    if kind == "mse":
        rows = (s - t).pow(2).sum(-1)
        count = s.shape[-1]
    elif kind == "cosine":
        rows = 1 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)
        count = 1
    else:
        rows = (attention_map(s) - attention_map(t)).pow(2).sum(-1)
        count = attention_map(s).shape[1]
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if reduction == "batchmean":
        return rows.sum() / rows.numel()
    return rows.sum() / (rows.numel() * count)


def inputs(kind, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "attention":
        s = torch.randn(3, 4, 5, 2, generator=g, dtype=torch.float64)
        t = torch.randn(3, 6, 5, 2, generator=g, dtype=torch.float64)
    else:
        s = torch.randn(2, 3, 9, generator=g, dtype=torch.float64)
        t = 0.5 * s + torch.randn(2, 3, 9, generator=g, dtype=torch.float64)
    return s.to(dtype), t.to(dtype)


def loss_and_grads(fn, s, t):
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(True)
    loss = fn(s, t)
    return (loss.detach(),) + torch.autograd.grad(loss.sum(), (s, t))


class TestFeatureLosses(unittest.TestCase):
    def test_against_the_definitions(self):
        for kind in kt.FEATURE_KINDS:
            for reduction in kt.FEATURE_REDUCTIONS:
                for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
                    with self.subTest(kind=kind, reduction=reduction, dtype=dtype):
                        s, t = inputs(kind, dtype)
                        got = loss_and_grads(lambda a, b: kt.feature_loss(
                            a, b, kind=kind, reduction=reduction), s, t)
                        want = loss_and_grads(lambda a, b: reference(a, b, kind, reduction),
                                              s, t)
                        for x, y in zip(got, want):
                            torch.testing.assert_close(x, y, rtol=tol, atol=tol)

    def test_pytorch_spellings(self):
        s, t = inputs("mse", torch.float32)
        torch.testing.assert_close(kt.feature_loss(s, t), F.mse_loss(s, t))
        torch.testing.assert_close(kt.feature_loss(s, t, kind="cosine"),
                                   (1 - F.cosine_similarity(s, t, dim=-1)).mean())
        a, b = inputs("attention", torch.float32)
        at = lambda x: F.normalize(x.pow(2).mean(1).view(x.size(0), -1))  # noqa: E731
        torch.testing.assert_close(kt.feature_loss(a, b, kind="attention"),
                                   (at(a) - at(b)).pow(2).mean())

    def test_gradcheck(self):
        for kind in kt.FEATURE_KINDS:
            for reduction in ("mean", "none"):
                with self.subTest(kind=kind, reduction=reduction):
                    s, t = inputs(kind)
                    self.assertTrue(torch.autograd.gradcheck(
                        lambda a, b: kt.feature_loss(a, b, kind=kind, reduction=reduction),
                        (s.requires_grad_(True), t.requires_grad_(True))))

    def test_vmap_and_per_sample_gradients(self):
        g = torch.Generator().manual_seed(3)
        shapes = {"mse": ((2, 3, 7), (2, 3, 7)), "cosine": ((2, 3, 7), (2, 3, 7)),
                  "attention": ((2, 3, 4, 5), (2, 6, 4, 5))}
        for kind in kt.FEATURE_KINDS:
            for reduction in kt.FEATURE_REDUCTIONS:
                with self.subTest(kind=kind, reduction=reduction):
                    ss, ts = shapes[kind]
                    s_all = torch.randn((3,) + ss, generator=g, dtype=torch.float64)
                    t_all = torch.randn((3,) + ts, generator=g, dtype=torch.float64)

                    def f(s, t):
                        return kt.feature_loss(s, t, kind=kind, reduction=reduction).sum()

                    got = torch.vmap(f)(s_all, t_all)
                    grads_got = torch.vmap(torch.func.grad(f, argnums=(0, 1)))(s_all, t_all)
                    # The module, the vmapped dimension not first.
                    crit = kt.FeatureDistillationLoss(kind=kind, reduction=reduction)
                    mod = torch.vmap(crit, in_dims=(1, 1))(s_all.movedim(0, 1),
                                                          t_all.movedim(0, 1))
                    for i in range(3):
                        want = f(s_all[i], t_all[i])
                        torch.testing.assert_close(got[i], want)
                        torch.testing.assert_close(mod[i].sum(), want)
                        ws, wt = torch.func.grad(f, argnums=(0, 1))(s_all[i], t_all[i])
                        torch.testing.assert_close(grads_got[0][i], ws)
                        torch.testing.assert_close(grads_got[1][i], wt)
        # A teacher shared by every entry (not batched).
        s_all = torch.randn(3, 2, 7, generator=g, dtype=torch.float64)
        t = torch.randn(2, 7, generator=g, dtype=torch.float64)
        got = torch.vmap(lambda s: kt.feature_loss(s, t, kind="cosine"))(s_all)
        for i in range(3):
            torch.testing.assert_close(got[i], kt.feature_loss(s_all[i], t, kind="cosine"))

    def test_module_compile_and_opcheck(self):
        crit = kt.FeatureDistillationLoss(kind="cosine", eps=1e-6)
        self.assertIn("cosine", repr(crit))
        compiled = torch.compile(crit, fullgraph=True, backend="aot_eager")
        s, t = inputs("cosine", torch.float32)
        got = loss_and_grads(compiled, s, t)
        want = loss_and_grads(crit, s, t)
        for x, y in zip(got, want):
            torch.testing.assert_close(x, y)
        for kind, code in (("mse", 0), ("attention", 2)):
            s, t = inputs(kind, torch.float32)
            torch.library.opcheck(torch.ops.kdfuse.feature_loss.default,
                                  (s.requires_grad_(True), t.requires_grad_(True), code, 3, 0.0,
                                   True, True))

    def test_strides_empty_and_mixed_dtypes(self):
        s, t = inputs("mse", torch.float32)
        st = s.transpose(0, 1)
        torch.testing.assert_close(kt.feature_loss(st, t.transpose(0, 1)),
                                   kt.feature_loss(st.contiguous(), t.transpose(0, 1).contiguous()))
        expanded = t[:1, :1].expand_as(t)
        torch.testing.assert_close(kt.feature_loss(s, expanded),
                                   F.mse_loss(s, expanded.contiguous()))
        e = torch.zeros(0, 7, requires_grad=True)
        loss = kt.feature_loss(e, torch.zeros(0, 7))
        self.assertEqual(loss.item(), 0.0)
        loss.backward()
        self.assertEqual(e.grad.shape, e.shape)
        out = kt.feature_loss(s.bfloat16(), t)
        self.assertEqual(out.dtype, torch.float32)

    def test_bad_inputs(self):
        s, t = inputs("mse", torch.float32)
        a, b = inputs("attention", torch.float32)
        cases = [
            (lambda: kt.feature_loss(s, t[:, :2]), ValueError, "teacher_features"),
            (lambda: kt.feature_loss(s, t, kind="l1"), ValueError, "kind"),
            (lambda: kt.feature_loss(s, t, reduction="avg"), ValueError, "reduction"),
            (lambda: kt.feature_loss(s, t, eps=1e-3), ValueError, "eps"),
            (lambda: kt.feature_loss(s, t, kind="cosine", eps=-1.0), ValueError, "eps"),
            (lambda: kt.feature_loss(s, t, kind="cosine", eps=1e-60), ValueError, "eps"),
            (lambda: kt.feature_loss(a, b[:, :, :3], kind="attention"), ValueError,
             "teacher_features"),
            (lambda: kt.feature_loss(s.long(), t), ValueError, "student_features"),
            (lambda: kt.FeatureDistillationLoss(kind="kl"), ValueError, "kind"),
        ]
        for fn, exc, name in cases:
            with self.subTest(name=name):
                with self.assertRaisesRegex(exc, name):
                    fn()


@unittest.skipUnless(HAVE_CUDA, "no CUDA GPU visible to torch: the CUDA path of the "
                     "feature losses is not tested here")
class TestFeatureCuda(unittest.TestCase):
    def test_cuda_matches_cpu(self):
        for kind in kt.FEATURE_KINDS:
            s, t = inputs(kind, torch.float32)
            got = loss_and_grads(lambda a, b: kt.feature_loss(a, b, kind=kind), s.cuda(),
                                 t.cuda())
            want = loss_and_grads(lambda a, b: kt.feature_loss(a, b, kind=kind), s, t)
            for x, y in zip(got, want):
                torch.testing.assert_close(x.cpu(), y, rtol=1e-4, atol=1e-5)


if __name__ == "__main__":
    unittest.main()
