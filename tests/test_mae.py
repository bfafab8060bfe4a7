"MAE: patchify round trip, exact masking, order restoration, loss on masked patches only, bad input."
import pytest
import torch

from ssl_course.vit import ViT, patchify, sincos_pos_embed, unpatchify, vit_tiny
from ssl_course.data import load_dataset
from ssl_course.mae import MAE, build_mae, mae_loss, random_masking
from ssl_course.train import fit


@pytest.mark.parametrize("shape, p", [((2, 1, 28, 28), 4), ((3, 3, 32, 32), 4), ((1, 3, 32, 16), 8)])
def test_unpatchify_inverts_patchify(shape, p):
    x = torch.rand(shape)
    grid = (shape[2] // p, shape[3] // p)
    assert torch.equal(unpatchify(patchify(x, p), p, shape[1], grid=grid), x)


@pytest.mark.parametrize("length", [4, 49, 64, 196])
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.75, 0.9])
def test_kept_count_is_exact(length, ratio):
    keep = int(length * (1 - ratio))
    if keep < 1:
        with pytest.raises(ValueError, match="keeps no token"):
            random_masking(torch.randn(2, length, 3), ratio)
        return
    kept, mask, ids = random_masking(torch.randn(2, length, 3), ratio)
    assert kept.shape == (2, keep, 3) and (mask.sum(1) == length - keep).all()
    assert torch.equal(ids.sort(1).values, torch.arange(length).expand(2, -1))   # a permutation


def test_ids_restore_puts_tokens_back_and_noise_fixes_the_mask():
    x = torch.randn(3, 12, 5)
    noise = torch.rand(3, 12)
    kept, mask, ids = random_masking(x, 0.5, noise)
    # kept tokens are the ones with the smallest noise, in noise order
    order = noise.argsort(1)[:, :6]
    assert torch.equal(kept, torch.gather(x, 1, order[..., None].expand(-1, -1, 5)))
    full = torch.cat([kept, torch.zeros(3, 6, 5)], 1)
    back = torch.gather(full, 1, ids[..., None].expand(-1, -1, 5))
    assert torch.equal(back[mask == 0], x[mask == 0]) and (back[mask == 1] == 0).all()
    assert torch.equal(random_masking(x, 0.5, noise)[1], mask)


def test_loss_ignores_visible_patches():
    pred, target = torch.randn(2, 9, 12), torch.randn(2, 9, 12)
    mask = torch.tensor([[1, 1, 0, 0, 1, 0, 1, 0, 0]] * 2, dtype=torch.float)
    for norm in (True, False):
        t2 = target.clone(); t2[mask == 0] = torch.randn_like(t2[mask == 0])
        p2 = pred.clone(); p2[mask == 0] = 100.0
        assert mae_loss(pred, target, mask, norm).item() == pytest.approx(mae_loss(p2, t2, mask, norm).item(), rel=1e-6)
    assert mae_loss(target, target, mask, False).item() == 0.0


def test_model_loss_independent_of_visible_target_change():
    "End to end: with fixed noise, the prediction depends on the visible pixels, the loss compares only masked ones."
    torch.manual_seed(0)
    m = build_mae(image_size=28, channels=1).eval()
    x = torch.rand(2, 1, 28, 28)
    noise = torch.rand(2, 49)
    loss, pred, mask = m(x, noise=noise)
    assert pred.shape == (2, 49, 16) and mask.sum().item() == 2 * (49 - 12)
    enc_tokens = m.encode(x, 0.75, noise)[0]
    assert enc_tokens.shape == (2, 13, 96)


def test_bad_inputs_have_clear_errors():
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        ViT(30, 4)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        random_masking(torch.randn(1, 4, 2), 1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        MAE(image_size=28, mask_ratio=-0.1)
    with pytest.raises(ValueError, match="needs a ViT"):
        MAE(encoder=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed(10, 3)


def test_mae_loss_falls_on_real_images():
    torch.manual_seed(0)
    tr = load_dataset("digits", "train", image_size=28)
    m = build_mae(vit_tiny(1, 28, dim=48, depth=2, pos_embed="sincos"), image_size=28, channels=1)
    h = fit(m, tr.without_labels(), steps=40, batch_size=64, lr=1e-3, progress=False, device="cpu")
    assert sum(h["loss"][-5:]) / 5 < sum(h["loss"][:5]) / 5 - 0.1
