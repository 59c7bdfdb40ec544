"""Tests of kdfuse's ctypes layer (kdfuse._lib) against the library, without
torch: struct sizes, the host loss and the f64 entry point against a float64
reference written here, and errors that name the argument."""

import ctypes
import math
import random
import unittest

import kdfuse
from kdfuse import _lib


def reference_row(s, t, tau, divergence, beta):
    """τ²·D(p‖q) of one row in float64, p = softmax(t/τ), q = softmax(s/τ)."""
    def log_softmax(x):
        x = [v / tau for v in x]
        m = max(x)
        z = math.log(sum(math.exp(v - m) for v in x)) + m
        return [v - z for v in x]

    lp, lq = log_softmax(t), log_softmax(s)
    if divergence == "forward-kl":
        d = sum(math.exp(a) * (a - b) for a, b in zip(lp, lq))
    elif divergence == "reverse-kl":
        d = sum(math.exp(b) * (b - a) for a, b in zip(lp, lq))
    elif divergence == "tvd":
        d = 0.5 * sum(abs(math.exp(a) - math.exp(b)) for a, b in zip(lp, lq))
    elif divergence == "soft-ce":
        d = -sum(math.exp(a) * b for a, b in zip(lp, lq))
    else:
        lm = [math.log(beta * math.exp(a) + (1 - beta) * math.exp(b)) for a, b in zip(lp, lq)]
        d = (beta * sum(math.exp(a) * (a - m) for a, m in zip(lp, lm))
             + (1 - beta) * sum(math.exp(b) * (b - m) for b, m in zip(lq, lm)))
    return tau * tau * d


class TestLibrary(unittest.TestCase):
    def run_host(self, s, t, n, v, params, f64, want_grad=True):
        ctype = ctypes.c_double if f64 else ctypes.c_float
        code = _lib.DTYPE_CODES["float64" if f64 else "float32"]
        b = _lib.new_batch(n, v, code)
        sa, ta = (ctype * (n * v))(*s), (ctype * (n * v))(*t)
        ga = (ctype * (n * v))()
        loss = ctype(float("nan"))
        b.student, b.teacher = ctypes.addressof(sa), ctypes.addressof(ta)
        if want_grad:
            b.grad = ctypes.addressof(ga)
        b.loss = ctypes.addressof(loss)
        lib = _lib.load_library()
        fn = lib.kdfuse_compute_host_f64 if f64 else lib.kdfuse_compute_host
        _lib.check(fn(ctypes.byref(b), ctypes.byref(params)))
        return loss.value, list(ga)

    def test_struct_sizes_match_the_library(self):
        lib = _lib.load_library()
        p = _lib.Params()
        self.assertEqual(lib.kdfuse_params_default(ctypes.byref(p)), 0)
        self.assertEqual((p.size, p.version), (ctypes.sizeof(_lib.Params), _lib.ABI_VERSION))
        b = _lib.Batch()
        self.assertEqual(lib.kdfuse_batch_init(ctypes.byref(b), 3, 7, 0), 0)
        self.assertEqual((b.size, b.rows, b.cols), (ctypes.sizeof(_lib.Batch), 3, 7))

    def test_info(self):
        info = kdfuse.info()
        self.assertEqual(info["library"], kdfuse.__version__)
        self.assertEqual(info["abi_version"], _lib.ABI_VERSION)

    def test_host_and_f64_losses_match_the_reference(self):
        rng = random.Random(4)
        n, v = 3, 11
        for divergence in _lib.DIVERGENCES:
            s = [rng.gauss(0, 2) for _ in range(n * v)]
            t = [rng.gauss(0, 2) for _ in range(n * v)]
            p = _lib.make_params(_lib.DIVERGENCES[divergence], _lib.C_BATCHMEAN, beta=0.3
                                 if divergence == "jsd" else 0.5, temperature=1.7)
            want = sum(reference_row(s[r * v:(r + 1) * v], t[r * v:(r + 1) * v], 1.7,
                                     divergence, 0.3) for r in range(n)) / n
            got32, g32 = self.run_host(s, t, n, v, p, f64=False)
            got64, g64 = self.run_host(s, t, n, v, p, f64=True)
            self.assertAlmostEqual(got32 / want, 1.0, delta=1e-5, msg=divergence)
            self.assertAlmostEqual(got64 / want, 1.0, delta=1e-12, msg=divergence)
            # The f64 gradient against central differences of the f64 loss.
            if divergence != "tvd":
                h = 1e-6
                for j in (0, 5, 17):
                    up, dn = list(s), list(s)
                    up[j] += h
                    dn[j] -= h
                    fd = (self.run_host(up, t, n, v, p, True, False)[0]
                          - self.run_host(dn, t, n, v, p, True, False)[0]) / (2 * h)
                    self.assertAlmostEqual(g64[j], fd, delta=1e-7, msg=divergence)
                    self.assertAlmostEqual(g32[j], fd, delta=1e-5, msg=divergence)

    def test_errors_name_the_argument(self):
        p = _lib.make_params(0, _lib.C_BATCHMEAN, temperature=-1.0)
        with self.assertRaisesRegex(kdfuse.KdfuseArgumentError, "temperature"):
            self.run_host([1.0, 2.0], [2.0, 1.0], 1, 2, p, f64=True)
        p = _lib.make_params(0, _lib.C_BATCHMEAN)
        b = _lib.new_batch(1, 2, 0)  # an f32 batch given to the f64 entry point
        x = (ctypes.c_double * 2)(1.0, 2.0)
        loss = ctypes.c_double()
        b.student = b.teacher = ctypes.addressof(x)
        b.loss = ctypes.addressof(loss)
        lib = _lib.load_library()
        with self.assertRaisesRegex(kdfuse.KdfuseArgumentError, "batch.dtype"):
            _lib.check(lib.kdfuse_compute_host_f64(ctypes.byref(b), ctypes.byref(p)))
        b.dtype = b.grad_dtype = 3  # f64 given to the f32 entry point
        with self.assertRaisesRegex(kdfuse.KdfuseArgumentError, "kdfuse_compute_host_f64"):
            _lib.check(lib.kdfuse_compute_host(ctypes.byref(b), ctypes.byref(p)))


if __name__ == "__main__":
    unittest.main()
