"""PRESTO and proportional odds: cumulative-logit ordinal regression (Faletto & Bien).

The response y ∈ {0, …, K−1} is ordered. With one intercept α_k and one weight vector
β_k per threshold,

    P(y ≤ k | x) = σ(η_k),   η_k = α_k + xᵀβ_k,   k = 0, …, K−2,

and the class probabilities are differences of consecutive cumulative probabilities.
PRESTO parametrises ``β_k = ψ_0 + … + ψ_k`` and puts an L1 penalty on every ψ_k, i.e. on
β_0 and on the differences of adjacent thresholds' weights; proportional odds is the
special case ψ_k = 0 for k ≥ 1 (one shared weight vector).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stepguard.losses.base import GuardedLoss, check_reduction, reduce

Crossing = Literal["inf", "clamp"]

__all__ = [
    "PRESTOLoss",
    "ProportionalOddsLoss",
    "cumulative_class_probs",
    "cumulative_logits",
    "ordinal_log_likelihood",
    "presto_penalty",
]


def cumulative_logits(x: Tensor, intercepts: Tensor, psi: Tensor) -> Tensor:
    """η_k = α_k + xᵀ(ψ_0 + … + ψ_k).

    Args:
        x: (B, p) covariates.
        intercepts: (K−1,) α.
        psi: (K−1, p) adjacent differences ψ (row 0 is β_0).

    Returns:
        (B, K−1) cumulative logits.
    """
    return intercepts + x @ psi.cumsum(dim=0).T


def cumulative_class_probs(eta: Tensor) -> Tensor:
    """Class probabilities (B, K) from cumulative logits (B, K−1); negative where η crosses."""
    cdf = torch.sigmoid(eta)
    zeros = torch.zeros_like(cdf[:, :1])
    ones = torch.ones_like(cdf[:, :1])
    return torch.diff(torch.cat([zeros, cdf, ones], dim=1), dim=1)


def ordinal_log_likelihood(
    eta: Tensor, target: Tensor, *, crossing: Crossing = "inf", eps: float = 1e-12
) -> Tensor:
    """Per-sample ``log P(y | x)`` from cumulative logits, in a stable form.

    With upper ``u = η_y`` and lower ``l = η_{y−1}`` (η_{−1} = −∞, η_{K−1} = +∞),
    ``σ(u) − σ(l) = σ(u)·σ(−l)·(1 − e^{l−u})``, so
    ``log p = logσ(u) + logσ(−l) + log(−expm1(l − u))``.

    Args:
        eta: (B, K−1) cumulative logits.
        target: (B,) int64 classes in [0, K).
        crossing: where ``u ≤ l`` the probability is ≤ 0: ``"inf"`` returns −∞ (the loss is
            +∞, as in the reference code), ``"clamp"`` floors it at ``eps``.
        eps: the floor for ``"clamp"``.

    Returns:
        (B,) log-likelihoods.
    """
    if eta.ndim != 2:
        raise ValueError(f"eta must have shape (B, K-1), got {tuple(eta.shape)}")
    if target.dtype != torch.long or target.shape != eta.shape[:1]:
        raise ValueError(f"target must be int64 of shape ({eta.shape[0]},)")
    if crossing not in ("inf", "clamp"):
        raise ValueError(f"crossing must be 'inf' or 'clamp', got {crossing!r}")
    inf = torch.full_like(eta[:, :1], math.inf)
    ext = torch.cat([-inf, eta, inf], dim=1)
    upper = ext.gather(1, (target + 1)[:, None]).squeeze(1)
    lower = ext.gather(1, target[:, None]).squeeze(1)
    gap = upper - lower
    ordered = gap > 0
    safe_gap = torch.where(ordered, gap, torch.ones_like(gap))
    value = F.logsigmoid(upper) + F.logsigmoid(-lower) + torch.log(-torch.expm1(-safe_gap))
    floor = torch.full_like(value, -math.inf if crossing == "inf" else math.log(eps))
    if crossing == "clamp":
        value = torch.maximum(value, floor)
    return torch.where(ordered, value, floor)


def presto_penalty(psi: Tensor, lam: float, alpha_en: float = 1.0) -> Tensor:
    """``λ·Σ [α_en·|ψ| + ½(1 − α_en)·ψ²]`` (intercepts are not penalised)."""
    return lam * (alpha_en * psi.abs().sum() + 0.5 * (1.0 - alpha_en) * (psi**2).sum())


class PRESTOLoss(GuardedLoss):
    r"""PRESTO: non-parallel cumulative-logit likelihood with an L1 penalty on adjacent
    threshold weights.

    $$P(y\le k\mid x)=\sigma(\alpha_k+x^\top\beta_k),\quad
    \beta_k=\sum_{j\le k}\psi_j,$$
    $$L=-\frac1N\sum_i\log p_{y_i}(x_i)+\lambda\sum_{k,j}\Big[\alpha_{en}|\psi_{kj}|
    +\tfrac12(1-\alpha_{en})\psi_{kj}^2\Big]$$

    The loss owns the intercepts α (K−1,) and ψ (K−1, p). The intercepts start at
    ``logit((k+1)/K)`` (increasing) and ψ at 0. Crossing cumulative logits (η_k < η_{k−1})
    give a negative class probability; ``crossing="inf"`` returns +∞ for that sample (as the
    reference code's −∞ log-likelihood), ``"clamp"`` floors the probability at 1e−12.

    Paper: Faletto & Bien, "Predicting Rare Events by Shrinking Towards Proportional Odds"
    (arXiv 2305.18700).

    Shapes: x (B, p), target (B,) int64 in [0, K) → 0-d, or (B,) per-sample negative
    log-likelihoods with ``reduction="none"`` (the penalty is then in ``components`` only).

    Args:
        in_features: p.
        num_classes: K ≥ 2.
        lam: penalty strength λ ≥ 0.
        alpha_en: elastic-net mix (1 = lasso, the PRESTO default).
        crossing: ``"inf"`` or ``"clamp"``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        accumulation_steps: see :class:`~stepguard.losses.base.GuardedLoss`.
    """

    _proportional = False

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        lam: float,
        alpha_en: float = 1.0,
        crossing: Crossing = "inf",
        reduction: str = "mean",
        *,
        accumulation_steps: int = 1,
    ) -> None:
        super().__init__(accumulation_steps=accumulation_steps)
        if in_features < 1 or num_classes < 2:
            raise ValueError("need in_features >= 1 and num_classes >= 2")
        if lam < 0 or not 0.0 <= alpha_en <= 1.0:
            raise ValueError(f"need lam >= 0 and alpha_en in [0, 1], got {lam}, {alpha_en}")
        if crossing not in ("inf", "clamp"):
            raise ValueError(f"crossing must be 'inf' or 'clamp', got {crossing!r}")
        self.in_features = in_features
        self.num_classes = num_classes
        self.lam = float(lam)
        self.alpha_en = float(alpha_en)
        self.crossing: Crossing = crossing
        self.reduction = check_reduction(reduction)
        levels = torch.arange(1, num_classes, dtype=torch.float32) / num_classes
        self.intercepts = nn.Parameter(torch.logit(levels))
        rows = 1 if self._proportional else num_classes - 1
        self.psi = nn.Parameter(torch.zeros(rows, in_features))

    def full_psi(self) -> Tensor:
        """ψ as (K−1, p); zero rows beyond the first for proportional odds."""
        if not self._proportional:
            return self.psi
        pad = self.psi.new_zeros(self.num_classes - 2, self.in_features)
        return torch.cat([self.psi, pad], dim=0)

    def radius_logits(self, output: Tensor, target: Tensor | None = None) -> Tensor:
        """The cumulative logits η (B, K−1) the sigmoids act on."""
        return cumulative_logits(output, self.intercepts, self.full_psi())

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"x must have shape (B, {self.in_features}), got {tuple(x.shape)}")
        eta = self.radius_logits(x)
        nll = -ordinal_log_likelihood(eta, target, crossing=self.crossing)
        penalty = presto_penalty(self.psi, self.lam, self.alpha_en)
        self._record(nll=nll, penalty=penalty)
        if self.reduction == "none":
            return nll
        return reduce(nll, self.reduction) + penalty


class ProportionalOddsLoss(PRESTOLoss):
    r"""Proportional-odds (cumulative logit) model: PRESTO with ψ_k = 0 for k ≥ 1.

    $$P(y\le k\mid x)=\sigma(\alpha_k+x^\top\beta),\qquad
    L=-\frac1N\sum_i\log p_{y_i}(x_i)+\lambda\big[\alpha_{en}\lVert\beta\rVert_1
    +\tfrac12(1-\alpha_{en})\lVert\beta\rVert_2^2\big]$$

    Paper: McCullagh, "Regression Models for Ordinal Data" (1980); as the PRESTO special case
    in Faletto & Bien (arXiv 2305.18700).

    Shapes: x (B, p), target (B,) int64 in [0, K) → 0-d.

    Args:
        in_features: p.
        num_classes: K ≥ 2.
        lam: penalty strength λ ≥ 0 (0.0).
        alpha_en: elastic-net mix (1.0).
        crossing: ``"inf"`` or ``"clamp"`` (crossing cannot happen with a shared β).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        accumulation_steps: see :class:`~stepguard.losses.base.GuardedLoss`.
    """

    _proportional = True

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        lam: float = 0.0,
        alpha_en: float = 1.0,
        crossing: Crossing = "inf",
        reduction: str = "mean",
        *,
        accumulation_steps: int = 1,
    ) -> None:
        super().__init__(
            in_features,
            num_classes,
            lam,
            alpha_en,
            crossing,
            reduction,
            accumulation_steps=accumulation_steps,
        )
