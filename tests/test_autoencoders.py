"""Autoencoders (ssl_course.autoencoders): closed-form KL, reparameterisation, noise models,
learning on real data, bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Independent, Normal, kl_divergence

from ssl_course.autoencoders import (
    VAE,
    Autoencoder,
    ConvDecoder,
    build_autoencoder,
    build_dae,
    build_vae,
    gaussian_kl,
    gaussian_noise,
    masking_noise,
    reconstruction_loss,
    reparameterize,
)
from ssl_course.backbones import SmallConvNet
from ssl_course.data import load_dataset
from ssl_course.train import build_method, fit, list_methods


def test_kl_of_the_prior_to_itself_is_zero():
    assert torch.equal(gaussian_kl(torch.zeros(4, 7), torch.zeros(4, 7)), torch.zeros(4))


@pytest.mark.parametrize("dim", [1, 3, 16])
def test_kl_matches_torch_distributions(dim):
    torch.manual_seed(dim)
    mu, logvar = 2 * torch.randn(5, dim), torch.randn(5, dim)
    q = Independent(Normal(mu, (0.5 * logvar).exp()), 1)
    p = Independent(Normal(torch.zeros(dim), torch.ones(dim)), 1)
    assert torch.allclose(gaussian_kl(mu, logvar), kl_divergence(q, p), rtol=1e-5, atol=1e-6)
    # a unit-variance Gaussian shifted by mu costs |mu|^2 / 2
    assert gaussian_kl(torch.full((1, dim), 2.0), torch.zeros(1, dim)).item() == pytest.approx(
        2.0 * dim
    )


def test_reparameterize_moments_and_gradients():
    torch.manual_seed(0)
    mu = torch.tensor([[-1.0, 3.0]], requires_grad=True)
    logvar = torch.tensor([[math.log(4.0), math.log(0.25)]], requires_grad=True)
    z = reparameterize(mu.expand(50000, 2), logvar.expand(50000, 2))
    assert torch.allclose(z.mean(0), torch.tensor([-1.0, 3.0]), atol=0.03)
    assert torch.allclose(z.std(0), torch.tensor([2.0, 0.5]), atol=0.03)
    (z**2).mean().backward()
    assert mu.grad.abs().min() > 0 and logvar.grad.abs().min() > 0
    eps = torch.randn(3, 2)  # with a given eps it is exactly mu + sigma * eps
    assert torch.allclose(reparameterize(torch.ones(3, 2), torch.zeros(3, 2), eps), 1 + eps)


def test_reconstruction_loss_is_the_bernoulli_nll():
    torch.manual_seed(0)
    x, logits = torch.rand(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    p = torch.sigmoid(logits)
    ref = -(x * p.log() + (1 - x) * (1 - p).log()).flatten(1).sum(1)
    assert torch.allclose(reconstruction_loss(logits, x), ref, rtol=1e-5)
    assert torch.allclose(reconstruction_loss(logits, x, "mse"), ((p - x) ** 2).flatten(1).sum(1))
    with pytest.raises(ValueError, match="'bce' or 'mse'"):
        reconstruction_loss(logits, x, "l1")
    with pytest.raises(ValueError, match="differ in shape"):
        reconstruction_loss(logits, x[:, :, :2])


def test_noise_models():
    torch.manual_seed(0)
    x = torch.rand(64, 3, 8, 8) * 0.9 + 0.05  # no exact zeros in the clean images
    m = masking_noise(x, 0.3)
    dropped = m == 0
    assert torch.equal(dropped[:, 0], dropped[:, 2])  # a masked pixel is zero in every channel
    assert 0.25 < dropped[:, 0].float().mean() < 0.35
    assert torch.equal(m[~dropped], x[~dropped])
    g = gaussian_noise(x, 0.5)
    assert g.min() >= 0 and g.max() <= 1 and (g - x).abs().mean() > 0.1
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        masking_noise(x, 1.0)


@pytest.mark.parametrize("size, channels", [(8, 1), (16, 1), (28, 1), (30, 3), (32, 3)])
def test_decoder_output_shape(size, channels):
    assert ConvDecoder(64, channels, size)(torch.randn(2, 64)).shape == (2, channels, size, size)


def test_bad_input_errors_name_the_fix():
    ae = Autoencoder(SmallConvNet(1), image_size=28, channels=1)
    with pytest.raises(ValueError, match="image_size=32"):
        ae(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match="channels=3"):
        ae.training_step((torch.rand(2, 3, 28, 28), None))
    with pytest.raises(ValueError, match="'gaussian' or 'masking'"):
        build_dae(SmallConvNet(1), noise="salt")
    with pytest.raises(ValueError, match=">= 1"):
        VAE(SmallConvNet(1), latent_dim=0)
    with pytest.raises(ValueError, match=r"\(N, 64\)"):
        ConvDecoder(64)(torch.randn(2, 32))
    with pytest.raises(ValueError, match="at least 4 px"):
        ConvDecoder(64, 1, 3)


def test_methods_are_registered_and_build():
    names = {m.name for m in list_methods()}
    assert {"autoencoder", "dae", "vae"} <= names
    x = torch.rand(4, 1, 16, 16)
    for name in ("autoencoder", "dae", "vae"):
        m = build_method(name, SmallConvNet(1), image_size=16, channels=1)
        out = m.training_step((x, torch.zeros(4)))
        loss = out["loss"] if isinstance(out, dict) else out
        assert loss.ndim == 0 and math.isfinite(loss.item())
        assert m.encoder(x).shape == (4, 128)


@pytest.fixture(scope="module")
def digits16():
    "Real images, small and fast: the bundled handwritten digits at 16 px."
    return load_dataset("digits", "train", image_size=16), load_dataset(
        "digits", "test", image_size=16
    )


def test_reconstruction_loss_falls_on_real_images(digits16):
    train, test = digits16
    torch.manual_seed(0)
    ae = build_autoencoder(SmallConvNet(1), image_size=16, channels=1)
    x = test.images[:256].float() / 255
    before = F.mse_loss(ae.reconstruct(x), x).item()
    h = fit(
        ae,
        train.without_labels(),
        steps=60,
        batch_size=64,
        lr=3e-3,
        progress=False,
        device="cpu",
        seed=0,
    )
    assert sum(h["loss"][-5:]) / 5 < 0.85 * h["loss"][0]
    assert F.mse_loss(ae.reconstruct(x), x).item() < 0.6 * before  # held-out images too


def test_denoised_output_is_closer_to_clean_than_the_noisy_input(digits16):
    train, test = digits16
    torch.manual_seed(0)
    dae = build_dae(SmallConvNet(1), image_size=16, channels=1, noise="gaussian", noise_level=0.3)
    fit(
        dae,
        train.without_labels(),
        steps=80,
        batch_size=64,
        lr=3e-3,
        progress=False,
        device="cpu",
        seed=0,
    )
    x = test.images[:256].float() / 255
    torch.manual_seed(1)
    noisy = gaussian_noise(x, 0.3)
    assert F.mse_loss(dae.reconstruct(noisy), x) < 0.8 * F.mse_loss(noisy, x)


def test_vae_learns_and_samples_images(digits16):
    train, _ = digits16
    torch.manual_seed(0)
    vae = build_vae(SmallConvNet(1), image_size=16, channels=1, latent_dim=4)
    h = fit(
        vae,
        train.without_labels(),
        steps=40,
        batch_size=64,
        lr=3e-3,
        progress=False,
        device="cpu",
        seed=0,
    )
    assert sum(h["loss"][-5:]) / 5 < h["loss"][0] and min(h["kl"]) >= 0
    assert all(
        abs(r["loss"] - r["recon"] - r["kl"] / 256) < 1e-4 for r in h.rows
    )  # loss = (recon + beta KL) / D
    s = vae.sample(6, generator=torch.Generator().manual_seed(0))
    assert s.shape == (6, 1, 16, 16) and s.min() >= 0 and s.max() <= 1
