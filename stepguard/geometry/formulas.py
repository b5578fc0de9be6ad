"""Closed-form radii of the softmax cross-entropy along a direction ("Ghosts of Softmax", arXiv 2603.13552).

All functions take *rows*: logits ``z`` and logit velocities ``a = ∂z/∂t`` of shape (M, K),
one row per sample (or labelled sequence position) and one column per class. A single
column (K = 1) is a one-logit sigmoid/BCE head and is treated as the pair [s, 0].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

PI = math.pi


def logit_spread(velocity: Tensor) -> Tensor:
    """Per-row spread Δ_n = max_k a_{n,k} − min_k a_{n,k}.

    For a one-logit head (K = 1) the row is [a, 0], so Δ_n = |a_n|: taking max − min of
    the single column would give 0 and an infinite radius.

    Args:
        velocity: (M, K) logit velocities.

    Returns:
        (M,) spreads.
    """
    if velocity.shape[-1] == 1:
        return velocity[..., 0].abs()
    return velocity.amax(dim=-1) - velocity.amin(dim=-1)


def rho_from_spread(delta: Tensor, temperature: float = 1.0) -> Tensor:
    """The multiclass radius ρ_a = π·T/Δ_a (Thm 4.6), +inf where Δ_a = 0.

    Every complex zero t of the partition function F(t) = Σ_k e^{z_k + a_k t} has
    |Im t| ≥ π/Δ_a, so the Taylor series of the loss along the direction converges for
    |t| < ρ_a. Dividing logits by a temperature T divides the velocities by T.
    """
    return torch.where(delta > 0, (PI * temperature) / delta, torch.full_like(delta, math.inf))


def binary_radius(logits: Tensor, velocity: Tensor) -> Tensor:
    """Exact per-row radius for two-class heads: ρ*_n = √(s_n² + π²)/|a_n| (Thm 4.3).

    With margin s = z₁ − z₀ and slope a = a₁ − a₀ (or the single logit s and its slope a
    for a one-logit head), the zeros of 1 + e^{s + a t} nearest the origin sit at
    t = (−s ± iπ)/a, whose modulus is √(s² + π²)/|a| ≥ π/|a|. Rows with a = 0 get +inf.

    Args:
        logits: (M, 1) or (M, 2) logits.
        velocity: same shape, their velocities.

    Returns:
        (M,) exact radii.
    """
    k = logits.shape[-1]
    if k == 1:
        s, a = logits[..., 0], velocity[..., 0]
    elif k == 2:
        s, a = logits[..., 1] - logits[..., 0], velocity[..., 1] - velocity[..., 0]
    else:
        raise ValueError(f"binary_radius needs one or two logits per row, got {k}")
    return _ghost_modulus(s, a)


def top2_radius(logits: Tensor, velocity: Tensor, targets: Tensor | None = None) -> Tensor:
    """Per-row top-2 radius √(δ_n² + π²)/|s_n|, the nearest ghost of each sample (Eq. 13).

    With y the target (the predicted class when ``targets`` is None) and c the strongest
    other class, δ_n = z_y − z_c and s_n = a_c − a_y; the pair (y, c) alone has its complex
    zeros at (δ_n ± iπ)/s_n. Since |s_n| ≤ Δ_n, each value is ≥ π/Δ_n: it tells which
    samples bind (near a decision flip and sensitive to the step), not a tighter bound.

    Args:
        logits: (M, K) logits, K ≥ 1 (K = 1 is the pair [s, 0]).
        velocity: (M, K) velocities.
        targets: optional (M,) class indices.

    Returns:
        (M,) radii (+inf where s_n = 0).
    """
    if logits.shape[-1] <= 2:
        return binary_radius(logits, velocity)
    y = logits.argmax(dim=-1) if targets is None else targets.to(logits.device, torch.long)
    rows = torch.arange(logits.shape[0], device=logits.device)
    others = logits.masked_fill(torch.nn.functional.one_hot(y, logits.shape[-1]).bool(), -math.inf)
    c = others.argmax(dim=-1)
    delta = logits[rows, y] - logits[rows, c]
    slope = velocity[rows, c] - velocity[rows, y]
    return _ghost_modulus(delta, slope)


def _ghost_modulus(margin: Tensor, slope: Tensor) -> Tensor:
    modulus = torch.sqrt(margin * margin + PI * PI)
    return torch.where(slope != 0, modulus / slope.abs(), torch.full_like(modulus, math.inf))
