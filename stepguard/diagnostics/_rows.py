"""Counted rows of classes: flattening logits, and the statistics taken over the counted rows.

:func:`masked_mean` and :func:`sorted_quantiles` are the library's one definition of a mean
and of a quantile over counted rows; both answer NaN when no row counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def flatten_rows(
    logits: Tensor,
    targets: Tensor | None = None,
    mask: Tensor | None = None,
    ignore_index: int = -100,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Reshape ``(..., K)`` logits to ``(R, K)`` rows and fold ``ignore_index`` into the mask.

    Returns ``(rows, targets1d, keep1d)``. ``targets1d`` has ignored positions replaced by 0
    (a valid class index) so that it can be gathered; ``keep1d`` is ``None`` when every row
    counts.
    """
    if logits.dim() < 1 or not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor (..., K), got {logits.dtype}")
    lead = logits.shape[:-1]
    rows = logits.reshape(-1, logits.shape[-1])
    keep: Tensor | None = None
    if mask is not None:
        if mask.shape != lead:
            raise ValueError(f"mask shape {tuple(mask.shape)} must be logits.shape[:-1] = {tuple(lead)}")
        keep = mask.reshape(-1).to(device=rows.device, dtype=torch.bool)
    flat_targets: Tensor | None = None
    if targets is not None:
        if targets.shape != lead:
            raise ValueError(
                f"targets shape {tuple(targets.shape)} must be logits.shape[:-1] = {tuple(lead)}"
            )
        flat_targets = targets.reshape(-1).to(device=rows.device, dtype=torch.long)
        labelled = flat_targets != ignore_index
        keep = labelled if keep is None else keep & labelled
        flat_targets = torch.where(labelled, flat_targets, torch.zeros_like(flat_targets))
    return rows, flat_targets, keep


def masked_mean(values: Tensor, keep: Tensor | None, count: Tensor | None = None) -> Tensor:
    """Mean of ``values`` over the rows ``keep`` marks; NaN when no row counts (no host sync).

    Args:
        values: (R,) per-row values.
        keep: (R,) booleans, or ``None`` when every row counts.
        count: the number of kept rows when the caller has it already (``keep.sum()``).
    """
    if keep is None:
        return values.sum() / values.numel()
    kept = torch.where(keep, values, torch.zeros_like(values))
    return kept.sum() / (keep.sum() if count is None else count).to(values.dtype)


def sorted_quantiles(
    ordered: Tensor, quantiles: Sequence[float], last: Tensor | int | None = None
) -> Tensor:
    """Quantiles with linear interpolation (as ``torch.quantile``) of values already sorted.

    Only ``ordered[: last + 1]`` counts, so rows that do not count can be sorted to the end
    and left there (no host sync when ``last`` is a tensor). The q-quantile sits at position
    q·last: the values either side of it, weighted by its fractional part.

    Args:
        ordered: (R,) floating-point values in ascending order.
        quantiles: the levels q, each in [0, 1].
        last: index of the last counted value (default ``R − 1``); a 0-d tensor or an int.

    Returns:
        (len(quantiles),) tensor in ``ordered``'s dtype; NaN when no value counts.
    """
    if ordered.dim() != 1 or not ordered.is_floating_point():
        raise ValueError(
            f"ordered must be a 1-d floating-point tensor, got {ordered.dtype}, shape {tuple(ordered.shape)}"
        )
    if any(not 0.0 <= q <= 1.0 for q in quantiles):
        raise ValueError(f"quantile levels must lie in [0, 1], got {list(quantiles)}")
    if last is None:
        last = ordered.numel() - 1
    end = torch.as_tensor(last, dtype=torch.float64, device=ordered.device)
    if ordered.numel() == 0:
        return torch.full((len(quantiles),), math.nan, dtype=ordered.dtype, device=ordered.device)
    levels = torch.tensor(quantiles, dtype=torch.float64, device=ordered.device)
    position = end.clamp(min=0) * levels
    low = position.floor()
    high = torch.minimum(low + 1, end.clamp(min=0))
    out = torch.lerp(ordered[low.long()], ordered[high.long()], (position - low).to(ordered.dtype))
    return out.where(end >= 0, math.nan)
