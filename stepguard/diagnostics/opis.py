"""OPIS, the Operating-Point-Inconsistency Score of an embedding model (the metric of the
Threshold-Consistent Margin paper, whose regulariser is :class:`stepguard.losses.TCMLoss`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["check_embeddings", "opis", "opis_from_embeddings", "pair_masks"]


def pair_masks(labels: Tensor) -> tuple[Tensor, Tensor]:
    """(same class, not the same sample) and (different class) pair masks, both (B, B)."""
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def check_embeddings(embeddings: Tensor, labels: Tensor) -> None:
    """Refuse anything but (B, D) floating-point embeddings with (B,) labels."""
    if not isinstance(embeddings, Tensor) or not embeddings.is_floating_point():
        raise TypeError("embeddings must be a floating-point tensor of shape (B, D)")
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must have shape (B, D), got {tuple(embeddings.shape)}")
    if not isinstance(labels, Tensor) or labels.shape != embeddings.shape[:1]:
        raise ValueError(f"labels must have shape ({embeddings.shape[0]},)")


def _harmonic(tpr: Tensor, tnr: Tensor) -> Tensor:
    total = tpr + tnr
    return torch.where(total > 0, 2 * tpr * tnr / total.clamp(min=1e-30), torch.zeros_like(total))


def _utility(sim: Tensor, pos: Tensor, neg: Tensor, thresholds: Tensor) -> Tensor:
    accept = sim[None] >= thresholds[:, None, None]
    pos_f, neg_f = pos.to(sim.dtype), neg.to(sim.dtype)
    tpr = (accept * pos_f).sum(dim=(1, 2)) / pos_f.sum().clamp(min=1.0)
    tnr = ((~accept) * neg_f).sum(dim=(1, 2)) / neg_f.sum().clamp(min=1.0)
    return _harmonic(tpr, tnr)


def opis(similarity: Tensor, labels: Tensor, thresholds: Tensor) -> Tensor:
    """Operating-Point-Inconsistency Score on a similarity matrix.

    For each class c, ``U_c(t)`` is the harmonic mean of the true-positive rate (pairs inside
    c accepted, ``s ≥ t``) and the true-negative rate (pairs between c and another class
    rejected) at threshold t; ``Ū(t)`` is the same on all pairs. With the thresholds an even
    grid over the calibration range,

        OPIS = (1/T) Σ_c mean_t (U_c(t) − Ū(t))²,

    the grid mean standing for ``∫ … dt / (t_max − t_min)``. Classes with no positive pair
    are skipped.

    Args:
        similarity: (N, N) symmetric similarities.
        labels: (N,) class labels.
        thresholds: (G,) thresholds spanning the calibration range.

    Returns:
        0-d OPIS.
    """
    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"similarity must be (N, N), got {tuple(similarity.shape)}")
    if labels.shape != similarity.shape[:1]:
        raise ValueError(f"labels must have shape ({similarity.shape[0]},)")
    pos_pairs, neg_pairs = pair_masks(labels)
    pos_pairs = torch.triu(pos_pairs, diagonal=1)
    neg_pairs = torch.triu(neg_pairs, diagonal=1)
    overall = _utility(similarity, pos_pairs, neg_pairs, thresholds)
    scores = []
    for cls in torch.unique(labels):
        member = labels == cls
        involves = member[:, None] | member[None, :]
        cls_pos = pos_pairs & member[:, None] & member[None, :]
        if not bool(cls_pos.any()):
            continue
        cls_util = _utility(similarity, cls_pos, neg_pairs & involves, thresholds)
        scores.append(((cls_util - overall) ** 2).mean())
    if not scores:
        raise ValueError("no class has a positive pair; OPIS is undefined")
    return torch.stack(scores).mean()


def opis_from_embeddings(
    embeddings: Tensor,
    labels: Tensor,
    far_range: tuple[float, float] = (1e-3, 1e-1),
    num_thresholds: int = 101,
) -> Tensor:
    """OPIS on cosine similarities, with the calibration range set by a target FAR interval.

    The thresholds span ``[t(far_high), t(far_low)]`` where ``t(f)`` is the (1 − f) quantile
    of all negative-pair similarities, so the overall false-accept rate lies in
    ``far_range``.

    Args:
        embeddings: (N, D) evaluation embeddings.
        labels: (N,) class labels.
        far_range: ``(far_low, far_high)`` with 0 < far_low < far_high < 1.
        num_thresholds: grid size.
    """
    low, high = far_range
    if not 0.0 < low < high < 1.0:
        raise ValueError(f"far_range must satisfy 0 < low < high < 1, got {far_range}")
    check_embeddings(embeddings, labels)
    unit = F.normalize(embeddings.detach(), dim=1)
    sim = unit @ unit.T
    _, neg_pairs = pair_masks(labels)
    neg_sims = sim[torch.triu(neg_pairs, diagonal=1)]
    if neg_sims.numel() == 0:
        raise ValueError("OPIS needs at least two classes")
    quantiles = torch.tensor([1.0 - high, 1.0 - low], dtype=sim.dtype, device=sim.device)
    t_min, t_max = torch.quantile(neg_sims, quantiles)
    grid = torch.linspace(0.0, 1.0, num_thresholds, dtype=sim.dtype, device=sim.device)
    return opis(sim, labels, t_min + (t_max - t_min) * grid)
