"""SimSiam (chapter 14b): the loss against the official code's formula and closed forms, the
stop-gradient, the network of the official builder, the fixed-rate predictor, bad input, and real
training - the loss falls with the stop-gradient and collapses without it."""

import math
import warnings

import pytest
import torch
import torch.nn as nn

from ssl_course.backbones import SmallConvNet
from ssl_course.data import ImageDataset, load_dataset
from ssl_course.evaluate import CollapseMonitor, CollapseWarning
from ssl_course.simsiam import build_simsiam, negative_cosine, output_std, simsiam_loss
from ssl_course.train import METHODS, Callback, fit

from conftest import needs_fashion


def official(p1, p2, z1, z2):
    "facebookresearch/simsiam main_simsiam.py: -(cos(p1, z2).mean() + cos(p2, z1).mean()) * 0.5."
    cos = nn.CosineSimilarity(dim=1)
    return -(cos(p1, z2.detach()).mean() + cos(p2, z1.detach()).mean()) * 0.5


def test_loss_equals_the_official_formula_and_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    p1, p2, z1, z2 = torch.randn(4, 16, 32, generator=g)
    got = simsiam_loss(p1, p2, z1, z2)
    assert torch.allclose(got, official(p1, p2, z1, z2), atol=1e-6)
    loop = 0.0
    for a, b in ((p1, z2), (p2, z1)):
        for u, v in zip(a.tolist(), b.tolist()):
            dot = sum(x * y for x, y in zip(u, v))
            nu, nv = math.sqrt(sum(x * x for x in u)), math.sqrt(sum(y * y for y in v))
            loop -= dot / (nu * nv) / len(a) / 2
    assert abs(got.item() - loop) < 1e-5


def test_closed_forms_and_symmetry():
    g = torch.Generator().manual_seed(1)
    p = torch.randn(32, 8, generator=g)
    assert negative_cosine(p, 5 * p).item() == pytest.approx(-1.0, abs=1e-6)
    assert negative_cosine(p, -0.5 * p).item() == pytest.approx(1.0, abs=1e-6)
    e = torch.eye(6)
    assert negative_cosine(e[:3], e[3:]).item() == pytest.approx(0.0, abs=1e-7)
    p1, p2, z1, z2 = torch.randn(4, 10, 8, generator=g)
    # swapping the two views leaves the symmetrised loss unchanged; scaling a vector does too
    assert torch.allclose(simsiam_loss(p1, p2, z1, z2), simsiam_loss(p2, p1, z2, z1))
    assert torch.allclose(simsiam_loss(p1, p2, z1, z2), simsiam_loss(3 * p1, p2, z1, 0.1 * z2))


def test_stop_gradient_keeps_the_target_out_of_the_graph():
    g = torch.Generator().manual_seed(2)
    p = torch.randn(8, 5, generator=g, requires_grad=True)
    z = torch.randn(8, 5, generator=g, requires_grad=True)
    simsiam_loss(p, p, z, z).backward()
    assert z.grad is None and p.grad.abs().sum() > 0
    p.grad = None
    simsiam_loss(p, p, z, z, stop_gradient=False).backward()
    assert z.grad.abs().sum() > 0


def test_output_std_closed_forms():
    g = torch.Generator().manual_seed(3)
    for d in (16, 256):
        u = torch.randn(20000, d, generator=g)
        assert output_std(u) == pytest.approx(d**-0.5, rel=0.02)  # uniform on the sphere
    assert output_std(torch.ones(10, 4) * 7) == 0.0  # collapsed
    with pytest.raises(ValueError, match="at least 2"):
        output_std(torch.ones(1, 4))


def test_the_network_is_the_official_builders():
    m = build_simsiam(SmallConvNet(1, width=8), dim=64, pred_dim=16)
    kinds = [type(mod).__name__ for mod in m.projector]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear", "BatchNorm1d"]
    assert [mod.bias is None for mod in m.projector if isinstance(mod, nn.Linear)] == [True] * 3
    assert not m.projector[-1].affine and m.projector[1].affine
    assert [type(mod).__name__ for mod in m.predictor] == [
        "Linear",
        "BatchNorm1d",
        "ReLU",
        "Linear",
    ]
    assert m.predictor[0].bias is None and m.predictor[-1].bias is not None
    assert (m.predictor[0].in_features, m.predictor[0].out_features) == (64, 16)
    assert build_simsiam(SmallConvNet(1, width=8), dim=64).predictor[0].out_features == 16  # D/4
    assert "2011.10566" in METHODS["simsiam"].paper


def test_bad_input_gets_a_clear_error():
    with pytest.raises(ValueError, match="same shape"):
        negative_cosine(torch.ones(4, 3), torch.ones(4, 2))
    with pytest.raises(ValueError, match="diverged"):
        negative_cosine(torch.full((2, 3), float("nan")), torch.ones(2, 3))
    with pytest.raises(ValueError, match="at least 2 images"):
        build_simsiam(SmallConvNet(1, width=8), dim=32).training_step((torch.rand(1, 1, 28, 28),))
    for kw in ({"dim": 0}, {"pred_dim": -4}, {"hidden_dim": 2.5}, {"dim": True}):
        with pytest.raises(ValueError, match="positive integer width"):
            build_simsiam(SmallConvNet(1, width=8), **kw)


def test_fit_keeps_the_predictor_at_a_fixed_learning_rate():
    class LRs(Callback):
        rows: list = []

        def on_step_end(self, trainer, logs):
            self.rows.append([g["lr"] for g in trainer.optimizer.param_groups])

    torch.manual_seed(0)
    data = ImageDataset(torch.randint(0, 255, (64, 1, 28, 28), dtype=torch.uint8), None, "t")
    for fix in (True, False):
        m, cb = build_simsiam(SmallConvNet(1, width=8), dim=32, fix_pred_lr=fix), LRs()
        cb.rows = []
        fit(m, data, steps=6, batch_size=16, lr=0.05, optimizer="sgd", warmup=0.0,
            callbacks=[cb], progress=False)  # fmt: skip
        body, pred = zip(*cb.rows)
        assert body[0] == 0.05 and body[-1] < 0.05  # cosine decay
        assert (set(pred) == {0.05}) == fix and (pred == body) != fix


def test_loss_falls_in_50_real_steps():
    tr = load_dataset("digits", "train", image_size=28)
    torch.manual_seed(0)
    m = build_simsiam(SmallConvNet(1, width=16), dim=256)
    h = fit(m, tr.without_labels(), steps=50, batch_size=64, lr=1e-3, progress=False, device="cpu")
    first, last = sum(h["loss"][:5]) / 5, sum(h["loss"][-5:]) / 5
    assert last < first - 0.2, (first, last)  # measured: about 0.0 -> -0.5


def projections(m, x):
    "Projector outputs with batch norm on its running statistics (no side effect on training)."
    m.projector.eval()
    z = m.projector(m.encoder(x))
    m.projector.train()
    return z


@needs_fashion
def test_without_stop_gradient_the_monitor_catches_dimensional_collapse():
    "Chapter 14b's claim: same seed and data, only the detach() differs."
    tr = load_dataset("fashion_mnist", "train", image_size=28, max_items=12000)
    x = tr.images[:256].float() / 255
    res = {}
    for sg in (True, False):
        torch.manual_seed(0)
        m = build_simsiam(SmallConvNet(1, width=32), dim=1024, stop_gradient=sg)
        mon = CollapseMonitor(x, every=20, min_rank=8, feature_fn=projections)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", CollapseWarning)
            h = fit(m, tr.without_labels(), steps=60, batch_size=64, lr=1e-3, progress=False,
                    device="cpu", callbacks=[mon])  # fmt: skip
        warned = [w for w in caught if issubclass(w.category, CollapseWarning)]
        res[sg] = (h["loss"][-1], mon, warned)
    # measured: effective rank of the projections about 19 with the stop-gradient, 4 without
    loss_sg, mon_sg, warned_sg = res[True]
    loss_no, mon_no, warned_no = res[False]
    assert not mon_sg.collapsed and not warned_sg
    assert mon_no.collapsed and mon_no.kind == "dimensional" and len(warned_no) == 1
    assert "dimensional collapse" in str(warned_no[0].message)
    assert mon_no.results[-1][2] < 0.5 * mon_sg.results[-1][2] and loss_no < loss_sg


def test_collapse_monitor_min_rank_is_checked():
    with pytest.raises(ValueError, match="min_rank"):
        CollapseMonitor(torch.zeros(4, 1, 28, 28), min_rank=0)
