"""Augmentations: per-transform rates measured on many images, against the SimCLR/DINO recipes and
torchvision."""

import pytest
import torch
from torchvision.transforms import v2

from ssl_course.augment import BatchAugment, MultiCrop, simclr_augment


def _colourful(n, size=8, seed=0):
    """n constant-colour images (n, 3, size, size): a random permutation of three well separated
    channel levels."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.stack(
        [
            torch.empty(n).uniform_(0.5, 0.65, generator=g),
            torch.empty(n).uniform_(0.1, 0.25, generator=g),
            torch.empty(n).uniform_(0.3, 0.4, generator=g),
        ],
        1,
    )
    perm = torch.argsort(torch.rand(n, 3, generator=g), 1)
    colours = levels.gather(1, perm)
    return colours[:, :, None, None].expand(n, 3, size, size).contiguous()


@pytest.fixture(autouse=True)
def _one_thread():
    """Thousands of tiny per-image transforms: intra-op threads only add contention
    (10x slower on 2 shared cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


LUMA = torch.tensor([0.299, 0.587, 0.114])


def _rates(x, y):
    """Fraction of grey outputs; of the colour outputs, the fraction whose colour changed
    (jitter fired); of the grey outputs, the fraction whose luminance changed
    (brightness, hence jitter, fired): for constant-colour inputs."""
    cx, cy = x.mean((2, 3)), y.mean((2, 3))
    grey = (cy.amax(1) - cy.amin(1)) < 1e-4
    changed = (cy - cx).abs().amax(1) > 1e-3
    lum_changed = ((cy - cx) @ LUMA).abs() > 1e-4
    return (
        grey.float().mean().item(),
        changed[~grey].float().mean().item(),
        lum_changed[grey].float().mean().item(),
    )


@pytest.mark.parametrize("jitter_p, gray_p", [(0.8, 0.2), (0.5, 0.5), (0.0, 0.3)])
def test_batch_grayscale_is_independent_of_colour_jitter(jitter_p, gray_p):
    """SimCLR (Chen et al. 2020, appendix A): RandomApply(ColorJitter, p=0.8) then
    RandomGrayscale(p=0.2), independent."""
    torch.manual_seed(0)
    x = _colourful(20_000)
    y = BatchAugment(8, crop_scale=(0.3, 1.0), jitter_p=jitter_p, gray_p=gray_p)(x)
    grey, jitter_on_colour, jitter_on_grey = _rates(x, y)
    assert abs(grey - gray_p) < 0.01  # grayscale fires with gray_p whatever the jitter did
    assert abs(jitter_on_colour - jitter_p) < 0.015  # jitter fires with jitter_p ...
    assert (
        abs(jitter_on_grey - jitter_p) < 0.02
    )  # ... also on the images that were then turned grey


def test_batch_augment_matches_torchvision_pipeline_statistically():
    """The same per-transform rates as `simclr_augment` (torchvision v2), measured on the same
    kind of images."""
    torch.manual_seed(0)
    x = _colourful(20_000)
    ours = _rates(x, BatchAugment(8, crop_scale=(0.3, 1.0))(x))
    xt = x[:2_000]
    tv_aug = simclr_augment(8, 3, crop_scale=(0.3, 1.0))
    theirs = _rates(xt, torch.stack([tv_aug(im) for im in xt]))
    assert theirs[0] == pytest.approx(0.2, abs=0.03) and theirs[1] == pytest.approx(0.8, abs=0.03)
    for a, b in zip(ours, theirs):
        assert abs(a - b) < 0.04, (ours, theirs)


# ---------------------------------------------------------------- DINO multi-crop
def _blur_applies(pipeline):
    "The RandomApply wrappers around a GaussianBlur in a v2.Compose."
    return [
        t
        for t in pipeline.transforms
        if isinstance(t, v2.RandomApply)
        and any(isinstance(u, v2.GaussianBlur) for u in t.transforms)
    ]


class _Count(torch.nn.Module):
    "Wraps a transform and counts how often it really runs."

    def __init__(self, t):
        super().__init__()
        self.t, self.n = t, 0

    def forward(self, x):
        self.n += 1
        return self.t(x)


def test_simclr_augment_blur_p_and_legacy_blur_flag():
    assert [a.p for a in _blur_applies(simclr_augment(28, blur=True))] == [0.5]  # SimCLR's p = 0.5
    assert _blur_applies(simclr_augment(28)) == []
    assert [a.p for a in _blur_applies(simclr_augment(28, blur_p=0.1))] == [0.1]
    assert [a.p for a in _blur_applies(simclr_augment(28, blur=True, blur_p=1.0))] == [1.0]
    assert _blur_applies(simclr_augment(28, blur=True, blur_p=0.0)) == []
    with pytest.raises(ValueError, match="blur_p"):
        simclr_augment(28, blur_p=1.5)


def test_multicrop_blur_and_solarize_rates_follow_dino():
    """DINO (Caron et al. 2021; DataAugmentationDINO): global crop 1 blurred with p=1.0, global
    crop 2 with p=0.1 and solarised with p=0.2, local crops blurred with p=0.5
    (and never solarised)."""
    mc = MultiCrop(16, 8, n_local=1, channels=1)
    assert [a.p for a in _blur_applies(mc.g1)] == [1.0]
    assert [a.p for a in _blur_applies(mc.g2)] == [0.1]
    assert [a.p for a in _blur_applies(mc.local)] == [0.5]
    counters = {}
    for name in ("g1", "g2", "local"):
        (apply,) = _blur_applies(getattr(mc, name))
        apply.transforms[0] = counters[name] = _Count(apply.transforms[0])
    torch.manual_seed(0)
    x = torch.full(
        (1, 16, 16), 0.9
    )  # bright and flat: crops, flips and blur keep it >= 0.54, solarize inverts it
    n, dark = 4_000, {"g1": 0, "g2": 0, "local": 0}
    for _ in range(n):
        views = mc(x)
        dark["g1"] += int(views[0].max() < 0.5)
        dark["g2"] += int(views[1].max() < 0.5)
        dark["local"] += sum(int(v.max() < 0.5) for v in views[2:])
    assert counters["g1"].n == n  # blur rate 1.0
    assert abs(counters["g2"].n / n - 0.1) < 0.015  # blur rate 0.1 (sd 0.005)
    assert abs(counters["local"].n / n - 0.5) < 0.025  # blur rate 0.5 (sd 0.008)
    assert (
        dark["g1"] == 0 and dark["local"] == 0 and abs(dark["g2"] / n - 0.2) < 0.02
    )  # solarize only on view 2 (sd 0.006)


def test_multicrop_global_view_1_is_smoother_than_view_2():
    """Behaviour, not bookkeeping: on noise images the always-blurred first global view has much
    less high-frequency energy."""
    torch.manual_seed(0)
    mc = MultiCrop(28, 12, n_local=0, channels=1)
    lap = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]])[None, None]

    def sharpness(v):
        v = v[None] - v.mean()
        return (
            torch.nn.functional.conv2d(v, lap).pow(2).mean() / v.pow(2).mean().clamp_min(1e-8)
        ).item()

    s1, s2 = [], []
    for _ in range(400):
        g1, g2 = mc(torch.rand(1, 28, 28))
        s1.append(sharpness(g1))
        s2.append(sharpness(g2))
    s1, s2 = torch.tensor(s1), torch.tensor(s2)
    assert s1.median() < 0.7 * s2.median()
    # about 90% of the second views are unblurred: their sharpness is above the first views' median
    assert (s2 > s1.median()).float().mean() > 0.75
