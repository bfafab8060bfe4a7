"""Train SimCLR, MoCo, BYOL and DINO with the active profile's budget (quick by default) on the same
data, then print one table: pretraining time, linear probe with 1 and `labels_per_class` labels per
class, and kNN accuracy with 100 labels per class, next to randomly initialised encoders. Nothing is
asserted.

    python bench/compare_methods.py                     # quick profile, ~5 min on 2 CPU cores
    SSL_COURSE_PROFILE=full python bench/compare_methods.py --device cuda
    python bench/compare_methods.py --scale 0.1         # 10% of the steps (a smoke run)
"""

import argparse
import time


from ssl_course.backbones import build_backbone
from ssl_course.vit import vit_tiny
from ssl_course.cli import format_table, load_chapter_modules
from ssl_course.core import get_device, get_settings, hardware_summary, seed_everything
from ssl_course.data import load_dataset, sample_per_class
from ssl_course.evaluate import embed, knn_accuracy, linear_probe
from ssl_course.train import build_method, fit


def evaluate(encoder, train, test, ks, device):
    fte, yte = embed(encoder, test, device=device)
    row = {}
    for k in ks:
        lab = sample_per_class(train.labels, k, seed=0)
        row[f"probe {k}/class"] = linear_probe(
            *embed(encoder, train.subset(lab), device=device), fte, yte, C=0.1
        ).accuracy
    lab = sample_per_class(train.labels, 100, seed=0)
    row["kNN 100/class"] = knn_accuracy(
        *embed(encoder, train.subset(lab), device=device), fte, yte, k=20
    )
    return row


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default=None)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--methods", default="simclr,moco,byol,dino")
    a = p.parse_args()
    s = get_settings()
    b = s.budget
    dev = get_device(a.device or s.device)
    load_chapter_modules()
    train = load_dataset(
        b.dataset, "train", max_items=b.max_train_images or None, image_size=b.image_size
    )
    test = load_dataset(
        b.dataset, "test", max_items=b.max_test_images or None, image_size=b.image_size
    )
    ks = (1, b.labels_per_class)
    print(
        f"# {hardware_summary(dev)}; profile {s.profile}; "
        f"{b.dataset} {len(train)} train / {len(test)} test"
    )
    rows = []
    for name in a.methods.split(","):
        seed_everything(s.seed)
        if name == "dino":
            enc = vit_tiny(train.channels, train.image_size)
            extra = {"out_dim": b.dino_out_dim, "n_local": b.dino_local_crops}
        else:
            enc = build_backbone(b.backbone, train.channels)
            extra = (
                {"queue_size": b.moco_queue, "momentum": b.moco_momentum}
                if name == "moco"
                else {"base_momentum": b.byol_momentum}
                if name == "byol"
                else {"temperature": b.simclr_temperature}
            )
        model = build_method(
            name, enc, image_size=train.image_size, channels=train.channels, **extra
        )
        length = b.length(name)
        if "steps" in length:
            length["steps"] = max(2, int(length["steps"] * a.scale))
        t0 = time.perf_counter()
        fit(
            model,
            train.without_labels(),
            **length,
            batch_size=b[f"{name}_batch_size"],
            lr=b[f"{name}_lr"],
            weight_decay=0.04 if name == "dino" else b.weight_decay,
            grad_clip=3.0 if name == "dino" else None,
            device=dev,
            progress=False,
        )
        rows.append(
            {
                "method": name,
                "encoder": type(enc).__name__,
                **length,
                "seconds": round(time.perf_counter() - t0, 1),
                **evaluate(model.encoder, train, test, ks, dev),
            }
        )
    for label, enc in (
        ("random CNN", build_backbone(b.backbone, train.channels)),
        ("random ViT", vit_tiny(train.channels, train.image_size)),
    ):
        rows.append(
            {"method": label, "encoder": type(enc).__name__, **evaluate(enc, train, test, ks, dev)}
        )
    print(format_table(rows))


if __name__ == "__main__":
    main()
