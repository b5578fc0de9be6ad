"""StableMax cross-entropy and the Softmax-Collapse diagnostics (Prieto, Barsbey, Mediano &
Birdal).

StableMax replaces ``exp`` in the softmax by ``s(x) = x + 1`` (x ≥ 0), ``1/(1 − x)``
(x < 0), which is C¹ at 0 and grows only linearly, so the normaliser cannot absorb the
non-maximal terms the way ``Σ exp`` does in finite precision ("Softmax Collapse").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from stepguard.losses.base import GuardedLoss, check_logits_target, check_reduction, reduce

__all__ = [
    "StableMaxCrossEntropyLoss",
    "cross_entropy_in_dtype",
    "log_stablemax",
    "stablemax",
    "stablemax_cross_entropy",
    "stablemax_s",
]

_TINY = 1e-30


def stablemax_s(x: Tensor) -> Tensor:
    """``s(x) = x + 1`` for x ≥ 0 and ``1/(1 − x + 1e−30)`` for x < 0."""
    return torch.where(x >= 0, x + 1.0, 1.0 / (1.0 - torch.clamp(x, max=0.0) + _TINY))


def _log_s(x: Tensor) -> Tensor:
    return torch.where(
        x >= 0, torch.log1p(torch.clamp(x, min=0.0)), -torch.log1p(torch.clamp(-x, min=0.0))
    )


def log_stablemax(logits: Tensor, dim: int = -1) -> Tensor:
    """``log(s(x_i)/Σ_j s(x_j))`` through ``log s = ±log1p(±x)``."""
    log_s = _log_s(logits)
    return log_s - torch.logsumexp(log_s, dim=dim, keepdim=True)


def stablemax(logits: Tensor, dim: int = -1) -> Tensor:
    """StableMax probabilities ``s(x_i)/Σ_j s(x_j)``."""
    return torch.exp(log_stablemax(logits, dim))


def stablemax_cross_entropy(
    logits: Tensor, target: Tensor, reduction: str = "mean", *, faithful: bool = False
) -> Tensor:
    """``−log StableMax(x)_y``.

    The default computes in the logits' dtype with the log-space form; ``faithful=True``
    casts to float64 and returns float64, as the reference code does.
    """
    check_logits_target(logits, target)
    if faithful:
        logits = logits.to(torch.float64)
    values = -log_stablemax(logits, dim=1).gather(1, target[:, None]).squeeze(1)
    return reduce(values, reduction)


class StableMaxCrossEntropyLoss(GuardedLoss):
    r"""StableMax cross-entropy.

    $$s(x)=\begin{cases}x+1&x\ge0\\ \frac1{1-x}&x<0\end{cases},\qquad
    \mathrm{StableMax}(x)_i=\frac{s(x_i)}{\sum_j s(x_j)},\qquad
    L=-\log\mathrm{StableMax}(x)_y$$

    ``faithful=True`` computes and returns float64, as the reference implementation.

    Paper: Prieto, Barsbey, Mediano & Birdal, "Grokking at the Edge of Numerical Stability"
    (arXiv 2501.04697).

    Shapes: logits (B, C), target (B,) int64 → 0-d, or (B,) with ``reduction="none"``.

    Args:
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        faithful: float64 computation and result.
        accumulation_steps: see :class:`~stepguard.losses.base.GuardedLoss`.
    """

    has_radius_logits = False
    no_radius_reason = (
        "StableMax normalises s(x), not exp(x), so the softmax radius does not apply to it"
    )

    def __init__(
        self, reduction: str = "mean", *, faithful: bool = False, accumulation_steps: int = 1
    ) -> None:
        super().__init__(accumulation_steps=accumulation_steps)
        self.reduction = check_reduction(reduction)
        self.faithful = faithful

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        loss = stablemax_cross_entropy(logits, target, self.reduction, faithful=self.faithful)
        self._record(stablemax_ce=loss)
        return loss


def cross_entropy_in_dtype(
    logits: Tensor,
    target: Tensor,
    dtype: torch.dtype,
    reduction: str = "mean",
    *,
    faithful: bool = False,
) -> Tensor:
    """Softmax cross-entropy computed in ``dtype``.

    ``faithful=True`` with float64 returns the result cast to float32, as the reference
    ``cross_entropy_float64`` does. The cast cannot create extra zeros: a positive float64
    cross-entropy is at least about 1e−16 (smaller terms are absorbed in the float64 sum).
    """
    check_logits_target(logits, target)
    loss = F.cross_entropy(logits.to(dtype), target, reduction=reduction)
    if faithful and dtype == torch.float64:
        loss = loss.to(torch.float32)
    return loss
