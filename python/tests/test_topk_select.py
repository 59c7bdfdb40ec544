"""Tests of kdfuse.torch.topk_teacher (the C entry points
kdfuse_topk_select_host and, on CUDA tensors, kdfuse_topk_select_cuda):
against torch.topk and torch.logsumexp, the tie rule, strides and leading
dimensions, and errors that name the argument."""

import os
import unittest

import torch

import kdfuse
import kdfuse.torch as kt

HAVE_CUDA = torch.cuda.is_available() or os.environ.get("KDFUSE_REQUIRE_GPU") == "1"


class TopkTeacher(unittest.TestCase):
    def test_matches_torch_topk_every_dtype(self):
        g = torch.Generator().manual_seed(3)
        x = torch.randn(2, 3, 5001, generator=g) * 4
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            xd = x.to(dtype)
            for k in (1, 64, 1000):
                values, indices, lse = kt.topk_teacher(xd, k, with_lse=True)
                self.assertEqual(values.shape, (2, 3, k))
                self.assertEqual(indices.dtype, torch.int32)
                self.assertEqual(values.dtype, torch.float32)
                want = torch.topk(xd.float(), k, dim=-1)
                # Values exactly; indices equal where the values are distinct.
                self.assertTrue(torch.equal(values, want.values))
                self.assertTrue(torch.equal(xd.float().gather(-1, indices.long()), values))
                if dtype == torch.float32:
                    self.assertTrue(torch.equal(indices.long(), want.indices))
                ref = torch.logsumexp(xd.double(), dim=-1).float()
                torch.testing.assert_close(lse, ref, rtol=1e-5, atol=1e-5)

    def test_ties_go_to_the_lower_index_and_strides(self):
        x = torch.tensor([[1.0, 3.0, 2.0, 3.0, -float("inf"), 2.0, 9.0]])
        # A strided view: every other column of a wider tensor.
        wide = torch.zeros(1, 14)
        wide[:, ::2] = x
        view = wide[:, ::2]
        for t in (x, view, x.t().contiguous().t()):
            values, indices = kt.topk_teacher(t, 5)
            self.assertEqual(indices.tolist(), [[6, 1, 3, 2, 5]])
            self.assertEqual(values.tolist(), [[9.0, 3.0, 3.0, 2.0, 2.0]])
        values, indices, lse = kt.topk_teacher(torch.full((2, 3), -float("inf")), 3, True)
        self.assertEqual(indices.tolist(), [[0, 1, 2], [0, 1, 2]])
        self.assertEqual(lse.tolist(), [-float("inf")] * 2)

    def test_errors_name_the_argument(self):
        x = torch.randn(4, 10)
        with self.assertRaisesRegex(kdfuse.KdfuseArgumentError, "`k`"):
            kt.topk_teacher(x, 11)
        with self.assertRaisesRegex(kdfuse.KdfuseArgumentError, "`k`"):
            kt.topk_teacher(x, 0)
        with self.assertRaisesRegex(kdfuse.KdfuseArgumentError, "`k`"):
            kt.topk_teacher(x, -2)
        y = x.clone()
        y[2, 5] = float("nan")
        with self.assertRaisesRegex(kdfuse.KdfuseArgumentError, "row 2 contains NaN"):
            kt.topk_teacher(y, 3)
        with self.assertRaisesRegex(ValueError, "float32, bfloat16 or float16"):
            kt.topk_teacher(x.double(), 3)
        with self.assertRaisesRegex(TypeError, "k must be an int"):
            kt.topk_teacher(x, 3.0)
        with self.assertRaisesRegex(ValueError, "CPU or CUDA tensor"):
            kt.topk_teacher(torch.empty(2, 3, device="meta"), 1)

    def test_empty_batch(self):
        values, indices, lse = kt.topk_teacher(torch.randn(0, 7), 7, with_lse=True)
        self.assertEqual(values.shape, (0, 7))
        self.assertEqual(lse.shape, (0,))


@unittest.skipUnless(HAVE_CUDA, "no CUDA device (torch.cuda.is_available() is False)")
class TopkTeacherCuda(unittest.TestCase):
    def test_matches_the_cpu_selection(self):
        g = torch.Generator().manual_seed(5)
        x = torch.randn(3, 4, 20001, generator=g) * 4
        x[0, 1, 7] = x[0, 1, 9] = x[0, 1].max() + 1  # a tie: the lower index first
        x[1, 2, :] = -float("inf")
        x[2, 0, 3] = float("inf")
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            xd = x.to(dtype)
            for k in (1, 128, 2048):
                cpu = kt.topk_teacher(xd, k, with_lse=True)
                dev = kt.topk_teacher(xd.cuda(), k, with_lse=True)
                self.assertTrue(all(t.device.type == "cuda" for t in dev))
                self.assertTrue(torch.equal(dev[0].cpu(), cpu[0]))
                self.assertTrue(torch.equal(dev[1].cpu(), cpu[1]))
                torch.testing.assert_close(dev[2].cpu(), cpu[2], rtol=1e-5, atol=1e-5)
        # Strided rows, and no lse.
        view = x.cuda()[:, :, ::2]
        values, indices = kt.topk_teacher(view, 16)
        want = kt.topk_teacher(x[:, :, ::2], 16)
        self.assertTrue(torch.equal(values.cpu(), want[0]))
        self.assertTrue(torch.equal(indices.cpu(), want[1]))

    def test_errors_name_the_argument(self):
        x = torch.randn(5, 100, device="cuda")
        with self.assertRaisesRegex(kdfuse.KdfuseArgumentError, "`k`"):
            kt.topk_teacher(x, 101)
        y = x.clone()
        y[3, 50] = float("nan")
        y[4, 0] = float("nan")
        with self.assertRaisesRegex(kdfuse.KdfuseArgumentError, "row 3 contains NaN"):
            kt.topk_teacher(y, 3)
        values, indices = kt.topk_teacher(torch.randn(0, 7, device="cuda"), 7)
        self.assertEqual(values.shape, (0, 7))


if __name__ == "__main__":
    unittest.main()
