"""Threshold-Consistent Margin (TCM) regulariser (its metric, OPIS, is :mod:`stepguard.diagnostics.opis`)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from stepguard.diagnostics.opis import check_embeddings, pair_masks
from stepguard.losses.base import GuardedLoss

__all__ = ["TCMLoss", "tcm_loss"]


def tcm_loss(
    embeddings: Tensor,
    labels: Tensor,
    lambda_plus: float = 1.0,
    lambda_minus: float = 1.0,
    margin_plus: float = 0.9,
    margin_minus: float = 0.5,
) -> tuple[Tensor, Tensor, Tensor]:
    """TCM over all ordered pairs i ≠ j of a batch, on cosine similarities.

    ``L⁺`` is the mean of ``m⁺ − s`` over positive pairs with ``s ≤ m⁺``; ``L⁻`` the mean of
    ``s − m⁻`` over negative pairs with ``s ≥ m⁻``; an empty set contributes 0.

    Returns:
        ``(λ⁺L⁺ + λ⁻L⁻, L⁺, L⁻)``.
    """
    check_embeddings(embeddings, labels)
    unit = F.normalize(embeddings, dim=1)
    sim = unit @ unit.T
    pos_pairs, neg_pairs = pair_masks(labels)
    pos = (pos_pairs & (sim <= margin_plus)).to(sim.dtype)
    neg = (neg_pairs & (sim >= margin_minus)).to(sim.dtype)
    l_pos = ((margin_plus - sim) * pos).sum() / pos.sum().clamp(min=1.0)
    l_neg = ((sim - margin_minus) * neg).sum() / neg.sum().clamp(min=1.0)
    return lambda_plus * l_pos + lambda_minus * l_neg, l_pos, l_neg


class TCMLoss(GuardedLoss):
    r"""Threshold-Consistent Margin regulariser, added to a base metric-learning loss.

    Over ordered pairs i ≠ j with cosine similarity $s_{ij}$:

    $$L_{TCM}=\lambda^+\frac{\sum_{(i,j)\in P}(m^+-s_{ij})}{|P|}
    +\lambda^-\frac{\sum_{(i,j)\in N}(s_{ij}-m^-)}{|N|}$$

    with P the same-label pairs with $s\le m^+$ and N the different-label pairs with
    $s\ge m^-$ (violators only; an empty set gives 0). The full objective is
    $L_{base}+L_{TCM}$. The denominators count violators, so the gradient per violating pair
    grows as violations become rare — expected, not a spike.

    Paper: Zhang, Xu, Tang, Fang, Wu, Tighe & Xing, "Threshold-Consistent Margin Loss for
    Open-World Deep Metric Learning" (arXiv 2307.04047). Defaults from the
    pytorch-metric-learning implementation (the paper's are not confirmed).

    Shapes: embeddings (B, D), labels (B,) → 0-d. Batch-coupled.

    Args:
        lambda_plus: λ⁺ (1.0).
        lambda_minus: λ⁻ (1.0).
        margin_plus: m⁺ (0.9).
        margin_minus: m⁻ (0.5).
        accumulation_steps: see :class:`~stepguard.losses.base.GuardedLoss`.
    """

    batch_coupled = True
    coupling_note = "every pair of the batch contributes"
    has_radius_logits = False
    no_radius_reason = "it acts on embedding cosines, not on logits"

    def __init__(
        self,
        lambda_plus: float = 1.0,
        lambda_minus: float = 1.0,
        margin_plus: float = 0.9,
        margin_minus: float = 0.5,
        *,
        accumulation_steps: int = 1,
    ) -> None:
        super().__init__(accumulation_steps=accumulation_steps)
        if lambda_plus < 0 or lambda_minus < 0:
            raise ValueError("lambda_plus and lambda_minus must be >= 0")
        self.lambda_plus = float(lambda_plus)
        self.lambda_minus = float(lambda_minus)
        self.margin_plus = float(margin_plus)
        self.margin_minus = float(margin_minus)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        loss, l_pos, l_neg = tcm_loss(
            embeddings,
            labels,
            self.lambda_plus,
            self.lambda_minus,
            self.margin_plus,
            self.margin_minus,
        )
        self._record(positive_term=l_pos, negative_term=l_neg)
        return loss
