"""Clustering (chapter 14c): Sinkhorn-Knopp against a plain re-derivation of the official
algorithm and its promised sums (also split over 2 processes), SwAV's swapped prediction against a
plain loop, prototypes, the equal-size constraint, DeepCluster's k-means (empty clusters
reassigned), whitening, cluster weights, the classifier's reset, resuming, bad input, and the
losses falling on real data."""

import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssl_course.backbones import SmallConvNet
from ssl_course.clustering import (
    build_deepcluster,
    build_swav,
    cluster_quality,
    kmeans,
    pca_whiten,
    sinkhorn_knopp,
    swav_loss,
)
from ssl_course.data import ImageDataset, load_dataset
from ssl_course.train import METHODS, fit

from _torchrun import torchrun
from pathlib import Path

HERE = Path(__file__).resolve().parent


def official_sinkhorn(out, eps=0.05, iters=3):
    "facebookresearch/swav distributed_sinkhorn on one process, in float64 numpy."
    Q = np.exp(out.double().numpy() / eps).T
    B, K = Q.shape[1], Q.shape[0]
    Q /= Q.sum()
    for _ in range(iters):
        Q /= Q.sum(axis=1, keepdims=True)
        Q /= K
        Q /= Q.sum(axis=0, keepdims=True)
        Q /= B
    Q *= B
    return torch.from_numpy(Q.T)


def test_sinkhorn_equals_the_official_algorithm_and_keeps_its_sums():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(64, 10, generator=g) * 2 - 1
    for iters in (1, 3, 10):
        torch.testing.assert_close(
            sinkhorn_knopp(s, iters=iters).double(),
            official_sinkhorn(s, iters=iters),
            rtol=1e-4,
            atol=1e-6,
        )
    q = sinkhorn_knopp(s, iters=500)
    torch.testing.assert_close(q.sum(1), torch.ones(64))
    torch.testing.assert_close(q.sum(0), torch.full((10,), 6.4), rtol=1e-4, atol=1e-4)
    # a constant added to every score changes nothing; uniform scores give the uniform code
    torch.testing.assert_close(sinkhorn_knopp(s + 3.0), sinkhorn_knopp(s))
    # nor does a per-prototype shift (absorbed by the prototype's rescaling): no prototype wins all
    torch.testing.assert_close(sinkhorn_knopp(s + torch.linspace(0, 1, 10)), sinkhorn_knopp(s))
    torch.testing.assert_close(sinkhorn_knopp(torch.zeros(6, 4)), torch.full((6, 4), 0.25))
    # a range of 20 at epsilon 0.05: no overflow (float64, the max subtracted first); 200: an error
    assert torch.isfinite(sinkhorn_knopp(s * 10)).all()
    with pytest.raises(ValueError, match="cosine similarities"):
        sinkhorn_knopp(s * 100)


def test_sinkhorn_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        sinkhorn_knopp(torch.tensor([[0.1, float("nan")], [0.2, 0.3]]))
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        sinkhorn_knopp(torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn_knopp(torch.zeros(3, 4), epsilon=0)


def test_sinkhorn_on_two_processes_equals_one_process(tmp_path):
    "The official code all-reduces Sinkhorn's sums: codes of a split batch = codes of the whole."
    proc = torchrun(HERE / "_ddp_sinkhorn.py", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from safetensors.torch import load_file

    got = load_file(str(tmp_path / "codes.safetensors"))["codes"]
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(24, 7, generator=g) * 2 - 1
    scores[12:] += 0.3
    torch.testing.assert_close(got, sinkhorn_knopp(scores), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(got[:12], sinkhorn_knopp(scores[:12]), atol=1e-3)  # not per half


def test_swav_loss_equals_a_plain_loop():
    "facebookresearch/swav main_swav.py's loop over crops_for_assign and the other crops."
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(5, 9, generator=g) for _ in range(6)]
    codes = [F.softmax(torch.randn(5, 9, generator=g), 1) for _ in range(2)]
    ref = 0.0
    for i in range(2):
        sub = 0.0
        for v in range(6):
            if v == i:
                continue
            x = views[v] / 0.1
            for n in range(5):
                sub -= (
                    sum(codes[i][n, k] * (x[n, k] - torch.logsumexp(x[n], 0)) for k in range(9)) / 5
                )
        ref += sub / 5
    ref /= 2
    torch.testing.assert_close(swav_loss(views, codes, 0.1), torch.as_tensor(ref).float())
    assert swav_loss([torch.zeros(3, 7)] * 2, [torch.eye(7)[:3]]).item() == pytest.approx(
        math.log(7)
    )


def test_swav_network_prototypes_and_registration():
    torch.manual_seed(0)
    m = build_swav(SmallConvNet(1, width=8), n_prototypes=12, dim=16, hidden_dim=32,
                   freeze_prototypes_steps=2)  # fmt: skip
    assert "2006.09882" in METHODS["swav"].paper and "1807.05520" in METHODS["deepcluster"].paper
    with torch.no_grad():
        m.prototypes.weight.mul_(5)  # un-normalised rows are normalised again before each step
    x = torch.rand(8, 1, 28, 28)
    for step in range(3):
        m.zero_grad()
        out = m.training_step((x,))
        out["loss"].backward()
        torch.testing.assert_close(m.prototypes.weight.norm(dim=1), torch.ones(12))
        assert (m.prototypes.weight.grad is None) == (step < 2)
        m.on_step_end(step, 3)
    assert 1 <= out["prototypes_used"] <= 12
    for kw in ({"n_prototypes": 1}, {"dim": 0}, {"n_local": -1}):
        with pytest.raises(ValueError):
            build_swav(SmallConvNet(1, width=8), **kw)
    with pytest.raises(ValueError, match="at least 2 images"):
        m.training_step((x[:1],))


def test_swav_loss_falls_in_50_real_steps_and_needs_equipartition():
    """On real digits: the loss falls with Sinkhorn codes; with plain softmax codes (no equal-size
    constraint) the batch piles into a few prototypes."""
    tr = load_dataset("digits", "train", image_size=28)
    res = {}
    for eq in (True, False):
        torch.manual_seed(0)
        m = build_swav(SmallConvNet(1, width=16), n_prototypes=30, hidden_dim=256, dim=64,
                       freeze_prototypes_steps=5, equipartition=eq)  # fmt: skip
        h = fit(m, tr.without_labels(), steps=50, batch_size=64, lr=1e-3, progress=False,
                device="cpu")  # fmt: skip
        res[eq] = h
    h = res[True]
    first, last = sum(h["loss"][:5]) / 5, sum(h["loss"][-5:]) / 5
    assert last < first - 0.3, (first, last)
    used_eq = sum(h["prototypes_used"][-10:]) / 10
    used_no = sum(res[False]["prototypes_used"][-10:]) / 10
    assert used_eq >= 20 and used_no <= used_eq / 3, (used_eq, used_no)


def test_pca_whiten_and_kmeans_closed_forms():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 5, generator=g) @ torch.randn(5, 5, generator=g) + 3
    w = pca_whiten(x, 3)
    assert w.shape == (400, 3)
    torch.testing.assert_close(w.norm(dim=1), torch.ones(400))
    # invariant to a global scale and shift of the features
    torch.testing.assert_close(pca_whiten(10 * x - 7, 3).abs(), w.abs(), rtol=1e-3, atol=1e-3)
    # Lloyd's iterations against a plain numpy implementation from the same start
    pts = torch.randn(200, 2, generator=g)
    init = pts[:4].clone()
    c, a, n_re = kmeans(pts, 4, iters=10, init=init)
    C, P = init.double().numpy(), pts.double().numpy()
    for _ in range(10):
        A = ((P[:, None] - C[None]) ** 2).sum(-1).argmin(1)
        C = np.stack([P[A == j].mean(0) for j in range(4)])
    assert n_re == 0
    torch.testing.assert_close(c.double(), torch.from_numpy(C), rtol=1e-4, atol=1e-5)
    assert (a.numpy() == ((P[:, None] - C[None]) ** 2).sum(-1).argmin(1)).all()


def test_kmeans_reassigns_empty_clusters():
    g = torch.Generator().manual_seed(0)
    pts = torch.cat(
        [torch.randn(50, 2, generator=g) * 0.1, torch.randn(50, 2, generator=g) * 0.1 + 5]
    )
    init = torch.tensor([[0.0, 0.0], [5.0, 5.0], [100.0, 100.0], [-100.0, 0.0]])
    c, a, n_re = kmeans(pts, 4, iters=5, init=init)
    assert n_re >= 2 and torch.bincount(a, minlength=4).min() > 0
    with pytest.raises(ValueError, match="1 <= k"):
        kmeans(pts, 0)
    with pytest.raises(ValueError, match="NaN"):
        kmeans(torch.tensor([[float("inf"), 0.0], [0.0, 0.0]]), 1)
    with pytest.raises(ValueError, match="init must have shape"):
        kmeans(pts, 2, init=torch.zeros(3, 2))


def _tiny(n=96):
    torch.manual_seed(0)
    return ImageDataset(torch.randint(0, 255, (n, 1, 28, 28), dtype=torch.uint8), None, "tiny")


def test_deepcluster_weights_reset_and_bad_input():
    data = _tiny()
    dc = build_deepcluster(
        SmallConvNet(1, width=8), k=6, hidden_dim=32, pca_dim=8, recluster_every=2
    )
    opt = torch.optim.AdamW(dc.parameters(), lr=1e-3)
    wrapped = dc.setup_fit(data, opt)
    x, _, i = torch.utils.data.default_collate([wrapped[j] for j in range(16)])
    assert i.tolist() == list(range(16))
    for step in range(3):
        opt.zero_grad()
        dc.training_step((x, None, i))["loss"].backward()
        opt.step()
        if step == 1:
            assert dc.classifier.weight in opt.state  # trained: the optimiser holds its moments
        dc.on_step_end(step, 3)
    # step 2 re-clustered: the new classifier starts without the old one's moments
    dc.recluster()
    assert dc.classifier.weight not in opt.state and dc.classifier.bias.abs().sum() == 0
    counts = torch.bincount(dc.labels, minlength=6).float()
    used = counts > 0
    prod = dc.weights[used] * counts[used]
    torch.testing.assert_close(prod, prod.mean().expand_as(prod))  # weight x size constant
    torch.testing.assert_close(dc.weights[dc.labels].mean(), torch.tensor(1.0))
    with pytest.raises(ValueError, match="index"):
        dc.training_step((x,))
    with pytest.raises(ValueError, match="at least 2 images"):
        dc.training_step((x[:1], i[:1]))
    with pytest.raises(ValueError, match="same dataset"):
        dc.setup_fit(_tiny(50), opt)
    with pytest.raises(RuntimeError, match="needs the dataset"):
        build_deepcluster(SmallConvNet(1, width=8), k=3).recluster()
    with pytest.raises(ValueError, match="k must be"):
        build_deepcluster(SmallConvNet(1, width=8), k=1)


def test_deepcluster_resume_is_exact(tmp_path):
    "A run stopped between two clusterings resumes with its pseudo-labels and ends identical."
    data = _tiny()
    mk = lambda: build_deepcluster(SmallConvNet(1, width=8), k=6, hidden_dim=32, pca_dim=8,
                                   recluster_every=4)  # fmt: skip
    kw = dict(steps=8, batch_size=16, progress=False, device="cpu", seed=0, checkpoint_every=3)
    torch.manual_seed(0)
    a = mk()
    fit(a, data, checkpoint_dir=tmp_path / "a", keep_checkpoints=5, **kw)
    ckpts = sorted(p.name for p in (tmp_path / "a").iterdir() if p.is_dir())
    shutil.copytree(tmp_path / "a" / ckpts[1], tmp_path / "b" / ckpts[1])  # step 6: mid-epoch
    torch.manual_seed(1)
    b = mk()
    fit(b, data, checkpoint_dir=tmp_path / "b", resume=True, **kw)
    assert torch.equal(a.labels, b.labels)
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(v, w), k


def test_deepcluster_loss_falls_in_50_real_steps():
    tr = load_dataset("digits", "train", image_size=28)
    torch.manual_seed(0)
    dc = build_deepcluster(SmallConvNet(1, width=16), k=50, pca_dim=32, recluster_every=1000)
    h = fit(dc, tr.without_labels(), steps=50, batch_size=64, lr=1e-3, progress=False, device="cpu")
    first, last = sum(h["loss"][:5]) / 5, sum(h["loss"][-5:]) / 5
    assert last < first - 0.5, (first, last)
    assert dc.cluster_log[0]["clusters_used"] == 50


def test_cluster_quality():
    y = torch.arange(300) % 3
    x = F.one_hot(y, 3).float() + 0.01 * torch.randn(300, 3)
    assert cluster_quality(x, y) == {"nmi": 1.0, "purity": 1.0, "k": 3}
    r = cluster_quality(torch.randn(300, 4), y)
    assert r["nmi"] < 0.05 and 1 / 3 <= r["purity"] < 0.45
    with pytest.raises(ValueError, match="features"):
        cluster_quality(torch.zeros(3, 2), torch.zeros(4))
