"""Run a test worker script on 2 CPU processes with torchrun (gloo), as the DDP tests do."""

import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: Path, *args: str, nproc: int = 2, env: dict | None = None):
    "Launch `script` on `nproc` local processes; return the finished `CompletedProcess`."
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def sharded_loss_and_grads(fn, *inputs):
    """Inside a worker: give `fn` this rank's contiguous share of each full-batch input; return
    the loss averaged over the ranks and each input's gradient in batch order, divided by the world
    size (DDP's averaging of gradients undoes that), to compare with one process on the whole."""
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    n = inputs[0].shape[0] // world
    parts = [x[rank * n : (rank + 1) * n].clone().requires_grad_() for x in inputs]
    loss = fn(*parts)
    loss.backward()
    mean_loss = loss.detach().clone().reshape(1)
    dist.all_reduce(mean_loss)
    grads = []
    for p in parts:
        pieces = [torch.zeros_like(p.grad) for _ in range(world)]
        dist.all_gather(pieces, p.grad.contiguous())
        grads.append(torch.cat(pieces) / world)
    return mean_loss / world, grads
