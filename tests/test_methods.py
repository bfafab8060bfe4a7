"MoCo, BYOL and DINO: closed forms, independent formulas, queue and EMA semantics, short real runs."

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_course.backbones import SmallConvNet, build_backbone
from ssl_course.vit import vit_tiny
from ssl_course.byol import build_byol, byol_loss
from ssl_course.data import load_dataset
from ssl_course.dino import build_dino, dino_loss, update_center
from ssl_course.moco import (
    FeatureQueue,
    build_moco,
    cosine_momentum,
    ema_update,
    moco_loss,
    momentum_copy,
)
from ssl_course.train import build_method, fit


# --- MoCo -----------------------------------------------------------------------------------------
def test_moco_loss_closed_forms_and_reference():
    e = torch.eye(8)
    K, tau = 12, 0.2
    assert moco_loss(e[:4], e[:4], e[[4, 5, 6, 7] * 3], tau).item() == pytest.approx(
        math.log(1 + K * math.exp(-1 / tau)), rel=1e-5
    )
    assert moco_loss(e[:2], e[2:4], e[[4, 5, 6, 7] * 3], tau).item() == pytest.approx(
        math.log(K + 1), rel=1e-5
    )
    g = torch.Generator().manual_seed(0)
    q, k, queue = (
        torch.randn(6, 5, generator=g),
        torch.randn(6, 5, generator=g),
        torch.randn(9, 5, generator=g),
    )
    qn, kn, nn_ = F.normalize(q, dim=1), F.normalize(k, dim=1), F.normalize(queue, dim=1)
    ref = torch.stack(
        [
            -torch.log(
                torch.exp(qn[i] @ kn[i] / 0.3)
                / (torch.exp(qn[i] @ kn[i] / 0.3) + torch.exp(nn_ @ qn[i] / 0.3).sum())
            )
            for i in range(6)
        ]
    ).mean()
    assert moco_loss(q, k, queue, 0.3).item() == pytest.approx(ref.item(), rel=1e-5)


def test_moco_keys_get_no_gradient():
    q, k = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    moco_loss(q, k, torch.randn(5, 3)).backward()
    assert q.grad is not None and k.grad is None


def test_queue_pointer_wraps_and_keeps_newest():
    fq = FeatureQueue(5, 2)
    fq.enqueue(torch.tensor([[1.0, 0]] * 4))
    assert int(fq.ptr) == 4
    fq.enqueue(torch.tensor([[0, 1.0]] * 3))
    assert int(fq.ptr) == 2
    assert fq.queue.tolist() == [[0, 1], [0, 1], [1, 0], [1, 0], [0, 1]]
    fq.enqueue(
        torch.arange(14, dtype=torch.float).view(7, 2) + 1
    )  # larger than the queue: newest 5 kept
    assert int(fq.ptr) == 2 and torch.allclose(fq.queue.norm(dim=1), torch.ones(5))


def test_ema_update_equals_formula_and_schedule():
    online, target = nn.Linear(4, 3), None
    target = momentum_copy(online)
    with torch.no_grad():
        online.weight.mul_(3).add_(1)
    before = target.weight.clone()
    ema_update(target, online, 0.99)
    torch.testing.assert_close(target.weight, 0.99 * before + 0.01 * online.weight)
    assert cosine_momentum(0, 10, 0.996) == pytest.approx(0.996) and cosine_momentum(
        10, 10, 0.996
    ) == pytest.approx(1.0)
    assert cosine_momentum(5, 10, 0.9) == pytest.approx(0.95)


def test_ema_update_averages_parameters_only_and_keeps_the_target_batchnorm_statistics():
    """MoCo (`_momentum_update_key_encoder`), BYOL and DINO average parameters only; the target's
    batch-norm running statistics are its own, updated by its own forward passes
    (He et al. 2020; Grill et al. 2020; Caron et al. 2021)."""
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    target = momentum_copy(online)
    online(torch.randn(64, 4) * 3 + 2)  # different data: different running statistics
    target(torch.randn(64, 4))
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    t_params = [p.clone() for p in target.parameters()]
    t_bufs = {n: b.clone() for n, b in target.named_buffers()}
    assert not torch.allclose(t_bufs["1.running_mean"], online[1].running_mean)
    ema_update(target, online, 0.9)
    for n, b in target.named_buffers():
        assert torch.equal(b, t_bufs[n]), (
            n
        )  # running_mean, running_var, num_batches_tracked untouched
    for a, before, o in zip(target.parameters(), t_params, online.parameters()):
        torch.testing.assert_close(a, 0.9 * before + 0.1 * o, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["moco", "byol", "dino"])
def test_target_network_keeps_its_own_batchnorm_statistics_in_training(name):
    """In a real training step the target runs in training mode and its BN buffers come from its own
    forward pass."""
    torch.manual_seed(0)
    kw = {"moco": dict(queue_size=32), "byol": {}, "dino": {}}[name]
    m = build_method(name, encoder=SmallConvNet(1, width=8), **kw).train()
    target = {"moco": "key_encoder", "byol": "target_encoder", "dino": "teacher_encoder"}[name]
    tgt, onl = getattr(m, target), m.encoder
    with torch.no_grad():  # let the online network drift away from the target
        for p in onl.parameters():
            p.add_(0.5 * torch.randn_like(p))
    bn_t = next(mod for mod in tgt.modules() if isinstance(mod, nn.BatchNorm2d))
    bn_o = next(mod for mod in onl.modules() if isinstance(mod, nn.BatchNorm2d))
    before = bn_t.running_mean.clone()
    out = m.training_step((torch.rand(16, 1, 28, 28), None))
    out["loss"].backward()
    assert tgt.training and not torch.equal(
        bn_t.running_mean, before
    )  # its own forward updated its statistics
    after_forward = {n: b.clone() for n, b in tgt.named_buffers()}
    m.on_step_end(0, 10)
    for n, b in tgt.named_buffers():
        assert torch.equal(b, after_forward[n]), n
    assert not torch.allclose(bn_t.running_mean, bn_o.running_mean)


def test_moco_method_moves_the_key_encoder_by_ema():
    torch.manual_seed(0)
    m = build_moco(SmallConvNet(1, width=8), queue_size=32, momentum=0.5)
    out = m.training_step((torch.rand(8, 1, 28, 28), None))
    out["loss"].backward()
    assert int(m.queue.ptr) == 8 and all(p.grad is None for p in m.key_encoder.parameters())
    k0 = [p.clone() for p in m.key_encoder.parameters()]
    with torch.no_grad():
        for p in m.encoder.parameters():
            p.add_(1.0)
    m.on_step_end(0, 1)
    for a, b, c in zip(m.key_encoder.parameters(), k0, m.encoder.parameters()):
        torch.testing.assert_close(a, 0.5 * b + 0.5 * c)


# --- BYOL -----------------------------------------------------------------------------------------
def test_byol_loss_closed_forms_symmetry_and_stopgrad():
    v = torch.randn(6, 5)
    assert byol_loss(v, 2 * v).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(v, -v).item() == pytest.approx(4.0, abs=1e-5)
    assert byol_loss(torch.eye(3), torch.eye(3).roll(1, 0)).item() == pytest.approx(2.0, abs=1e-6)
    w = torch.randn(6, 5)
    assert byol_loss(v, w).item() == pytest.approx(byol_loss(w, v).item(), rel=1e-6)
    p, z = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    byol_loss(p, z).backward()
    assert z.grad is None and p.grad is not None


def test_byol_loss_falls_in_50_real_steps():
    torch.manual_seed(0)
    tr = load_dataset("digits", "train", image_size=28)
    m = build_byol(SmallConvNet(1, width=16), base_momentum=0.99)
    h = fit(m, tr.without_labels(), steps=50, batch_size=64, lr=3e-3, progress=False, device="cpu")
    assert sum(h["loss"][-5:]) / 5 < sum(h["loss"][:5]) / 5 - 0.5


def test_byol_without_stop_gradient_collapses():
    torch.manual_seed(0)
    tr = load_dataset("digits", "train", image_size=28)
    m = build_byol(SmallConvNet(1, width=16), predictor=False, stop_gradient=False)
    h = fit(m, tr.without_labels(), steps=30, batch_size=64, lr=3e-3, progress=False, device="cpu")
    assert h["loss"][-1] < 0.05


# --- DINO -----------------------------------------------------------------------------------------
def test_dino_loss_uniform_is_log_k_and_matches_reference():
    K = 50
    flat = [torch.zeros(3, K)] * 4
    assert dino_loss(flat, flat[:2], torch.zeros(1, K)).item() == pytest.approx(
        math.log(K), rel=1e-5
    )
    g = torch.Generator().manual_seed(1)
    s = [torch.randn(2, 6, generator=g) for _ in range(3)]
    t = [torch.randn(2, 6, generator=g) for _ in range(2)]
    c = torch.randn(1, 6, generator=g)
    ts, tt = 0.2, 0.1
    pairs = [(i, v) for i in range(2) for v in range(3) if v != i]
    ref = sum(
        -(F.softmax((t[i] - c) / tt, -1) * F.log_softmax(s[v] / ts, -1)).sum(-1).mean()
        for i, v in pairs
    ) / len(pairs)
    assert dino_loss(s, t, c, ts, tt).item() == pytest.approx(ref.item(), rel=1e-5)
    # same-view pairs skipped: with one teacher view, student view 0 does not matter
    s2 = [s[0] + 100, s[1], s[2]]
    assert dino_loss(s2, t[:1], c, ts, tt).item() == pytest.approx(
        dino_loss(s, t[:1], c, ts, tt).item(), rel=1e-6
    )


def test_dino_center_update_equals_formula():
    c = torch.randn(1, 4)
    t = [torch.randn(5, 4), torch.randn(5, 4)]
    torch.testing.assert_close(
        update_center(c, t, 0.9), 0.9 * c + 0.1 * torch.cat(t).mean(0, keepdim=True)
    )


def test_dino_method_views_and_teacher():
    torch.manual_seed(0)
    m = build_dino(vit_tiny(1, 28, dim=48, depth=2), out_dim=32, n_local=3)
    g, l = m.crops(torch.rand(4, 1, 28, 28))
    assert len(g) == 2 and len(l) == 3 and l[0].shape[-1] == 12
    m.training_step((torch.rand(4, 1, 28, 28), None))["loss"].backward()
    assert all(p.grad is None for p in m.teacher_encoder.parameters())
    torch.testing.assert_close(m.head.last_layer.weight.norm(dim=1), torch.ones(32))
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        m.encoder(torch.rand(2, 1, 30, 30))


def test_all_methods_registered_for_the_cli():
    enc = lambda: SmallConvNet(1, width=8)
    for name in ("simclr", "moco", "byol"):
        assert hasattr(build_method(name, enc()), "training_step")
    assert hasattr(build_method("dino", vit_tiny(1, 28, dim=48, depth=1)), "teacher_encoder")
    assert build_backbone("vit_tiny", 3, image_size=32).num_patches == 64


def test_moco_loss_falls_in_50_real_steps_once_the_queue_is_full():
    """The queue starts with random (easy) negatives, so the loss first jumps; after that it must
    fall."""
    torch.manual_seed(0)
    tr = load_dataset("digits", "train", image_size=28)
    m = build_moco(SmallConvNet(1, width=16), queue_size=128, momentum=0.9)
    h = fit(
        m,
        tr.without_labels(),
        steps=50,
        batch_size=64,
        lr=3e-3,
        progress=False,
        device="cpu",
        seed=0,
    )
    means = [sum(h["loss"][i : i + 5]) / 5 for i in range(0, 50, 5)]
    assert max(means[1:5]) - means[-1] > 0.15
