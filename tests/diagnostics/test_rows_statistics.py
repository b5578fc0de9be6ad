"""The one masked mean and the one quantile over counted rows."""

from __future__ import annotations

import math

import pytest
import torch

from stepguard.diagnostics._rows import masked_mean, sorted_quantiles

LEVELS = (0.99, 0.9, 0.5, 0.0, 1.0)


def test_masked_mean_over_kept_rows_and_nan_without_rows() -> None:
    values = torch.tensor([1.0, 2.0, 6.0])
    keep = torch.tensor([True, False, True])
    assert masked_mean(values, keep).item() == 3.5
    assert masked_mean(values, keep, count=keep.sum()).item() == 3.5
    assert masked_mean(values, None).item() == 3.0
    assert math.isnan(masked_mean(values, torch.zeros(3, dtype=torch.bool)).item())
    assert math.isnan(masked_mean(torch.zeros(0), None).item())


@pytest.mark.parametrize("n", [1, 2, 7, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sorted_quantiles_match_torch_quantile(n: int, dtype: torch.dtype) -> None:
    values = torch.randn(n, generator=torch.Generator().manual_seed(n), dtype=dtype)
    expected = torch.quantile(values, torch.tensor(LEVELS, dtype=dtype))
    ordered = values.sort().values
    # torch.quantile places q·(n − 1) in the values' dtype, this helper in float64: float32
    # results may differ by a rounding of float32.
    tol = {"rtol": 0, "atol": 1e-12} if dtype == torch.float64 else {}
    torch.testing.assert_close(sorted_quantiles(ordered, LEVELS), expected, **tol)
    torch.testing.assert_close(sorted_quantiles(ordered, LEVELS, n - 1), expected, **tol)


def test_sorted_quantiles_ignore_the_values_after_last() -> None:
    kept = torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64)
    padded = torch.cat([kept, torch.full((4,), math.inf, dtype=torch.float64)]).sort().values
    last = torch.tensor(2.0, dtype=torch.float64)  # a tensor: no host sync
    expected = torch.quantile(kept, torch.tensor(LEVELS, dtype=torch.float64))
    assert torch.equal(sorted_quantiles(padded, LEVELS, last), expected)


def test_sorted_quantiles_without_values_are_nan() -> None:
    assert sorted_quantiles(torch.zeros(0), LEVELS).isnan().all()
    everything_dropped = torch.full((3,), math.inf)
    assert sorted_quantiles(everything_dropped, LEVELS, torch.tensor(-1.0)).isnan().all()


def test_sorted_quantiles_reject_bad_input() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sorted_quantiles(torch.zeros(3), (1.5,))
    with pytest.raises(ValueError, match="1-d floating-point"):
        sorted_quantiles(torch.zeros(3, dtype=torch.long), (0.5,))
