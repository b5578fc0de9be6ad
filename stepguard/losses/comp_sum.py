"""Comp-sum losses Φ^τ (Mao, Mohri & Zhong 2023) and the robust CE family: GCE, MAE, RCE, SCE, NCE.

All consume logits (B, C) and int64 targets (B,). With ``p = softmax(h)`` and
``u = Σ_{y'≠y} exp(h_{y'} − h_y) = 1/p_y − 1`` the comp-sum loss is

    ℓ_τ = Φ^τ(u) = ((1+u)^{1−τ} − 1)/(1 − τ) = (1 − p_y^{τ−1})/(τ − 1),  τ ≠ 1,
    ℓ_1 = log(1 + u) = −log p_y.

τ = 0 is the sum-exponential loss, τ = 1 cross-entropy, τ ∈ (1, 2) GCE with q = τ − 1 and
τ = 2 gives 1 − p_y (half the L1 distance ‖e_y − p‖₁).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from stepguard.losses.base import GuardedLoss, check_logits_target, check_reduction, reduce

__all__ = [
    "CLAMP_PROB",
    "SCE_LOG_ZERO",
    "AdvCompSumLoss",
    "CompSumLoss",
    "GCELoss",
    "MAELoss",
    "NCELoss",
    "RCELoss",
    "SCELoss",
    "adv_comp_sum_loss",
    "comp_sum_loss",
    "gce_loss",
    "mae_loss",
    "nce_loss",
    "rce_loss",
    "sce_loss",
]

SCE_LOG_ZERO = math.log(1e-4)
CLAMP_PROB = 1e-7
_TAU_ONE = 1e-6


def _target_log_prob(logits: Tensor, target: Tensor) -> Tensor:
    return F.log_softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)


def comp_sum_loss(
    logits: Tensor, target: Tensor, tau: float = 1.0, reduction: str = "mean"
) -> Tensor:
    """Comp-sum loss ``Φ^τ(Σ_{y'≠y} e^{h_{y'}−h_y})`` in its stable form.

    Computed as ``−expm1((τ−1)·log p_y)/(τ−1)`` from ``log_softmax``, and as ``−log p_y`` when
    ``|τ − 1| < 1e−6``.

    Args:
        logits: (B, C).
        target: (B,) int64.
        tau: τ ≥ 0.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
    """
    check_logits_target(logits, target)
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    log_py = _target_log_prob(logits, target)
    if abs(tau - 1.0) < _TAU_ONE:
        return reduce(-log_py, reduction)
    return reduce(-torch.expm1((tau - 1.0) * log_py) / (tau - 1.0), reduction)


def gce_loss(
    logits: Tensor,
    target: Tensor,
    q: float = 0.7,
    reduction: str = "mean",
    *,
    faithful: bool = False,
) -> Tensor:
    """Generalized cross-entropy ``(1 − p_y^q)/q`` (= comp-sum with τ = 1 + q).

    ``faithful=True`` clamps the probabilities to [1e−7, 1] first, as the reference
    implementation does.
    """
    check_logits_target(logits, target)
    if not 0.0 < q <= 1.0:
        raise ValueError(f"q must lie in (0, 1], got {q}")
    if faithful:
        p_y = F.softmax(logits, dim=1).clamp(CLAMP_PROB, 1.0).gather(1, target[:, None]).squeeze(1)
        values = (1.0 - p_y.pow(q)) / q
    else:
        values = -torch.expm1(q * _target_log_prob(logits, target)) / q
    return reduce(values, reduction)


def mae_loss(
    logits: Tensor, target: Tensor, reduction: str = "mean", *, faithful: bool = False
) -> Tensor:
    """Mean absolute error ``‖e_y − softmax(h)‖₁ = 2(1 − p_y)``.

    ``faithful=True`` returns the reduced form ``1 − p_y`` of the reference implementation
    (equal to comp-sum at τ = 2).
    """
    check_logits_target(logits, target)
    one_minus = -torch.expm1(_target_log_prob(logits, target))
    values = one_minus if faithful else 2.0 * one_minus
    return reduce(values, reduction)


def rce_loss(
    logits: Tensor,
    target: Tensor,
    log_zero: float = SCE_LOG_ZERO,
    reduction: str = "mean",
    *,
    faithful: bool = False,
) -> Tensor:
    """Reverse cross-entropy ``−Σ_k p_k log q_k`` with ``log 0`` replaced by ``A = log_zero``.

    For a one-hot label this is ``−A(1 − p_y)``. ``faithful=True`` clamps ``p`` to
    [1e−7, 1] and the one-hot label to [1e−4, 1] before the sum, as the reference code does
    (then ``A = ln 1e−4`` regardless of ``log_zero``).
    """
    check_logits_target(logits, target)
    if faithful:
        prob = F.softmax(logits, dim=1).clamp(CLAMP_PROB, 1.0)
        label = F.one_hot(target, logits.shape[1]).to(prob.dtype).clamp(1e-4, 1.0)
        values = -(prob * torch.log(label)).sum(dim=1)
    else:
        values = -log_zero * -torch.expm1(_target_log_prob(logits, target))
    return reduce(values, reduction)


def sce_loss(
    logits: Tensor,
    target: Tensor,
    alpha: float = 0.1,
    beta: float = 1.0,
    log_zero: float = SCE_LOG_ZERO,
    reduction: str = "mean",
    *,
    faithful: bool = False,
) -> Tensor:
    """Symmetric cross-entropy ``α·CE + β·RCE``."""
    check_logits_target(logits, target)
    ce = -_target_log_prob(logits, target)
    rce = rce_loss(logits, target, log_zero, "none", faithful=faithful)
    return reduce(alpha * ce + beta * rce, reduction)


def nce_loss(logits: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Normalized cross-entropy ``log p_y / Σ_k log p_k`` (Ma et al. 2020)."""
    check_logits_target(logits, target)
    log_p = F.log_softmax(logits, dim=1)
    values = log_p.gather(1, target[:, None]).squeeze(1) / log_p.sum(dim=1)
    return reduce(values, reduction)


def adv_comp_sum_loss(
    logits: Tensor,
    adv_logits: Tensor,
    target: Tensor,
    tau: float = 1.0,
    nu: float = 1.0,
    p: float = 2.0,
    reduction: str = "mean",
) -> tuple[Tensor, Tensor, Tensor]:
    """Smooth adversarial comp-sum loss ``ℓ_τ(h(x), y) + ν‖h(x') − h(x)‖_p``.

    ``adv_logits`` are the logits at the perturbation x' that the caller's attack found
    (the sup over ‖x' − x‖ ≤ γ is the attack's job).

    Returns:
        ``(loss, base, regularizer)``, each reduced.
    """
    check_logits_target(logits, target)
    if adv_logits.shape != logits.shape:
        raise ValueError(
            f"adv_logits must have the shape of logits {tuple(logits.shape)}, "
            f"got {tuple(adv_logits.shape)}"
        )
    if nu < 0:
        raise ValueError(f"nu must be >= 0, got {nu}")
    base = comp_sum_loss(logits, target, tau, "none")
    reg = torch.linalg.vector_norm(adv_logits - logits, ord=p, dim=1)
    return reduce(base + nu * reg, reduction), reduce(base, reduction), reduce(reg, reduction)


class _LogitLoss(GuardedLoss):
    def __init__(self, reduction: str = "mean", accumulation_steps: int = 1) -> None:
        super().__init__(accumulation_steps=accumulation_steps)
        self.reduction = check_reduction(reduction)


class CompSumLoss(_LogitLoss):
    r"""Comp-sum loss $\Phi^\tau$.

    $$\ell_\tau(h,x,y)=\Phi^\tau\Big(\sum_{y'\ne y}e^{h_{y'}-h_y}\Big),\quad
    \Phi^\tau(u)=\begin{cases}\log(1+u)&\tau=1\\
    \frac{(1+u)^{1-\tau}-1}{1-\tau}&\tau\ne1\end{cases}
    \;=\;\frac{1-p_y^{\tau-1}}{\tau-1}$$

    τ = 0: sum-exponential; τ = 1: cross-entropy; τ ∈ (1, 2): GCE with q = τ − 1; τ = 2:
    ``1 − p_y``.

    Paper: Mao, Mohri & Zhong, "Cross-Entropy Loss Functions: Theoretical Analysis and
    Applications" (arXiv 2304.07288).

    Shapes: logits (B, C), target (B,) int64 → 0-d, or (B,) with ``reduction="none"``.

    Args:
        tau: τ ≥ 0 (1.0).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        accumulation_steps: see :class:`~stepguard.losses.base.GuardedLoss`.
    """

    def __init__(
        self, tau: float = 1.0, reduction: str = "mean", *, accumulation_steps: int = 1
    ) -> None:
        super().__init__(reduction, accumulation_steps)
        if tau < 0:
            raise ValueError(f"tau must be >= 0, got {tau}")
        self.tau = float(tau)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        loss = comp_sum_loss(logits, target, self.tau, self.reduction)
        self._record(comp_sum=loss)
        return loss


class GCELoss(_LogitLoss):
    r"""Generalized cross-entropy $L_q = (1 - p_y^q)/q$, comp-sum with τ = 1 + q.

    Paper: Zhang & Sabuncu, "Generalized Cross Entropy Loss for Training Deep Neural
    Networks with Noisy Labels" (arXiv 1805.07836).

    Shapes: logits (B, C), target (B,) int64 → 0-d, or (B,) with ``reduction="none"``.

    Args:
        q: exponent in (0, 1] (0.7).
        faithful: clamp probabilities to [1e−7, 1] as the reference (APL) code does.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        accumulation_steps: see :class:`~stepguard.losses.base.GuardedLoss`.
    """

    def __init__(
        self,
        q: float = 0.7,
        reduction: str = "mean",
        *,
        faithful: bool = False,
        accumulation_steps: int = 1,
    ) -> None:
        super().__init__(reduction, accumulation_steps)
        if not 0.0 < q <= 1.0:
            raise ValueError(f"q must lie in (0, 1], got {q}")
        self.q = float(q)
        self.faithful = faithful

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        loss = gce_loss(logits, target, self.q, self.reduction, faithful=self.faithful)
        self._record(gce=loss)
        return loss


class MAELoss(_LogitLoss):
    r"""Mean absolute error $\lVert e_y - \mathrm{softmax}(h)\rVert_1 = 2(1 - p_y)$.

    ``faithful=True`` returns the reduced form $1 - p_y$ of the reference implementation,
    which equals comp-sum at τ = 2.

    Paper: Ghosh, Kumar & Sastry, "Robust Loss Functions under Label Noise for Deep Neural
    Networks" (arXiv 1712.09482); comp-sum view in arXiv 2304.07288.

    Shapes: logits (B, C), target (B,) int64 → 0-d, or (B,) with ``reduction="none"``.

    Args:
        faithful: return ``1 − p_y`` (reference code) instead of ``2(1 − p_y)``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        accumulation_steps: see :class:`~stepguard.losses.base.GuardedLoss`.
    """

    def __init__(
        self, reduction: str = "mean", *, faithful: bool = False, accumulation_steps: int = 1
    ) -> None:
        super().__init__(reduction, accumulation_steps)
        self.faithful = faithful

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        loss = mae_loss(logits, target, self.reduction, faithful=self.faithful)
        self._record(mae=loss)
        return loss


class RCELoss(_LogitLoss):
    r"""Reverse cross-entropy $-\sum_k p_k\log q_k$ with $\log 0 := A$, i.e. $-A(1-p_y)$.

    Paper: Wang, Ma, Chen, Luo, Yi & Bailey, "Symmetric Cross Entropy for Robust Learning
    with Noisy Labels" (arXiv 1908.06112).

    Shapes: logits (B, C), target (B,) int64 → 0-d, or (B,) with ``reduction="none"``.

    Args:
        log_zero: the constant A replacing log 0 (``ln 1e−4 ≈ −9.21``, as in the code).
        faithful: clamp p to [1e−7, 1] and the label to [1e−4, 1] as the reference code.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        accumulation_steps: see :class:`~stepguard.losses.base.GuardedLoss`.
    """

    def __init__(
        self,
        log_zero: float = SCE_LOG_ZERO,
        reduction: str = "mean",
        *,
        faithful: bool = False,
        accumulation_steps: int = 1,
    ) -> None:
        super().__init__(reduction, accumulation_steps)
        if log_zero >= 0:
            raise ValueError(f"log_zero (A) must be negative, got {log_zero}")
        self.log_zero = float(log_zero)
        self.faithful = faithful

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        loss = rce_loss(logits, target, self.log_zero, self.reduction, faithful=self.faithful)
        self._record(rce=loss)
        return loss


class SCELoss(_LogitLoss):
    r"""Symmetric cross-entropy $\alpha\,\mathrm{CE} + \beta\,\mathrm{RCE}$, RCE $=-A(1-p_y)$.

    Defaults are the CIFAR-10 setting (α = 0.1, β = 1); CIFAR-100 uses α = 6, β = 0.1.

    Paper: Wang et al., "Symmetric Cross Entropy for Robust Learning with Noisy Labels"
    (arXiv 1908.06112).

    Shapes: logits (B, C), target (B,) int64 → 0-d, or (B,) with ``reduction="none"``.

    Args:
        alpha: CE weight α (0.1).
        beta: RCE weight β (1.0).
        log_zero: the constant A replacing log 0 (``ln 1e−4``).
        faithful: the reference code's clamps in the RCE term.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        accumulation_steps: see :class:`~stepguard.losses.base.GuardedLoss`.
    """

    def __init__(
        self,
        alpha: float = 0.1,
        beta: float = 1.0,
        log_zero: float = SCE_LOG_ZERO,
        reduction: str = "mean",
        *,
        faithful: bool = False,
        accumulation_steps: int = 1,
    ) -> None:
        super().__init__(reduction, accumulation_steps)
        if alpha < 0 or beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got {alpha}, {beta}")
        if log_zero >= 0:
            raise ValueError(f"log_zero (A) must be negative, got {log_zero}")
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.log_zero = float(log_zero)
        self.faithful = faithful

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        check_logits_target(logits, target)
        ce = -_target_log_prob(logits, target)
        rce = rce_loss(logits, target, self.log_zero, "none", faithful=self.faithful)
        loss = reduce(self.alpha * ce + self.beta * rce, self.reduction)
        self._record(ce=ce, rce=rce)
        return loss


class NCELoss(_LogitLoss):
    r"""Normalized cross-entropy $\log p_y / \sum_k \log p_k$.

    Paper: Ma, Huang, Wang, Romano, Erfani & Bailey, "Normalized Loss Functions for Deep
    Learning with Noisy Labels" (arXiv 2006.13554).

    Shapes: logits (B, C), target (B,) int64 → 0-d, or (B,) with ``reduction="none"``.

    Args:
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        accumulation_steps: see :class:`~stepguard.losses.base.GuardedLoss`.
    """

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        loss = nce_loss(logits, target, self.reduction)
        self._record(nce=loss)
        return loss


class AdvCompSumLoss(_LogitLoss):
    r"""Smooth adversarial comp-sum loss: comp-sum plus a smooth logit-difference term.

    $$\tilde\ell_\tau(h,x,y)=\ell_\tau(h,x,y)+\nu\sup_{\lVert x'-x\rVert\le\gamma}
    \lVert h(x')-h(x)\rVert_p$$

    The loss receives the clean logits h(x) and the logits h(x') at the perturbation found by
    the caller's attack (e.g. PGD on the second term). The exact smooth term of the paper
    (Sec. 6) could not be checked against the paper body; this is the logit-difference norm.

    Paper: Mao, Mohri & Zhong, "Cross-Entropy Loss Functions: Theoretical Analysis and
    Applications" (arXiv 2304.07288).

    Shapes: logits (B, C), adv_logits (B, C), target (B,) int64 → 0-d, or (B,) with
    ``reduction="none"``.

    Args:
        nu: weight ν ≥ 0 of the smooth term.
        tau: comp-sum τ ≥ 0 (1.0).
        p: norm order of the logit difference (2).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        accumulation_steps: see :class:`~stepguard.losses.base.GuardedLoss`.
    """

    def __init__(
        self,
        nu: float,
        tau: float = 1.0,
        p: float = 2.0,
        reduction: str = "mean",
        *,
        accumulation_steps: int = 1,
    ) -> None:
        super().__init__(reduction, accumulation_steps)
        if nu < 0 or tau < 0:
            raise ValueError(f"nu and tau must be >= 0, got {nu}, {tau}")
        self.nu = float(nu)
        self.tau = float(tau)
        self.p = float(p)

    def forward(self, logits: Tensor, adv_logits: Tensor, target: Tensor) -> Tensor:
        loss, base, reg = adv_comp_sum_loss(
            logits, adv_logits, target, self.tau, self.nu, self.p, self.reduction
        )
        self._record(base=base, regularizer=reg)
        return loss
