"""Tiny deterministic methods shared by the DDP and resume tests (no batch norm: DDP must match one
process)."""

import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from ssl_course.simclr import nt_xent_loss
from ssl_course.train import SSLMethod


class Regression(SSLMethod):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

    def training_step(self, batch):
        x, y = batch
        return ((self.encoder(x) - y) ** 2).mean()


class PairContrast(SSLMethod):
    """NT-Xent over two fixed views: under DDP the negatives come from every process
    (all_gather_with_grad)."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 8))

    def training_step(self, batch):
        v1, v2 = batch
        return nt_xent_loss(self.encoder(v1), self.encoder(v2), temperature=0.5)


class NoisyRegression(Regression):
    "Uses the RNG inside the step, so an exact resume must restore RNG state too."

    def training_step(self, batch):
        x, y = batch
        return ((self.encoder(x + 0.1 * torch.randn_like(x)) - y) ** 2).mean()


def make_data(kind: str):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 6, generator=g)
    if kind == "ntxent":
        return TensorDataset(x, x + 0.1 * torch.randn(64, 6, generator=g))
    return TensorDataset(
        x, torch.tanh(2 * x[:, :3]) + 0.05 * torch.randn(64, 3, generator=g)
    )  # learnable target


def make_method(kind: str):
    return {"regression": Regression, "ntxent": PairContrast, "noisy": NoisyRegression}[kind]()
