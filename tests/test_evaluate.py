"kNN, probes, label-efficiency curves and embedding metrics (ssl_course.evaluate)."

import math

import pytest
import torch
import torch.nn as nn

from ssl_course.data import DataError, load_dataset
from ssl_course.evaluate import (
    alignment,
    effective_rank,
    embed,
    feature_dim,
    knn_accuracy,
    knn_predict,
    label_efficiency_curve,
    linear_probe,
    summarize_curve,
    train_supervised,
    uniformity,
)


def test_knn_on_a_hand_built_case():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    test = torch.tensor([[1.0, 0.05], [0.05, 1.0], [-1.0, 0.1]])
    assert knn_accuracy(train, labels, test, torch.tensor([0, 1, 2]), k=1) == 1.0
    # weighted vote, closed form: with k=3 the query [1, 0] sees sims 1, cos(0.1107), 0 -> class 0
    # wins
    scores = knn_predict(train, labels, torch.tensor([[1.0, 0.0]]), k=3, temperature=0.5)
    c = torch.nn.functional.cosine_similarity(
        torch.tensor([[0.9, 0.1]]), torch.tensor([[1.0, 0.0]])
    ).item()
    s1 = torch.nn.functional.cosine_similarity(
        torch.tensor([[0.1, 0.9]]), torch.tensor([[1.0, 0.0]])
    ).item()
    expected = torch.tensor([[math.exp(1 / 0.5) + math.exp(c / 0.5), math.exp(s1 / 0.5), 0.0]])
    expected = expected * math.exp(
        -1 / 0.5
    )  # scores are exp((sim - max sim) / T): the nearest has sim 1
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(DataError, match="unlabelled"):
        knn_predict(train, torch.tensor([0, 0, 1, 1, -1]), test)


def test_linear_probe_on_digits_beats_chance_by_far():
    tr, te = load_dataset("digits", "train"), load_dataset("digits", "test")
    flat = lambda d: d.images.flatten(1).float() / 16
    res = linear_probe(flat(tr), tr.labels, flat(te), te.labels)
    assert res.accuracy > 0.9  # chance is 0.1
    # shuffled labels carry no signal: the same probe drops to about chance
    perm = tr.labels[torch.randperm(len(tr), generator=torch.Generator().manual_seed(0))]
    assert linear_probe(flat(tr), perm, flat(te), te.labels).accuracy < 0.25


def test_supervised_baseline_learns_digits():
    torch.manual_seed(0)
    tr, te = load_dataset("digits", "train"), load_dataset("digits", "test")
    enc = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU())
    enc.out_dim = 64
    res = train_supervised(enc, tr, te, steps=150, lr=3e-3, augment=None)
    assert res.accuracy > 0.85
    with pytest.raises(DataError, match="unlabelled"):
        train_supervised(enc, tr.without_labels(), te, steps=1)


def test_embed_and_feature_dim():
    ds = load_dataset("digits", "test")
    enc = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    f, y = embed(enc, ds, batch_size=100)
    assert f.shape == (len(ds), 5) and torch.equal(y, ds.labels)
    assert feature_dim(enc, torch.zeros(1, 1, 8, 8)) == 5


def test_label_efficiency_curve_rows_and_summary():
    labels = torch.arange(4).repeat_interleave(10)
    seen = []
    ev = lambda idx, seed: (seen.append((len(idx), seed)), len(idx) / 100 + seed / 1000)[1]
    rows = label_efficiency_curve(labels, {"a": ev}, labels_per_class=(1, 5), seeds=(0, 1))
    assert [(r["labels_per_class"], r["seed"]) for r in rows] == [(1, 0), (1, 1), (5, 0), (5, 1)]
    assert seen == [(4, 0), (4, 1), (20, 0), (20, 1)]
    s = {r["labels_per_class"]: r for r in summarize_curve(rows)}
    assert (
        s[5]["mean"] == pytest.approx(0.2005)
        and s[5]["std"] == pytest.approx(0.0005)
        and s[1]["n"] == 2
    )


def test_alignment_uniformity_rank_closed_forms():
    z = torch.randn(64, 8)
    assert alignment(z, 3 * z).item() == pytest.approx(
        0.0, abs=1e-6
    )  # scale does not matter after L2-norm
    assert alignment(z, -z).item() == pytest.approx(4.0, abs=1e-5)  # ||u - (-u)||^2 = 4
    e = torch.eye(4)  # pairwise squared distance 2
    assert uniformity(e, t=2.0).item() == pytest.approx(-4.0, abs=1e-5)
    assert effective_rank(torch.eye(6)) == pytest.approx(6.0, rel=1e-4)
    assert effective_rank(torch.ones(10, 6)) == pytest.approx(1.0, rel=1e-3)


def test_knn_vote_is_stable_at_tiny_temperatures():
    """exp(sim / T) overflows for T ~ 0.01; the vote must still pick the class of the most similar
    neighbours."""
    import torch
    from ssl_course.evaluate import knn_predict

    g = torch.Generator().manual_seed(0)
    tr = torch.randn(200, 16, generator=g)
    y = torch.arange(200) % 4
    te = tr[:40] + 0.01 * torch.randn(
        40, 16, generator=g
    )  # each test item sits next to one training item
    for t in (0.005, 0.01, 0.07):
        scores = knn_predict(tr, y, te, k=10, temperature=t)
        assert torch.isfinite(scores).all()
        # at these temperatures the nearest neighbour dominates the vote
        if t <= 0.01:
            assert (scores.argmax(1) == y[:40]).all()
        # reference: the same vote computed in float64 without the shift
        s = (
            torch.nn.functional.normalize(te.double(), dim=1)
            @ torch.nn.functional.normalize(tr.double(), dim=1).T
        )
        sim, idx = s.topk(10, dim=1)
        ref = torch.zeros(40, 4, dtype=torch.float64).scatter_add_(1, y[idx], (sim / t).exp())
        if torch.isfinite(ref).all():
            assert (ref.argmax(1) == scores.argmax(1)).all()
