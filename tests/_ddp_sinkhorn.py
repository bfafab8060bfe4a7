"""Launched by test_clustering.py with `torchrun --nproc_per_node 2`: each rank holds half of a
fixed batch of prototype scores and computes SwAV's Sinkhorn codes (whose sums run over every
process); rank 0 saves both ranks' codes in the order of the whole batch."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from ssl_course.clustering import sinkhorn_knopp

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
g = torch.Generator().manual_seed(3)
scores = torch.rand(24, 7, generator=g) * 2 - 1
scores[rank * 12 : (rank + 1) * 12] += rank * 0.3  # the two halves differ: the shift must be shared
n = 24 // world
q = sinkhorn_knopp(scores[rank * n : (rank + 1) * n].contiguous())
parts = [torch.zeros_like(q) for _ in range(world)]
dist.all_gather(parts, q.contiguous())
if rank == 0:
    save_file({"codes": torch.cat(parts)}, str(Path(sys.argv[1]) / "codes.safetensors"))
dist.destroy_process_group()
