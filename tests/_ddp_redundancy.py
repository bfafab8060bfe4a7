"""Launched by test_redundancy.py with `torchrun --nproc_per_node 2`: each rank holds half of a
fixed batch of embeddings, computes the Barlow Twins and VICReg losses (which gather the batch)
and their gradients; rank 0 saves the loss (averaged over ranks) and both ranks' gradients
(divided by the world size) in the order of the whole batch."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from ssl_course.redundancy import barlow_twins_loss, vicreg_loss

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
g = torch.Generator().manual_seed(7)
z1, z2 = torch.randn(12, 5, generator=g), torch.randn(12, 5, generator=g)
n = 12 // world
out = {}
for name, fn in (("barlow", barlow_twins_loss), ("vicreg", vicreg_loss)):
    a = z1[rank * n : (rank + 1) * n].clone().requires_grad_()
    b = z2[rank * n : (rank + 1) * n].clone().requires_grad_()
    loss = fn(a, b)
    loss.backward()
    mean_loss = loss.detach().clone().reshape(1)
    dist.all_reduce(mean_loss)
    grads = []
    for t in (a.grad, b.grad):
        parts = [torch.zeros_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        grads.append(torch.cat(parts) / world)
    out[f"{name}_loss"] = mean_loss / world
    out[f"{name}_grad1"], out[f"{name}_grad2"] = grads
if rank == 0:
    save_file(out, str(Path(sys.argv[1]) / "ddp.safetensors"))
dist.destroy_process_group()
