"""The PRESTO / proportional-odds solver: the penalised ordinal regression fitted to
convergence by proximal Newton, for a fixed design matrix (the loss itself is
:class:`stepguard.losses.PRESTOLoss`; this module fits it outside a network).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from stepguard.losses.presto import cumulative_logits, ordinal_log_likelihood

__all__ = ["PrestoFit", "fit_presto"]


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
