"""Label-distributionally robust losses LDR-KL and adaptive ALDR-KL (Zhu, Ying & Yang).

With margin-shifted score gaps ``d_k = f_k − f_y + c·1[k ≠ y]`` the LDR-KL loss is the
KL-regularised worst case over label distributions q:

    ψ_λ(f, y) = max_{q ∈ Δ_C} Σ_k q_k d_k − λ·KL(q ‖ uniform) = λ·log((1/C)·Σ_k e^{d_k/λ}).

λ → 0 gives a max-margin (Crammer–Singer-like) loss, λ → ∞ the mean of the d_k.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from stepguard.losses.base import GuardedLoss, check_logits_target, check_reduction, reduce

__all__ = ["ALDRKLLoss", "LDRKLLoss", "ldr_gaps", "ldr_kl_loss", "ldr_normalize"]


def ldr_normalize(logits: Tensor, *, softplus: bool = True) -> Tensor:
    """The reference code's score normalisation ``f/(‖f‖₁/C)``, after a softplus if asked."""
    f = F.softplus(logits) if softplus else logits
    return f / (f.abs().sum(dim=1, keepdim=True) / logits.shape[1])


def ldr_gaps(scores: Tensor, target: Tensor, margin: float) -> Tensor:
    """``d_k = f_k − f_y + c·1[k ≠ y]`` (B, C)."""
    others = 1.0 - F.one_hot(target, scores.shape[1]).to(scores.dtype)
    return scores - scores.gather(1, target[:, None]) + margin * others


def _log_mean_exp_scaled(gaps: Tensor, lam: Tensor | float) -> Tensor:
    if isinstance(lam, Tensor):
        lam = lam[:, None]
    values = torch.logsumexp(gaps / lam, dim=1) - math.log(gaps.shape[1])
    return values * (lam.squeeze(1) if isinstance(lam, Tensor) else lam)


def ldr_kl_loss(
    logits: Tensor,
    target: Tensor,
    margin: float = 0.1,
    lam: float = 10.0,
    reduction: str = "mean",
    *,
    faithful: bool = False,
) -> Tensor:
    """LDR-KL ``λ·(logsumexp(d/λ) − log C)``.

    ``faithful=True`` first normalises the logits as the reference code does
    (``f = softplus(z)``, ``f ← f/mean_k f``).
    """
    check_logits_target(logits, target)
    if lam <= 0:
        raise ValueError(f"lam must be positive, got {lam}")
    scores = ldr_normalize(logits, softplus=True) if faithful else logits
    return reduce(_log_mean_exp_scaled(ldr_gaps(scores, target, margin), lam), reduction)


class LDRKLLoss(GuardedLoss):
    r"""LDR-KL: label-distributionally robust loss with a KL penalty to the uniform label.

    $$\psi_\lambda(f,y)=\lambda\log\Big(\frac1C\sum_k\exp\frac{f_k-f_y+c\,1[k\ne y]}
    {\lambda}\Big)$$

    ``faithful=True`` applies the reference code's normalisation first:
    $f=\mathrm{softplus}(z)$, $f\leftarrow f/\mathrm{mean}_k f$. Defaults follow the paper's
    experiments (c = 0.1, λ = 10; the reference class defaults are c = 2, λ = 1).

    Paper: Zhu, Ying & Yang, "Label Distributionally Robust Losses for Multi-class
    Classification: Consistency, Robustness and Adaptivity" (ICML 2023, arXiv 2112.14869).

    Shapes: logits (B, C), target (B,) int64 → 0-d, or (B,) with ``reduction="none"``.

    Args:
        margin: c (0.1).
        lam: λ > 0 (10).
        faithful: reference-code normalisation of the logits.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        accumulation_steps: see :class:`~stepguard.losses.base.GuardedLoss`.
    """

    def __init__(
        self,
        margin: float = 0.1,
        lam: float = 10.0,
        reduction: str = "mean",
        *,
        faithful: bool = False,
        accumulation_steps: int = 1,
    ) -> None:
        super().__init__(accumulation_steps=accumulation_steps)
        if lam <= 0:
            raise ValueError(f"lam must be positive, got {lam}")
        self.margin = float(margin)
        self.lam = float(lam)
        self.faithful = faithful
        self.reduction = check_reduction(reduction)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        loss = ldr_kl_loss(
            logits, target, self.margin, self.lam, self.reduction, faithful=self.faithful
        )
        self._record(ldr_kl=loss)
        return loss

    def radius_logits(self, output: Tensor, target: Tensor | None = None) -> Tensor:
        """``d/λ`` (B, C): the logits of the softmax giving the worst-case label weights."""
        if target is None:
            raise ValueError("LDRKLLoss.radius_logits needs the target (the margin shifts d)")
        scores = ldr_normalize(output) if self.faithful else output
        return ldr_gaps(scores, target, self.margin) / self.lam


class ALDRKLLoss(GuardedLoss):
    r"""ALDR-KL: LDR-KL with an adaptive per-sample λ_i kept across calls.

    Each call, for the samples of the batch (ids ``index``):

    1. $\hat p_i=\mathrm{normalize}(\mathrm{softmax}(d_i/\lambda_i^{old})+10^{-5})$;
    2. $\lambda_i\leftarrow\lambda_0-\lambda_0\,\mathrm{KL}(\hat p_i\Vert u)/(\alpha\log C)$
       (stored detached in the buffer ``lam``);
    3. $\ell_i=\lambda_i\log\frac1C\sum_k e^{d_{ik}/\lambda_i}
       -\frac{\alpha\log C}{2\lambda_0}(\lambda_i-\lambda_0)^2$.

    ``faithful=True`` reproduces the reference code: the logits are first normalised by
    $f\leftarrow f/(\lVert f\rVert_1/C)$ (after a softplus when ``softplus=True``, the
    CIFAR-100 setting) and $\hat p_i$ uses $\mathrm{softmax}(f_i/\lambda_i)$ instead of the
    margin-shifted gaps. λ is updated only in training mode.

    Paper: Zhu, Ying & Yang, "Label Distributionally Robust Losses for Multi-class
    Classification: Consistency, Robustness and Adaptivity" (ICML 2023, arXiv 2112.14869).

    Shapes: logits (B, C), target (B,) int64, index (B,) int64 sample ids in [0, N) → 0-d,
    or (B,) with ``reduction="none"``. The buffer ``lam`` (N,) is in ``state_dict()``.

    Args:
        num_samples: N, the size of the training set.
        lam0: λ₀ (10).
        alpha: α > 1 (2).
        margin: c (0.1).
        faithful: reference-code normalisation and weights.
        softplus: with ``faithful``, apply the softplus before normalising.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        accumulation_steps: see :class:`~stepguard.losses.base.GuardedLoss`.
    """

    def __init__(
        self,
        num_samples: int,
        lam0: float = 10.0,
        alpha: float = 2.0,
        margin: float = 0.1,
        reduction: str = "mean",
        *,
        faithful: bool = False,
        softplus: bool = False,
        accumulation_steps: int = 1,
    ) -> None:
        super().__init__(accumulation_steps=accumulation_steps)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if lam0 <= 0 or alpha <= 1:
            raise ValueError(f"need lam0 > 0 and alpha > 1 (keeps λ positive), got {lam0}, {alpha}")
        self.num_samples = num_samples
        self.lam0 = float(lam0)
        self.alpha = float(alpha)
        self.margin = float(margin)
        self.faithful = faithful
        self.softplus = softplus
        self.reduction = check_reduction(reduction)
        self.register_buffer("lam", torch.full((num_samples,), float(lam0)))

    def _scores(self, logits: Tensor) -> Tensor:
        return ldr_normalize(logits, softplus=self.softplus) if self.faithful else logits

    def forward(self, logits: Tensor, target: Tensor, index: Tensor) -> Tensor:
        check_logits_target(logits, target)
        if (
            not isinstance(index, Tensor)
            or index.dtype != torch.long
            or index.shape != target.shape
        ):
            raise ValueError(f"index must be int64 sample ids of shape {tuple(target.shape)}")
        num_classes = logits.shape[1]
        log_c = math.log(num_classes)
        scores = self._scores(logits)
        gaps = ldr_gaps(scores, target, self.margin)
        with torch.no_grad():
            lam_old = self.lam[index].to(logits.dtype)
            source = scores if self.faithful else gaps
            p_hat = F.softmax(source / lam_old[:, None], dim=1) + 1e-5
            p_hat = p_hat / p_hat.sum(dim=1, keepdim=True)
            kl = (p_hat * torch.log(p_hat * num_classes)).sum(dim=1)
            lam_new = self.lam0 - self.lam0 * kl / (self.alpha * log_c)
            if self.training:
                self.lam[index] = lam_new.to(self.lam.dtype)
        ldr = _log_mean_exp_scaled(gaps, lam_new)
        penalty = self.alpha * log_c / (2 * self.lam0) * (lam_new - self.lam0) ** 2
        values = ldr - penalty
        self._record(ldr_kl=ldr, penalty=penalty, lam_mean=lam_new)
        return reduce(values, self.reduction)

    def radius_logits(
        self, output: Tensor, target: Tensor | None = None, index: Tensor | None = None
    ) -> Tensor:
        """``d/λ_i`` (B, C) with the stored λ of ``index`` (λ₀ when no ids are given)."""
        if target is None:
            raise ValueError("ALDRKLLoss.radius_logits needs the target (the margin shifts d)")
        gaps = ldr_gaps(self._scores(output), target, self.margin)
        if index is None:
            return gaps / self.lam0
        return gaps / self.lam[index].to(gaps.dtype)[:, None]
