"""Launched by test_infomax.py with `torchrun --nproc_per_node 2`: each rank holds half of a fixed
batch of local and global features, computes the JSD and InfoNCE losses (which gather the local
features, so the negatives are the whole batch's) and their gradients; rank 0 saves the loss
(averaged over ranks) and both ranks' gradients (divided by the world size) in batch order."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from _torchrun import sharded_loss_and_grads

from ssl_course.infomax import infonce_mi_loss, jsd_mi_loss

dist.init_process_group("gloo")
rank = dist.get_rank()
g = torch.Generator().manual_seed(7)
local, glob = torch.randn(8, 5, 3, generator=g), torch.randn(8, 5, generator=g)
out = {}
for name, fn in (("jsd", jsd_mi_loss), ("infonce", infonce_mi_loss)):
    loss, (gl, gg) = sharded_loss_and_grads(fn, local, glob)
    out[f"{name}_loss"], out[f"{name}_grad_local"], out[f"{name}_grad_global"] = loss, gl, gg
if rank == 0:
    save_file(out, str(Path(sys.argv[1]) / "ddp.safetensors"))
dist.destroy_process_group()
