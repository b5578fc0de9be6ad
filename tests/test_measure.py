"""The measurement helpers shared by the guard and the analyzer."""

from __future__ import annotations

import torch

from stepguard.measure import QUANTILES, _quantiles, sync_to_host


def test_quantiles_match_torch_quantile() -> None:
    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 64, 1000):
        values = torch.rand(n, generator=gen, dtype=torch.float64) * 10
        expected = torch.quantile(values, torch.tensor(QUANTILES, dtype=torch.float64))
        assert torch.allclose(_quantiles(values), expected, rtol=0, atol=1e-12)


def test_sync_brings_every_value_in_its_place() -> None:
    scalars = {
        "a": torch.tensor(1.5),
        "b": torch.tensor(2, dtype=torch.int64),
        "c": torch.tensor(0.25, dtype=torch.float64),
        "spread_q": torch.tensor([3.0, 2.0, 1.0]),
        "d": torch.tensor(-4.0),
    }
    vectors = {"binding": torch.tensor([5.0, 7.0]), "values": torch.zeros(0)}
    out = sync_to_host(scalars, vectors)
    assert out == {
        "a": 1.5,
        "b": 2.0,
        "c": 0.25,
        "spread_q": [3.0, 2.0, 1.0],
        "d": -4.0,
        "binding": [5.0, 7.0],
        "values": [],
    }
