"""Vocab-parallel distillation on the CPU with gloo: each rank holds a slice
of the vocabulary, and the loss equals the unsharded one.

    torchrun --standalone --nproc-per-node 2 python/examples/vocab_parallel.py

Rank 0 prints the sharded and the unsharded loss; every rank checks its
shard's gradient against the unsharded gradient's columns.
"""

import torch
import torch.distributed as dist

import kdfuse.torch as kt

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()

torch.manual_seed(0)  # the same batch on every rank
n, v = 8, 1003
student = torch.randn(n, v)
teacher = 0.8 * student + torch.randn(n, v)
labels = torch.randint(0, v, (n,))
opts = dict(divergence="jsd", beta=0.5, temperature=2.0, alpha=0.5)

# Megatron's layout: contiguous shards, the last one shorter.
per = -(-v // world)
lo, hi = rank * per, min(v, (rank + 1) * per)
shard = student[:, lo:hi].clone().requires_grad_()
loss = kt.vocab_parallel_distill_loss(shard, teacher[:, lo:hi], labels, lo, **opts)
loss.backward()

full = student.clone().requires_grad_()
reference = kt.distill_loss(full, teacher, labels, precision="exact", **opts)
reference.backward()
same = torch.allclose(loss, reference, rtol=1e-5) and torch.allclose(
    shard.grad, full.grad[:, lo:hi], rtol=1e-4, atol=1e-7)
if rank == 0:
    print(f"sharded loss {loss.item():.6f} on {world} ranks, unsharded loss "
          f"{reference.item():.6f}: {'matches' if same else 'DIFFERS'}")
dist.barrier()  # no rank tears its connections down while another still uses them
dist.destroy_process_group()
raise SystemExit(0 if same else 1)
