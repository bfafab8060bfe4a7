"""Launched by test_infomax.py with `torchrun --nproc_per_node 2`: each rank holds half of a fixed
batch of local and global features, computes the JSD and InfoNCE losses (which gather the local
features, so the negatives are the whole batch's) and their gradients; rank 0 saves the loss
(averaged over ranks) and both ranks' gradients (divided by the world size) in batch order."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from ssl_course.infomax import infonce_mi_loss, jsd_mi_loss

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
g = torch.Generator().manual_seed(7)
local, glob = torch.randn(8, 5, 3, generator=g), torch.randn(8, 5, generator=g)
n = 8 // world
out = {}
for name, fn in (("jsd", jsd_mi_loss), ("infonce", infonce_mi_loss)):
    a = local[rank * n : (rank + 1) * n].clone().requires_grad_()
    b = glob[rank * n : (rank + 1) * n].clone().requires_grad_()
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
    out[f"{name}_grad_local"], out[f"{name}_grad_global"] = grads
if rank == 0:
    save_file(out, str(Path(sys.argv[1]) / "ddp.safetensors"))
dist.destroy_process_group()
