"""Library inputs that used to give a wrong answer quietly now give one clear error."""

import math

import pytest
import torch

from ssl_course.data import DataError, ImageDataset
from ssl_course.evaluate import embed, knn_accuracy, linear_probe


def feats(n=20, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.arange(n) % 2


def test_knn_refuses_nan_features_instead_of_reporting_chance():
    x, y = feats()
    bad = x.clone()
    bad[3, 1] = math.nan
    with pytest.raises(DataError, match="NaN or infinite"):
        knn_accuracy(bad, y, x, y)
    with pytest.raises(DataError, match="the test features"):
        knn_accuracy(x, y, bad, y)
    assert knn_accuracy(x, y, x, y, k=1) == 1.0  # finite features still work


@pytest.mark.parametrize("t", [0, -0.1, math.nan, math.inf])
def test_knn_temperature_must_be_positive(t):
    x, y = feats()
    with pytest.raises(ValueError, match="temperature must be a positive number"):
        knn_accuracy(x, y, x, y, temperature=t)


def test_linear_probe_refuses_nan_features():
    x, y = feats()
    bad = x.clone()
    bad[0, 0] = math.inf
    with pytest.raises(DataError, match="NaN or infinite"):
        linear_probe(bad, y, x, y)


def test_embed_refuses_an_empty_dataset():
    empty = ImageDataset(
        torch.zeros(0, 1, 8, 8, dtype=torch.uint8), torch.zeros(0, dtype=torch.long)
    )
    with pytest.raises(DataError, match="empty dataset"):
        embed(torch.nn.Flatten(), empty)
