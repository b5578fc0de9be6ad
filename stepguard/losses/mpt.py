"""Margin-preserving training against negative flips (Ricci, Biondi, Pernici & Del Bimbo).

An old model was trained on the first ``num_old`` classes; the new model has
C = num_old + C_new outputs. Training adds a bias b to the new-class logits inside the
cross-entropy (not at test time), so the model must keep larger margins for old classes,
and distils from the old model and from an independently trained new reference model with
focal weights. The negative-flip rates that measure how many samples the old model got right
and the new one gets wrong are :func:`stepguard.analysis.metrics.negative_flip_rate` and
:func:`~stepguard.analysis.metrics.relative_negative_flip_rate`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from stepguard.losses.base import GuardedLoss, check_logits_target, reduce

Distillation = Literal["kl", "lm", "none"]

__all__ = [
    "MPTLoss",
    "focal_distillation_kl",
    "focal_distillation_lm",
    "margin_calibrated_logits",
]


def margin_calibrated_logits(logits: Tensor, num_old: int, b: float) -> Tensor:
    """``z + b·1[class ≥ num_old]``: the bias b on the new-class logits."""
    if not 0 < num_old < logits.shape[-1]:
        raise ValueError(f"num_old must lie in (0, {logits.shape[-1]}), got {num_old}")
    bias = torch.zeros(logits.shape[-1], dtype=logits.dtype, device=logits.device)
    bias[num_old:] = b
    return logits + bias


def _focal_weight(teacher: Tensor, target: Tensor, alpha: float, beta: float) -> Tensor:
    correct = (teacher.argmax(dim=1) == target).to(teacher.dtype)
    return alpha + beta * correct


def focal_distillation_kl(
    student: Tensor,
    teacher: Tensor,
    target: Tensor,
    tau: float = 5.0,
    alpha: float = 1.0,
    beta: float = 5.0,
    reduction: str = "mean",
) -> Tensor:
    """Focal distillation ``(α + β·1[argmax r = y])·KL(softmax(r/τ) ‖ softmax(z/τ))``.

    No τ² factor. The teacher is detached.

    Args:
        student: (B, K) student logits over the teacher's classes.
        teacher: (B, K) teacher logits.
        target: (B,) int64 labels (a teacher is "correct" when its argmax equals the label).
        tau: temperature τ.
        alpha: base weight α.
        beta: extra weight β where the teacher is correct.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must match"
        )
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    teacher = teacher.detach()
    kl = F.kl_div(
        F.log_softmax(student / tau, dim=1), F.softmax(teacher / tau, dim=1), reduction="none"
    ).sum(dim=1)
    return reduce(_focal_weight(teacher, target, alpha, beta) * kl, reduction)


def focal_distillation_lm(
    student: Tensor,
    teacher: Tensor,
    target: Tensor,
    alpha: float = 1.0,
    beta: float = 5.0,
    reduction: str = "mean",
) -> Tensor:
    """Logit-matching focal distillation ``(α + β·1[correct])·½·mean_k (z_k − r_k)²``."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must match"
        )
    teacher = teacher.detach()
    sq = 0.5 * ((student - teacher) ** 2).mean(dim=1)
    return reduce(_focal_weight(teacher, target, alpha, beta) * sq, reduction)


class MPTLoss(GuardedLoss):
    r"""Margin-preserving training: margin-calibrated CE plus double-source focal distillation.

    $$L = \mathrm{CE}(z + b\,1_{\text{new}},\,y) + \mathrm{FD}(z_{:C_{old}}, r^{old})
    + \mathrm{FD}(z, r^{new})$$

    $$\mathrm{FD}_{KL}(z, r) = \frac1B\sum_i(\alpha+\beta\,1[\arg\max r_i=y_i])\,
    \mathrm{KL}\big(\mathrm{softmax}(r_i/\tau)\,\Vert\,\mathrm{softmax}(z_i/\tau)\big)$$

    Distillation uses the unbiased logits. ``distillation="lm"`` uses
    $0.4\cdot$ FD-LM on each source, $\mathrm{FD}_{LM}=(\alpha+\beta 1[\cdot])\tfrac12
    \mathrm{mean}_k(z_k-r_k)^2$ (MPT_LM). Defaults follow the official training script
    (b = 4, τ = 5, α = 1, β = 5); the library function's τ = 100 default is not used.

    Paper: Ricci, Biondi, Pernici & Del Bimbo, "Margin Preserving Training against Negative
    Flips" (arXiv 2511.08322).

    Shapes: logits (B, C), target (B,) int64, old_logits (B, C_old), new_reference_logits
    (B, C) or ``None`` → 0-d.

    Args:
        num_old: C_old, the number of old classes (the first columns).
        b: bias on new-class logits in the CE (4.0).
        tau: distillation temperature (5.0).
        alpha: focal base weight α (1.0).
        beta: focal extra weight β (5.0).
        distillation: ``"kl"`` (MPT_KL), ``"lm"`` (MPT_LM) or ``"none"``.
        lm_weight: weight of each FD-LM term (0.4).
        accumulation_steps: see :class:`~stepguard.losses.base.GuardedLoss`.
    """

    def __init__(
        self,
        num_old: int,
        b: float = 4.0,
        tau: float = 5.0,
        alpha: float = 1.0,
        beta: float = 5.0,
        distillation: Distillation = "kl",
        lm_weight: float = 0.4,
        *,
        accumulation_steps: int = 1,
    ) -> None:
        super().__init__(accumulation_steps=accumulation_steps)
        if num_old < 1:
            raise ValueError(f"num_old must be >= 1, got {num_old}")
        if distillation not in ("kl", "lm", "none"):
            raise ValueError(f"distillation must be 'kl', 'lm' or 'none', got {distillation!r}")
        if tau <= 0:
            raise ValueError(f"tau must be positive, got {tau}")
        self.num_old = num_old
        self.b = float(b)
        self.tau = float(tau)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.distillation: Distillation = distillation
        self.lm_weight = float(lm_weight)

    def _fd(self, student: Tensor, teacher: Tensor, target: Tensor) -> Tensor:
        if self.distillation == "kl":
            return focal_distillation_kl(student, teacher, target, self.tau, self.alpha, self.beta)
        return self.lm_weight * focal_distillation_lm(
            student, teacher, target, self.alpha, self.beta
        )

    def forward(
        self,
        logits: Tensor,
        target: Tensor,
        old_logits: Tensor | None = None,
        new_reference_logits: Tensor | None = None,
    ) -> Tensor:
        check_logits_target(logits, target)
        ce = F.cross_entropy(margin_calibrated_logits(logits, self.num_old, self.b), target)
        zero = ce.new_zeros(())
        fd_old, fd_new = zero, zero
        if self.distillation != "none":
            if old_logits is not None:
                if old_logits.shape != (logits.shape[0], self.num_old):
                    raise ValueError(
                        f"old_logits must have shape ({logits.shape[0]}, {self.num_old}), "
                        f"got {tuple(old_logits.shape)}"
                    )
                fd_old = self._fd(logits[:, : self.num_old], old_logits, target)
            if new_reference_logits is not None:
                fd_new = self._fd(logits, new_reference_logits, target)
        loss = ce + fd_old + fd_new
        self._record(margin_calibrated_ce=ce, distill_old=fd_old, distill_new_reference=fd_new)
        return loss

    def radius_logits(self, output: Tensor, target: Tensor | None = None) -> Tensor:
        """The biased logits ``z + b·1[new]`` the training cross-entropy acts on."""
        return margin_calibrated_logits(output, self.num_old, self.b)
