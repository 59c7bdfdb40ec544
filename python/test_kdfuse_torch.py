"""Tests of python/kdfuse_torch.py.

Without torch: the ctypes structs against the library (a loss on the CPU
backend through kdfuse_compute_host, checked against a float64 reference in
plain Python). With torch: the autograd function on CPU tensors; with torch
and a CUDA GPU: on CUDA tensors, against PyTorch's own ops. What cannot run
is skipped with its reason (unittest prints it with -v).

    python3 -m unittest -v python/test_kdfuse_torch.py
"""

import ctypes
import math
import os
import pathlib
import random
import sys
import unittest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import kdfuse_torch as kt  # noqa: E402

try:
    import torch
except ImportError:  # the module works without torch; its tests skip
    torch = None

# KDFUSE_REQUIRE_GPU=1 (scripts/gpu-check): a missing GPU fails instead of skipping.
REQUIRE_GPU = os.environ.get("KDFUSE_REQUIRE_GPU") == "1"
HAVE_CUDA = REQUIRE_GPU or (torch is not None and torch.cuda.is_available())


def reference_loss(s, t, n, v, tau, divergence, beta):
    """float64 batchmean of τ²·D(p‖q), p = softmax(t/τ), q = softmax(s/τ)."""
    total = 0.0
    for r in range(n):
        a = [x / tau for x in t[r * v:(r + 1) * v]]
        b = [x / tau for x in s[r * v:(r + 1) * v]]
        la, lb = max(a), max(b)
        za = math.log(sum(math.exp(x - la) for x in a)) + la
        zb = math.log(sum(math.exp(x - lb) for x in b)) + lb
        lp = [x - za for x in a]
        lq = [x - zb for x in b]
        if divergence == "forward-kl":
            d = sum(math.exp(x) * (x - y) for x, y in zip(lp, lq))
        elif divergence == "reverse-kl":
            d = sum(math.exp(y) * (y - x) for x, y in zip(lp, lq))
        elif divergence == "tvd":
            d = 0.5 * sum(abs(math.exp(x) - math.exp(y)) for x, y in zip(lp, lq))
        elif divergence == "soft-ce":
            d = -sum(math.exp(x) * y for x, y in zip(lp, lq))
        else:
            lm = [math.log(beta * math.exp(x) + (1 - beta) * math.exp(y)) for x, y in zip(lp, lq)]
            d = beta * sum(math.exp(x) * (x - m) for x, m in zip(lp, lm)) + (1 - beta) * sum(
                math.exp(y) * (y - m) for y, m in zip(lq, lm))
        total += tau * tau * d
    return total / n


class CtypesAgainstLibrary(unittest.TestCase):
    """Runs wherever libkdfuse is built (CI included): no torch needed."""

    def setUp(self):
        try:
            self.lib = kt.load_library()
        except kt.KdfuseError as e:
            self.fail(str(e))

    def test_struct_sizes_match_the_library(self):
        p = kt.Params()
        self.assertEqual(self.lib.kdfuse_params_default(ctypes.byref(p)), 0)
        self.assertEqual(p.size, ctypes.sizeof(kt.Params))
        self.assertEqual(p.version, kt.ABI_VERSION)
        b = kt.Batch()
        self.assertEqual(self.lib.kdfuse_batch_init(ctypes.byref(b), 3, 7, 0), 0)
        self.assertEqual(b.size, ctypes.sizeof(kt.Batch))
        self.assertEqual((b.rows, b.cols, b.grad_stride), (3, 7, 7))

    def test_host_loss_matches_float64_reference(self):
        rng = random.Random(4)
        n, v = 3, 11
        for divergence in ("forward-kl", "reverse-kl", "jsd", "tvd", "soft-ce"):
            s = [rng.gauss(0, 2) for _ in range(n * v)]
            t = [rng.gauss(0, 2) for _ in range(n * v)]
            beta = 0.3 if divergence == "jsd" else None  # JSD's alone
            params = kt.make_params(self.lib, divergence, beta=beta, temperature=1.7)
            b = kt.Batch()
            kt.check(self.lib, self.lib.kdfuse_batch_init(ctypes.byref(b), n, v, 0))
            sa, ta = (ctypes.c_float * (n * v))(*s), (ctypes.c_float * (n * v))(*t)
            ga = (ctypes.c_float * (n * v))(*([float("nan")] * (n * v)))
            loss = ctypes.c_float(float("nan"))
            b.student, b.teacher = ctypes.addressof(sa), ctypes.addressof(ta)
            b.grad, b.loss = ctypes.addressof(ga), ctypes.addressof(loss)
            kt.check(self.lib, self.lib.kdfuse_compute_host(ctypes.byref(b), ctypes.byref(params)))
            want = reference_loss(s, t, n, v, 1.7, divergence, 0.3)
            self.assertAlmostEqual(loss.value / want, 1.0, delta=1e-5, msg=divergence)
            for r in range(n):  # each gradient row sums to zero (shift invariance)
                self.assertAlmostEqual(sum(ga[r * v:(r + 1) * v]), 0.0, delta=1e-6)

    def test_softcap_and_row_weights_reach_the_library(self):
        n, v = 2, 5
        x = (ctypes.c_float * (n * v))(*[float(i % 7) for i in range(n * v)])
        y = (ctypes.c_float * (n * v))(*[float((3 * i) % 5) for i in range(n * v)])

        def loss_of(params, weights=None):
            b = kt.Batch()
            kt.check(self.lib, self.lib.kdfuse_batch_init(ctypes.byref(b), n, v, 0))
            out = ctypes.c_float(float("nan"))
            b.student, b.teacher, b.loss = (ctypes.addressof(x), ctypes.addressof(y),
                                            ctypes.addressof(out))
            w = None
            if weights is not None:
                w = (ctypes.c_float * n)(*weights)
                b.row_weights = ctypes.addressof(w)
            kt.check(self.lib, self.lib.kdfuse_compute_host(ctypes.byref(b), ctypes.byref(params)))
            return out.value

        self.assertEqual(kt.make_params(self.lib).softcap, 0.0)
        self.assertEqual(kt.make_params(self.lib, softcap=3.0).softcap, 3.0)
        with self.assertRaisesRegex(kt.KdfuseError, "softcap"):
            loss_of(kt.make_params(self.lib, softcap=-1.0))
        plain = loss_of(kt.make_params(self.lib))
        self.assertEqual(loss_of(kt.make_params(self.lib), [1.0, 1.0]), plain)
        with self.assertRaisesRegex(kt.KdfuseError, "row_weights"):
            loss_of(kt.make_params(self.lib), [1.0, float("nan")])

    def test_errors_name_the_argument(self):
        params = kt.make_params(self.lib, temperature=-1.0)
        b = kt.Batch()
        kt.check(self.lib, self.lib.kdfuse_batch_init(ctypes.byref(b), 1, 2, 0))
        x = (ctypes.c_float * 2)(1.0, 2.0)
        loss = ctypes.c_float()
        b.student = b.teacher = ctypes.addressof(x)
        b.loss = ctypes.addressof(loss)
        with self.assertRaisesRegex(kt.KdfuseError, "temperature"):
            kt.check(self.lib, self.lib.kdfuse_compute_host(ctypes.byref(b), ctypes.byref(params)))
        with self.assertRaises(ValueError):
            kt.make_params(self.lib, divergence="hellinger")


class BadInputRaises(unittest.TestCase):
    """What the library refuses reaches Python as an exception naming the argument."""

    def setUp(self):
        self.lib = kt.load_library()
        n, v = 2, 5
        self.x = (ctypes.c_float * (n * v))(*[float(i % 7) for i in range(n * v)])
        self.y = (ctypes.c_float * (n * v))(*[float((3 * i) % 5) for i in range(n * v)])
        self.out = (ctypes.c_float * 4)()
        self.b = kt.Batch()
        kt.check(self.lib, self.lib.kdfuse_batch_init(ctypes.byref(self.b), n, v, 0))
        self.b.student, self.b.teacher = ctypes.addressof(self.x), ctypes.addressof(self.y)
        self.b.loss = ctypes.addressof(self.out)

    def compute(self, params, batch=None):
        b = self.b if batch is None else batch
        kt.check(self.lib, self.lib.kdfuse_compute_host(ctypes.byref(b), ctypes.byref(params)))

    def test_parameters_beyond_fp32(self):
        for kwargs, arg in [({"temperature": 1e20}, "temperature"),
                            ({"temperature": 1e19}, "temperature"),
                            ({"softcap": 1e-50}, "softcap"),
                            ({"softcap": 1e39}, "softcap")]:
            with self.assertRaisesRegex(kt.KdfuseError, arg, msg=str(kwargs)):
                self.compute(kt.make_params(self.lib, **kwargs))
        self.compute(kt.make_params(self.lib, temperature=4.0, softcap=30.0))

    def test_beta_and_softcap_zero(self):
        with self.assertRaisesRegex(ValueError, "beta"):
            kt.make_params(self.lib, "reverse-kl", beta=0.3)
        p = kt.make_params(self.lib, "reverse-kl")
        p.beta = 0.3  # set on the struct: the library refuses it
        with self.assertRaisesRegex(kt.KdfuseError, "beta"):
            self.compute(p)
        with self.assertRaisesRegex(ValueError, "softcap"):
            kt.make_params(self.lib, softcap=0.0)

    def test_struct_version_and_alignment(self):
        for version in (0, 3, 99, 0xFFFFFFFF):
            p = kt.make_params(self.lib)
            p.version = version
            with self.assertRaisesRegex(kt.KdfuseError, "params.version"):
                self.compute(p)
        b = kt.Batch.from_buffer_copy(self.b)
        b.loss = ctypes.addressof(self.out) + 1
        with self.assertRaisesRegex(kt.KdfuseError, "batch.loss"):
            self.compute(kt.make_params(self.lib), b)
        b = kt.Batch.from_buffer_copy(self.b)
        b.rows = 2**63 - 1
        with self.assertRaisesRegex(kt.KdfuseError, "stride"):
            self.compute(kt.make_params(self.lib), b)

    def test_empty_batch_loss_is_plus_zero(self):
        b = kt.Batch.from_buffer_copy(self.b)
        b.rows = 0
        self.out[0] = float("nan")
        self.compute(kt.make_params(self.lib), b)
        self.assertEqual(math.copysign(1.0, self.out[0]), 1.0)


def torch_reference(s, t, labels, divergence, beta, tau, alpha):
    """PyTorch's ops in float64: the usual recipe."""
    F = torch.nn.functional
    s64, t64 = s.double().reshape(-1, s.shape[-1]), t.double().reshape(-1, s.shape[-1])
    lq, lp = F.log_softmax(s64 / tau, -1), F.log_softmax(t64 / tau, -1)
    if divergence == "forward-kl":
        d = (lp.exp() * (lp - lq)).sum(-1)
    elif divergence == "reverse-kl":
        d = (lq.exp() * (lq - lp)).sum(-1)
    elif divergence == "tvd":
        d = 0.5 * (lp.exp() - lq.exp()).abs().sum(-1)
    elif divergence == "soft-ce":
        d = -(lp.exp() * lq).sum(-1)
    else:
        lm = torch.logsumexp(torch.stack([lp + math.log(beta), lq + math.log(1 - beta)]), 0)
        d = beta * (lp.exp() * (lp - lm)).sum(-1) + (1 - beta) * (lq.exp() * (lq - lm)).sum(-1)
    row = (1 - alpha) * tau * tau * d
    if alpha > 0:
        row = row + alpha * F.cross_entropy(s64, labels.reshape(-1), reduction="none")
    return row.sum() / row.shape[0]


@unittest.skipIf(torch is None and not REQUIRE_GPU, "torch is not installed")
class TorchAutograd(unittest.TestCase):
    def check_device(self, device, dtypes):
        g = torch.Generator().manual_seed(0)
        for dtype in dtypes:
            for divergence in ("forward-kl", "reverse-kl", "jsd", "tvd", "soft-ce"):
                s = (torch.randn(2, 3, 1001, generator=g) * 2).to(device=device, dtype=dtype)
                t = (torch.randn(2, 3, 1001, generator=g) * 2).to(device=device, dtype=dtype)
                labels = torch.randint(0, 1001, (2, 3), generator=g).to(device)
                s.requires_grad_(True)
                beta = 0.4 if divergence == "jsd" else None  # JSD's alone
                loss = kt.distill_loss(s, t, labels, divergence=divergence, beta=beta,
                                       temperature=2.0, alpha=0.3)
                (3 * loss).backward()  # the upstream gradient reaches the saved one
                s_ref = s.detach().double().requires_grad_(True)
                ref = torch_reference(s_ref, t, labels, divergence, 0.4, 2.0, 0.3)
                (3 * ref).backward()
                tol = 1e-5 if dtype == torch.float32 else 2e-2
                self.assertLess(abs(loss.item() - ref.item()) / abs(ref.item()), max(tol, 1e-5))
                err = (s.grad.double() - s_ref.grad).norm() / s_ref.grad.norm()
                self.assertLess(err.item(), tol, f"{device} {dtype} {divergence}")

    def test_cpu_tensors(self):
        self.check_device("cpu", [torch.float32, torch.bfloat16])

    @unittest.skipUnless(HAVE_CUDA, "no CUDA GPU visible to torch")
    def test_cuda_tensors_on_the_current_stream(self):
        self.check_device("cuda", [torch.float32, torch.bfloat16, torch.float16])
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            s = torch.randn(64, 32000, device="cuda", requires_grad=True)
            t = torch.randn(64, 32000, device="cuda")
            loss = kt.distill_loss(s, t, divergence="jsd")
            loss.backward()
        torch.cuda.synchronize()
        self.assertTrue(torch.isfinite(s.grad).all().item())

    @unittest.skipUnless(HAVE_CUDA, "no CUDA GPU visible to torch")
    def test_cuda_bad_input_raises(self):
        s = torch.randn(4, 10, device="cuda")
        with self.assertRaisesRegex(kt.KdfuseError, "temperature"):
            kt.distill_loss(s, s, temperature=0.0)
        with self.assertRaisesRegex(ValueError, "dtypes differ"):
            kt.distill_loss(s, s.half())


if __name__ == "__main__":
    unittest.main(verbosity=2)
