"Augmentations: per-transform rates measured on many images, against the SimCLR/DINO recipes and torchvision."
import pytest
import torch
from torchvision.transforms import v2

from ssl_course.augment import BatchAugment, MultiCrop, simclr_augment


def _colourful(n, size=8, seed=0):
    "n constant-colour images (n, 3, size, size): a random permutation of three well separated channel levels."
    g = torch.Generator().manual_seed(seed)
    levels = torch.stack([torch.empty(n).uniform_(0.5, 0.65, generator=g), torch.empty(n).uniform_(0.1, 0.25, generator=g),
                          torch.empty(n).uniform_(0.3, 0.4, generator=g)], 1)
    perm = torch.argsort(torch.rand(n, 3, generator=g), 1)
    colours = levels.gather(1, perm)
    return colours[:, :, None, None].expand(n, 3, size, size).contiguous()


LUMA = torch.tensor([0.299, 0.587, 0.114])


def _rates(x, y):
    """Fraction of grey outputs; of the colour outputs, the fraction whose colour changed (jitter fired); of the grey
    outputs, the fraction whose luminance changed (brightness, hence jitter, fired): for constant-colour inputs."""
    cx, cy = x.mean((2, 3)), y.mean((2, 3))
    grey = (cy.amax(1) - cy.amin(1)) < 1e-4
    changed = (cy - cx).abs().amax(1) > 1e-3
    lum_changed = ((cy - cx) @ LUMA).abs() > 1e-4
    return grey.float().mean().item(), changed[~grey].float().mean().item(), lum_changed[grey].float().mean().item()


@pytest.mark.parametrize("jitter_p, gray_p", [(0.8, 0.2), (0.5, 0.5), (0.0, 0.3)])
def test_batch_grayscale_is_independent_of_colour_jitter(jitter_p, gray_p):
    "SimCLR (Chen et al. 2020, appendix A): RandomApply(ColorJitter, p=0.8) then RandomGrayscale(p=0.2), independent."
    torch.manual_seed(0)
    x = _colourful(20_000)
    y = BatchAugment(8, crop_scale=(0.3, 1.0), jitter_p=jitter_p, gray_p=gray_p)(x)
    grey, jitter_on_colour, jitter_on_grey = _rates(x, y)
    assert abs(grey - gray_p) < 0.01                          # grayscale fires with gray_p whatever the jitter did
    assert abs(jitter_on_colour - jitter_p) < 0.015            # jitter fires with jitter_p ...
    assert abs(jitter_on_grey - jitter_p) < 0.02               # ... also on the images that were then turned grey


def test_batch_augment_matches_torchvision_pipeline_statistically():
    "The same per-transform rates as `simclr_augment` (torchvision v2), measured on the same kind of images."
    torch.manual_seed(0)
    x = _colourful(20_000)
    ours = _rates(x, BatchAugment(8, crop_scale=(0.3, 1.0))(x))
    xt = x[:2_000]
    tv_aug = simclr_augment(8, 3, crop_scale=(0.3, 1.0))
    theirs = _rates(xt, torch.stack([tv_aug(im) for im in xt]))
    assert theirs[0] == pytest.approx(0.2, abs=0.03) and theirs[1] == pytest.approx(0.8, abs=0.03)
    for a, b in zip(ours, theirs):
        assert abs(a - b) < 0.04, (ours, theirs)
