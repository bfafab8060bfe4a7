"""Pretext tasks (ssl_course.pretext): exact pseudo-labels, Hamming-distance permutation sets,
masked-only losses, chance at init, colour, bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

from ssl_course.backbones import SmallConvNet
from ssl_course.data import DATASETS, load_dataset
from ssl_course.pretext import (
    SHAPE_CLASSES,
    Colorization,
    ContextEncoder,
    Jigsaw,
    LightnessInput,
    ab_bins,
    annealed_mean,
    build_colorization,
    build_inpainting,
    build_jigsaw,
    build_rotation,
    colorization_loss,
    hamming_distances,
    inpainting_loss,
    jigsaw_permutations,
    jigsaw_tiles,
    lab_to_rgb,
    lightness,
    region_mask,
    render_colour_shapes,
    rgb_to_lab,
    rotate_batch,
    shuffle_tiles,
    soft_encode_ab,
    tiles_to_image,
)
from ssl_course.train import build_method, fit, list_methods


# --- rotation -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 1, 28, 28), (2, 3, 32, 32), (1, 2, 5, 5)])
def test_four_quarter_turns_are_the_identity_and_labels_match(shape):
    x = torch.rand(shape)
    y = x
    for _ in range(4):
        y = torch.rot90(y, 1, (2, 3))
    assert torch.equal(y, x)
    xr, labels = rotate_batch(x)
    n = shape[0]
    assert xr.shape == (4 * n, *shape[1:]) and labels.tolist() == [
        k for k in range(4) for _ in range(n)
    ]
    for k in range(4):
        block = xr[labels == k]
        assert torch.equal(block, torch.rot90(x, k, (2, 3)))
        assert torch.equal(
            torch.rot90(block, -k, (2, 3)), x
        )  # undoing the labelled rotation gives the image back
    # 90 degrees counter-clockwise: the top row becomes the left column, read bottom to top
    assert torch.equal(xr[labels == 1][0, 0, :, 0], x[0, 0, 0, :].flip(0))


def test_rotation_refuses_non_square_images():
    with pytest.raises(ValueError, match="square"):
        rotate_batch(torch.rand(2, 1, 28, 30))


# --- jigsaw ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("k, promised", [(4, 9), (10, 8), (30, 7), (100, 6)])
def test_permutation_set_has_the_promised_minimum_hamming_distance(k, promised):
    perms, d_min = jigsaw_permutations(k, min_distance=promised)
    assert perms.shape == (k, 9) and d_min >= promised
    assert torch.equal(perms.sort(1).values, torch.arange(9).expand(k, 9))  # rows are permutations
    D = hamming_distances(perms)
    off = D[~torch.eye(k, dtype=torch.bool)]
    assert int(off.min()) == d_min  # the reported value is the true one
    slow = min(
        sum(int(a != b) for a, b in zip(perms[i].tolist(), perms[j].tolist()))
        for i in range(k)
        for j in range(i + 1, k)
    )
    assert slow == d_min  # and agrees with a plain loop


def test_permutation_set_refuses_an_impossible_promise():
    # at most 9 permutations of 9 items can all differ in every position
    with pytest.raises(ValueError, match="minimum Hamming distance"):
        jigsaw_permutations(10, min_distance=9)
    with pytest.raises(ValueError, match="at least 2"):
        jigsaw_permutations(1)
    perms, d = jigsaw_permutations(24, grid=2)  # all 4! permutations of a 2x2 grid
    assert len(torch.unique(perms, dim=0)) == 24 and d == 2


def test_inverse_permutation_restores_the_image():
    torch.manual_seed(0)
    x = torch.rand(5, 3, 27, 27)
    tiles = jigsaw_tiles(x, 3, tile=9, jitter=False)  # no gaps: tiles cover the image
    assert torch.equal(tiles_to_image(tiles), x)
    perms, _ = jigsaw_permutations(30)
    p = perms[torch.randint(0, 30, (5,))]
    shuffled = shuffle_tiles(tiles, p)
    assert not torch.equal(shuffled, tiles)
    for n in range(5):
        for i in range(9):
            assert torch.equal(shuffled[n, i], tiles[n, p[n, i]])  # slot i holds tile p[i]
    assert torch.equal(tiles_to_image(shuffle_tiles(shuffled, torch.argsort(p, dim=1))), x)


def test_jittered_tiles_stay_inside_their_cells():
    cell_id = (
        torch.arange(9).reshape(3, 3).repeat_interleave(10, 0).repeat_interleave(10, 1).float()
    )
    x = cell_id.expand(8, 1, 30, 30).clone()
    tiles = jigsaw_tiles(x, 3)  # 10 px cells, 8 px tiles
    assert tiles.shape == (8, 9, 1, 8, 8)
    for i in range(9):
        assert (tiles[:, i] == i).all()


def test_images_too_small_for_the_grid_get_a_clear_error():
    with pytest.raises(ValueError, match=r"too small for a 3x3 jigsaw grid.*image_size="):
        jigsaw_tiles(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="too small"):
        build_jigsaw(SmallConvNet(1), image_size=12)
    assert jigsaw_tiles(torch.rand(2, 1, 15, 15)).shape == (
        2,
        9,
        1,
        4,
        4,
    )  # the smallest size that works


# --- inpainting -----------------------------------------------------------------------------------


def test_inpainting_loss_counts_only_the_masked_region():
    torch.manual_seed(0)
    pred, target = torch.rand(4, 3, 12, 12), torch.rand(4, 3, 12, 12)
    mask = region_mask(4, 12, 0.25)
    inside = mask.expand_as(pred).bool()
    ref = ((pred - target)[inside] ** 2).mean()
    assert inpainting_loss(pred, target, mask).item() == pytest.approx(ref.item(), rel=1e-6)
    p2, t2 = pred.clone(), target.clone()
    p2[~inside] = 5.0
    t2[~inside] = -5.0  # anything outside the hole
    assert inpainting_loss(p2, t2, mask).item() == pytest.approx(ref.item(), rel=1e-6)
    p3 = pred.clone()
    p3[inside] += 0.3
    assert inpainting_loss(p3, target, mask) > inpainting_loss(pred, target, mask) - 1e-3
    assert not torch.isclose(inpainting_loss(p3, target, mask), inpainting_loss(pred, target, mask))


def test_region_masks():
    g = torch.Generator().manual_seed(0)
    m = region_mask(50, 28, 0.25, generator=g)
    assert m.shape == (50, 1, 28, 28) and torch.equal(m.sum((1, 2, 3)), torch.full((50,), 196.0))
    centre = region_mask(1, 28, 0.25, "center")
    assert centre[0, 0, 7:21, 7:21].all() and centre.sum() == 196
    with pytest.raises(ValueError, match="'random' or 'center'"):
        region_mask(1, 28, 0.25, "corner")


def test_context_encoder_output_and_gradient_come_from_the_hole():
    torch.manual_seed(0)
    ce = build_inpainting(SmallConvNet(1), image_size=16, channels=1)
    x = torch.rand(8, 1, 16, 16, requires_grad=True)
    loss = ce.training_step((x, None))
    loss.backward()
    assert loss.ndim == 0 and ce.decoder.fc[0].weight.grad is not None


# --- chance level at initialisation ---------------------------------------------------------------


def test_uniform_predictions_cost_exactly_log_k():
    for k in (4, 100, 1000):
        assert F.cross_entropy(
            torch.zeros(7, k), torch.randint(0, k, (7,))
        ).item() == pytest.approx(math.log(k), rel=1e-6)
    bins = ab_bins()
    z = soft_encode_ab(torch.randn(2, 2, 3, 3) * 30, bins)
    assert colorization_loss(torch.zeros(2, len(bins), 3, 3), z).item() == pytest.approx(
        math.log(len(bins)), rel=1e-5
    )


@pytest.mark.parametrize("task, k", [("rotation", 4), ("jigsaw", 100), ("colorization", None)])
def test_untrained_models_start_near_chance(task, k):
    torch.manual_seed(0)
    if task == "rotation":
        m, x = build_rotation(SmallConvNet(1)), torch.rand(32, 1, 28, 28)
    elif task == "jigsaw":
        m, x = build_jigsaw(SmallConvNet(1), image_size=28, n_perms=100), torch.rand(64, 1, 28, 28)
    else:
        m, x = (
            build_colorization(SmallConvNet(1), image_size=28, rebalance=0.0),
            torch.rand(32, 3, 28, 28),
        )
        k = len(m.bins)
    out = m.training_step((x, None))
    loss = out["loss"] if isinstance(out, dict) else out
    assert abs(loss.item() - math.log(k)) < 0.1 * math.log(k)


# --- colorization ---------------------------------------------------------------------------------


def test_lab_conversion_reference_values_and_round_trip():
    ref = {
        (1.0, 1.0, 1.0): (100.0, 0.0, 0.0),
        (0.0, 0.0, 0.0): (0.0, 0.0, 0.0),
        (1.0, 0.0, 0.0): (53.24, 80.09, 67.20),
        (0.0, 1.0, 0.0): (87.73, -86.18, 83.18),
        (0.0, 0.0, 1.0): (32.30, 79.19, -107.86),
    }
    for rgb, lab in ref.items():
        got = rgb_to_lab(torch.tensor(rgb).view(1, 3, 1, 1)).flatten()
        assert torch.allclose(got, torch.tensor(lab), atol=0.05), (rgb, got)
    torch.manual_seed(0)
    x = torch.rand(4, 3, 6, 6)
    assert torch.allclose(lab_to_rgb(rgb_to_lab(x)), x, atol=1e-4)
    grey = torch.rand(2, 1, 5, 5)
    assert torch.allclose(
        lightness(grey), lightness(grey.expand(-1, 3, -1, -1))
    )  # grey input = R=G=B


def test_bins_soft_targets_and_annealed_mean():
    bins = ab_bins()
    assert 200 < len(bins) < 320 and (bins % 10 == 0).all()
    ab = rgb_to_lab(torch.rand(3, 3, 4, 4))[:, 1:]
    z = soft_encode_ab(ab, bins)
    assert torch.allclose(z.sum(1), torch.ones(3, 4, 4), atol=1e-5) and ((z > 0).sum(1) == 5).all()
    nearest = torch.cdist(ab.permute(0, 2, 3, 1).reshape(-1, 2), bins).argmin(1)
    assert torch.equal(
        z.permute(0, 2, 3, 1).reshape(-1, len(bins)).argmax(1), nearest
    )  # most weight on the nearest bin
    one_hot_logits = torch.full((1, len(bins), 1, 1), -1e4)
    one_hot_logits[0, 7] = 0
    assert torch.allclose(annealed_mean(one_hot_logits, bins).flatten(), bins[7])


def test_colorization_refuses_grey_images_with_the_fix():
    with pytest.raises(ValueError, match="colour_shapes"):
        build_colorization(SmallConvNet(1), image_size=28, channels=1)
    col = Colorization(SmallConvNet(1), image_size=28, channels=3)
    with pytest.raises(ValueError, match=r"got 1 channel.*colour_shapes"):
        col.training_step((torch.rand(4, 1, 28, 28), None))
    with pytest.raises(ValueError, match="1 or 3"):
        LightnessInput(SmallConvNet(1))(torch.rand(2, 2, 28, 28))
    # the kept encoder sees lightness only, from colour or grey images; a 3-channel backbone gets L
    # three times
    enc = LightnessInput(SmallConvNet(3))
    x = torch.rand(2, 3, 28, 28)
    assert torch.allclose(enc(x), enc.backbone(lightness(x).expand(-1, 3, -1, -1)))


def test_colour_shapes_dataset():
    assert "colour_shapes" in DATASETS
    a, b = render_colour_shapes(50, 16, seed=3), render_colour_shapes(50, 16, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert (
        a.images.shape == (50, 3, 16, 16)
        and a.images.dtype == torch.uint8
        and a.classes == SHAPE_CLASSES
    )
    assert torch.bincount(a.labels, minlength=10).tolist() == [5] * 10
    # colour carries class information: the mean hue direction differs between classes
    d = render_colour_shapes(400, 16, seed=0)
    ab = rgb_to_lab(d.images.float() / 255)[:, 1:].amax((2, 3))
    per_class = torch.stack([ab[d.labels == c].mean(0) for c in range(10)])
    assert torch.cdist(per_class, per_class).max() > 20
    test = load_dataset("colour_shapes", "test", image_size=16)
    assert len(test) == 2000 and test.channels == 3 and test.image_size == 16


# --- learning and registration --------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits16():
    return load_dataset("digits", "train", image_size=16)


@pytest.mark.parametrize("name", ["rotation", "jigsaw", "inpainting"])
def test_pretext_losses_fall_on_real_images(name, digits16):
    torch.manual_seed(0)
    m = build_method(
        name,
        SmallConvNet(1),
        image_size=16,
        channels=1,
        **({"n_perms": 10} if name == "jigsaw" else {}),
    )
    h = fit(
        m,
        digits16.without_labels(),
        steps=40,
        batch_size=32,
        lr=3e-3,
        progress=False,
        device="cpu",
        seed=0,
    )
    assert sum(h["loss"][-5:]) / 5 < 0.8 * h["loss"][0]


def test_colorization_loss_falls_on_rendered_colour_images():
    torch.manual_seed(0)
    data = render_colour_shapes(640, 16, seed=0)
    m = build_colorization(SmallConvNet(1), image_size=16)
    h = fit(
        m,
        data.without_labels(),
        steps=25,
        batch_size=64,
        lr=3e-3,
        progress=False,
        device="cpu",
        seed=0,
    )
    assert sum(h["loss"][-5:]) / 5 < 0.8 * h["loss"][0]
    assert m.colorize(data.images[:4].float() / 255).shape == (4, 3, 16, 16)


def test_methods_are_registered():
    assert {"rotation", "jigsaw", "inpainting", "colorization"} <= {m.name for m in list_methods()}
    assert isinstance(build_method("jigsaw", SmallConvNet(1), image_size=28, channels=1), Jigsaw)
    assert isinstance(
        build_method("inpainting", SmallConvNet(3), image_size=32, channels=3), ContextEncoder
    )


def test_greedy_permutations_match_a_plain_loop_re_derivation():
    # the vectorised distance (position-value index) must pick exactly what a per-pair loop picks
    import itertools

    import numpy as np

    from ssl_course.pretext import _greedy_perms, all_permutations

    cand = list(itertools.permutations(range(5)))
    assert all_permutations(5).tolist() == [list(p) for p in cand]  # lexicographic, every one
    assert not all_permutations(5).flags.writeable  # the cached array cannot be changed by a caller
    for n_perms, seed in [(12, 0), (30, 3)]:
        rng = np.random.default_rng(seed)
        chosen = [int(rng.integers(len(cand)))]
        dist = [sum(a != b for a, b in zip(c, cand[chosen[0]])) for c in cand]
        for _ in range(n_perms - 1):
            best = max(dist)
            j = int(rng.choice([i for i, d in enumerate(dist) if d == best]))
            chosen.append(j)
            dist = [min(d, sum(a != b for a, b in zip(c, cand[j]))) for d, c in zip(dist, cand)]
        got, _ = _greedy_perms(n_perms, 5, seed)
        assert got.tolist() == [list(cand[j]) for j in chosen]
