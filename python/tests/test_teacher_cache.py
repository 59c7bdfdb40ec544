"""kdfuse.teacher_cache (pure Python, numpy): reads the cache `kdfuse
teacher-cache build` wrote (fixtures/teacher_cache_rust), writes one that
reads back (the Rust reader reads fixtures/teacher_cache_py, written by this
module: cli/tests/cli/teacher_cache.rs), batches, appends, bad input."""

import json
import os
import shutil
import tempfile
import unittest

import numpy as np

from kdfuse.teacher_cache import TeacherCache, TeacherCacheError, TeacherCacheWriter

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
K, V, N = 5, 40, 10


def fixture_logits():
    """The logits both fixtures were built from: [10, 40], many ties."""
    r = np.arange(N)[:, None]
    c = np.arange(V)[None, :]
    return (((r * 7 + c * 13) % 17) * 0.5 - 4).astype(np.float32)


def reference_topk(x, k):
    """Values descending, ties by the lower index; lse in float64."""
    idx = np.argsort(-x, axis=1, kind="stable")[:, :k].astype(np.int32)
    val = np.take_along_axis(x, idx, 1)
    m = x.max(1, keepdims=True).astype(np.float64)
    lse = (m[:, 0] + np.log(np.exp(x.astype(np.float64) - m).sum(1))).astype(np.float32)
    return idx, val, lse


def bf16(x):
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    u = (u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return u.view(np.float32)


class TeacherCacheTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp()

    def tearDown(self):
        shutil.rmtree(self.tmp)

    def test_reads_the_rust_written_cache(self):
        cache = TeacherCache(os.path.join(FIXTURES, "teacher_cache_rust"))
        self.assertEqual((cache.total_rows, cache.k), (N, K))
        self.assertEqual(cache.meta["values_dtype"], "bf16")
        self.assertEqual(len(cache.index["shards"]), 3)
        idx, val, lse = reference_topk(fixture_logits(), K)
        got_idx, got_val, got_lse = cache.read_rows(0, N)
        np.testing.assert_array_equal(got_idx, idx)
        np.testing.assert_array_equal(got_val, bf16(val))
        np.testing.assert_allclose(got_lse, lse, rtol=0, atol=1e-5)
        # A range across shards is the slice of the whole.
        part = cache.read_rows(3, 9)
        np.testing.assert_array_equal(part[0], idx[3:9])
        np.testing.assert_array_equal(part[2], got_lse[3:9])

    def test_batches(self):
        cache = TeacherCache(os.path.join(FIXTURES, "teacher_cache_rust"))
        batches = list(cache.batches(3))
        self.assertEqual([b[0].shape for b in batches], [(3, K), (3, K), (3, K), (1, K)])
        np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), cache.read_rows(0, N)[0])
        self.assertEqual([b[1].shape[0] for b in cache.batches(4, start=2, end=9)], [4, 3])
        with self.assertRaises(TeacherCacheError):
            list(cache.batches(0))

    def test_torch_tensors_in_and_out(self):
        try:
            import torch
        except ImportError:
            self.skipTest("torch is not installed")
        cache = TeacherCache(os.path.join(FIXTURES, "teacher_cache_rust"))
        idx, val, lse = cache.read_rows(2, 6, torch=True)
        self.assertEqual((idx.dtype, val.dtype, lse.dtype), (torch.int32, torch.float32, torch.float32))
        self.assertEqual(tuple(idx.shape), (4, K))
        out = os.path.join(self.tmp, "t")
        with TeacherCacheWriter(out, k=K, vocab_size=V, with_lse=True) as w:
            w.push(idx, val, lse)
        back = TeacherCache(out).read_rows(0, 4, torch=True)
        for a, b in zip(back, (idx, val, lse)):
            self.assertTrue(torch.equal(a, b))

    def test_python_fixture_is_what_this_writer_writes(self):
        """fixtures/teacher_cache_py (read by the Rust tests) holds the
        log-probs of the fixture logits, as written by TeacherCacheWriter."""
        cache = TeacherCache(os.path.join(FIXTURES, "teacher_cache_py"))
        idx, val, lse = reference_topk(fixture_logits(), K)
        got_idx, got_val, got_lse = cache.read_rows(0, N)
        np.testing.assert_array_equal(got_idx, idx)
        np.testing.assert_array_equal(got_lse, lse)
        np.testing.assert_array_equal(got_val, val - lse[:, None])

    def test_write_read_append_round_trip(self):
        x = np.random.default_rng(0).standard_normal((23, 64)).astype(np.float32)
        idx, val, _ = reference_topk(x, 8)
        out = os.path.join(self.tmp, "c")
        with TeacherCacheWriter(out, k=8, vocab_size=64, values_dtype="bf16", shard_rows=5) as w:
            w.push(idx[:12], val[:12])
            w.push(idx[12:20], val[12:20])
        with TeacherCacheWriter(out, k=8, vocab_size=64, values_dtype="bf16", shard_rows=5, append=True) as w:
            w.push(idx[20:], val[20:])
        cache = TeacherCache(out)
        self.assertEqual(cache.total_rows, 23)
        self.assertEqual([s["end"] for s in cache.index["shards"]], [5, 10, 15, 20, 23])
        got_idx, got_val, lse = cache.read_rows(0, 23)
        self.assertIsNone(lse)
        np.testing.assert_array_equal(got_idx, idx)
        np.testing.assert_array_equal(got_val, bf16(val))
        self.assertFalse([n for n in os.listdir(out) if n.endswith(".tmp")])

    def test_bad_input(self):
        out = os.path.join(self.tmp, "c")
        with self.assertRaisesRegex(TeacherCacheError, "k = 9"):
            TeacherCacheWriter(out, k=9, vocab_size=8)
        w = TeacherCacheWriter(out, k=2, vocab_size=8)
        with self.assertRaisesRegex(TeacherCacheError, "outside"):
            w.push(np.array([[0, 8]]), np.zeros((1, 2)))
        with self.assertRaisesRegex(TeacherCacheError, "lse"):
            w.push(np.array([[0, 1]]), np.zeros((1, 2)), lse=np.zeros(1))
        w.push(np.array([[0, 1]]), np.zeros((1, 2)))
        w.close()
        with self.assertRaisesRegex(TeacherCacheError, "already holds"):
            TeacherCacheWriter(out, k=2, vocab_size=8)
        with self.assertRaisesRegex(TeacherCacheError, "differs"):
            TeacherCacheWriter(out, k=2, vocab_size=8, values_dtype="bf16", append=True)
        cache = TeacherCache(out)
        with self.assertRaisesRegex(TeacherCacheError, "not within"):
            cache.read_rows(0, 2)
        shard = os.path.join(out, "shard-00000.safetensors")
        with open(shard, "rb") as f:
            data = f.read()
        with open(shard, "wb") as f:
            f.write(data[:-1])
        with self.assertRaisesRegex(TeacherCacheError, "truncated"):
            TeacherCache(out)
        index = os.path.join(out, "teacher_cache.index.json")
        with open(index, "w") as f:
            json.dump({"format": "other"}, f)
        with self.assertRaisesRegex(TeacherCacheError, "format"):
            TeacherCache(out)
        with self.assertRaisesRegex(TeacherCacheError, "cannot read"):
            TeacherCache(os.path.join(self.tmp, "nowhere"))


if __name__ == "__main__":
    unittest.main()
