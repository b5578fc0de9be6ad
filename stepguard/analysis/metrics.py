"""Metrics across checkpoints: per-sample loss and correctness, negative flips, CLD scores.

* Negative-flip rate ("Margin Preserving Training against negative flips", Ricci et al.,
  arXiv 2511.08322): NFR = (1/N)·Σ_n 1[correct at t ∧ wrong at t+1], over the N counted
  samples (or positions) of the probe.
* CLD, correlation of loss differences (Nagaraj, Ravikumar & Roy 2025): with the per-sample
  training losses ℓ_t(z_m) at E checkpoints and the mean validation loss of each class,
  CLD(z_m) = Pearson r(Δℓ(z_m), ΔL_val,y_m) over the E−1 differences between consecutive
  checkpoints, with population standard deviations and r = 0 where one is 0; a coreset
  keeps the highest-scoring samples of each class. A class without validation samples has
  no mean validation loss: its samples score NaN.

These are the library's only implementations of both metrics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from stepguard.geometry.logits import to_rows


@dataclass(frozen=True)
class RowEvaluation:
    """The model's loss and correctness on each counted row of the probe at one checkpoint.

    Rows are samples, or (sample, position) pairs for sequence outputs; rows masked out or
    whose target is ``ignore_index`` are dropped (``positions`` maps the kept rows back).

    Attributes:
        logits: (M, K) logits of the kept rows, float64 on the CPU.
        targets: (M,) their targets (``None`` without targets).
        loss: (M,) cross-entropy (binary cross-entropy for a one-logit head), float64;
            ``None`` without targets.
        correct: (M,) whether the prediction is the target; ``None`` without targets.
        positions: flat index of each kept row (``None``: all rows kept).
        shape: the logits' shape before flattening.
    """

    logits: Tensor
    targets: Tensor | None
    loss: Tensor | None
    correct: Tensor | None
    positions: Tensor | None
    shape: tuple[int, ...]

    @property
    def mean_loss(self) -> float | None:
        """Mean loss over the kept rows (NaN when none is kept)."""
        if self.loss is None:
            return None
        return float(self.loss.mean()) if self.loss.numel() else math.nan

    @property
    def accuracy(self) -> float | None:
        """Fraction of kept rows predicted correctly (NaN when none is kept)."""
        if self.correct is None:
            return None
        return float(self.correct.double().mean()) if self.correct.numel() else math.nan


def evaluate_rows(
    logits: Tensor,
    targets: Tensor | None,
    mask: Tensor | None = None,
    *,
    ignore_index: int | None = -100,
    temperature: float = 1.0,
) -> RowEvaluation:
    """Per-row loss and correctness of ``logits`` against ``targets``.

    A one-logit head (logits (N,) or (N, 1)) takes targets in {0, 1}: binary cross-entropy
    with logits, correct when ``(z > 0) == y``. Otherwise softmax cross-entropy of ``z/T``,
    correct when the arg-max is the target.
    """
    binary_float = targets is not None and targets.is_floating_point()
    z, _, y, positions = to_rows(
        logits.detach(), mask=mask, targets=targets, ignore_index=None if binary_float else ignore_index
    )
    z = z.to(torch.float64).cpu()
    loss = correct = None
    if y is not None:
        y = y.cpu()
        if z.shape[-1] == 1:
            s = z[:, 0] / temperature
            yf = y.to(torch.float64)
            loss = F.binary_cross_entropy_with_logits(s, yf, reduction="none")
            correct = (s > 0) == (yf > 0.5)
        else:
            yl = y.to(torch.long)
            loss = F.cross_entropy(z / temperature, yl, reduction="none")
            correct = z.argmax(dim=-1) == yl
    return RowEvaluation(
        logits=z,
        targets=y,
        loss=loss,
        correct=correct,
        positions=None if positions is None else positions.cpu(),
        shape=tuple(logits.shape),
    )


# ---------------------------------------------------------------- negative flips


def negative_flips(correct_old: Tensor, correct_new: Tensor) -> Tensor:
    """Boolean per row: correct before and wrong after."""
    if correct_old.shape != correct_new.shape:
        raise ValueError(
            f"negative flips need the same rows at both checkpoints, got {tuple(correct_old.shape)} "
            f"and {tuple(correct_new.shape)}"
        )
    return correct_old.bool() & ~correct_new.bool()


def negative_flip_rate(correct_old: Tensor, correct_new: Tensor) -> float:
    """NFR = (1/N)·Σ_n 1[correct_old ∧ ¬correct_new] (NaN for no rows)."""
    flips = negative_flips(correct_old, correct_new)
    return float(flips.double().mean()) if flips.numel() else math.nan


def relative_negative_flip_rate(correct_old: Tensor, correct_new: Tensor) -> float:
    """Relative NFR = NFR / ((1 − ER_old)·ER_new): the flips as a share of those that chance
    alone would give with the same accuracies. 0 where the denominator is 0 (no sample was
    right before or none is wrong after: no flip is possible); NaN for no rows.
    """
    nfr = negative_flip_rate(correct_old, correct_new)
    if math.isnan(nfr):
        return nfr
    denominator = float(correct_old.double().mean()) * float((~correct_new.bool()).double().mean())
    return nfr / denominator if denominator > 0 else 0.0


def class_incremental_correctness(
    old_logits: Tensor, new_logits: Tensor, target: Tensor, num_old: int | None = None
) -> tuple[Tensor, Tensor]:
    """Correctness of an old and an updated classifier on the same samples, for the flip rates.

    The old prediction is the arg-max over the old model's outputs (C_old columns), the new
    one over all of the new model's. With ``num_old`` only samples whose label is an old class
    (``target < num_old``) are kept, as the reference evaluation of Ricci et al. does.

    Returns:
        ``(correct_old, correct_new)``, boolean (N',) tensors for the kept samples.
    """
    if old_logits.shape[:1] != target.shape or new_logits.shape[:1] != target.shape:
        raise ValueError(
            f"logits (N, C) and target (N,) must share N, got {tuple(old_logits.shape)}, "
            f"{tuple(new_logits.shape)} and {tuple(target.shape)}"
        )
    correct_old = old_logits.argmax(dim=1) == target
    correct_new = new_logits.argmax(dim=1) == target
    if num_old is None:
        return correct_old, correct_new
    kept = target < num_old
    return correct_old[kept], correct_new[kept]


def flip_rate(old: RowEvaluation, new: RowEvaluation) -> tuple[float, int]:
    """Negative-flip rate and count between two evaluations of the same probe.

    Raises:
        ValueError: the evaluations have no targets, or different rows.
    """
    if old.correct is None or new.correct is None:
        raise ValueError("negative flips need targets in the probe")
    count = int(negative_flips(old.correct, new.correct).sum())
    return negative_flip_rate(old.correct, new.correct), count


# ---------------------------------------------------------------- CLD


def cld_scores(
    train_losses: Tensor,
    train_labels: Tensor,
    val_losses: Tensor,
    val_labels: Tensor,
) -> Tensor:
    """CLD score of every training sample: Pearson r of its loss differences with those of
    the mean validation loss of its class.

    Args:
        train_losses: (E, N) per-sample training losses at E ≥ 3 checkpoints (E − 1 ≥ 2
            differences: a correlation of one pair of numbers says nothing).
        train_labels: (N,) classes.
        val_losses: (E, M) per-sample validation losses at the same checkpoints.
        val_labels: (M,) classes.

    Returns:
        (N,) float64 scores in [−1, 1]; 0 where either standard deviation is 0 (population
        std, as the reference code); NaN for samples whose class has no validation sample
        (the class's mean validation loss, and so the correlation, is undefined).
    """
    x = torch.as_tensor(train_losses, dtype=torch.float64)
    v = torch.as_tensor(val_losses, dtype=torch.float64)
    ty = torch.as_tensor(train_labels).reshape(-1)
    vy = torch.as_tensor(val_labels).reshape(-1)
    if x.ndim != 2 or v.ndim != 2 or x.shape[0] != v.shape[0]:
        raise ValueError(
            "CLD needs (E, N) training and (E, M) validation losses at the same checkpoints, "
            f"got {tuple(x.shape)} and {tuple(v.shape)}; the arguments are "
            "(train_losses, train_labels, val_losses, val_labels)"
        )
    if x.shape[0] < 3:
        raise ValueError(f"CLD needs losses at 3 or more checkpoints (2 differences), got {x.shape[0]}")
    if ty.numel() != x.shape[1] or vy.numel() != v.shape[1]:
        raise ValueError("CLD: one label per training and per validation sample is needed")
    d_train = torch.diff(x, dim=0)
    scores = torch.full((x.shape[1],), math.nan, dtype=torch.float64)
    for c in torch.unique(ty).tolist():
        in_val = vy == c
        if not bool(in_val.any()):
            continue
        members = ty == c
        d_val = torch.diff(v[:, in_val].mean(dim=1))
        cols = d_train[:, members]
        x_std = cols.std(dim=0, correction=0)
        y_std = d_val.std(correction=0)
        xz = (cols - cols.mean(dim=0)) / torch.where(x_std == 0, torch.ones_like(x_std), x_std)
        yz = (d_val - d_val.mean()) / (y_std if float(y_std) != 0 else 1.0)
        scores[members] = (xz * yz[:, None]).mean(dim=0)
    return scores


def cld_ranking(scores: Tensor, labels: Tensor) -> dict[int, list[int]]:
    """Sample indices of each class, highest CLD score first (NaN scores: the class is left empty).

    Ties keep the reference code's order (a reversed ascending sort: the later index first).
    """
    ranking: dict[int, list[int]] = {}
    y = torch.as_tensor(labels).reshape(-1)
    for c in torch.unique(y).tolist():
        idx = (y == c).nonzero().squeeze(1)
        s = scores[idx]
        if bool(torch.isnan(s).any()):
            ranking[int(c)] = []
            continue
        order = torch.argsort(s, stable=True).flip(0)
        ranking[int(c)] = idx[order].tolist()
    return ranking


def cld_coreset(
    ranking: Mapping[int, list[int]], fraction: float | None = None, *, per_class: int | None = None
) -> list[int]:
    """The union over classes of the top samples of each class, sorted.

    Give either ``fraction`` (the top ⌈fraction·n_c⌉ of each class: every class with a
    ranking keeps at least one sample) or ``per_class`` (the top min(k, n_c)).
    """
    if (fraction is None) == (per_class is None):
        raise ValueError("give exactly one of fraction and per_class to cld_coreset")
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise ValueError(f"the coreset fraction must lie in (0, 1], got {fraction}")
    if per_class is not None and per_class < 0:
        raise ValueError(f"per_class must be 0 or more, got {per_class}")
    keep: list[int] = []
    for members in ranking.values():
        k = math.ceil(fraction * len(members)) if fraction is not None else per_class
        keep.extend(members[:k])
    return sorted(keep)
