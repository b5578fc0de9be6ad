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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stepguard.losses.base import GuardedLoss, check_reduction, reduce

Crossing = Literal["inf", "clamp"]

__all__ = [
    "PRESTOLoss",
    "PrestoFit",
    "ProportionalOddsLoss",
    "cumulative_class_probs",
    "cumulative_logits",
    "fit_presto",
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


@dataclass(frozen=True)
class PrestoFit:
    """Result of :func:`fit_presto` on the original covariate scale.

    Attributes:
        intercepts: (K−1,) α.
        beta: (K−1, p) per-threshold weights β_k (rows).
        objective: the penalised objective at the solution, on the standardised scale.
        iterations: proximal-Newton iterations used.
    """

    intercepts: Tensor
    beta: Tensor
    objective: float
    iterations: int


def fit_presto(
    x: Tensor,
    target: Tensor,
    lam: float,
    *,
    num_classes: int | None = None,
    alpha_en: float = 1.0,
    standardize: bool = True,
    faithful: bool = False,
    max_iter: int = 100,
    tol: float = 1e-13,
) -> PrestoFit:
    """Fit PRESTO at a fixed λ by proximal Newton in float64 (small and medium problems).

    The objective is ``−loglik/N + λ·penalty(ψ)`` with ψ on the standardised covariates when
    ``standardize`` (population standard deviation), as in ordinalNet. Each iteration solves
    the L1-penalised quadratic model by coordinate descent and backtracks on the true
    objective. Coefficients are mapped back to the original scale with
    ``β_k = β̃_k/σ`` and ``α_k = α̃_k − μᵀβ_k``.

    ``faithful=True`` reproduces the reference code's intercept mapping
    ``α_k = α̃_k − μᵀψ_k/σ``, which is wrong for k ≥ 1 whenever the covariate means are not
    zero (it ignores that η_k uses ψ_0 + … + ψ_k).

    Args:
        x: (N, p) covariates.
        target: (N,) int64 classes in [0, K).
        lam: λ ≥ 0.
        num_classes: K (default: max label + 1).
        alpha_en: elastic-net mix.
        standardize: standardise covariates for the fit.
        faithful: reproduce the reference intercept mapping.
        max_iter: maximum Newton iterations.
        tol: stop when the predicted decrease falls below ``tol``.
    """
    x = x.detach().to(torch.float64)
    target = target.detach().long()
    n, p = x.shape
    k_classes = int(target.max()) + 1 if num_classes is None else num_classes
    if standardize:
        mu = x.mean(dim=0)
        sd = x.std(dim=0, correction=0).clamp(min=1e-12)
    else:
        mu = torch.zeros(p, dtype=torch.float64)
        sd = torch.ones(p, dtype=torch.float64)
    xs = (x - mu) / sd
    k1 = k_classes - 1
    counts = torch.bincount(target, minlength=k_classes).to(torch.float64)
    cum = (counts.cumsum(0)[:-1] / n).clamp(1e-6, 1 - 1e-6)
    theta = torch.cat([torch.logit(cum), torch.zeros(k1 * p, dtype=torch.float64)])
    weights = torch.cat(
        [
            torch.zeros(k1, dtype=torch.float64),
            torch.full((k1 * p,), lam * alpha_en, dtype=torch.float64),
        ]
    )
    ridge = lam * (1.0 - alpha_en)

    def smooth(t: Tensor) -> Tensor:
        psi = t[k1:].reshape(k1, p)
        eta = cumulative_logits(xs, t[:k1], psi)
        return -ordinal_log_likelihood(eta, target).mean() + 0.5 * ridge * (psi**2).sum()

    def total(t: Tensor) -> float:
        return float(smooth(t)) + float((weights * t.abs()).sum())

    current = total(theta)
    iterations = 0
    while iterations < max_iter:
        iterations += 1
        grad, hess = _grad_and_hessian(smooth, theta)
        step = _l1_quadratic_step(theta, grad, hess, weights)
        decrease = float(grad @ step) + float(
            (weights * ((theta + step).abs() - theta.abs())).sum()
        )
        if -decrease < tol:
            break
        scale = 1.0
        while scale > 1e-10:
            candidate = theta + scale * step
            value = total(candidate)
            if math.isfinite(value) and value <= current + 0.25 * scale * decrease:
                break
            scale *= 0.5
        else:
            break
        theta, current = candidate, value
    psi_std = theta[k1:].reshape(k1, p)
    beta = psi_std.cumsum(dim=0) / sd
    shift = (psi_std / sd) @ mu if faithful else beta @ mu
    intercepts = theta[:k1] - shift
    return PrestoFit(intercepts, beta, current, iterations)


def _grad_and_hessian(fn: Callable[[Tensor], Tensor], theta: Tensor) -> tuple[Tensor, Tensor]:
    point = theta.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(point), point, create_graph=True)
    rows = [torch.autograd.grad(grad[j], point, retain_graph=True)[0] for j in range(point.numel())]
    hess = torch.stack(rows) + 1e-12 * torch.eye(point.numel(), dtype=point.dtype)
    return grad.detach(), hess.detach()


def _l1_quadratic_step(theta: Tensor, grad: Tensor, hess: Tensor, weights: Tensor) -> Tensor:
    """Coordinate descent on ``gᵀd + ½dᵀHd + Σ w_j|θ_j + d_j|``."""
    th = theta.tolist()
    g = grad.tolist()
    h = hess.tolist()
    w = weights.tolist()
    size = len(th)
    step = [0.0] * size
    hd = [0.0] * size
    for _ in range(1000):
        largest = 0.0
        for j in range(size):
            h_jj = h[j][j]
            partial = g[j] + hd[j] - h_jj * step[j]
            z = th[j] - partial / h_jj
            new_value = math.copysign(max(abs(z) - w[j] / h_jj, 0.0), z) - th[j]
            change = new_value - step[j]
            if change != 0.0:
                row = h[j]
                for i in range(size):
                    hd[i] += row[i] * change
                step[j] = new_value
                largest = max(largest, abs(change))
        if largest < 1e-15:
            break
    return torch.tensor(step, dtype=theta.dtype)
