"""Orthogonal Projection Loss (Ranasinghe, Naseer, Hayat, Khan & Khan)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from stepguard.losses.base import GuardedLoss

Negatives = Literal["abs_mean", "signed", "abs_elementwise"]

__all__ = ["OPLLoss", "opl_loss"]

_GUARD = 1e-6


def opl_loss(
    features: Tensor,
    labels: Tensor,
    gamma: float = 0.5,
    negatives: Negatives = "abs_mean",
) -> tuple[Tensor, Tensor, Tensor]:
    """OPL ``(1 − s) + γ·d`` on L2-normalised features.

    s is the mean cosine over same-label pairs i ≠ j; d over different-label pairs, taken as
    ``|mean cos|`` (``"abs_mean"``, the paper), ``mean cos`` (``"signed"``, reference
    ``loss.py``) or ``mean |cos|`` (``"abs_elementwise"``, reference CIFAR/ImageNet code).
    Means divide by ``count + 1e−6``.

    Returns:
        ``(loss, s, d)``.
    """
    if not isinstance(features, Tensor) or features.ndim != 2 or not features.is_floating_point():
        raise ValueError("features must be a floating-point tensor of shape (B, D)")
    if not isinstance(labels, Tensor) or labels.shape != features.shape[:1]:
        raise ValueError(f"labels must have shape ({features.shape[0]},)")
    if negatives not in ("abs_mean", "signed", "abs_elementwise"):
        raise ValueError(
            f"negatives must be 'abs_mean', 'signed' or 'abs_elementwise', got {negatives!r}"
        )
    unit = F.normalize(features, p=2, dim=1)
    dot = unit @ unit.T
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    pos = (same & ~eye).to(dot.dtype)
    neg = (~same).to(dot.dtype)
    s = (pos * dot).sum() / (pos.sum() + _GUARD)
    if negatives == "abs_elementwise":
        d = (neg * dot.abs()).sum() / (neg.sum() + _GUARD)
    else:
        d = (neg * dot).sum() / (neg.sum() + _GUARD)
        if negatives == "abs_mean":
            d = d.abs()
    return (1.0 - s) + gamma * d, s, d


class OPLLoss(GuardedLoss):
    r"""Orthogonal Projection Loss: pull same-class features together, push classes to be
    orthogonal.

    $$s=\frac{\sum_{i\ne j,\,y_i=y_j}\langle\hat f_i,\hat f_j\rangle}{\#\text{pairs}},\quad
    d=\frac{\sum_{y_i\ne y_k}\langle\hat f_i,\hat f_k\rangle}{\#\text{pairs}},\qquad
    L_{OPL}=(1-s)+\gamma\,|d|$$

    The total training loss is $L_{CE}+\lambda L_{OPL}$ (README: γ = 0.5, λ = 1; CIFAR
    script: γ = 2, λ = 0.1). ``faithful=True`` selects the reference ``loss.py`` (signed
    mean, no absolute value); ``negatives="abs_elementwise"`` the reference CIFAR/ImageNet
    code (mean of |cos|). With no positive pair in the batch s = 0 and the loss has a
    constant +1: use class-balanced sampling.

    Paper: Ranasinghe, Naseer, Hayat, Khan & Khan, "Orthogonal Projection Loss" (ICCV 2021,
    arXiv 2103.14021).

    Shapes: features (B, D) penultimate features, labels (B,) → 0-d. Batch-coupled.

    Args:
        gamma: γ (0.5).
        negatives: ``"abs_mean"`` (paper), ``"signed"`` or ``"abs_elementwise"``.
        faithful: shorthand for ``negatives="signed"`` (reference ``loss.py``).
        accumulation_steps: see :class:`~stepguard.losses.base.GuardedLoss`.
    """

    batch_coupled = True
    coupling_note = "every pair of the batch contributes"
    has_radius_logits = False
    no_radius_reason = "it acts on feature cosines, not on logits"

    def __init__(
        self,
        gamma: float = 0.5,
        negatives: Negatives | None = None,
        *,
        faithful: bool = False,
        accumulation_steps: int = 1,
    ) -> None:
        super().__init__(accumulation_steps=accumulation_steps)
        if negatives is None:
            negatives = "signed" if faithful else "abs_mean"
        if negatives not in ("abs_mean", "signed", "abs_elementwise"):
            raise ValueError(
                f"negatives must be 'abs_mean', 'signed' or 'abs_elementwise', got {negatives!r}"
            )
        self.gamma = float(gamma)
        self.negatives: Negatives = negatives
        self.faithful = faithful

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        loss, s, d = opl_loss(features, labels, self.gamma, self.negatives)
        self._record(positive_mean=s, negative_mean=d)
        return loss
