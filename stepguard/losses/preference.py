"""Preference losses on sequence log-probabilities: DPO (and conservative DPO), IPO, SimPO,
and the gradient-entanglement diagnostics of margin-based preference losses.

DPO and IPO take summed response log-probabilities of the policy and of a frozen reference
model; SimPO takes length-averaged policy log-probabilities and no reference. All inputs
have shape (B,), one entry per preference pair (chosen y_w, rejected y_l).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from stepguard.losses.base import GuardedLoss, check_reduction, reduce

SimPOLossType = Literal["sigmoid", "hinge"]

__all__ = [
    "DPOLoss",
    "IPOLoss",
    "SimPOLoss",
    "dpo_loss",
    "ipo_loss",
    "sequence_log_probs",
    "simpo_loss",
]


def _check_pairs(**logps: Tensor | None) -> Tensor:
    shape = None
    first = None
    for name, value in logps.items():
        if value is None:
            continue
        if not isinstance(value, Tensor) or not value.is_floating_point() or value.ndim != 1:
            raise ValueError(f"{name} must be a floating-point tensor of shape (B,)")
        if shape is None:
            shape, first = value.shape, value
        elif value.shape != shape:
            raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {tuple(shape)}")
    assert first is not None
    return first


def _margin(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None,
    reference_rejected_logps: Tensor | None,
    reference_free: bool,
) -> Tensor:
    _check_pairs(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
    )
    h = policy_chosen_logps - policy_rejected_logps
    if reference_free:
        return h
    if reference_chosen_logps is None or reference_rejected_logps is None:
        raise ValueError(
            "reference_chosen_logps and reference_rejected_logps are required unless reference_free=True"
        )
    return h - (reference_chosen_logps - reference_rejected_logps)


def _rewards(beta: float, policy: Tensor, reference: Tensor | None, reference_free: bool) -> Tensor:
    if reference_free or reference is None:
        return (beta * policy).detach()
    return (beta * (policy - reference)).detach()


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None = None,
    reference_rejected_logps: Tensor | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    reduction: str = "mean",
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO / conservative DPO.

    ``h = (log π_w − log π_l) − (log π_ref,w − log π_ref,l)`` (reference term 0 when
    ``reference_free``), ``L = −(1−ε)·logσ(βh) − ε·logσ(−βh)``.

    Returns:
        ``(loss, chosen_rewards, rejected_rewards)``; rewards ``β(log π − log π_ref)`` are
        detached and per pair.
    """
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    h = _margin(
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
        reference_free,
    )
    losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    chosen = _rewards(beta, policy_chosen_logps, reference_chosen_logps, reference_free)
    rejected = _rewards(beta, policy_rejected_logps, reference_rejected_logps, reference_free)
    return reduce(losses, reduction), chosen, rejected


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float = 0.1,
    reduction: str = "mean",
) -> tuple[Tensor, Tensor, Tensor]:
    """IPO ``(h − 1/(2β))²`` with h the DPO log-ratio margin (β plays the role of τ).

    Returns:
        ``(loss, chosen_rewards, rejected_rewards)``.
    """
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    h = _margin(
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
        False,
    )
    losses = (h - 1.0 / (2.0 * beta)) ** 2
    chosen = _rewards(beta, policy_chosen_logps, reference_chosen_logps, False)
    rejected = _rewards(beta, policy_rejected_logps, reference_rejected_logps, False)
    return reduce(losses, reduction), chosen, rejected


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    beta: float = 2.0,
    gamma_beta_ratio: float = 0.25,
    label_smoothing: float = 0.0,
    loss_type: SimPOLossType = "sigmoid",
    reduction: str = "mean",
) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO on length-averaged log-probabilities.

    ``r = avg log π(y_w) − avg log π(y_l)``; ``"sigmoid"``:
    ``−(1−ε)·logσ(β(r − γ/β)) − ε·logσ(−β(r − γ/β))``; ``"hinge"``: ``relu(1 − β(r − γ/β))``.

    Returns:
        ``(loss, chosen_rewards, rejected_rewards)`` with rewards ``β·avg log π`` detached.
    """
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    _check_pairs(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    z = beta * (policy_chosen_logps - policy_rejected_logps - gamma_beta_ratio)
    if loss_type == "sigmoid":
        losses = -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - z)
    else:
        raise ValueError(f"loss_type must be 'sigmoid' or 'hinge', got {loss_type!r}")
    chosen = (beta * policy_chosen_logps).detach()
    rejected = (beta * policy_rejected_logps).detach()
    return reduce(losses, reduction), chosen, rejected


def sequence_log_probs(
    logits: Tensor,
    labels: Tensor,
    *,
    average: bool = False,
    ignore_index: int = -100,
    shift: bool = True,
) -> Tensor:
    """Summed (DPO, IPO) or length-averaged (SimPO) response log-probabilities.

    Args:
        logits: (B, T, V) token logits.
        labels: (B, T) token ids; ``ignore_index`` marks prompt and padding positions.
        average: divide by the number of response tokens.
        ignore_index: label of positions that do not count.
        shift: logits at position t predict the label at t + 1 (causal LMs).

    Returns:
        (B,) log-probabilities.
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError("logits must be (B, T, V) and labels (B, T)")
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != ignore_index
    safe = torch.where(mask, labels, torch.zeros_like(labels))
    token_logps = torch.log_softmax(logits.float(), dim=-1).gather(2, safe[..., None]).squeeze(2)
    total = (token_logps * mask).sum(dim=1)
    return total / mask.sum(dim=1).clamp(min=1) if average else total


class _PreferenceLoss(GuardedLoss):
    def __init__(self, beta: float, reduction: str, accumulation_steps: int) -> None:
        super().__init__(accumulation_steps=accumulation_steps)
        if beta <= 0:
            raise ValueError(f"beta must be positive, got {beta}")
        self.beta = float(beta)
        self.reduction = check_reduction(reduction)

    def _record_rewards(self, loss: Tensor, chosen: Tensor, rejected: Tensor) -> None:
        self._record(
            preference=loss,
            chosen_reward=chosen,
            rejected_reward=rejected,
            reward_margin=chosen - rejected,
            reward_accuracy=(chosen > rejected).to(chosen.dtype),
        )


class DPOLoss(_PreferenceLoss):
    r"""Direct Preference Optimization, with conservative label smoothing.

    $$h=\log\frac{\pi_\theta(y_w)}{\pi_{ref}(y_w)}-\log\frac{\pi_\theta(y_l)}{\pi_{ref}(y_l)},
    \qquad L=-(1-\varepsilon)\log\sigma(\beta h)-\varepsilon\log\sigma(-\beta h)$$

    ε = ``label_smoothing`` = 0 is DPO, ε > 0 conservative DPO (cDPO); ``reference_free``
    drops the reference terms. ``components`` holds the mean implicit rewards
    $\beta(\log\pi_\theta-\log\pi_{ref})$ of chosen and rejected responses, their margin and
    the reward accuracy.

    Paper: Rafailov, Sharma, Mitchell, Ermon, Manning & Finn, "Direct Preference
    Optimization: Your Language Model is Secretly a Reward Model" (arXiv 2305.18290).

    Shapes: policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
    reference_rejected_logps, each (B,) summed response log-probs → 0-d, or (B,) with
    ``reduction="none"``.

    Args:
        beta: β > 0 (0.1).
        label_smoothing: ε ∈ [0, 0.5) (0).
        reference_free: ignore the reference model.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        accumulation_steps: see :class:`~stepguard.losses.base.GuardedLoss`.
    """

    def __init__(
        self,
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        reference_free: bool = False,
        reduction: str = "mean",
        *,
        accumulation_steps: int = 1,
    ) -> None:
        super().__init__(beta, reduction, accumulation_steps)
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)
        self.reference_free = reference_free

    def forward(
        self,
        policy_chosen_logps: Tensor,
        policy_rejected_logps: Tensor,
        reference_chosen_logps: Tensor | None = None,
        reference_rejected_logps: Tensor | None = None,
    ) -> Tensor:
        loss, chosen, rejected = dpo_loss(
            policy_chosen_logps,
            policy_rejected_logps,
            reference_chosen_logps,
            reference_rejected_logps,
            self.beta,
            self.label_smoothing,
            self.reference_free,
            self.reduction,
        )
        self._record_rewards(loss, chosen, rejected)
        return loss

    def radius_logits(self, output: tuple[Tensor, ...], target: Tensor | None = None) -> Tensor:
        """``β·h`` (B,), the argument of the loss's sigmoid, from the four log-prob tensors."""
        parts = list(output) + [None] * (4 - len(output))
        return self.beta * _margin(parts[0], parts[1], parts[2], parts[3], self.reference_free)


class IPOLoss(_PreferenceLoss):
    r"""Identity Preference Optimisation: a squared loss on the DPO log-ratio margin.

    $$L=\Big(h-\frac1{2\beta}\Big)^2,\qquad h=\log\frac{\pi_\theta(y_w)\pi_{ref}(y_l)}
    {\pi_\theta(y_l)\pi_{ref}(y_w)}$$

    β plays the role of the paper's τ (Eq. 17). Inputs are summed log-probs as in the DPO
    reference code; use :func:`sequence_log_probs` with ``average=True`` for the
    length-normalised variant.

    Paper: Azar et al., "A General Theoretical Paradigm to Understand Learning from Human
    Preferences" (arXiv 2310.12036).

    Shapes: four (B,) log-prob tensors → 0-d, or (B,) with ``reduction="none"``.

    Args:
        beta: β > 0 (0.1).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        accumulation_steps: see :class:`~stepguard.losses.base.GuardedLoss`.
    """

    has_radius_logits = False
    no_radius_reason = "IPO is a squared loss on the log-ratio margin"

    def __init__(self, beta: float = 0.1, reduction: str = "mean", *, accumulation_steps: int = 1) -> None:
        super().__init__(beta, reduction, accumulation_steps)

    def forward(
        self,
        policy_chosen_logps: Tensor,
        policy_rejected_logps: Tensor,
        reference_chosen_logps: Tensor,
        reference_rejected_logps: Tensor,
    ) -> Tensor:
        loss, chosen, rejected = ipo_loss(
            policy_chosen_logps,
            policy_rejected_logps,
            reference_chosen_logps,
            reference_rejected_logps,
            self.beta,
            self.reduction,
        )
        self._record_rewards(loss, chosen, rejected)
        return loss


class SimPOLoss(_PreferenceLoss):
    r"""SimPO: reference-free, length-normalised margin loss with a target reward margin.

    $$r=\frac{\log\pi_\theta(y_w)}{|y_w|}-\frac{\log\pi_\theta(y_l)}{|y_l|},\qquad
    L=-(1-\varepsilon)\log\sigma\big(\beta(r-\gamma/\beta)\big)
    -\varepsilon\log\sigma\big(-\beta(r-\gamma/\beta)\big)$$

    ``loss_type="hinge"`` uses $\mathrm{relu}(1-\beta(r-\gamma/\beta))$. With
    ``sft_weight`` > 0 the loss adds $w\cdot\mathrm{mean}_i(-\log\pi_\theta(y_w)/|y_w|)$, the
    chosen responses' average negative log-likelihood (the reference code's token-level
    cross-entropy, equal when the responses have the same length). Defaults from the
    reference configuration (β = 2, γ/β = 0.25, no SFT term).

    Paper: Meng, Xia & Chen, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward" (arXiv 2405.14734).

    Shapes: policy_chosen_logps, policy_rejected_logps, each (B,) length-averaged → 0-d, or
    (B,) with ``reduction="none"``.

    Args:
        beta: β > 0 (2.0).
        gamma_beta_ratio: γ/β (0.25).
        label_smoothing: ε (0).
        loss_type: ``"sigmoid"`` or ``"hinge"``.
        sft_weight: weight of the SFT term (0).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        accumulation_steps: see :class:`~stepguard.losses.base.GuardedLoss`.
    """

    def __init__(
        self,
        beta: float = 2.0,
        gamma_beta_ratio: float = 0.25,
        label_smoothing: float = 0.0,
        loss_type: SimPOLossType = "sigmoid",
        sft_weight: float = 0.0,
        reduction: str = "mean",
        *,
        accumulation_steps: int = 1,
    ) -> None:
        super().__init__(beta, reduction, accumulation_steps)
        if loss_type not in ("sigmoid", "hinge"):
            raise ValueError(f"loss_type must be 'sigmoid' or 'hinge', got {loss_type!r}")
        self.gamma_beta_ratio = float(gamma_beta_ratio)
        self.label_smoothing = float(label_smoothing)
        self.loss_type: SimPOLossType = loss_type
        if sft_weight < 0:
            raise ValueError(f"sft_weight must be >= 0, got {sft_weight}")
        self.sft_weight = float(sft_weight)

    def forward(self, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor) -> Tensor:
        loss, chosen, rejected = simpo_loss(
            policy_chosen_logps,
            policy_rejected_logps,
            self.beta,
            self.gamma_beta_ratio,
            self.label_smoothing,
            self.loss_type,
            self.reduction,
        )
        self._record_rewards(loss, chosen, rejected)
        if self.sft_weight > 0:
            sft = reduce(-policy_chosen_logps, self.reduction)
            self.components["sft"] = sft.detach().mean()
            loss = loss + self.sft_weight * sft
        return loss

    def radius_logits(self, output: tuple[Tensor, ...], target: Tensor | None = None) -> Tensor:
        """``β(r − γ/β)`` (B,), the argument of the loss's sigmoid."""
        chosen, rejected = output[0], output[1]
        return self.beta * (chosen - rejected - self.gamma_beta_ratio)
