"""I-JEPA (chapter 16a): the official multi-block masking re-derived, the predictor's invariances,
the loss in closed form, the EMA target, what the context encoder can see, and a loss that falls
on real images."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from ssl_course.backbones import SmallConvNet
from ssl_course.data import load_dataset
from ssl_course.jepa import (
    IJEPA,
    JEPAPredictor,
    apply_masks,
    block_size,
    build_ijepa,
    ijepa_loss,
    linear_momentum,
    multiblock_masks,
    position_share,
)
from ssl_course.train import METHODS, fit
from ssl_course.vit import vit_tiny


def official_block_size(height, width, scale, aspect):
    "facebookresearch/ijepa src/masks/multiblock.py _sample_block_size, the random draws given."
    max_keep = int(height * width * scale)
    h = int(round(math.sqrt(max_keep * aspect)))
    w = int(round(math.sqrt(max_keep / aspect)))
    while h >= height:
        h -= 1
    while w >= width:
        w -= 1
    return h, w


@pytest.mark.parametrize("grid", [7, 8, 14, 16])
def test_block_size_equals_the_official_formula(grid):
    for scale in (0.15, 0.17, 0.2, 0.85, 0.93, 1.0):
        for aspect in (0.75, 1.0, 1.2, 1.5):
            assert block_size(grid, scale, aspect) == official_block_size(grid, grid, scale, aspect)


def test_masks_disjoint_rectangles_full_coverage_and_reproducible():
    g = torch.Generator().manual_seed(0)
    seen_t, seen_c = torch.zeros(49), torch.zeros(49)
    overlap = 0
    for _ in range(40):
        ctx, tgt = multiblock_masks(32, 7, generator=g)
        assert ctx.shape[0] == 32 and tgt.shape[:2] == (4, 32)
        assert ctx.shape[1] > 10  # min_keep
        assert (ctx.diff(dim=1) > 0).all() and (tgt.diff(dim=2) > 0).all()  # sorted, no repeats
        overlap += sum(
            bool(set(ctx[i].tolist()) & set(tgt[:, i].flatten().tolist())) for i in range(32)
        )
        # untruncated targets are full h x w rectangles of one size for the batch
        for t in tgt.flatten(0, 1):
            r, c = t // 7, t % 7
            assert len(t) == (r.max() - r.min() + 1) * (c.max() - c.min() + 1)
        seen_t[tgt.flatten()] += 1
        seen_c[ctx.flatten()] += 1
    assert (seen_t > 0).all() and (seen_c > 0).all()  # corners reach the last row and column
    assert overlap / (40 * 32) < 0.1  # only images whose context was relaxed after 20 failed draws
    ctx, tgt = multiblock_masks(64, 7, n_targets=1, generator=g)  # never relaxed: disjoint
    assert all(not set(ctx[i].tolist()) & set(tgt[0, i].tolist()) for i in range(64))
    a = multiblock_masks(8, 7, generator=torch.Generator().manual_seed(5))
    b = multiblock_masks(8, 7, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_sizes_follow_the_scales_and_relaxation_terminates():
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        ctx, tgt = multiblock_masks(16, 14, generator=g)
        assert 0.15 * 196 - 14 <= tgt.shape[2] <= 0.2 * 196  # about 29-39 of 196 patches
    # targets large enough to cover any context: the constraint is relaxed, never an endless loop
    ctx, tgt = multiblock_masks(
        16, 7, n_targets=4, target_scale=(0.6, 0.6), min_keep=10, generator=g
    )
    assert ctx.shape[1] > 10


def test_bad_input_gets_clear_errors():
    with pytest.raises(ValueError, match="min_keep"):
        multiblock_masks(4, 7, min_keep=36)
    with pytest.raises(ValueError, match="need n >= 1"):
        multiblock_masks(0, 7)
    with pytest.raises(ValueError, match="scale"):
        block_size(7, 0.0, 1.0)
    with pytest.raises(ValueError, match="indices for 3"):
        apply_masks(torch.zeros(2, 49, 3), torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="same shape"):
        ijepa_loss(torch.zeros(2, 3, 4), torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="pool='mean'"):
        IJEPA(SmallConvNet(1))
    with pytest.raises(ValueError, match="N >= 2"):
        position_share(torch.zeros(1, 49, 8))
    with pytest.raises(ValueError, match="pool must be"):
        vit_tiny(pool="max")
    with pytest.raises(ValueError, match="keep must be"):
        vit_tiny(pool="mean").forward_patches(torch.rand(2, 1, 28, 28), torch.zeros(3, 4).long())


def test_apply_masks_equals_a_loop():
    x = torch.randn(3, 10, 4)
    idx = torch.tensor([[0, 2, 9], [1, 1, 3], [8, 7, 6]])
    ref = torch.stack([x[i, idx[i]] for i in range(3)])
    assert torch.equal(apply_masks(x, idx), ref)


def test_predictor_shapes_positions_and_set_invariance():
    torch.manual_seed(0)
    p = JEPAPredictor(7, 96, 48, 3, 3).eval()
    z = torch.randn(2, 12, 96)
    ci = torch.stack([torch.randperm(49)[:12] for _ in range(2)])
    ti = torch.tensor([[0, 1, 7, 8], [40, 41, 47, 48]])
    out = p(z, ci, ti)
    assert out.shape == (2, 4, 96)
    perm = torch.randperm(12)
    torch.testing.assert_close(p(z[:, perm], ci[:, perm], ti), out, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(p(z, ci, ti.flip(0)), out, atol=1e-4)
    # no order among the targets either: reordering them reorders the predictions
    torch.testing.assert_close(
        p(z, ci, ti[:, [3, 1, 0, 2]]), out[:, [3, 1, 0, 2]], atol=1e-5, rtol=1e-5
    )
    # narrow: fewer channels than the encoder, output back at the encoder's width
    assert p.embed.out_features == 48 and p.proj.out_features == 96


def test_loss_closed_form_and_stop_gradient():
    p, t = torch.randn(4, 6, 8, requires_grad=True), torch.randn(4, 6, 8, requires_grad=True)
    d = (p - t).abs()
    ref = torch.where(d < 1, 0.5 * d**2, d - 0.5).mean()
    loss = ijepa_loss(p, t)
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert t.grad is None and p.grad.abs().sum() > 0
    assert ijepa_loss(t, t).item() == 0.0


def test_ema_schedule_and_update():
    assert linear_momentum(0, 100) == pytest.approx(0.996)
    assert linear_momentum(25, 100) == pytest.approx(0.997)
    assert linear_momentum(100, 100) == linear_momentum(150, 100) == 1.0
    torch.manual_seed(0)
    m = IJEPA()
    assert all(not q.requires_grad for q in m.target_encoder.parameters())
    for t_, o in zip(m.target_encoder.parameters(), m.encoder.parameters()):
        assert torch.equal(t_, o)  # starts as a copy
    old = [q.clone() for q in m.target_encoder.parameters()]
    with torch.no_grad():
        for q in m.encoder.parameters():
            q.add_(torch.randn_like(q))
    m.on_step_end(50, 100)
    assert m.momentum == pytest.approx(0.998)
    for t_, o, prev in zip(m.target_encoder.parameters(), m.encoder.parameters(), old):
        torch.testing.assert_close(t_, 0.998 * prev + 0.002 * o)


def test_context_encoder_sees_only_the_context_and_targets_see_everything():
    torch.manual_seed(0)
    m = IJEPA().eval()
    x = torch.rand(4, 1, 28, 28)
    masks = multiblock_masks(4, 7, generator=torch.Generator().manual_seed(2))
    keep = torch.zeros(4, 49, dtype=torch.bool)
    keep[torch.arange(4)[:, None], masks[0]] = True
    pix = keep.view(4, 1, 7, 1, 7, 1).expand(4, 1, 7, 4, 7, 4).reshape(4, 1, 28, 28)
    with torch.no_grad():
        _, p1, t1 = m(x, masks)
        _, p2, t2 = m(torch.where(pix, x, torch.rand_like(x)), masks)
    torch.testing.assert_close(p1, p2, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(t1, t2, atol=1e-3)
    # targets are the target encoder's layer-normalised patch tokens at the target indices
    with torch.no_grad():
        h = m.target_encoder.forward_patches(x)
        h = F.layer_norm(h, h.shape[-1:])
    for b in range(4):
        torch.testing.assert_close(t1[b], h[torch.arange(4)[:, None], masks[1][b]])


def test_position_share_closed_forms():
    pos = torch.randn(1, 49, 8).expand(20, -1, -1)
    img = torch.randn(20, 1, 8).expand(-1, 49, -1)
    assert position_share(pos) == pytest.approx(1.0)
    assert position_share(img) == pytest.approx(0.0, abs=1e-12)
    # independent sum: the share is the position part's variance over the total
    a, b = torch.randn(1, 49, 8), torch.randn(20, 1, 8)
    t = a.expand(20, -1, -1) + b.expand(-1, 49, -1)
    va, vb = a.double().var(1, unbiased=False).sum(), b.double().var(0, unbiased=False).sum()
    assert position_share(t) == pytest.approx(float(va / (va + vb)), rel=1e-9)


def test_mean_pool_vit_shares_weights_with_cls_vit():
    v = vit_tiny(pos_embed="sincos")
    vm = vit_tiny(pos_embed="sincos", pool="mean")
    vm.load_state_dict(v.state_dict())
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(vm(x), vm.forward_patches(x).mean(1))
    assert vm(x).shape == v(x).shape == (3, 96)


def test_registered_and_loss_falls_in_50_real_steps():
    assert "ijepa" in METHODS
    m = build_ijepa(SmallConvNet(1), image_size=28, channels=1)  # a CNN is replaced by the ViT
    assert m.encoder.pool == "mean"
    tr = load_dataset("fashion_mnist", "train", max_items=2000)
    torch.manual_seed(0)
    m = build_ijepa(None, image_size=28, channels=1, pred_depth=2)
    hist = fit(m, tr.without_labels(), steps=50, batch_size=64, lr=1e-3, progress=False)
    first, last = sum(hist["loss"][:5]) / 5, sum(hist["loss"][-5:]) / 5
    assert last < 0.7 * first


def test_cli_pretrain_ijepa(tmp_path):
    from ssl_course.cli import main

    out = tmp_path / "ijepa"
    args = ["pretrain", "--method", "ijepa", "--dataset", "digits", "--steps", "3"]
    assert main([*args, "--batch-size", "32", "--out", str(out), "--no-progress"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["method"] == "ijepa" and rep["steps"] == 3
    from safetensors.torch import load_file

    weights = load_file(str(out / "encoder.safetensors"))
    assert "patch_embed.weight" in weights and weights["pos_embed"].shape == (1, 50, 96)
