"""Soft-label (distillation) and hard-label logistic losses (Ghosh, Yu, Warmuth & Bartlett).

In binary logistic regression with noise-free soft targets ``p_i = σ(x_iᵀw*)``, training on
the soft targets reaches w* (Bayes risk) once n ≥ d, while any rotation-invariant method on
sampled hard labels has excess risk Ω((d − 1)/n); gradient descent on ``w = u ⊙ v`` reaches
O(s·log d / n) for s-sparse w* (the layer :class:`stepguard.layers.HadamardLinear`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from stepguard.losses.base import GuardedLoss, check_reduction, reduce

__all__ = [
    "HardLabelLogisticLoss",
    "SoftTargetBCELoss",
    "hard_label_logistic_loss",
    "soft_target_bce_loss",
]


def _flat_pair(logits: Tensor, other: Tensor, name: str) -> tuple[Tensor, Tensor]:
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise TypeError("logits must be a floating-point tensor")
    if other.shape != logits.shape:
        raise ValueError(
            f"{name} must have the shape of logits {tuple(logits.shape)}, got {tuple(other.shape)}"
        )
    return logits, other.to(logits.dtype)


def soft_target_bce_loss(logits: Tensor, soft_target: Tensor, reduction: str = "mean") -> Tensor:
    """``softplus(z) − p·z`` = BCE between σ(z) and the soft target p ∈ [0, 1]."""
    logits, p = _flat_pair(logits, soft_target, "soft_target")
    return F.binary_cross_entropy_with_logits(logits, p, reduction=reduction)


def hard_label_logistic_loss(logits: Tensor, target_pm1: Tensor, reduction: str = "mean") -> Tensor:
    """``softplus(−y·z)`` with y ∈ {−1, +1}."""
    logits, y = _flat_pair(logits, target_pm1, "target")
    return reduce(F.softplus(-y * logits), reduction)


class SoftTargetBCELoss(GuardedLoss):
    r"""Soft-label (distillation) logistic loss.

    $$L_{soft}(w)=\frac1n\sum_i\big[-p_i\log\sigma(z_i)-(1-p_i)\log(1-\sigma(z_i))\big]
    =\frac1n\sum_i\big[\operatorname{softplus}(z_i)-p_iz_i\big],\quad z_i=x_i^\top w$$

    Paper: Ghosh, Yu, Warmuth & Bartlett, "Hard labels sampled from sparse targets mislead
    rotation invariant algorithms" (arXiv 2603.20967).

    Shapes: logits (N,) [or any shape], soft_target of the same shape in [0, 1] → 0-d, or
    elementwise with ``reduction="none"``.

    Args:
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        accumulation_steps: see :class:`~stepguard.losses.base.GuardedLoss`.
    """

    def __init__(self, reduction: str = "mean", *, accumulation_steps: int = 1) -> None:
        super().__init__(accumulation_steps=accumulation_steps)
        self.reduction = check_reduction(reduction)

    def forward(self, logits: Tensor, soft_target: Tensor) -> Tensor:
        loss = soft_target_bce_loss(logits, soft_target, self.reduction)
        with torch.no_grad():
            p = soft_target.to(logits.dtype).clamp(0.0, 1.0)
            entropy = F.binary_cross_entropy(p, p, reduction="mean")
        self._record(soft_bce=loss, target_entropy=entropy)
        return loss


class HardLabelLogisticLoss(GuardedLoss):
    r"""Hard-label logistic loss $L_{hard}(w)=\frac1n\sum_i\operatorname{softplus}(-y_iz_i)$,
    $y_i\in\{\pm1\}$ (e.g. drawn with $P(y_i=+1)=p_i$).

    Paper: Ghosh, Yu, Warmuth & Bartlett, "Hard labels sampled from sparse targets mislead
    rotation invariant algorithms" (arXiv 2603.20967).

    Shapes: logits (N,), target (N,) in {−1, +1} → 0-d, or (N,) with ``reduction="none"``.

    Args:
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        accumulation_steps: see :class:`~stepguard.losses.base.GuardedLoss`.
    """

    def __init__(self, reduction: str = "mean", *, accumulation_steps: int = 1) -> None:
        super().__init__(accumulation_steps=accumulation_steps)
        self.reduction = check_reduction(reduction)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        loss = hard_label_logistic_loss(logits, target, self.reduction)
        self._record(logistic=loss)
        return loss
