"""Tests for the transfer-learning chapters 20-23: transfer, finetune, label_efficiency,
case_studies."""

import json
import math

import pytest
import torch

from ssl_course.backbones import build_backbone
from ssl_course.case_studies import (
    average_precision,
    defect_split,
    detection_metrics,
    knn_anomaly_scores,
    make_defects,
    mix_datasets,
    noise_images,
    oversample,
)
from ssl_course.cli import load_chapter_modules, run_pretrain
from ssl_course.data import DataError, ImageDataset, load_dataset
from ssl_course.evaluate import label_efficiency_curve, summarize_curve
from ssl_course.finetune import FineTuner, fine_tune_layers, layer_ids
from ssl_course.label_efficiency import label_multiplier, labels_needed, supervised_steps
from ssl_course.train import METHODS, CheckpointError
from ssl_course.transfer import (
    infer_architecture,
    load_backbone,
    mlp_probe,
    normalize_features,
    train_probe,
)
from ssl_course.vit import vit_tiny

load_chapter_modules()
IMAGE_METHODS = sorted(m.name for m in METHODS.values() if m.modality == "image")


# ----------------------------------------------------------- load_backbone round trip, every method
@pytest.fixture(scope="module")
def pretrain_runs(tmp_path_factory):
    "One `ssl-course pretrain` run (1 step, digits) per registered image method."
    root = tmp_path_factory.mktemp("pretrain")
    runs = {}
    for name in IMAGE_METHODS:
        out = root / name
        # colorization needs colour images; run_pretrain's kNN check needs >= 100 labelled images
        # per class
        data, chans, n = ("colour_shapes", 3, 2000) if name == "colorization" else ("digits", 1, 0)
        run_pretrain(
            name,
            dataset=data,
            steps=1,
            batch_size=32,
            train_images=n,
            out_dir=out,
            progress=False,
            verbose=False,
        )
        runs[name] = (out, chans)
    return runs


@pytest.mark.parametrize("method", IMAGE_METHODS)
def test_load_backbone_round_trip(pretrain_runs, method):
    from safetensors.torch import load_file

    out, chans = pretrain_runs[method]
    enc = load_backbone(out)
    saved = load_file(str(out / "encoder.safetensors"))
    sd = enc.state_dict()
    for k, v in saved.items():
        assert torch.equal(sd[k], v), k
    x = torch.rand(3, chans, 28, 28)
    f1, f2 = enc(x), load_backbone(out / "encoder.safetensors", method=method)(x)
    assert f1.ndim == 2 and f1.shape[0] == 3 and torch.isfinite(f1).all()
    assert torch.allclose(f1, f2)


def test_load_backbone_from_training_checkpoint(pretrain_runs):
    """The step-* checkpoint (whole method, prefix 'encoder.') gives the same encoder as
    encoder.safetensors."""
    out = pretrain_runs["simclr"][0]
    a, b = load_backbone(out), load_backbone(out / "checkpoints", method="simclr")
    x = torch.rand(2, 1, 28, 28)
    assert torch.allclose(a(x), b(x))


def test_load_backbone_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_backbone(tmp_path / "missing")
    (tmp_path / "w.pt").write_bytes(b"not a pickle you should open")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_backbone(tmp_path / "w.pt")
    from safetensors.torch import save_model

    enc = build_backbone("small_cnn", in_channels=1)
    save_model(enc, str(tmp_path / "encoder.safetensors"))
    with pytest.raises(CheckpointError, match="method"):
        load_backbone(tmp_path)  # no report.json
    (tmp_path / "report.json").write_text(json.dumps({"method": "mlm"}))
    with pytest.raises(CheckpointError, match="encoder="):
        load_backbone(tmp_path)  # text method: pass encoder=
    assert load_backbone(tmp_path, encoder=build_backbone("small_cnn", in_channels=1)) is not None
    with pytest.raises(CheckpointError, match="does not fit"):
        load_backbone(tmp_path, encoder=build_backbone("small_cnn", in_channels=1, width=16))


def test_infer_architecture():
    assert infer_architecture(
        build_backbone("small_cnn", in_channels=3, width=16).state_dict()
    ) == {"backbone": "small_cnn", "channels": 3, "width": 16}
    a = infer_architecture(vit_tiny(1, 28).state_dict())
    assert (
        a["backbone"] == "vit"
        and a["image_size"] == 28
        and a["depth"] == 4
        and a["patch_size"] == 4
    )


# ---------------------------------------------------------------- probes
def test_normalize_uses_train_statistics_only():
    a, b = torch.randn(40, 4) * 3 + 1, torch.randn(10, 4)
    na, nb = normalize_features(a, b)
    na2, nb2 = normalize_features(a, b * 1000)
    mu, sd = a.mean(0), a.std(0, unbiased=False)
    assert torch.allclose(na, na2) and torch.allclose(nb2, (b * 1000 - mu) / sd, atol=1e-3)
    with pytest.raises(ValueError):
        normalize_features(a, b, "bogus")


def test_mlp_probe_solves_xor_linear_does_not():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 2, generator=g)
    y = ((x[:, 0] > 0) ^ (x[:, 1] > 0)).long()
    assert train_probe(x[:400], y[:400], x[400:], y[400:]).accuracy < 0.75
    assert (
        mlp_probe(x[:400], y[:400], x[400:], y[400:], hidden=32, steps=500, lr=0.02).accuracy > 0.9
    )
    with pytest.raises(DataError, match="unlabelled"):
        train_probe(x[:4], torch.tensor([0, 1, -1, 0]), x, y)


# ---------------------------------------------------------------- fine-tuning
def test_layerwise_scales_and_freezing():
    ft = FineTuner(
        build_backbone("small_cnn", in_channels=1), 10, backbone_lr_scale=0.1, layer_decay=0.5
    )
    assert [g["lr_scale"] for g in ft.param_groups()] == pytest.approx([1.0, 0.025, 0.05, 0.1])
    ids, n = layer_ids(vit_tiny(1, 28))
    assert (
        n == 6
        and ids["pos_embed"] == 0
        and ids["blocks.0.norm1.weight"] == 1
        and ids["norm.bias"] == 5
    )
    part = FineTuner(build_backbone("small_cnn", in_channels=1), 10, trainable_layers=1).train()
    assert not part.encoder.features[0][1].training and part.encoder.features[4][1].training
    with pytest.raises(ValueError, match="layer_decay"):
        FineTuner(build_backbone("small_cnn"), 10, layer_decay=0)


def test_fine_tune_layers_learns_and_keeps_frozen_weights():
    tr = load_dataset("digits", "train", image_size=28)
    te = load_dataset("digits", "test", image_size=28)
    enc = build_backbone("small_cnn", in_channels=1)
    w0 = enc.features[0][0].weight.clone()
    r = fine_tune_layers(
        enc,
        tr,
        te,
        steps=80,
        batch_size=64,
        lr=1e-2,
        backbone_lr_scale=1.0,
        trainable_layers=2,
        head_norm=True,
    )
    assert r.accuracy > 0.25  # 10 classes: chance is 0.1
    assert torch.equal(
        r.model.encoder.features[0][0].weight, w0
    )  # the frozen bottom layer did not move
    assert torch.equal(
        enc.features[0][0].weight, w0
    )  # the caller's encoder is untouched (a copy trained)


# ---------------------------------------------------------------- label efficiency
def test_label_multiplier_known_answer():
    ks = [1, 10, 100, 1000]
    summary = [
        {"method": "sup", "labels_per_class": k, "mean": 0.5 + 0.1 * math.log10(k)} for k in ks
    ]
    summary += [
        {"method": "ssl", "labels_per_class": 1, "mean": 0.6},
        {"method": "ssl", "labels_per_class": 10, "mean": 0.8},
    ]
    m = label_multiplier(summary, "ssl", "sup", 1)
    assert m["relation"] == "=" and m["multiplier"] == pytest.approx(10.0)
    assert label_multiplier(summary, "ssl", "sup", 10)["multiplier"] == pytest.approx(100.0)
    assert labels_needed(ks, [0.5, 0.6, 0.7, 0.8], 0.9) == (1000.0, ">=")
    assert labels_needed(ks, [0.5, 0.6, 0.7, 0.8], 0.3) == (1.0, "<=")
    with pytest.raises(ValueError, match="no measurement"):
        label_multiplier(summary, "ssl", "sup", 5)


def test_label_curve_on_a_toy_problem_with_known_answer():
    """Evaluators whose accuracy is a known function of the labelled set: the curve and the
    multiplier recover it."""
    labels = torch.arange(10).repeat(200)  # 10 classes x 200 items
    seen = []

    def sup(idx, seed):
        seen.append(idx)
        return 0.5 + 0.1 * math.log10(len(idx) / 10)

    def ssl(idx, seed):
        return 0.6 + 0.1 * math.log10(len(idx) / 10)  # = sup with 10x the labels

    rows = label_efficiency_curve(labels, {"sup": sup, "ssl": ssl}, [1, 10, 100], seeds=[0, 1])
    summ = summarize_curve(rows)
    assert all(r["std"] == 0 for r in summ)
    assert label_multiplier(summ, "ssl", "sup", 1)["multiplier"] == pytest.approx(10.0)
    for idx in seen:  # k per class, distinct, inside the training set
        assert len(idx.unique()) == len(idx) and idx.max() < len(labels)
        assert torch.bincount(labels[idx]).unique().numel() == 1


def test_supervised_steps_clipped():
    assert supervised_steps(10, 64, 10, 30, 60) == 30
    assert supervised_steps(6000, 128, 15, 100, 400) == 400
    assert supervised_steps(1000, 100, 15, 100, 400) == 150


# ---------------------------------------------------------------- case studies
def test_detection_metrics_hand_built():
    m = detection_metrics(
        [1, 1, 0, 0, 0, 1], [1, 0, 1, 0, 0, 1], scores=[0.9, 0.2, 0.8, 0.1, 0.3, 0.7]
    )
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (2, 1, 1, 2)
    assert (
        m["precision"] == pytest.approx(2 / 3)
        and m["recall"] == pytest.approx(2 / 3)
        and m["fpr"] == pytest.approx(1 / 3)
    )
    assert m["average_precision"] == pytest.approx(
        (1 + 2 / 3 + 3 / 5) / 3
    )  # positives at ranks 1, 3, 5
    assert detection_metrics([0, 0], [0, 0]) == {
        "precision": 0.0,
        "recall": 0.0,
        "fpr": 0.0,
        "tp": 0,
        "fp": 0,
        "fn": 0,
        "tn": 2,
    }
    with pytest.raises(ValueError, match="length"):
        detection_metrics([0, 1], [0])
    with pytest.raises(ValueError, match="positive"):
        average_precision([0, 0], [0.1, 0.2])


def _toy_images(n, seed, value=120):
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, 28, 28, dtype=torch.uint8)
    x[:, :, 6:22, 6:22] = value + torch.randint(
        0, 100, (n, 1, 16, 16), generator=g, dtype=torch.uint8
    )
    return ImageDataset(x, torch.arange(n) % 10, name="toy", split="train")


def test_defect_split_never_leaks_and_defects_change_pixels():
    tr, te = _toy_images(600, 0), _toy_images(300, 1)
    te.split = "test"
    s = defect_split(tr, te, defect_rate=0.05, n_defect_labels=5, n_normal_labels=20, n_test=200)
    assert int(s.labelled.labels.sum()) == 5 and len(s.labelled) == 25
    assert set(s.source_idx["labelled"].tolist()) <= set(s.source_idx["pool"].tolist())
    assert (
        s.source_idx["test"].max() < len(te)
        and len(s.test) == 200
        and int(s.test.labels.sum()) == 10
    )
    assert not s.pool.is_labeled  # the pool's labels are hidden
    # test images come from the test set only: every non-defective test image is one of te's images
    normal = s.test.images[s.test.labels == 0]
    te_set = {bytes(x.numpy().tobytes()) for x in te.images}
    assert all(bytes(x.numpy().tobytes()) in te_set for x in normal)
    tr_set = {bytes(x.numpy().tobytes()) for x in tr.images}
    assert not any(bytes(x.numpy().tobytes()) in tr_set for x in normal)
    d = make_defects(tr.images[:20], seed=0)
    changed = (d != tr.images[:20]).flatten(1).float().mean(1)
    assert (changed > 0).all() and (changed < 0.1).all()  # small, local defects
    with pytest.raises(DataError, match="only"):
        defect_split(tr, te, 0.01, 50, 20)


def test_oversample_anomaly_and_piles():
    y = torch.tensor([0] * 10 + [1] * 2)
    idx = oversample(y)
    assert torch.bincount(y[idx]).tolist() == [10, 10]
    normal = torch.tensor([[1.0, 0.0], [0.9, 0.1]])
    s = knn_anomaly_scores(normal, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert s[0] < 1e-6 and s[1] > 0.8
    mix = mix_datasets(_toy_images(100, 0), noise_images(100), 0.5, 80)
    assert len(mix) == 80 and not mix.is_labeled
