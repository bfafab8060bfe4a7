"""Training speed of every zoo recipe: steps/s and images/s of its real training step
(its method, encoder, batch and optimiser) on the chosen device, and the wall time its full recipe
would take at that speed.
Prints a table; nothing is asserted. Measure with nothing else running.

    python bench/zoo_train_speed.py  # CPU, every image recipe, 5 timed steps each
    python bench/zoo_train_speed.py --device cuda --steps 30
    python bench/zoo_train_speed.py --recipes simclr-fmnist-cnn,mae-fmnist-vit
"""

import argparse
import time

import torch

from ssl_course import zoo
from ssl_course.cli import format_table
from ssl_course.core import get_device, hardware_summary
from ssl_course.train import _autocast, make_optimizer


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument(
        "--recipes", default="", help="comma-separated names (default: every image recipe)"
    )
    a = p.parse_args()
    dev = get_device(a.device)
    names = (
        a.recipes.split(",")
        if a.recipes
        else [r.name for r in zoo.list_recipes() if r.protocol == "image"]
    )
    pool = zoo._training_data(zoo.get_recipe(names[0]), max_items=4096)
    print(f"# {hardware_summary(dev)}; {a.steps} timed steps after 2 warm-up steps")
    rows = []
    for name in names:
        r = zoo.get_recipe(name)
        if r.protocol != "image":
            print(f"# {name}: {r.protocol} recipe, skipped (time it with `ssl-course zoo train`)")
            continue
        model = zoo.build_model(r, channels=pool.channels).to(dev).train()
        opt = make_optimizer(model, r.optimizer, r.lr, r.weight_decay)
        g = torch.Generator().manual_seed(0)
        for step in range(a.steps + 2):
            if step == 2:
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            idx = torch.randint(0, len(pool), (r.batch_size,), generator=g)
            x = (pool.images[idx].float() / 255).to(dev)
            with _autocast(dev, "auto"):
                out = model.training_step((x, torch.full((len(x),), -1, device=dev)))
            loss = out["loss"] if isinstance(out, dict) else out
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if hasattr(model, "on_step_end"):
                model.on_step_end(step, r.steps)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        sps = a.steps / (time.perf_counter() - t0)
        rows.append(
            {
                "recipe": name,
                "batch": r.batch_size,
                "steps/s": round(sps, 2),
                "images/s": round(sps * r.batch_size),
                "recipe steps": r.steps,
                "full recipe (min)": round(r.steps / sps / 60, 1),
            }
        )
    print(format_table(rows))
    print(
        f"all image recipes: {sum(x['full recipe (min)'] for x in rows):.0f} min of training "
        f"at these speeds"
    )


if __name__ == "__main__":
    main()
