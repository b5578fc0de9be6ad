"""Flattening logits with any leading dimensions into counted rows of classes."""

from __future__ import annotations

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


def masked_mean(values: Tensor, keep: Tensor | None) -> Tensor:
    """Mean of ``values`` over the kept rows; NaN when no row is kept (no host sync)."""
    if keep is None:
        return values.sum() / values.numel()
    kept = torch.where(keep, values, torch.zeros_like(values))
    return kept.sum() / keep.sum()
