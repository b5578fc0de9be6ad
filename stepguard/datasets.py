"""The embedded digits data (8×8 images, 10 classes) and a reproducible split."""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from importlib import resources

import torch
from torch import Tensor


@dataclass(frozen=True)
class Split:
    """Train and test tensors of a classification data set."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_digits() -> tuple[Tensor, Tensor]:
    """All 1797 digits: features (1797, 64) scaled to [0, 1] (pixel count / 16), labels (1797,)."""
    raw = resources.files("stepguard.data").joinpath("digits.csv.gz").read_bytes()
    rows = [
        [float(v) for v in line.split(",")]
        for line in gzip.decompress(raw).decode("ascii").splitlines()
        if line
    ]
    table = torch.tensor(rows, dtype=torch.float32)
    return table[:, :-1] / 16.0, table[:, -1].to(torch.long)


def stratified_split(x: Tensor, y: Tensor, test_fraction: float = 0.2, seed: int = 0) -> Split:
    """Hold out ``round(test_fraction·n_c)`` samples of each class c, shuffled with ``seed``."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    gen = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in torch.unique(y):
        idx = (y == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        n_test = round(test_fraction * idx.numel())
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    tr = torch.cat(train)[torch.randperm(sum(t.numel() for t in train), generator=gen)]
    te = torch.cat(test)[torch.randperm(sum(t.numel() for t in test), generator=gen)]
    return Split(x[tr], y[tr], x[te], y[te])


def digits_split(seed: int = 0, test_fraction: float = 0.2) -> Split:
    """The digits data, stratified into train (1438) and test (359) for ``seed``."""
    x, y = load_digits()
    return stratified_split(x, y, test_fraction, seed)


def minibatches(n: int, batch_size: int, seed: int):
    """Endless index batches: a fresh permutation of range(n) each epoch."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            yield order[start : start + batch_size]
