"""Choose a zoo recipe's settings on a validation split, never on the test set.

Each variant is the registered recipe with some fields changed (longer runs, other batch sizes,
temperatures, queue sizes, gradient clipping). The variants train side by side, one process each,
on one device; each is then scored on a fixed validation split of the training pool (500 images
per class held out; kNN with the other 55,000 labels, linear probe at 1 and 10 labels/class over
3 draws; DINO also the [CLS] attention ratio). The best variant of each recipe (sum of the three
validation accuracies) is copied into `<out>/zoo` and evaluated there by the zoo protocol
(`ssl-course zoo evaluate`, the test set for the first time).

With `--budget-s`, a variant's step count is set from its own measured speed while all variants
run together (steps/s x budget, rounded down to 500), so the runs fit a fixed wall-clock window.

    python bench/recipe_search.py --device cuda --out /tmp/search --budget-s 300 \
        --variants bench/recipe_variants.json
"""

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from ssl_course import zoo
from ssl_course.core import get_device, hardware_summary
from ssl_course.data import sample_per_class
from ssl_course.evaluate import embed, knn_accuracy
from ssl_course.train import _autocast, make_optimizer


def validation_split(y: torch.Tensor, per_class: int = 500, seed: int = 1234):
    "Indices of a stratified validation split of the pool and of the rest (the kNN memory)."
    val = sample_per_class(y, per_class, seed=seed)
    mask = torch.ones(len(y), dtype=torch.bool)
    mask[val] = False
    return val, mask.nonzero().squeeze(1)


def measure_speed(recipe, pool, dev, steps: int = 30) -> float:
    "Steps per second of the recipe's real training step (after 5 warm-up steps)."
    model = zoo.build_model(recipe, channels=pool.channels).to(dev).train()
    opt = make_optimizer(model, recipe.optimizer, recipe.lr, recipe.weight_decay)
    g = torch.Generator().manual_seed(0)
    for step in range(steps + 5):
        if step == 5:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        idx = torch.randint(0, len(pool), (recipe.batch_size,), generator=g)
        x = (pool.images[idx].float() / 255).to(dev)
        with _autocast(dev, "auto"):
            out = model.training_step((x, torch.full((len(x),), -1, device=dev)))
        loss = out["loss"] if isinstance(out, dict) else out
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - t0)


def measure_fit_speed(recipe, pool, dev, steps: int = 120) -> float:
    """Steps per second of `fit` itself (data loading, augmentation, logging included), start-up
    counted in: a conservative figure."""
    from ssl_course.train import fit

    model = zoo.build_model(recipe, channels=pool.channels)
    t0 = time.perf_counter()
    fit(
        model,
        pool.without_labels(),
        steps=steps,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        device=dev,
        seed=0,
        num_workers=0,
        progress=False,
        grad_clip=recipe.grad_clip,
    )
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - t0)


def worker(a):
    "Train one variant into its own zoo folder, then score it on the validation split."
    dev = get_device(a.device)
    spec = json.loads(a.worker)
    base = zoo.get_recipe(spec["recipe"])
    over = dict(spec.get("overrides", {}))
    recipe = dataclasses.replace(base, **over)
    vdir = Path(a.out) / "variants" / spec["variant"]
    vdir.mkdir(parents=True, exist_ok=True)
    log = {"variant": spec["variant"], "recipe": base.name, "overrides": over}
    pool = zoo._training_data(recipe, max_items=a.max_items or None)
    if a.budget_s:
        sps = (
            measure_fit_speed(recipe, pool, dev)
            if a.fit_speed
            else measure_speed(recipe, pool, dev)
        )
        steps = int(sps * a.budget_s // 500 * 500)
        steps = max(spec.get("min_steps", 1000), min(spec.get("max_steps", 30000), steps))
        log.update(measured_steps_per_s=round(sps, 2), steps=steps)
        recipe = dataclasses.replace(recipe, steps=steps)
    zoo.RECIPES[base.name] = recipe
    for f in Path(a.zoo_src).glob("baselines-*.json"):
        shutil.copy(f, vdir / f.name)
    t0 = time.perf_counter()
    card = zoo.train_recipe(
        base.name,
        device=dev,
        zoo=vdir,
        progress=False,
        run_dir=vdir / "run",
        max_items=a.max_items or None,
    )
    shutil.rmtree(vdir / "run", ignore_errors=True)
    log["train_s"] = round(time.perf_counter() - t0, 1)
    log["last_loss"] = card["training"]["last_loss"]
    enc = zoo.load_pretrained(base.name, vdir, device=dev)
    feats, y = embed(enc, pool, device=dev)
    val, mem = validation_split(y, a.val_per_class)
    log["val_knn"] = knn_accuracy(feats[mem], y[mem], feats[val], y[val], k=20, temperature=0.07)
    curve = zoo.probe_curve(feats[mem], y[mem], feats[val], y[val], (1, 10), (0, 1, 2))
    log["val_probe_1"], log["val_probe_10"] = curve["1"]["mean"], curve["10"]["mean"]
    if recipe.backbone.startswith("vit"):
        x = (pool.images[val[:1000]].float() / 255).to(dev)
        log["val_attention_ratio"] = zoo.object_attention_ratio(enc, x)
    log["val_score"] = log["val_knn"] + log["val_probe_1"] + log["val_probe_10"]
    log["hardware"] = hardware_summary(dev)
    (vdir / "val.json").write_text(json.dumps(log, indent=1))
    print(json.dumps(log), flush=True)


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True)
    p.add_argument("--variants", default="bench/recipe_variants.json")
    p.add_argument("--budget-s", type=float, default=0.0, help="training window per variant")
    p.add_argument("--threads", type=int, default=2, help="CPU threads per variant process")
    p.add_argument("--zoo-src", default="zoo", help="where the baselines files are read from")
    p.add_argument("--no-evaluate", action="store_true", help="skip the test-set evaluation")
    p.add_argument("--max-items", type=int, default=0, help="smoke runs: a smaller pool")
    p.add_argument("--val-per-class", type=int, default=500)
    p.add_argument(
        "--fit-speed", action="store_true", help="set steps from fit's own speed (safer)"
    )
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    specs = json.loads(Path(a.variants).read_text())
    out = Path(a.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "PYTHONUNBUFFERED": "1"}
    procs = []
    t0 = time.perf_counter()
    for s in specs:
        cmd = [sys.executable, __file__, "--device", a.device, "--out", a.out]
        cmd += ["--budget-s", str(a.budget_s), "--zoo-src", a.zoo_src]
        cmd += ["--max-items", str(a.max_items), "--val-per-class", str(a.val_per_class)]
        cmd += ["--fit-speed"] if a.fit_speed else []
        cmd += ["--worker", json.dumps(s)]
        logf = open(out / "logs" / f"{s['variant']}.log", "w")
        procs.append((s, subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)))
    for s, pr in procs:
        rc = pr.wait()
        print(f"# {s['variant']}: exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
    results = []
    for s in specs:
        f = out / "variants" / s["variant"] / "val.json"
        if f.is_file():
            results.append(json.loads(f.read_text()))
    keys = ["variant", "steps", "train_s", "last_loss", "val_knn", "val_probe_1", "val_probe_10"]
    for r in results:
        print(" | ".join(f"{k}={r.get(k)}" for k in keys), r.get("val_attention_ratio", ""))
    best = {}
    for r in results:
        if r["recipe"] not in best or r["val_score"] > best[r["recipe"]]["val_score"]:
            best[r["recipe"]] = r
    (out / "chosen.json").write_text(json.dumps(best, indent=1))
    zdir = out / "zoo"
    zdir.mkdir(exist_ok=True)
    for name, r in best.items():
        vdir = out / "variants" / r["variant"]
        for f in vdir.iterdir():
            if f.is_file() and f.name != "val.json":
                shutil.copy(f, zdir / f.name)
        print(f"# chosen for {name}: {r['variant']} (validation score {r['val_score']:.4f})")
        if a.no_evaluate:
            continue
        spec = next(s for s in specs if s["variant"] == r["variant"])
        over = {**spec.get("overrides", {}), "steps": r.get("steps", zoo.get_recipe(name).steps)}
        zoo.RECIPES[name] = dataclasses.replace(zoo.get_recipe(name), **over)
        t1 = time.perf_counter()
        zoo.evaluate_recipe(name, device=a.device, zoo=zdir, verbose=True)
        print(f"# evaluated {name} in {time.perf_counter() - t1:.0f} s", flush=True)
    print(f"# all done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
