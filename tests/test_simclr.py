"SimCLR's NT-Xent against closed forms and an independent formula; a short real training run."

import math

import pytest
import torch
import torch.nn.functional as F

from ssl_course.backbones import SmallConvNet
from ssl_course.data import load_dataset
from ssl_course.simclr import build_simclr, nt_xent_loss
from ssl_course.train import fit


def nt_xent_reference(z1, z2, t):
    """Straight from the paper: l(i, j) = -log exp(s_ij/t) / sum_{k != i} exp(s_ik/t), averaged
    over 2N anchors."""
    z = F.normalize(torch.cat([z1, z2]).double(), dim=1)
    n = len(z1)
    sim = z @ z.T / t
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        others = torch.cat([sim[i, :i], sim[i, i + 1 :]])
        total += -(sim[i, j] - torch.logsumexp(others, 0))
    return total / (2 * n)


@pytest.mark.parametrize("n", [2, 5, 32])
def test_collapse_costs_exactly_log_2n_minus_1(n):
    z = torch.ones(n, 7)
    assert nt_xent_loss(z, z, 0.5).item() == pytest.approx(math.log(2 * n - 1), rel=1e-5)


@pytest.mark.parametrize("t", [0.07, 0.2, 0.5, 1.0])
def test_matches_independent_formula_and_is_symmetric(t):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(9, 4, generator=g), torch.randn(9, 4, generator=g)
    assert nt_xent_loss(a, b, t).item() == pytest.approx(
        nt_xent_reference(a, b, t).item(), rel=1e-4
    )
    assert nt_xent_loss(a, b, t).item() == pytest.approx(nt_xent_loss(b, a, t).item(), rel=1e-5)
    # invariant to the scale of each embedding (cosine similarity)
    assert nt_xent_loss(3 * a, 0.5 * b, t).item() == pytest.approx(
        nt_xent_loss(a, b, t).item(), rel=1e-5
    )


def test_bad_inputs():
    with pytest.raises(ValueError, match="same shape"):
        nt_xent_loss(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="at least 2"):
        nt_xent_loss(torch.randn(1, 3), torch.randn(1, 3))


def test_short_simclr_run_lowers_the_loss_on_real_images():
    torch.manual_seed(0)
    tr = load_dataset("digits", "train", image_size=28)
    model = build_simclr(SmallConvNet(1), image_size=28, channels=1, temperature=0.2)
    hist = fit(
        model, tr.without_labels(), steps=40, batch_size=64, lr=3e-3, progress=False, device="cpu"
    )
    first, last = sum(hist["loss"][:5]) / 5, sum(hist["loss"][-5:]) / 5
    assert last < first - 0.3
