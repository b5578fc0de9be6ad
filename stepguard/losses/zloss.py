"""Two different "z-losses": the spherical Z-loss (de Brébisson & Vincent) and PaLM's
log²Z auxiliary penalty (Chowdhery et al.).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from stepguard.losses.base import GuardedLoss, check_logits_target, check_reduction

__all__ = [
    "CrossEntropyWithZLoss",
    "LogZSquaredPenalty",
    "SphericalZLoss",
    "cross_entropy_with_z_loss",
    "logz_squared_penalty",
    "spherical_z_loss",
    "z_scores",
]


def z_scores(logits: Tensor, eps: float = 1e-12) -> Tensor:
    """``(o − mean o)/σ(o)`` per row, σ the population standard deviation (floored at √eps)."""
    mean = logits.mean(dim=1, keepdim=True)
    var = (logits**2).mean(dim=1, keepdim=True) - mean**2
    return (logits - mean) / torch.sqrt(var.clamp(min=eps))


def spherical_z_loss(logits: Tensor, target: Tensor, a: float, b: float, reduction: str = "mean") -> Tensor:
    """``softplus(a·(b − z_y))/a`` with z the per-row z-scores of the logits."""
    check_logits_target(logits, target)
    if a <= 0:
        raise ValueError(f"a must be positive, got {a}")
    z_y = z_scores(logits).gather(1, target[:, None]).squeeze(1)
    values = F.softplus(a * (b - z_y)) / a
    return _reduce(values, reduction)


def _reduce(values: Tensor, reduction: str, valid: Tensor | None = None) -> Tensor:
    if reduction == "none":
        return values
    if valid is not None:
        values = values * valid.to(values.dtype)
    if reduction == "sum":
        return values.sum()
    if reduction == "mean":
        count = values.new_tensor(values.numel()) if valid is None else valid.sum()
        return values.sum() / count
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def logz_squared_penalty(
    logits: Tensor,
    multiplier: float = 1e-4,
    reduction: str = "mean",
    *,
    target: Tensor | None = None,
    ignore_index: int = -100,
) -> Tensor:
    """PaLM's auxiliary loss ``multiplier·(log Z)²``, ``log Z = logsumexp(logits)``.

    Logits are upcast to float32 first. Rows whose target equals ``ignore_index`` are left
    out of ``mean``/``sum`` (with ``"none"`` they are 0).

    Args:
        logits: (N, C).
        multiplier: z (1e−4 in PaLM).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        target: optional (N,) labels, only used to find ignored rows.
        ignore_index: label value of rows to ignore.
    """
    log_z = torch.logsumexp(logits.float(), dim=-1)
    values = multiplier * log_z.pow(2)
    valid = None if target is None else target != ignore_index
    if valid is not None and reduction == "none":
        values = values * valid.to(values.dtype)
    return _reduce(values, reduction, valid)


def cross_entropy_with_z_loss(
    logits: Tensor,
    target: Tensor,
    multiplier: float = 1e-4,
    reduction: str = "mean",
    ignore_index: int = -100,
) -> tuple[Tensor, Tensor]:
    """Cross-entropy and the log²Z penalty, both in float32 with the same reduction.

    Returns:
        ``(ce, z_loss)``.
    """
    check_logits_target(logits, target)
    ce = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction=reduction)
    z = logz_squared_penalty(logits, multiplier, reduction, target=target, ignore_index=ignore_index)
    return ce, z


class SphericalZLoss(GuardedLoss):
    r"""Spherical Z-loss: a softplus of the target's z-score, shift- and scale-invariant.

    $$\mu=\tfrac1C\sum_k o_k,\ \sigma^2=\tfrac1C\sum_k o_k^2-\mu^2,\ z_c=\frac{o_c-\mu}
    {\sigma},\qquad L_Z(o,c)=\frac1a\log\big(1+e^{a(b-z_c)}\big)$$

    It depends on o only through $o_c$, $\sum_k o_k$ and $\sum_k o_k^2$ (the spherical
    family). σ is floored at $10^{-6}$ (all-equal logits). With C = 2, $|z_c| = 1$ always and
    the loss carries almost no signal. Logit growth is invisible to it: monitor the logit
    norm separately. No values of a and b are universal; tune both.

    Paper: de Brébisson & Vincent, "The Z-loss: a shift and scale invariant classification
    loss belonging to the Spherical Family" (arXiv 1604.08859).

    Shapes: logits (B, C), target (B,) int64 → 0-d, or (B,) with ``reduction="none"``.

    Args:
        a: sharpness a > 0.
        b: location b (target z-score).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        accumulation_steps: see :class:`~stepguard.losses.base.GuardedLoss`.
    """

    def __init__(self, a: float, b: float, reduction: str = "mean", *, accumulation_steps: int = 1) -> None:
        super().__init__(accumulation_steps=accumulation_steps)
        if a <= 0:
            raise ValueError(f"a must be positive, got {a}")
        self.a = float(a)
        self.b = float(b)
        self.reduction = check_reduction(reduction)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        loss = spherical_z_loss(logits, target, self.a, self.b, self.reduction)
        with torch.no_grad():
            z_y = z_scores(logits).gather(1, target[:, None])
        self._record(z_loss=loss, target_z_score=z_y)
        return loss

    def radius_logits(self, output: Tensor, target: Tensor | None = None) -> Tensor:
        """The argument ``a·(z_y − b)`` (B,) of the loss's sigmoid: ``L = −log σ(a(z_y − b))/a``."""
        if target is None:
            raise ValueError("SphericalZLoss.radius_logits needs the target")
        z_y = z_scores(output).gather(1, target[:, None]).squeeze(1)
        return self.a * (z_y - self.b)


class _LogZLoss(GuardedLoss):
    """Shared hyperparameters of the log²Z losses: multiplier z, reduction, ignore_index."""

    def __init__(
        self,
        multiplier: float = 1e-4,
        reduction: str = "mean",
        ignore_index: int = -100,
        *,
        accumulation_steps: int = 1,
    ) -> None:
        super().__init__(accumulation_steps=accumulation_steps)
        if multiplier < 0:
            raise ValueError(f"multiplier must be >= 0, got {multiplier}")
        self.multiplier = float(multiplier)
        self.reduction = check_reduction(reduction)
        self.ignore_index = ignore_index


class LogZSquaredPenalty(_LogZLoss):
    r"""PaLM's auxiliary z-loss $z\cdot(\log Z)^2$, $\log Z=\operatorname{logsumexp}_j h_j$.

    Added to cross-entropy, it keeps the log-partition near 0 (PaLM: z = 1e−4). Rows whose
    target is ``ignore_index`` are excluded when a target is passed.

    Paper: Chowdhery et al., "PaLM: Scaling Language Modeling with Pathways"
    (arXiv 2204.02311).

    Shapes: logits (N, C) [, target (N,)] → 0-d, or (N,) with ``reduction="none"``.

    Args:
        multiplier: z (1e−4).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        ignore_index: label of ignored rows (−100).
        accumulation_steps: see :class:`~stepguard.losses.base.GuardedLoss`.
    """

    def forward(self, logits: Tensor, target: Tensor | None = None) -> Tensor:
        loss = logz_squared_penalty(
            logits, self.multiplier, self.reduction, target=target, ignore_index=self.ignore_index
        )
        with torch.no_grad():
            log_z = torch.logsumexp(logits.float(), dim=-1)
        self._record(z_loss=loss, log_z=log_z)
        return loss


class CrossEntropyWithZLoss(_LogZLoss):
    r"""Cross-entropy plus PaLM's log²Z penalty: $\mathrm{CE}+z(\log Z)^2$.

    Paper: Chowdhery et al., "PaLM: Scaling Language Modeling with Pathways"
    (arXiv 2204.02311).

    Shapes: logits (N, C), target (N,) int64 → 0-d, or (N,) with ``reduction="none"``.

    Args:
        multiplier: z (1e−4).
        reduction: ``"mean"`` (over non-ignored rows), ``"sum"`` or ``"none"``.
        ignore_index: label of ignored rows (−100).
        accumulation_steps: see :class:`~stepguard.losses.base.GuardedLoss`.
    """

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        ce, z = cross_entropy_with_z_loss(logits, target, self.multiplier, self.reduction, self.ignore_index)
        self._record(cross_entropy=ce, z_loss=z)
        return ce + z
