"""Soft-Binary-Argmax: Euclidean projection onto the (n, k)-hypersimplex, and the
differentiable zero-one losses built on it (Gomez, Wang & Tang).

The hypersimplex is ``Δ_{n,k} = {μ ∈ [0, 1]^n : Σμ = k}``. The projection of ``s = θ/ε`` is
``μ = clip(s − τ, 0, 1)`` with the scalar τ that makes ``Σμ = k`` (KKT conditions of the
box- and sum-constrained least squares). For k = 1 it is sparsemax; as ε → 0 it tends to
the hard top-k indicator. With F = {i : 0 < μ_i < 1} the Jacobian is

    ∂μ/∂θ = (1/ε)·(I_F − 1_F 1_Fᵀ/|F|)   on F × F, and 0 elsewhere.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from stepguard.losses.base import GuardedLoss, check_logits_target

__all__ = [
    "HypersimplexBinaryLoss",
    "HypersimplexMulticlassLoss",
    "hypersimplex_binary_loss",
    "hypersimplex_k",
    "hypersimplex_multiclass_loss",
    "hypersimplex_threshold",
    "soft_binary_argmax",
    "soft_binary_argmax_jacobian",
]


def hypersimplex_k(n: int, fraction: float, *, faithful: bool = False) -> int:
    """Number of ones k for n coordinates and a fraction p.

    The default rounds ``n·p`` to the nearest integer; ``faithful=True`` truncates with
    ``int(n·p)`` as the reference code does (so n = 100, p = 0.29 gives 28, not 29).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    return int(n * fraction) if faithful else round(n * fraction)


def hypersimplex_threshold(s: Tensor, k: Tensor | float) -> Tensor:
    """The τ with ``Σ_i clip(s_i − τ, 0, 1) = k`` along the last dimension.

    Exact: ``f(t) = Σ clip(s_i − t, 0, 1)`` is piecewise linear and non-increasing with
    breakpoints at s_i and s_i − 1; the crossing segment is found with ``searchsorted`` and
    τ is then recomputed from the free coordinates.

    Args:
        s: (..., n) scores.
        k: scalar or (...) tensor in [0, n].

    Returns:
        (...) thresholds.
    """
    n = s.shape[-1]
    k = torch.as_tensor(k, dtype=s.dtype, device=s.device).expand(s.shape[:-1])
    ascending = torch.sort(s, dim=-1).values.contiguous()
    prefix = F.pad(ascending.cumsum(dim=-1), (1, 0))
    total = prefix[..., -1:]

    def relu_sum(t: Tensor) -> Tensor:
        below = torch.searchsorted(ascending, t, right=True)
        above_sum = total - prefix.gather(-1, below)
        return above_sum - t * (n - below).to(s.dtype)

    breaks = torch.sort(torch.cat([ascending, ascending - 1.0], dim=-1), dim=-1).values
    values = relu_sum(breaks) - relu_sum(breaks + 1.0)
    count = (values >= k[..., None]).sum(dim=-1, keepdim=True)
    hi = count.clamp(max=2 * n - 1)
    lo = (count - 1).clamp(min=0)
    t_lo, t_hi = breaks.gather(-1, lo), breaks.gather(-1, hi)
    f_lo, f_hi = values.gather(-1, lo), values.gather(-1, hi)
    slope = f_lo - f_hi
    frac = torch.where(slope > 0, (f_lo - k[..., None]) / slope.clamp(min=1e-300), 0.0)
    tau = (t_lo + frac.clamp(0.0, 1.0) * (t_hi - t_lo)).squeeze(-1)
    mu = s - tau[..., None]
    free = (mu > 0) & (mu < 1)
    ones = mu >= 1
    n_free = free.sum(dim=-1)
    refined = ((s * free).sum(dim=-1) + ones.sum(dim=-1) - k) / n_free.clamp(min=1)
    return torch.where(n_free > 0, refined, tau)


class _SoftBinaryArgmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, theta: Tensor, k: Tensor, eps: float) -> Tensor:
        s = theta / eps
        tau = hypersimplex_threshold(s, k)
        mu = (s - tau[..., None]).clamp(0.0, 1.0)
        free = (mu > 0) & (mu < 1)
        ctx.save_for_backward(free)
        ctx.eps = eps
        return mu

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (free,) = ctx.saved_tensors
        mask = free.to(grad.dtype)
        mean = (grad * mask).sum(dim=-1, keepdim=True) / mask.sum(dim=-1, keepdim=True).clamp(min=1)
        return mask * (grad - mean) / ctx.eps, None, None


def soft_binary_argmax(
    theta: Tensor, k: Tensor | float, regularization_strength: float = 1.0
) -> Tensor:
    """Soft-Binary-Argmax: the projection of ``θ/ε`` onto Δ_{n,k} along the last dimension.

    Args:
        theta: (..., n) scores.
        k: number of ones, a scalar or a (...) tensor in [0, n].
        regularization_strength: ε > 0.

    Returns:
        (..., n) μ with entries in [0, 1] summing to k; differentiable in θ.
    """
    if regularization_strength <= 0:
        raise ValueError(f"regularization_strength must be positive, got {regularization_strength}")
    if not isinstance(theta, Tensor) or not theta.is_floating_point():
        raise TypeError("theta must be a floating-point tensor")
    k_t = torch.as_tensor(k, dtype=theta.dtype, device=theta.device)
    return _SoftBinaryArgmax.apply(theta, k_t, float(regularization_strength))


def soft_binary_argmax_jacobian(mu: Tensor, regularization_strength: float = 1.0) -> Tensor:
    """Jacobian ``∂μ/∂θ`` (..., n, n) of the projection at its output μ.

    ``(1/ε)·(diag(1_F) − 1_F 1_Fᵀ/|F|)`` with F the coordinates strictly inside (0, 1).
    """
    free = ((mu > 0) & (mu < 1)).to(mu.dtype)
    n_free = free.sum(dim=-1, keepdim=True).clamp(min=1)[..., None]
    outer = free[..., :, None] * free[..., None, :]
    return (torch.diag_embed(free) - outer / n_free) / regularization_strength


def hypersimplex_multiclass_loss(
    logits: Tensor,
    target: Tensor,
    regularization_strength: float = 1.5,
    fraction: float = 0.5,
    *,
    faithful: bool = False,
) -> tuple[Tensor, Tensor]:
    """Project every class column across the batch onto Δ_{B,k} and take the MSE to one-hot.

    Returns:
        ``(loss, projection)`` with projection (B, C).
    """
    check_logits_target(logits, target)
    batch = logits.shape[0]
    k = hypersimplex_k(batch, fraction, faithful=faithful)
    projection = soft_binary_argmax(logits.T, k, regularization_strength).T
    onehot = F.one_hot(target, logits.shape[1]).to(logits.dtype)
    return F.mse_loss(projection, onehot), projection


def hypersimplex_binary_loss(
    scores: Tensor,
    labels: Tensor,
    regularization_strength: float = 1e-3,
    *,
    faithful: bool = False,
) -> tuple[Tensor, Tensor]:
    """Project the batch's scores onto Δ_{n,k}, k = number of positives; MSE to the labels.

    ``faithful=True`` reproduces the reference objective: ``k = int(n·mean(y))`` (float
    truncation) and ε fixed at 1e−3 whatever ``regularization_strength`` says.

    Returns:
        ``(loss, projection)`` with projection (n,).
    """
    if scores.ndim != 1 or labels.shape != scores.shape:
        raise ValueError("scores and labels must both have shape (n,)")
    y = labels.to(scores.dtype)
    if faithful:
        k = torch.floor(scores.shape[0] * labels.to(torch.float64).mean()).to(scores.dtype)
        eps = 1e-3
    else:
        k = y.sum()
        eps = regularization_strength
    projection = soft_binary_argmax(scores, k, eps)
    return F.mse_loss(projection, y), projection


class HypersimplexMulticlassLoss(GuardedLoss):
    r"""Multi-class zero-one surrogate through Soft-Binary-Argmax across the batch.

    For every class c the column $h_{:,c}$ of the batch's logits is projected onto
    $\Delta_{B,k}$ with $k=\lfloor pB\rceil$:

    $$\mu_{:,c}=\arg\min_{\mu\in\Delta_{B,k}}\tfrac12\lVert\mu-h_{:,c}/\varepsilon\rVert^2,
    \qquad L=\frac1{BC}\sum_{i,c}(\mu_{ic}-1[y_i=c])^2$$

    Each class column is pushed to sum to k over the batch, so the loss depends on the batch
    size and couples samples. ``faithful=True`` uses ``k = int(p·B)`` (truncation).

    Paper: Gomez, Wang & Tang, "Differentiable Zero-One Loss via Hypersimplex Projections"
    (arXiv 2602.23336).

    Shapes: logits (B, C), target (B,) int64 → 0-d. Batch-coupled.

    Args:
        regularization_strength: ε (1.5).
        fraction: p, the fraction of ones per column (0.5).
        faithful: truncate k as the reference code.
        accumulation_steps: see :class:`~stepguard.losses.base.GuardedLoss`.
    """

    batch_coupled = True
    coupling_note = "each class column is projected across the whole batch"
    has_radius_logits = False
    no_radius_reason = "it uses a Euclidean projection onto the hypersimplex, not a softmax"

    def __init__(
        self,
        regularization_strength: float = 1.5,
        fraction: float = 0.5,
        *,
        faithful: bool = False,
        accumulation_steps: int = 1,
    ) -> None:
        super().__init__(accumulation_steps=accumulation_steps)
        if regularization_strength <= 0 or not 0.0 <= fraction <= 1.0:
            raise ValueError("need regularization_strength > 0 and fraction in [0, 1]")
        self.regularization_strength = float(regularization_strength)
        self.fraction = float(fraction)
        self.faithful = faithful

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        loss, projection = hypersimplex_multiclass_loss(
            logits, target, self.regularization_strength, self.fraction, faithful=self.faithful
        )
        free = ((projection > 0) & (projection < 1)).to(projection.dtype)
        self._record(mse=loss, free_fraction=free)
        return loss


class HypersimplexBinaryLoss(GuardedLoss):
    r"""Binary zero-one surrogate: the batch's scores projected onto $\Delta_{n,k}$.

    $$\mu=\arg\min_{\mu\in\Delta_{n,k}}\tfrac12\lVert\mu-f/\varepsilon\rVert^2,\quad
    k=\textstyle\sum_i y_i,\qquad L=\frac1n\sum_i(\mu_i-y_i)^2$$

    ``faithful=True`` reproduces the reference objective: ``k = int(n·mean(y))`` and
    ε = 1e−3 regardless of ``regularization_strength``.

    Paper: Gomez, Wang & Tang, "Differentiable Zero-One Loss via Hypersimplex Projections"
    (arXiv 2602.23336).

    Shapes: scores (n,), labels (n,) in {0, 1} → 0-d. Batch-coupled.

    Args:
        regularization_strength: ε (1e−3).
        faithful: reference-code k and ε.
        accumulation_steps: see :class:`~stepguard.losses.base.GuardedLoss`.
    """

    batch_coupled = True
    coupling_note = "the batch's scores are projected jointly with k from its labels"
    has_radius_logits = False
    no_radius_reason = "it uses a Euclidean projection onto the hypersimplex, not a sigmoid"

    def __init__(
        self,
        regularization_strength: float = 1e-3,
        *,
        faithful: bool = False,
        accumulation_steps: int = 1,
    ) -> None:
        super().__init__(accumulation_steps=accumulation_steps)
        if regularization_strength <= 0 or not math.isfinite(regularization_strength):
            raise ValueError("regularization_strength must be positive and finite")
        self.regularization_strength = float(regularization_strength)
        self.faithful = faithful

    def forward(self, scores: Tensor, labels: Tensor) -> Tensor:
        loss, projection = hypersimplex_binary_loss(
            scores.reshape(-1),
            labels.reshape(-1),
            self.regularization_strength,
            faithful=self.faithful,
        )
        self._record(mse=loss, projection_mean=projection)
        return loss
