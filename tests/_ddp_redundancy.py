"""Launched by test_redundancy.py with `torchrun --nproc_per_node 2`: each rank holds half of a
fixed batch of embeddings, computes the Barlow Twins and VICReg losses (which gather the batch)
and their gradients; rank 0 saves the loss (averaged over ranks) and both ranks' gradients
(divided by the world size) in the order of the whole batch."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from _torchrun import sharded_loss_and_grads

from ssl_course.redundancy import barlow_twins_loss, vicreg_loss

dist.init_process_group("gloo")
rank = dist.get_rank()
g = torch.Generator().manual_seed(7)
z1, z2 = torch.randn(12, 5, generator=g), torch.randn(12, 5, generator=g)
out = {}
for name, fn in (("barlow", barlow_twins_loss), ("vicreg", vicreg_loss)):
    out[f"{name}_loss"], (out[f"{name}_grad1"], out[f"{name}_grad2"]) = sharded_loss_and_grads(
        fn, z1, z2
    )
if rank == 0:
    save_file(out, str(Path(sys.argv[1]) / "ddp.safetensors"))
dist.destroy_process_group()
