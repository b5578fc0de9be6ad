"""Which logit rows count, derived from a captured forward call (for ``rows_fn=``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor


def causal_lm_rows(
    args: tuple[Any, ...], kwargs: Mapping[str, Any], *, ignore_index: int = -100
) -> dict[str, Tensor | None]:
    """Rows of a causal LM called as ``model(input_ids, labels=labels, ...)``.

    Position t of the logits predicts token t+1, so the target of row (b, t) is
    ``labels[b, t+1]``; the last position predicts nothing, and rows whose shifted label is
    ``ignore_index`` (padding, prompt tokens) do not count. This is how Hugging Face causal
    LMs shift their loss.

    Returns:
        ``{"targets": (B, T) shifted labels with ignore_index at the end, "mask": None}``,
        or ``{}`` when the call carried no ``labels``.
    """
    labels = kwargs.get("labels")
    if not isinstance(labels, Tensor):
        return {}
    shifted = torch.full_like(labels, ignore_index)
    shifted[:, :-1] = labels[:, 1:]
    return {"targets": shifted, "mask": None}


def labels_rows(
    args: tuple[Any, ...], kwargs: Mapping[str, Any], *, key: str = "labels"
) -> dict[str, Tensor | None]:
    """Rows of a classifier called with its targets as a keyword (``model(x, labels=y)``)."""
    labels = kwargs.get(key)
    return {"targets": labels} if isinstance(labels, Tensor) else {}
