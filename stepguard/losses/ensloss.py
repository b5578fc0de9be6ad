"""EnsLoss: a random calibrated convex loss derivative per batch (Ben Dai).

Binary classification with a score f (B,) or (B, 1) and labels in {0, 1}. Each batch draws
a fresh set of loss derivatives, makes them non-decreasing in the margin (convexity),
bounded in [−1, 0) and strictly negative at 0 (calibration), and returns a surrogate whose
gradient is exactly that derivative. Its value is not a loss curve.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from stepguard.losses.base import GuardedLoss

__all__ = ["EnsLoss", "ensloss_derivatives", "ensloss_surrogate", "inverse_box_cox"]

_SHIFT = 1e-6


def inverse_box_cox(eps: Tensor, lam: float) -> Tensor:
    """``exp(ε)`` for λ = 0, else ``max(1 + λε, 0)^{1/λ}``."""
    if lam == 0.0:
        return torch.exp(eps)
    return torch.clamp(1.0 + lam * eps, min=0.0).pow(1.0 / lam)


def _margins(output: Tensor, target01: Tensor) -> Tensor:
    if not isinstance(output, Tensor) or not output.is_floating_point():
        raise TypeError("output must be a floating-point tensor of shape (B,) or (B, 1)")
    flat = output.reshape(-1)
    if output.ndim > 2 or (output.ndim == 2 and output.shape[1] != 1):
        raise ValueError(f"output must have shape (B,) or (B, 1), got {tuple(output.shape)}")
    labels = target01.reshape(-1).to(flat.dtype)
    if labels.shape != flat.shape:
        raise ValueError(f"target must have {flat.shape[0]} labels, got {tuple(target01.shape)}")
    return (2.0 * labels - 1.0) * flat


def ensloss_derivatives(margins: Tensor, normal_draws: Tensor, lam: float = 0.0) -> Tensor:
    """The per-sample loss derivatives g_i = ϕ'(z_i) that one EnsLoss step uses.

    1. ``g̃ = −BC⁻¹_λ(ε)`` sorted ascending and clipped below at −1;
    2. the k-th smallest margin gets the k-th smallest g̃ (ϕ' non-decreasing: convex ϕ);
    3. ``g ← g/z`` where ``z > 1`` (superlinear tail decay);
    4. ``g ← g − 1e−6`` (ϕ'(0) < 0: calibrated).

    Args:
        margins: (B,) margins ``z = y·f`` with y ∈ {−1, +1}.
        normal_draws: (B,) standard normal draws ε.
        lam: Box-Cox λ.

    Returns:
        (B,) derivatives in [−1 − 1e−6, −1e−6], detached.
    """
    z = margins.detach()
    raw = torch.sort(-inverse_box_cox(normal_draws.to(z.dtype), lam), stable=True).values
    raw = raw.clamp(min=-1.0)
    order = torch.sort(z, stable=True).indices
    g = torch.empty_like(raw)
    g[order] = raw
    g = torch.where(z > 1.0, g / z, g)
    return g - _SHIFT


def ensloss_surrogate(
    output: Tensor,
    target01: Tensor,
    lam: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """``(1/B)·Σ g_i·z_i`` with freshly drawn derivatives; its gradient is ``g_i·y_i/B``.

    Returns:
        ``(surrogate, g)``.
    """
    z = _margins(output, target01)
    eps = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)
    g = ensloss_derivatives(z, eps, lam)
    return (g * z).mean(), g


class EnsLoss(GuardedLoss):
    r"""EnsLoss: ensemble of random calibrated convex losses, one per batch.

    Per batch: $\tilde g=-\mathrm{BC}^{-1}_\lambda(\varepsilon)$, $\varepsilon\sim\mathcal
    N(0,I_B)$, sorted and clipped to $[-1,0]$; matched to the sorted margins
    $z_i=y_if_i$; divided by $z_i$ where $z_i>1$; shifted by $-10^{-6}$. The returned
    surrogate is

    $$\mathcal L=\frac1B\sum_i \operatorname{sg}(g_i)\,z_i,\qquad
    \frac{\partial\mathcal L}{\partial f_i}=\frac{g_i y_i}{B}.$$

    Only its gradient is meaningful (``meaningful_value = False``); ``components`` carries
    the mean derivative and a fixed reference, the binary cross-entropy, to monitor.

    Paper: Ben Dai, "EnsLoss: Stochastic Calibrated Loss Ensembles for Preventing
    Overfitting in Classification" (ICML 2025, arXiv 2409.00908).

    Shapes: output (B,) or (B, 1) scores, target (B,) or (B, 1) in {0, 1} → 0-d.
    Batch-coupled (derivatives are matched by rank within the batch).

    Args:
        lam: Box-Cox λ (0: lognormal derivatives).
        generator: random generator for ε (global RNG when ``None``).
        accumulation_steps: see :class:`~stepguard.losses.base.GuardedLoss`.
    """

    meaningful_value = False
    batch_coupled = True
    coupling_note = "derivatives are assigned by the rank of each margin in the batch"
    has_radius_logits = False
    no_radius_reason = "it acts on margins y·f through sampled derivatives, not a sigmoid"

    def __init__(
        self,
        lam: float = 0.0,
        *,
        generator: torch.Generator | None = None,
        accumulation_steps: int = 1,
    ) -> None:
        super().__init__(accumulation_steps=accumulation_steps)
        self.lam = float(lam)
        self.generator = generator

    def redraw_lambda(self, generator: torch.Generator | None = None) -> float:
        """Draw a new λ ~ U(−1, 1), as the training script does every ``period`` epochs."""
        self.lam = float(torch.rand((), generator=generator)) * 2.0 - 1.0
        return self.lam

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        surrogate, g = ensloss_surrogate(output, target, self.lam, self.generator)
        with torch.no_grad():
            bce = F.binary_cross_entropy_with_logits(
                output.reshape(-1), target.reshape(-1).to(output.dtype)
            )
        self._record(surrogate=surrogate, mean_derivative=g, bce_reference=bce)
        return surrogate
