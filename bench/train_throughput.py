r"""Training throughput of the course's loop: images/s and peak memory per method
(SimCLR, MoCo, BYOL, DINO) and backbone, and the overhead of `fit()` against a bare PyTorch loop
doing the same work.
Prints a table; nothing is asserted.

    python bench/train_throughput.py                       # CPU, quick sizes, SimCLR on both CNNs
    python bench/train_throughput.py --methods simclr,moco,byol,dino --backbones small_cnn
    python bench/train_throughput.py --device cuda --steps 50 --batch-size 512 \
        --image-size 32 --channels 3
"""

import argparse
import time

import torch

from ssl_course.backbones import build_backbone
from ssl_course.core import get_device, hardware_summary
from ssl_course.data import ImageDataset
from ssl_course.cli import load_chapter_modules
from ssl_course.train import _autocast, build_method, fit, make_optimizer


def fake_images(n, channels, size):
    g = torch.Generator().manual_seed(0)
    return ImageDataset(
        torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g), None
    )


def bare_loop(model, data, steps, batch, lr, device, amp):
    "The same work as fit() with nothing around it: the reference for the loop's overhead."
    model.to(device).train()
    opt = make_optimizer(model, "adamw", lr)
    x_all = data.images
    t0 = None
    for step in range(steps + 2):
        if step == 2:  # skip warm-up steps (allocator, cuDNN autotuning)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        idx = torch.randint(0, len(x_all), (batch,))
        x = (x_all[idx].float() / 255).to(device)
        with _autocast(device, amp):
            loss = model.training_step((x, None))["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if hasattr(model, "on_step_end"):
            model.on_step_end(step, steps + 2)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument(
        "--backbones",
        default="small_cnn,resnet18_cifar",
        help="for the CNN methods; DINO uses vit_tiny",
    )
    p.add_argument("--methods", default="simclr")
    p.add_argument("--amp", default="auto")
    a = p.parse_args()
    dev = get_device(a.device)
    load_chapter_modules()
    print(
        f"# {hardware_summary(dev)}; batch {a.batch_size}, "
        f"{a.channels}x{a.image_size}px, amp={a.amp}"
    )
    data = fake_images(max(4 * a.batch_size, 1024), a.channels, a.image_size)
    rows = []
    for method in a.methods.split(","):
        for name in ["vit_tiny"] if method == "dino" else a.backbones.split(","):
            kw = {"image_size": a.image_size} if name == "vit_tiny" else {}
            make = lambda: build_method(
                method,
                build_backbone(name, a.channels, **kw),
                image_size=a.image_size,
                channels=a.channels,
            )
            steps = (
                a.steps
                if not (name == "resnet18_cifar" and dev.type == "cpu")
                else max(2, a.steps // 5)
            )
            torch.manual_seed(0)
            bare = bare_loop(make(), data, steps, a.batch_size, 1e-3, dev, a.amp)
            torch.manual_seed(0)
            m = make()
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            fit(
                m, data, steps=2, batch_size=a.batch_size, device=dev, progress=False, amp=a.amp
            )  # warm-up
            h = fit(
                m, data, steps=steps, batch_size=a.batch_size, device=dev, progress=False, amp=a.amp
            )
            ips = h.steps_per_s * a.batch_size
            mem = (
                f"{torch.cuda.max_memory_allocated(dev) / 2**30:.2f}" if dev.type == "cuda" else "-"
            )
            rows.append(
                (
                    method,
                    name,
                    steps,
                    f"{bare:,.0f}",
                    f"{ips:,.0f}",
                    f"{100 * (bare / ips - 1):+.1f}%",
                    mem,
                )
            )
    hdr = (
        "method",
        "backbone",
        "steps",
        "bare loop img/s",
        "fit() img/s",
        "fit overhead",
        "peak GiB",
    )
    w = [max(len(str(r[i])) for r in rows + [hdr]) for i in range(len(hdr))]
    for r in [hdr, tuple("-" * x for x in w)] + rows:
        print("  ".join(str(v).ljust(x) for v, x in zip(r, w)))


if __name__ == "__main__":
    main()
