"""Deep InfoMax (chapter 14d): the JSD and InfoNCE estimators against slow re-derivations and closed
forms, the dot-product critic, the MI encoders, what the method feeds them, clear errors, and
losses that fall on real images."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from _torchrun import torchrun

from ssl_course.backbones import SmallConvNet
from ssl_course.data import load_dataset
from ssl_course.infomax import (
    MIEncoder,
    DeepInfoMax,
    build_infomax,
    dim_scores,
    infonce_mi_loss,
    jsd_mi_loss,
)
from ssl_course.train import METHODS, fit
from ssl_course.vit import vit_tiny

HERE = Path(__file__).parent


def _pair(n=5, d=6, L=4, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, L, generator=g) * scale, torch.randn(n, d, generator=g) * scale


def slow_jsd(local, glob):
    "The f-GAN JSD bound written out pair by pair (Hjelm et al. 2019 eq. 4, official log-2 shifts)."
    n, _, L = local.shape
    pos, neg = [], []
    for i in range(n):
        for j in range(n):
            for l in range(L):
                t = float(glob[i] @ local[j, :, l])
                sp = lambda v: math.log1p(math.exp(v))
                if i == j:
                    pos.append(math.log(2) - sp(-t))
                else:
                    neg.append(sp(t) - math.log(2))
    return sum(neg) / len(neg) - sum(pos) / len(pos)


def slow_infonce(local, glob):
    "For each (i, l): the positive T(i,i,l) against T(i,j,l') for every j != i and every l'."
    n, _, L = local.shape
    total = 0.0
    for i in range(n):
        negs = [float(glob[i] @ local[j, :, m]) for j in range(n) if j != i for m in range(L)]
        for l in range(L):
            p = float(glob[i] @ local[i, :, l])
            logits = torch.tensor([p] + negs, dtype=torch.float64)
            total += -float(torch.log_softmax(logits, 0)[0])
    return total / (n * L)


def test_scores_are_dot_products():
    local, glob = _pair()
    u = dim_scores(local, glob)
    assert u.shape == (5, 5, 4)
    torch.testing.assert_close(u[2, 3, 1], glob[2] @ local[3, :, 1])


def test_jsd_equals_slow_derivation_and_closed_forms():
    local, glob = _pair()
    assert jsd_mi_loss(local, glob).item() == pytest.approx(slow_jsd(local, glob), rel=1e-5)
    assert jsd_mi_loss(torch.zeros(4, 3, 2), torch.zeros(4, 3)).item() == pytest.approx(
        0.0, abs=1e-7
    )
    # positives far above, negatives far below: the bound reaches the JSD's maximum 2 log 2
    glob = torch.eye(4) * 30
    local = (torch.eye(4) * 2 - 1)[:, :, None].expand(4, 4, 3)  # +1 own channel, -1 others
    assert jsd_mi_loss(local, glob).item() == pytest.approx(-2 * math.log(2), abs=1e-6)


def test_infonce_equals_slow_derivation_and_closed_forms():
    local, glob = _pair(n=4, L=3)
    assert infonce_mi_loss(local, glob).item() == pytest.approx(slow_infonce(local, glob), rel=1e-5)
    n, L = 6, 5  # equal scores: every candidate equally likely, loss = log K
    assert infonce_mi_loss(torch.zeros(n, 3, L), torch.zeros(n, 3)).item() == pytest.approx(
        math.log(1 + (n - 1) * L)
    )
    # the official code's version: same-image negatives pushed down by 10 instead of dropped
    local, glob = _pair(n=4, L=3, scale=0.3)
    u = dim_scores(local, glob)
    pos = torch.diagonal(u).T
    eye = torch.eye(4)[:, :, None]
    un = (u * (1 - eye) - 10 * eye).reshape(4, -1)
    cand = torch.cat([pos[..., None], un[:, None, :].expand(4, 3, -1)], -1)
    official = -(pos - torch.logsumexp(cand, -1)).mean()
    assert infonce_mi_loss(local, glob).item() == pytest.approx(official.item(), abs=2e-3)


def test_estimators_prefer_informative_features():
    # globals that match their own image's locals score a larger MI bound than random ones
    g = torch.Generator().manual_seed(1)
    glob = F.normalize(torch.randn(8, 16, generator=g), dim=1) * 4
    local = glob[:, :, None].expand(8, 16, 5) + 0.1 * torch.randn(8, 16, 5, generator=g)
    shuffled = local[torch.randperm(8, generator=g)]
    for f in (jsd_mi_loss, infonce_mi_loss):
        assert f(local, glob) < f(shuffled, glob) - 0.5


@pytest.mark.parametrize("f", [dim_scores, jsd_mi_loss, infonce_mi_loss])
def test_bad_input_gets_clear_errors(f):
    with pytest.raises(ValueError, match="at least 2 images"):
        f(torch.zeros(1, 3, 4), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="flatten"):
        f(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="share the batch and the width"):
        f(torch.zeros(2, 3, 4), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="NaN"):
        f(torch.full((2, 3, 4), float("nan")), torch.zeros(2, 3))


def test_mi_encoder_shape_norm_and_identity_shortcut():
    net = MIEncoder(8, 16).eval()
    x = torch.randn(3, 8, 5, 5)
    h = net(x)
    assert h.shape == (3, 16, 5, 5)
    torch.testing.assert_close(h.mean(1), torch.zeros(3, 5, 5), atol=1e-5, rtol=0)  # layer norm
    w = net.shortcut.weight.detach().view(16, 8).clone()
    torch.testing.assert_close(w[:8, :8].diagonal(), torch.ones(8))
    assert w[:8, :8].fill_diagonal_(0).abs().max() <= 0.01
    with pytest.raises(ValueError, match="positive widths"):
        MIEncoder(8, 0)


def test_method_feeds_the_encoder_output_as_global_and_refuses_bad_setups():
    torch.manual_seed(0)
    enc = SmallConvNet(1)
    m = DeepInfoMax(enc, alpha=0.5).eval()
    x = torch.rand(4, 1, 28, 28)
    local, y = m(x)
    assert local.shape == (4, 128, 7, 7)
    torch.testing.assert_close(y, enc(x))  # the global feature is the encoder's output
    m4 = DeepInfoMax(SmallConvNet(1), local_layer=4).eval()
    assert m4(x)[0].shape == (4, 64, 7, 7)
    parts = m.train().mi_losses(x)
    assert set(parts) == {"y", "local", "global"}
    loss = m.training_step(x)["loss"]
    loss.backward()
    assert enc.features[0][0].weight.grad.abs().sum() > 0
    assert m.map_critic[-1].weight.grad.abs().sum() > 0
    with pytest.raises(TypeError, match="small_cnn"):
        DeepInfoMax(vit_tiny())
    with pytest.raises(ValueError, match="1..5"):
        DeepInfoMax(SmallConvNet(1), local_layer=6)
    with pytest.raises(ValueError, match="estimator"):
        DeepInfoMax(SmallConvNet(1), estimator="dv")
    with pytest.raises(ValueError, match="not both 0"):
        DeepInfoMax(SmallConvNet(1), alpha=0, beta=0)
    with pytest.raises(ValueError, match="augment"):
        DeepInfoMax(SmallConvNet(1), views=2)
    with pytest.raises(ValueError, match="at least 2 images"):
        m(x[:1])


def test_two_views_read_locals_from_the_second_view():
    torch.manual_seed(0)
    m = DeepInfoMax(SmallConvNet(1)).eval()
    x1, x2 = torch.rand(4, 1, 28, 28), torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        a = m.mi_losses(x1, x2)["local"]
        b = m.mi_losses(x1)["local"]
        g = m.global_net(m(x1)[1][:, :, None, None]).flatten(1)
        ref = jsd_mi_loss(m.local_net(m(x2)[0]).flatten(2), g)
    torch.testing.assert_close(a, ref)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("estimator", ["jsd", "infonce"])
def test_registered_and_loss_falls_in_50_real_steps(estimator):
    assert "infomax" in METHODS
    tr = load_dataset("fashion_mnist", "train", max_items=2000)
    torch.manual_seed(0)
    m = build_infomax(SmallConvNet(1, width=16), estimator=estimator, mi_units=64)
    hist = fit(m, tr.without_labels(), steps=50, batch_size=64, lr=1e-3, progress=False)
    first, last = sum(hist["loss"][:5]) / 5, sum(hist["loss"][-5:]) / 5
    assert last < first - 1.0


def test_cli_pretrain_infomax(tmp_path):
    from ssl_course.cli import main

    out = tmp_path / "infomax"
    args = ["pretrain", "--method", "infomax", "--dataset", "digits", "--steps", "3"]
    assert main([*args, "--batch-size", "32", "--out", str(out), "--no-progress"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["method"] == "infomax" and rep["steps"] == 3


def test_ddp_gather_on_two_processes_equals_one_process(tmp_path):
    """Each of 2 gloo processes holds half of the batch; with the local features gathered, the
    losses (averaged over the processes) and the gradients (divided by the world size, which
    DDP's averaging undoes) equal one process's on the whole batch."""
    proc = torchrun(HERE / "_ddp_infomax.py", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from safetensors.torch import load_file

    got = load_file(str(tmp_path / "ddp.safetensors"))
    g = torch.Generator().manual_seed(7)
    local, glob = torch.randn(8, 5, 3, generator=g), torch.randn(8, 5, generator=g)
    for name, fn in (("jsd", jsd_mi_loss), ("infonce", infonce_mi_loss)):
        a, b = local.clone().requires_grad_(), glob.clone().requires_grad_()
        loss = fn(a, b)
        loss.backward()
        torch.testing.assert_close(got[f"{name}_loss"], loss.detach().reshape(1))
        torch.testing.assert_close(got[f"{name}_grad_local"], a.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got[f"{name}_grad_global"], b.grad, rtol=1e-4, atol=1e-6)


def test_resnet_encoder_reads_an_intermediate_map():
    from ssl_course.backbones import resnet18_cifar

    torch.manual_seed(0)
    enc = resnet18_cifar(3)
    m = DeepInfoMax(enc, image_size=32).eval()
    x = torch.rand(2, 3, 32, 32)
    local, y = m(x)
    assert local.shape == (2, 256, 8, 8)  # stem + layer1-3: the official CIFAR setting's middle
    torch.testing.assert_close(y, enc(x))
    assert set(m.state_dict()) >= {f"encoder.{k}" for k in enc.state_dict()}
    assert not any(k.startswith("_stages") for k in m.state_dict())
