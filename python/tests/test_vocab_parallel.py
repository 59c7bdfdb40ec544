"""Vocab-parallel distillation over torch.distributed with gloo on the CPU:
world sizes 1 to 4, each rank a separate process (vp_worker.py), every rank
comparing its loss and its shard's gradients with the unsharded f64 loss;
a failing rank must end the run (never hang it); and the README's torchrun
example prints the unsharded loss.
"""

import os
import pathlib
import subprocess
import sys
import tempfile
import time
import unittest

import torch

import kdfuse.torch as kt

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent
# A rank that fails makes the others time out in gloo after 30 s (the
# worker's process-group timeout); the whole run is killed after this.
RUN_TIMEOUT = 240


def spawn(world, *extra, limit=RUN_TIMEOUT, pg_timeout=30, device="cpu"):
    """Runs `world` ranks of vp_worker.py, killing what is left after `limit`
    seconds; returns (exit codes, outputs, seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        rdzv = os.path.join(tmp, "rendezvous")
        env = dict(os.environ, OMP_NUM_THREADS="1", RAYON_NUM_THREADS="1",
                   VP_TIMEOUT=str(pg_timeout), VP_DEVICE=device)
        procs = [subprocess.Popen([sys.executable, str(HERE / "vp_worker.py"), str(r),
                                   str(world), rdzv, *extra],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env=env)
                 for r in range(world)]
        start = time.monotonic()
        outs, codes = [], []
        for p in procs:
            left = max(0.1, limit - (time.monotonic() - start))
            try:
                out, _ = p.communicate(timeout=left)
            except subprocess.TimeoutExpired:
                p.kill()
                out, _ = p.communicate()
                out += "\n[killed: still running after the time limit]"
            outs.append(out)
            codes.append(p.returncode)
        return codes, outs, time.monotonic() - start


class VocabParallelGloo(unittest.TestCase):
    def check_world(self, world):
        codes, outs, secs = spawn(world)
        text = "\n".join(outs)
        self.assertEqual(codes, [0] * world, text[-4000:])
        for r in range(world):
            self.assertIn(f"rank {r}/{world}:", text)
        # The log shows the ranks ran (unittest -v prints this to stderr).
        ok = [line for line in text.splitlines() if "cases ok" in line]
        print(f"\n  gloo world {world}: {'; '.join(ok)} ({secs:.1f} s)", file=sys.stderr)

    def test_world_1(self):
        self.check_world(1)

    def test_world_2(self):
        self.check_world(2)

    def test_world_3(self):
        self.check_world(3)

    def test_world_4(self):
        self.check_world(4)

    def test_a_failing_rank_ends_the_run(self):
        codes, outs, secs = spawn(3, "fail")
        self.assertNotEqual(codes[1], 0)
        self.assertIn("vocab_start must be an int", outs[1])
        # The other ranks stop at gloo's timeout instead of hanging.
        self.assertTrue(all(c != 0 for c in codes), codes)
        self.assertLess(secs, RUN_TIMEOUT)
        print(f"\n  a failing rank ended the run in {secs:.1f} s: exit codes {codes}",
              file=sys.stderr)


    def test_a_hung_rank_ends_the_run(self):
        # Rank 1 sleeps; the others give up at the process group's timeout
        # (5 s here), the sleeper is killed at the limit: the run fails in
        # bounded time.
        codes, outs, secs = spawn(3, "hang", limit=25, pg_timeout=5)
        self.assertTrue(all(c != 0 for c in codes), codes)
        self.assertIn("killed", outs[1])
        self.assertLess(secs, 40)
        print(f"\n  a hung rank ended the run in {secs:.1f} s: exit codes {codes}",
              file=sys.stderr)


REQUIRE_GPU = os.environ.get("KDFUSE_REQUIRE_GPU") == "1"
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


@unittest.skipUnless(GPUS or REQUIRE_GPU, "no CUDA GPU visible to torch: the NCCL path of "
                     "vocab_parallel_distill_loss is not tested here")
class VocabParallelNccl(unittest.TestCase):
    """The same cases on CUDA tensors over NCCL: world 1, and every GPU of the
    machine (up to 4) when it has more than one."""

    def test_nccl(self):
        self.assertGreater(GPUS, 0, "KDFUSE_REQUIRE_GPU=1 but torch sees no GPU")
        for world in sorted({1, min(GPUS, 4)}):
            codes, outs, secs = spawn(world, device="cuda")
            text = "\n".join(outs)
            self.assertEqual(codes, [0] * world, text[-4000:])
            ok = [line for line in text.splitlines() if "cases ok" in line]
            print(f"\n  nccl world {world}: {'; '.join(ok)} ({secs:.1f} s)", file=sys.stderr)


class VocabParallelSingleProcess(unittest.TestCase):
    """Without a process group the call is a world of one."""

    def test_world_of_one_equals_distill_loss(self):
        g = torch.Generator().manual_seed(3)
        s = torch.randn(4, 33, generator=g, requires_grad=True)
        t = torch.randn(4, 33, generator=g)
        s2 = s.detach().clone().requires_grad_()
        for d in ("forward-kl", "tvd"):
            a = kt.vocab_parallel_distill_loss(s, t, None, 0, divergence=d, temperature=2.0)
            b = kt.distill_loss(s2, t, divergence=d, temperature=2.0, precision="exact")
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
            a.backward()
            b.backward()
            torch.testing.assert_close(s.grad, s2.grad, rtol=1e-5, atol=1e-7)
            s.grad = s2.grad = None

    def test_bad_arguments_raise(self):
        s = torch.zeros(2, 4)
        cases = [
            (dict(vocab_start=-1), "vocab_start"),
            (dict(vocab_size=0), "vocab_size"),
            (dict(divergence="kl"), "divergence"),
        ]
        for kwargs, word in cases:
            with self.assertRaises((ValueError, TypeError)) as cm:
                kt.vocab_parallel_distill_loss(s, s, None, **kwargs)
            self.assertIn(word, str(cm.exception))
        with self.assertRaisesRegex(ValueError, "teacher_logits"):
            kt.vocab_parallel_distill_loss(s, None)
        with self.assertRaisesRegex(ValueError, "float32, bfloat16 or float16"):
            kt.vocab_parallel_distill_loss(s.double(), s.double())
        with self.assertRaisesRegex(ValueError, "labels"):
            kt.vocab_parallel_distill_loss(s, s, torch.tensor([0, 9]), 0, vocab_size=4)

    def test_collectives(self):
        self.assertEqual(kt.vocab_parallel_collectives("forward-kl"), 1)
        self.assertEqual(kt.vocab_parallel_collectives("jsd", beta=0.5), 2)
        self.assertEqual(kt.vocab_parallel_collectives("tvd", alpha=1.0), 1)


class VocabParallelExample(unittest.TestCase):
    """The README's example, as the README runs it (torchrun, 2 ranks, gloo)."""

    def test_torchrun_example_prints_the_unsharded_loss(self):
        example = ROOT / "python" / "examples" / "vocab_parallel.py"
        out = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone",
             "--nproc-per-node", "2", str(example)],
            capture_output=True, text=True, timeout=RUN_TIMEOUT,
            env=dict(os.environ, OMP_NUM_THREADS="1"))
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
        lines = [line for line in out.stdout.splitlines() if "loss" in line]
        self.assertTrue(any("matches" in line for line in lines), out.stdout)
        print("\n  " + "\n  ".join(lines), file=sys.stderr)


if __name__ == "__main__":
    unittest.main()
