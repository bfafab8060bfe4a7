"""Launched by test_train.py with `torchrun --nproc_per_node 2`: trains the toy methods of
`_toy_methods` under DDP (gloo, CPU) and rank 0 saves the final weights."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from _toy_methods import make_data, make_method  # noqa: E402
from ssl_course.train import fit, get_rank  # noqa: E402

out = Path(sys.argv[1])
for kind in ("regression", "ntxent"):
    torch.manual_seed(0)
    method = make_method(kind)
    hist = fit(
        method,
        make_data(kind),
        steps=6,
        batch_size=8,
        lr=0.1,
        optimizer="sgd",
        warmup=0,
        device="cpu",
        seed=0,
        progress=False,
    )
    if get_rank() == 0:
        save_file(
            {k: v.contiguous() for k, v in method.state_dict().items()},
            str(out / f"{kind}.safetensors"),
        )
        (out / f"{kind}.loss").write_text(repr(hist["loss"]))

# DINO's center and MoCo's queue see the *global* batch: each rank passes its half.
from ssl_course.dino import update_center  # noqa: E402
from ssl_course.moco import FeatureQueue  # noqa: E402

g = torch.Generator().manual_seed(5)
teacher = [torch.randn(8, 6, generator=g) for _ in range(2)]
keys = torch.randn(8, 4, generator=g)
r = get_rank()
center = update_center(torch.zeros(1, 6), [t[4 * r : 4 * r + 4] for t in teacher], 0.9)
queue = FeatureQueue(10, 4)
queue.queue.zero_()
queue.enqueue(keys[4 * r : 4 * r + 4])
queue.enqueue(keys[4 * r : 4 * r + 4])
if r == 0:
    save_file(
        {"center": center, "queue": queue.queue, "ptr": queue.ptr.reshape(1)},
        str(out / "state.safetensors"),
    )
dist.destroy_process_group()
