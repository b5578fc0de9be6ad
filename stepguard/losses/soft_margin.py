"""Soft-margin (hinge + L2) loss of the NN ≡ SVM equivalence (Chen, Huang, Nguyen & Weng)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from stepguard.losses.base import GuardedLoss

__all__ = ["SoftMarginLoss", "hinge_loss", "soft_margin_loss"]


def hinge_loss(output: Tensor, target_pm1: Tensor) -> Tensor:
    """``mean_i max(0, 1 − y_i·f_i)`` with y ∈ {−1, +1}."""
    flat = output.reshape(-1)
    y = target_pm1.reshape(-1).to(flat.dtype)
    if y.shape != flat.shape:
        raise ValueError(f"target must have {flat.shape[0]} entries, got {tuple(target_pm1.shape)}")
    return torch.relu(1.0 - y * flat).mean()


def soft_margin_loss(
    output: Tensor,
    target_pm1: Tensor,
    weight: Tensor | None = None,
    lam: float = 1e-3,
    width: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``hinge + (λ/2)·‖W/√width‖²``; width defaults to the last dimension of W.

    Returns:
        ``(loss, hinge, penalty)``.
    """
    hinge = hinge_loss(output, target_pm1)
    if weight is None:
        penalty = hinge.new_zeros(())
    else:
        width = weight.shape[-1] if width is None else width
        penalty = 0.5 * lam * (weight / math.sqrt(width)).pow(2).sum()
    return hinge + penalty, hinge, penalty


class SoftMarginLoss(GuardedLoss):
    r"""Soft-margin loss of a network trained as a kernel SVM in the NTK regime.

    $$L=\frac1n\sum_i\max\big(0,1-y_i(f(x_i)-f_0(x_i))\big)+\frac\lambda2\Big\lVert
    \frac{W_{last}}{\sqrt{\text{width}}}\Big\rVert^2$$

    The output is centred by the initial network's output f₀ (pass ``init_output`` or
    centre it yourself); only the last layer's weights, NTK-scaled, are penalised.

    Paper: Chen, Huang, Nguyen & Weng, "On the Equivalence between Neural Network and
    Support Vector Machine" (NeurIPS 2021, arXiv 2111.06063).

    Shapes: output (n,) or (n, 1), target (n,) in {−1, +1}, weight (out, width) → 0-d.

    Args:
        lam: λ (1e−3).
        width: NTK width (default: ``weight.shape[-1]``).
        accumulation_steps: see :class:`~stepguard.losses.base.GuardedLoss`.
    """

    has_radius_logits = False
    no_radius_reason = "the hinge has no softmax or sigmoid"

    def __init__(
        self, lam: float = 1e-3, width: int | None = None, *, accumulation_steps: int = 1
    ) -> None:
        super().__init__(accumulation_steps=accumulation_steps)
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        self.lam = float(lam)
        self.width = width

    def forward(
        self,
        output: Tensor,
        target: Tensor,
        weight: Tensor | None = None,
        init_output: Tensor | None = None,
    ) -> Tensor:
        if init_output is not None:
            output = output - init_output.detach()
        loss, hinge, penalty = soft_margin_loss(output, target, weight, self.lam, self.width)
        self._record(hinge=hinge, penalty=penalty)
        return loss
