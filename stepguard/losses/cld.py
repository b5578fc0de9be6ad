"""CLD (Correlation of Loss Differences) coreset scores: Nagaraj, Ravikumar & Roy,
"Coresets from Trajectories: Selecting Data via Correlation of Loss Differences"
(arXiv 2508.20230).

A training sample is valuable when its loss moves with the validation loss of its class
along the training trajectory. With per-sample training losses ``ℓ(θ_t, z_m)`` at E
checkpoints,

    Δ_m = (ℓ(θ_{t+1}, z_m) − ℓ(θ_t, z_m))_{t=0..E−2},
    Δ'_{V,c} = the same differences of the mean validation loss of class c,
    CLD(z_m) = Pearson r(Δ_m, Δ'_{V,y_m})   (population std; a zero std gives r = 0).

The coreset keeps the top-k samples of each class by CLD. These are scores, not a loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["cld_coreset", "cld_ranking", "cld_scores"]


def cld_scores(
    train_losses: Tensor,
    val_losses: Tensor,
    train_labels: Tensor,
    val_labels: Tensor,
    num_classes: int | None = None,
) -> Tensor:
    """Per-sample CLD scores.

    Args:
        train_losses: (E, N) per-sample training losses at E ≥ 3 checkpoints.
        val_losses: (E, M) per-sample validation losses at the same checkpoints.
        train_labels: (N,) int64 classes.
        val_labels: (M,) int64 classes.
        num_classes: number of classes (default: inferred from the labels).

    Returns:
        (N,) float64 Pearson correlations; 0 where either series has zero variance or the
        sample's class has no validation samples.
    """
    if train_losses.ndim != 2 or val_losses.ndim != 2:
        raise ValueError("train_losses and val_losses must be (E, N) and (E, M)")
    if train_losses.shape[0] != val_losses.shape[0]:
        raise ValueError("train_losses and val_losses need the same number of checkpoints E")
    if train_losses.shape[0] < 3:
        raise ValueError("CLD needs at least 3 checkpoints (2 loss differences)")
    if train_labels.shape != train_losses.shape[1:] or val_labels.shape != val_losses.shape[1:]:
        raise ValueError("label shapes must match the loss columns")
    train = train_losses.to(torch.float64)
    val = val_losses.to(torch.float64)
    if num_classes is None:
        num_classes = int(max(int(train_labels.max()), int(val_labels.max()))) + 1
    onehot = torch.nn.functional.one_hot(val_labels.long(), num_classes).to(torch.float64)
    counts = onehot.sum(dim=0)
    class_val = (val @ onehot) / counts.clamp(min=1.0)
    d_train = torch.diff(train, dim=0)
    d_val = torch.diff(class_val, dim=0)[:, train_labels.long()]
    centred_t = d_train - d_train.mean(dim=0)
    centred_v = d_val - d_val.mean(dim=0)
    std_t = centred_t.pow(2).mean(dim=0).sqrt()
    std_v = centred_v.pow(2).mean(dim=0).sqrt()
    cov = (centred_t * centred_v).mean(dim=0)
    ok = (std_t > 0) & (std_v > 0) & (counts[train_labels.long()] > 0)
    return torch.where(ok, cov / (std_t * std_v).clamp(min=1e-300), torch.zeros_like(cov))


def cld_ranking(scores: Tensor, labels: Tensor, num_classes: int) -> dict[int, Tensor]:
    """Per class, the indices of its training samples sorted by descending CLD (stable)."""
    ranking: dict[int, Tensor] = {}
    for cls in range(num_classes):
        members = torch.nonzero(labels == cls).reshape(-1)
        order = torch.sort(scores[members], descending=True, stable=True).indices
        ranking[cls] = members[order]
    return ranking


def cld_coreset(
    scores: Tensor,
    labels: Tensor,
    num_classes: int,
    *,
    fraction: float | None = None,
    per_class: int | None = None,
) -> Tensor:
    """The union over classes of the top-k samples by CLD, as sorted indices.

    Give either ``fraction`` (k_c = round(fraction·n_c)) or ``per_class`` (k_c = that
    number, capped at n_c).
    """
    if (fraction is None) == (per_class is None):
        raise ValueError("give exactly one of fraction and per_class")
    if fraction is not None and not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    chosen = []
    for members in cld_ranking(scores, labels, num_classes).values():
        k = (
            round(fraction * members.numel())
            if fraction is not None
            else min(per_class or 0, members.numel())
        )
        chosen.append(members[:k])
    return torch.sort(torch.cat(chosen)).values if chosen else torch.empty(0, dtype=torch.long)
