"""Barlow Twins and VICReg (chapter 14a): closed forms, equality with slow element-by-element
re-derivations, bad input, the loss falling on real images, and the DDP gather on 2 CPU processes
against one process."""

import math
from pathlib import Path

import pytest
import torch

from _torchrun import torchrun
from ssl_course.backbones import SmallConvNet
from ssl_course.data import load_dataset
from ssl_course.redundancy import (
    barlow_twins_loss,
    barlow_twins_terms,
    build_barlow_twins,
    build_vicreg,
    cross_correlation,
    off_diagonal,
    vicreg_loss,
    vicreg_terms,
)
from ssl_course.train import METHODS, fit

HERE = Path(__file__).parent


def barlow_reference(a, b, lambd):
    "The paper's eq. (1)-(2) element by element, in float64: C_ij over the batch, then the sums."
    a, b = a.double(), b.double()
    n, d = a.shape
    mean_a = [sum(a[k, i] for k in range(n)) / n for i in range(d)]
    mean_b = [sum(b[k, i] for k in range(n)) / n for i in range(d)]
    sa = [math.sqrt(sum((a[k, i] - mean_a[i]) ** 2 for k in range(n)) / n + 1e-5) for i in range(d)]
    sb = [math.sqrt(sum((b[k, i] - mean_b[i]) ** 2 for k in range(n)) / n + 1e-5) for i in range(d)]
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c = (
                sum((a[k, i] - mean_a[i]) / sa[i] * (b[k, j] - mean_b[j]) / sb[j] for k in range(n))
                / n
            )
            loss += (1 - c) ** 2 if i == j else lambd * c**2
    return float(loss)


def vicreg_reference(a, b, sim=25.0, std=25.0, cov=1.0, gamma=1.0, eps=1e-4):
    "VICReg's eqs. (1)-(6) element by element, in float64, with the official code's constants."
    a, b = a.double(), b.double()
    n, d = a.shape
    inv = sum(float((a[k, i] - b[k, i]) ** 2) for k in range(n) for i in range(d)) / (n * d)
    v_term, c_term = 0.0, 0.0
    for z in (a, b):
        mean = [float(z[:, i].sum()) / n for i in range(d)]
        c = [
            [
                sum((float(z[k, i]) - mean[i]) * (float(z[k, j]) - mean[j]) for k in range(n))
                / (n - 1)
                for j in range(d)
            ]
            for i in range(d)
        ]
        v_term += sum(max(0.0, gamma - math.sqrt(c[i][i] + eps)) for i in range(d)) / d / 2
        c_term += sum(c[i][j] ** 2 for i in range(d) for j in range(d) if i != j) / d
    return sim * inv + std * v_term + cov * c_term


def test_off_diagonal_picks_every_entry_but_the_diagonal():
    m = torch.arange(16.0).view(4, 4)
    expected = [m[i, j].item() for i in range(4) for j in range(4) if i != j]
    assert off_diagonal(m).tolist() == expected
    with pytest.raises(ValueError, match="square"):
        off_diagonal(torch.zeros(2, 3))


@pytest.mark.parametrize("lambd", [0.0051, 0.5])
def test_barlow_matches_slow_rederivation(lambd):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 4, generator=g), torch.randn(7, 4, generator=g)
    assert barlow_twins_loss(a, b, lambd).item() == pytest.approx(
        barlow_reference(a, b, lambd), rel=1e-4
    )


def test_barlow_closed_forms():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(64, 8, generator=g)
    # identical (standardised) embeddings: the diagonal is 1, the invariance term is zero
    assert barlow_twins_terms(z, z)["invariance"].item() == pytest.approx(0.0, abs=1e-4)
    # decorrelated, identical columns (centred orthonormal): C is the identity, the loss is zero
    w, _ = torch.linalg.qr(z - z.mean(0))  # Q = A R^-1 keeps the columns centred
    assert torch.allclose(cross_correlation(w, w), torch.eye(8), atol=1e-3)
    assert barlow_twins_loss(w, w).item() < 1e-5
    # opposite views: C = -I, invariance = 4 per dimension
    assert barlow_twins_terms(z, -z)["invariance"].item() == pytest.approx(4 * 8, rel=1e-3)
    # symmetric in the two views
    b = torch.randn(64, 8, generator=g)
    assert barlow_twins_loss(z, b).item() == pytest.approx(barlow_twins_loss(b, z).item(), rel=1e-5)


def test_barlow_is_invariant_to_a_per_dimension_affine_shift():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(32, 6, generator=g), torch.randn(32, 6, generator=g)
    scale, shift = torch.rand(6, generator=g) * 5 + 0.5, torch.randn(6, generator=g) * 10
    base = barlow_twins_loss(a, b).item()
    assert barlow_twins_loss(a * scale + shift, b).item() == pytest.approx(base, rel=1e-3)
    assert barlow_twins_loss(a, b * scale - shift).item() == pytest.approx(base, rel=1e-3)
    # VICReg is not: its invariance term is a plain distance
    assert vicreg_loss(a * scale + shift, b).item() != pytest.approx(vicreg_loss(a, b).item())


def test_vicreg_matches_slow_rederivation():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(6, 4, generator=g) * 0.7, torch.randn(6, 4, generator=g) * 1.3
    assert vicreg_loss(a, b).item() == pytest.approx(vicreg_reference(a, b), rel=1e-4)
    assert vicreg_loss(a, b, 1.0, 2.0, 3.0).item() == pytest.approx(
        vicreg_reference(a, b, 1.0, 2.0, 3.0), rel=1e-4
    )


def test_vicreg_closed_forms():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(128, 5, generator=g)
    z = (z - z.mean(0)) / z.std(0) * torch.tensor([1.0, 1.5, 2.0, 3.0, 1.2])  # every std >= 1
    t = vicreg_terms(z, z)
    assert t["invariance"].item() == 0.0 and t["variance"].item() == 0.0
    # collapsed embeddings: every std is 0, the variance term is relu(1 - sqrt(1e-4)) = 0.99
    c = torch.ones(16, 5)
    assert vicreg_terms(c, c)["variance"].item() == pytest.approx(0.99, rel=1e-5)
    assert vicreg_terms(c, c)["covariance"].item() == 0.0
    # decorrelated (centred orthonormal) columns: the covariance term is zero
    a = torch.randn(40, 5, generator=g)
    q, _ = torch.linalg.qr(a - a.mean(0))
    assert vicreg_terms(q, q)["covariance"].item() < 1e-10
    # the invariance term is the mean squared distance
    a, b = torch.randn(10, 3, generator=g), torch.randn(10, 3, generator=g)
    assert vicreg_terms(a, b)["invariance"].item() == pytest.approx(
        ((a - b) ** 2).mean().item(), rel=1e-6
    )


@pytest.mark.parametrize("loss", [barlow_twins_loss, vicreg_loss])
def test_bad_input_gets_a_clear_error(loss):
    with pytest.raises(ValueError, match="at least 2 items"):
        loss(torch.randn(1, 8), torch.randn(1, 8))
    with pytest.raises(ValueError, match="same shape"):
        loss(torch.randn(4, 8), torch.randn(4, 7))
    with pytest.raises(ValueError, match="same shape"):
        loss(torch.randn(4, 8, 2), torch.randn(4, 8, 2))
    bad = torch.randn(4, 8)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        loss(bad, torch.randn(4, 8))


def test_bad_weights_get_a_clear_error():
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    for bad in (-0.1, float("nan"), float("inf"), "0.005", True):
        with pytest.raises(ValueError, match="lambd"):
            barlow_twins_loss(a, b, bad)
    # 0 is allowed: it switches the redundancy term off (an ablation of the chapter)
    assert barlow_twins_loss(a, b, 0).item() == barlow_twins_terms(a, b)["invariance"].item()
    with pytest.raises(ValueError, match="std_coeff"):
        vicreg_loss(a, b, std_coeff=-1)
    with pytest.raises(ValueError, match="cov_coeff"):
        build_vicreg(SmallConvNet(1, width=8), cov_coeff=float("nan"))
    with pytest.raises(ValueError, match="lambd"):
        build_barlow_twins(SmallConvNet(1, width=8), lambd=-1)
    with pytest.raises(ValueError, match="expander dims"):
        build_vicreg(SmallConvNet(1, width=8), dims=(64, 0))


def test_methods_are_registered_with_their_papers():
    assert "2103.03230" in METHODS["barlow_twins"].paper
    assert "2105.04906" in METHODS["vicreg"].paper


@pytest.mark.parametrize("build", [build_barlow_twins, build_vicreg])
def test_loss_falls_in_50_real_steps(build):
    torch.manual_seed(0)
    tr = load_dataset("digits", "train", image_size=28)
    m = build(SmallConvNet(1, width=16), dims=(256, 256, 256))
    h = fit(m, tr.without_labels(), steps=50, batch_size=64, lr=3e-3, progress=False, device="cpu")
    first, last = sum(h["loss"][:5]) / 5, sum(h["loss"][-5:]) / 5
    assert last < 0.92 * first, (first, last)  # VICReg: about 21.5 -> 18.7; Barlow falls further


def test_vicreg_without_variance_and_covariance_collapses():
    "Invariance alone has a trivial minimum, every image at one point; the full loss stays spread."
    from ssl_course.evaluate import embedding_std

    tr = load_dataset("digits", "train", image_size=28)
    x = tr.images[:256].float() / 255
    spread, raw = {}, {}
    for std_coeff, cov_coeff in ((0.0, 0.0), (25.0, 1.0)):
        torch.manual_seed(0)
        m = build_vicreg(
            SmallConvNet(1, width=16),
            dims=(256, 256, 256),
            std_coeff=std_coeff,
            cov_coeff=cov_coeff,
        )
        fit(m, tr.without_labels(), steps=40, batch_size=64, lr=3e-3, progress=False, device="cpu")
        with torch.no_grad():
            z = m.eval().projector(m.encoder(x))
        spread[std_coeff], raw[std_coeff] = embedding_std(z), z.std(0).mean().item()
    # measured: per-dimension std 0.024 vs 0.34, normalised spread 0.24 vs 0.88
    assert raw[0.0] < 0.15 * raw[25.0] and spread[0.0] < 0.5 * spread[25.0], (raw, spread)


def test_ddp_gather_on_two_processes_equals_one_process(tmp_path):
    """Each of 2 gloo processes holds half of the batch; the gathered Barlow Twins and VICReg
    losses (VICReg: averaged over the processes, as DDP averages gradients) and the gradients
    (divided by the world size, which DDP's averaging undoes) equal one process's on the whole."""
    proc = torchrun(HERE / "_ddp_redundancy.py", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from safetensors.torch import load_file

    got = load_file(str(tmp_path / "ddp.safetensors"))
    g = torch.Generator().manual_seed(7)
    z1, z2 = torch.randn(12, 5, generator=g), torch.randn(12, 5, generator=g)
    for name, fn in (("barlow", barlow_twins_loss), ("vicreg", vicreg_loss)):
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        loss = fn(a, b)
        loss.backward()
        torch.testing.assert_close(got[f"{name}_loss"], loss.detach().reshape(1))
        torch.testing.assert_close(got[f"{name}_grad1"], a.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got[f"{name}_grad2"], b.grad, rtol=1e-4, atol=1e-6)
