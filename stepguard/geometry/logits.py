"""Finding the logits in a model's output and choosing the rows that count."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

LogitsFn = Callable[[Any], Tensor]


def extract_logits(output: Any, logits_fn: LogitsFn | None = None) -> Tensor:
    """Return the logits tensor of a model output.

    Accepted: a tensor; an object with a ``.logits`` attribute (Hugging Face outputs); a
    mapping with a ``"logits"`` key; anything else through ``logits_fn(output)``.

    Raises:
        TypeError: when no logits can be found, or they are integer or complex.
    """
    if logits_fn is not None:
        logits = logits_fn(output)
    elif isinstance(output, Tensor):
        logits = output
    elif isinstance(output, Mapping) and "logits" in output:
        logits = output["logits"]
    elif isinstance(getattr(output, "logits", None), Tensor):
        logits = output.logits
    else:
        raise TypeError(
            f"cannot find logits in a model output of type {type(output).__name__}: "
            "return a tensor, an object with .logits, or a dict with 'logits', or pass "
            "logits_fn=lambda output: ... to pick the tensor the softmax acts on"
        )
    check_logits(logits)
    return logits


def check_logits(logits: Any) -> None:
    """Raise a clear error unless ``logits`` is a real floating-point tensor."""
    if not isinstance(logits, Tensor):
        raise TypeError(
            f"logits must be a torch.Tensor, got {type(logits).__name__}; "
            "make logits_fn return the tensor the softmax acts on"
        )
    if logits.is_complex():
        raise TypeError(f"logits are complex ({logits.dtype}); the radius is defined for real logits")
    if not logits.is_floating_point():
        raise TypeError(
            f"logits have integer dtype {logits.dtype}; they must be floating point "
            "(did logits_fn return class indices, e.g. argmax, instead of the scores?)"
        )
    if logits.ndim == 0:
        raise ValueError("logits are a scalar; expected (N,), (N, K) or (N, T, K)")


def to_rows(
    logits: Tensor,
    velocity: Tensor | None = None,
    *,
    mask: Tensor | None = None,
    targets: Tensor | None = None,
    ignore_index: int | None = -100,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Flatten logits (and velocities, targets) to rows and drop the rows that don't count.

    Shapes: (N,) is a one-logit head and becomes (N, 1); (N, K) stays; (N, T, K) and any
    further leading dims flatten to (N·T, K). A row counts when ``mask`` is True there
    and its target is not ``ignore_index``.

    Returns:
        ``(logit_rows, velocity_rows, target_rows, positions)`` where ``positions`` holds
        the flat index of each kept row (``None`` when every row is kept).
    """
    z, a, y, keep = _flat_rows(logits, velocity, mask, targets, ignore_index)
    if keep is None:
        return z, a, y, None
    positions = keep.nonzero().squeeze(-1)
    return (
        z.index_select(0, positions),
        None if a is None else a.index_select(0, positions),
        None if y is None else y.index_select(0, positions),
        positions,
    )


def mask_rows(
    logits: Tensor,
    velocity: Tensor,
    *,
    mask: Tensor | None = None,
    targets: Tensor | None = None,
    ignore_index: int | None = -100,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """:func:`to_rows` without dropping anything: the rows and a ``keep`` mask, with no host sync.

    Dropping rows needs their number on the host (``nonzero``), which on a GPU waits for
    every queued kernel; the guard instead keeps every row and masks its statistics, so a
    measured step synchronizes once, when its numbers are read. Targets of dropped rows
    are replaced by 0, so they can still index the class dimension.

    Returns:
        ``(logit_rows, velocity_rows, target_rows, keep)``; ``keep`` is ``None`` when no
        mask or target can drop a row.
    """
    z, a, y, keep = _flat_rows(logits, velocity, mask, targets, ignore_index)
    assert a is not None
    if y is not None and keep is not None:
        y = torch.where(keep, y, 0)
    return z, a, y, keep


def _flat_rows(
    logits: Tensor,
    velocity: Tensor | None,
    mask: Tensor | None,
    targets: Tensor | None,
    ignore_index: int | None,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Logits, velocities and targets as rows, and the mask of the rows that count (or None)."""
    if logits.ndim == 1:
        logits = logits.unsqueeze(-1)
        velocity = None if velocity is None else velocity.unsqueeze(-1)
    lead = logits.shape[:-1]
    k = logits.shape[-1]
    z = logits.reshape(-1, k)
    a = None if velocity is None else velocity.reshape(-1, k)
    keep: Tensor | None = None
    y: Tensor | None = None
    if targets is not None:
        _check_rows("targets", targets, lead)
        y = targets.reshape(-1).to(device=z.device)
        if ignore_index is not None:
            keep = y != ignore_index
    if mask is not None:
        _check_rows("mask", mask, lead)
        m = mask.reshape(-1).to(device=z.device, dtype=torch.bool)
        keep = m if keep is None else keep & m
    return z, a, y, keep


def _check_rows(name: str, value: Tensor, lead: torch.Size) -> None:
    if tuple(value.shape) == tuple(lead):
        return
    if name == "targets":
        raise ValueError(
            f"targets have shape {tuple(value.shape)} but the logits' rows have "
            f"shape {tuple(lead)}; pass one class index per sample (or position)"
        )
    raise ValueError(
        f"mask has shape {tuple(value.shape)} but the logits' rows have shape "
        f"{tuple(lead)}; pass a boolean mask with one entry per sample (or position)"
    )
