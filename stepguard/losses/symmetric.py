"""Symmetric losses: the symmetric part of any multi-class loss, the multi-class unhinged
loss (the symmetric part of cross-entropy) and the binary unhinged loss.

Any loss splits uniquely as ``ℓ(f, y) = ℓ_sym(f, y) + ℓ_ci(f)`` with the class-insensitive
part ``ℓ_ci(f) = (1/C)·Σ_{y'} ℓ(f, y')`` and ``Σ_y ℓ_sym(f, y) = 0`` (symmetry, hence
label-noise robustness in the sense of Ghosh et al.). For cross-entropy the log-partition
cancels and ``ℓ_sym(f, y) = −(f_y − mean_k f_k)``, which is linear in the scores.

Linear losses are unbounded below, so the minimiser diverges unless the scores are bounded
or regularised: the modules require ``bound`` (scores pass through ``bound·tanh(·/bound)``),
``score_l2`` (a penalty ``½·score_l2·‖f‖²`` per sample) or an explicit
``allow_unbounded=True``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from stepguard.losses.base import GuardedLoss, check_logits_target, check_reduction, reduce

__all__ = [
    "BinaryUnhingedLoss",
    "SymmetricCELoss",
    "binary_unhinged_loss",
    "symmetric_ce_loss",
    "symmetrize",
]

PerSampleLoss = Callable[[Tensor, Tensor], Tensor]


def symmetrize(loss_fn: PerSampleLoss, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Split a per-sample multi-class loss into its symmetric and class-insensitive parts.

    Args:
        loss_fn: ``(logits (B, C), target (B,)) → (B,)`` per-sample losses.
        logits: (B, C).
        target: (B,) int64.

    Returns:
        ``(ℓ_sym, ℓ_ci)``, each (B,); ``ℓ_sym`` sums to 0 over the possible labels.
    """
    check_logits_target(logits, target)
    num_classes = logits.shape[1]
    every = torch.stack(
        [loss_fn(logits, torch.full_like(target, c)) for c in range(num_classes)], dim=1
    )
    insensitive = every.mean(dim=1)
    return every.gather(1, target[:, None]).squeeze(1) - insensitive, insensitive


def symmetric_ce_loss(logits: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Multi-class unhinged loss ``−(f_y − mean_k f_k)``, the symmetric part of CE."""
    check_logits_target(logits, target)
    values = logits.mean(dim=1) - logits.gather(1, target[:, None]).squeeze(1)
    return reduce(values, reduction)


def binary_unhinged_loss(scores: Tensor, target_pm1: Tensor, reduction: str = "mean") -> Tensor:
    """Binary unhinged loss ``1 − y·v`` with y ∈ {−1, +1}."""
    scores = _flat(scores)
    return reduce(1.0 - target_pm1.reshape(-1).to(scores.dtype) * scores, reduction)


def _flat(scores: Tensor) -> Tensor:
    if not isinstance(scores, Tensor) or not scores.is_floating_point():
        raise TypeError("scores must be a floating-point tensor of shape (B,) or (B, 1)")
    if scores.ndim > 2 or (scores.ndim == 2 and scores.shape[1] != 1):
        raise ValueError(f"scores must have shape (B,) or (B, 1), got {tuple(scores.shape)}")
    return scores.reshape(-1)


class _Unbounded(GuardedLoss):
    has_radius_logits = False
    no_radius_reason = "the loss is linear in the scores; no softmax or sigmoid is involved"

    def __init__(
        self,
        bound: float | None,
        score_l2: float,
        allow_unbounded: bool,
        reduction: str,
        accumulation_steps: int,
    ) -> None:
        super().__init__(accumulation_steps=accumulation_steps)
        if bound is not None and bound <= 0:
            raise ValueError(f"bound must be positive, got {bound}")
        if score_l2 < 0:
            raise ValueError(f"score_l2 must be >= 0, got {score_l2}")
        if bound is None and score_l2 == 0 and not allow_unbounded:
            raise ValueError(
                f"{type(self).__name__} is linear in the scores and unbounded below, so "
                "training diverges: pass bound=<b> (scores through b·tanh(·/b)), "
                "score_l2=<λ> (penalty ½λ‖f‖²), or allow_unbounded=True if the model "
                "bounds its scores itself (normalised logits, strong weight decay)"
            )
        self.bound = bound
        self.score_l2 = float(score_l2)
        self.allow_unbounded = allow_unbounded
        self.reduction = check_reduction(reduction)

    def _squash(self, scores: Tensor) -> Tensor:
        if self.bound is None:
            return scores
        return self.bound * torch.tanh(scores / self.bound)


class SymmetricCELoss(_Unbounded):
    r"""Symmetric part of cross-entropy = the linear multi-class unhinged loss.

    $$\ell_{sym}(f,y)=-\Big(f_y-\frac1C\sum_k f_k\Big)
    =-\frac{C-1}{C}f_y+\frac1C\sum_{k\ne y}f_k,\qquad\sum_y\ell_{sym}(f,y)=0$$

    plus ``½·score_l2·‖f‖²`` when set. With ``bound`` the scores are ``b·tanh(f/b)``.

    Paper: Lemire Paquin, Chaib-Draa & Giguère, "Symmetrization of Loss Functions for Robust
    Training of Neural Networks in the Presence of Noisy Labels" (arXiv 2605.20347); binary
    unhinged loss of van Rooyen, Menon & Williamson, "Learning with Symmetric Label Noise: The
    Importance of Being Unhinged" (arXiv 1505.07634).

    Shapes: logits (B, C), target (B,) int64 → 0-d, or (B,) with ``reduction="none"``.

    Args:
        bound: tanh bound b on the logits, or ``None``.
        score_l2: coefficient of the ``½‖f‖²`` penalty per sample.
        allow_unbounded: accept neither bound nor penalty.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        accumulation_steps: see :class:`~stepguard.losses.base.GuardedLoss`.
    """

    def __init__(
        self,
        bound: float | None = None,
        score_l2: float = 0.0,
        *,
        allow_unbounded: bool = False,
        reduction: str = "mean",
        accumulation_steps: int = 1,
    ) -> None:
        super().__init__(bound, score_l2, allow_unbounded, reduction, accumulation_steps)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        check_logits_target(logits, target)
        scores = self._squash(logits)
        sym = symmetric_ce_loss(scores, target, "none")
        penalty = 0.5 * self.score_l2 * (scores**2).sum(dim=1)
        self._record(symmetric=sym, penalty=penalty)
        return reduce(sym + penalty, self.reduction)


class BinaryUnhingedLoss(_Unbounded):
    r"""Binary unhinged loss $\ell(y,v)=1-yv$, $y\in\{-1,+1\}$; $\ell(+1,v)+\ell(-1,v)=2$.

    plus ``½·score_l2·v²`` when set; with ``bound`` the score is ``b·tanh(v/b)``.

    Paper: van Rooyen, Menon & Williamson, "Learning with Symmetric Label Noise: The
    Importance of Being Unhinged" (arXiv 1505.07634).

    Shapes: scores (B,) or (B, 1), target (B,) in {−1, +1} → 0-d, or (B,) with
    ``reduction="none"``.

    Args:
        bound: tanh bound b on the score, or ``None``.
        score_l2: coefficient of the ``½v²`` penalty per sample.
        allow_unbounded: accept neither bound nor penalty.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        accumulation_steps: see :class:`~stepguard.losses.base.GuardedLoss`.
    """

    def __init__(
        self,
        bound: float | None = None,
        score_l2: float = 0.0,
        *,
        allow_unbounded: bool = False,
        reduction: str = "mean",
        accumulation_steps: int = 1,
    ) -> None:
        super().__init__(bound, score_l2, allow_unbounded, reduction, accumulation_steps)

    def forward(self, scores: Tensor, target: Tensor) -> Tensor:
        v = self._squash(_flat(scores))
        base = binary_unhinged_loss(v, target, "none")
        penalty = 0.5 * self.score_l2 * v**2
        self._record(unhinged=base, penalty=penalty)
        return reduce(base + penalty, self.reduction)
