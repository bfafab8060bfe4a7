"""MAE: patchify round trip, exact masking, order restoration, loss on masked patches only, bad
input."""

import pytest
import torch

from ssl_course.vit import ViT, patchify, sincos_pos_embed, unpatchify, vit_tiny
from ssl_course.data import load_dataset
from ssl_course.mae import MAE, build_mae, mae_loss, random_masking
from ssl_course.train import fit


@pytest.mark.parametrize(
    "shape, p", [((2, 1, 28, 28), 4), ((3, 3, 32, 32), 4), ((1, 3, 32, 16), 8)]
)
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
    assert torch.equal(ids.sort(1).values, torch.arange(length).expand(2, -1))  # a permutation


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
        t2 = target.clone()
        t2[mask == 0] = torch.randn_like(t2[mask == 0])
        p2 = pred.clone()
        p2[mask == 0] = 100.0
        assert mae_loss(pred, target, mask, norm).item() == pytest.approx(
            mae_loss(p2, t2, mask, norm).item(), rel=1e-6
        )
    assert mae_loss(target, target, mask, False).item() == 0.0


def _reference_loss(pred, imgs, mask, norm_pix_loss, p=4):
    """He et al. 2022 (MAE), written out: mean over the masked patches of the per-patch MSE to the
    (normalised) pixels."""
    target = patchify(imgs, p).double()
    total, count = 0.0, 0
    for i, j in torch.nonzero(mask).tolist():
        t = target[i, j]
        if norm_pix_loss:
            t = (t - t.mean()) / (t.var(unbiased=True) + 1e-6).sqrt()
        total += ((pred[i, j].double() - t) ** 2).mean().item()
        count += 1
    return total / count


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_model_loss_ignores_visible_patches(norm_pix_loss):
    """End to end, with fixed noise: changing the decoder's prediction on the *visible* patches
    leaves the loss exactly unchanged; changing it on one *masked* patch changes the loss by what
    the formula says."""
    torch.manual_seed(0)
    m = build_mae(image_size=28, channels=1, norm_pix_loss=norm_pix_loss).eval()
    x, noise = torch.rand(2, 1, 28, 28), torch.rand(2, 49)

    def run(edit=None):
        """The model's (loss, pred, mask), with `edit` applied to the decoder's output
        (positions 1.. are the patches)."""
        hook = (
            m.decoder_pred.register_forward_hook(lambda mod, inp, out: edit(out.clone()))
            if edit
            else None
        )
        try:
            with torch.no_grad():
                return m(x, noise=noise)
        finally:
            if hook:
                hook.remove()

    loss, pred, mask = run()
    assert mask.sum().item() == 2 * (49 - 12)
    assert loss.item() == pytest.approx(_reference_loss(pred, x, mask, norm_pix_loss), rel=1e-5)
    visible = mask == 0

    def scramble_visible(out):
        out[:, 1:][visible] = 50 * torch.randn_like(out[:, 1:][visible])
        return out

    loss_v, pred_v, _ = run(scramble_visible)
    assert (pred_v[visible] - pred[visible]).abs().mean() > 10  # the visible predictions did change
    assert torch.equal(pred_v[~visible], pred[~visible])
    assert loss_v.item() == loss.item()  # exactly: they never enter the loss

    i, j = torch.nonzero(mask)[0].tolist()

    def nudge_one_masked(out):
        out[i, 1 + j] += 0.5
        return out

    loss_m, pred_m, _ = run(nudge_one_masked)
    assert loss_m.item() != loss.item()
    assert loss_m.item() == pytest.approx(_reference_loss(pred_m, x, mask, norm_pix_loss), rel=1e-5)
    assert loss_m.item() - loss.item() == pytest.approx(
        _reference_loss(pred_m, x, mask, norm_pix_loss)
        - _reference_loss(pred, x, mask, norm_pix_loss),
        rel=1e-3,
    )
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
