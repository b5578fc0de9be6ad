"""Learning from aggregate responses: bag-level, instance-level and interpolated losses
(Javanmard, Chen, Mirrokni, Badanidiyuru & Fu).

Only the mean response ``ȳ_B = (1/|B|)·Σ_{i∈B} y_i`` of each bag B is observed. With the
squared loss and ``f̄_B`` the mean prediction of the bag,

    Σ_{i∈B} (ȳ_B − f_i)² = |B|·(ȳ_B − f̄_B)² + Σ_{i∈B} (f_i − f̄_B)²,

so the instance-level loss is the (size-weighted) bag-level loss plus the within-bag
variance of the predictions, a regulariser. Bags must stay whole within a batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from stepguard.losses.base import GuardedLoss, check_reduction

__all__ = [
    "AggregateInterpolatedLoss",
    "BagLevelLoss",
    "InstanceLevelLoss",
    "bag_level_loss",
    "bag_means",
    "instance_level_loss",
    "interpolated_aggregate_loss",
]


def _check(pred: Tensor, bag_index: Tensor, bag_response: Tensor) -> None:
    if not isinstance(pred, Tensor) or pred.ndim != 1 or not pred.is_floating_point():
        raise ValueError("pred must be a floating-point tensor of shape (N,)")
    if (
        not isinstance(bag_index, Tensor)
        or bag_index.dtype != torch.long
        or bag_index.shape != pred.shape
    ):
        raise ValueError(f"bag_index must be int64 of shape {tuple(pred.shape)}")
    if not isinstance(bag_response, Tensor) or bag_response.ndim != 1:
        raise ValueError("bag_response must have shape (num_bags,)")


def bag_means(values: Tensor, bag_index: Tensor, num_bags: int) -> tuple[Tensor, Tensor]:
    """Per-bag means and sizes of ``values`` grouped by ``bag_index`` (empty bags: 0, 0)."""
    sums = values.new_zeros(num_bags).index_add(0, bag_index, values)
    counts = values.new_zeros(num_bags).index_add(0, bag_index, torch.ones_like(values))
    return sums / counts.clamp(min=1.0), counts


def bag_level_loss(
    pred: Tensor, bag_index: Tensor, bag_response: Tensor, reduction: str = "mean"
) -> Tensor:
    """``(ȳ_B − f̄_B)²`` per non-empty bag; ``"mean"`` averages over those bags."""
    _check(pred, bag_index, bag_response)
    means, counts = bag_means(pred, bag_index, bag_response.shape[0])
    present = (counts > 0).to(pred.dtype)
    values = (bag_response.to(pred.dtype) - means) ** 2 * present
    if reduction == "none":
        return values
    if reduction == "sum":
        return values.sum()
    return values.sum() / present.sum().clamp(min=1.0)


def instance_level_loss(
    pred: Tensor, bag_index: Tensor, bag_response: Tensor, reduction: str = "mean"
) -> Tensor:
    """``(ȳ_{B(i)} − f_i)²`` per instance, each instance regressed on its bag's response."""
    _check(pred, bag_index, bag_response)
    values = (bag_response.to(pred.dtype)[bag_index] - pred) ** 2
    if reduction == "none":
        return values
    return values.sum() if reduction == "sum" else values.mean()


def interpolated_aggregate_loss(
    pred: Tensor, bag_index: Tensor, bag_response: Tensor, rho: float, reduction: str = "mean"
) -> Tensor:
    """``Σ_B [|B|·(ȳ_B − f̄_B)² + ρ·Σ_{i∈B}(f_i − f̄_B)²]``, divided by N for ``"mean"``.

    ρ = 1 equals the instance-level loss, ρ = 0 the size-weighted bag-level loss.
    """
    _check(pred, bag_index, bag_response)
    means, counts = bag_means(pred, bag_index, bag_response.shape[0])
    bias = counts * (bag_response.to(pred.dtype) - means) ** 2
    spread = pred.new_zeros(bag_response.shape[0]).index_add(
        0, bag_index, (pred - means[bag_index]) ** 2
    )
    values = bias + rho * spread
    if reduction == "none":
        return values
    return values.sum() if reduction == "sum" else values.sum() / pred.shape[0]


class _AggregateBase(GuardedLoss):
    batch_coupled = True
    coupling_note = "a bag's loss depends on all of its instances, which must share a batch"
    has_radius_logits = False
    no_radius_reason = "it is a squared loss on real-valued predictions"

    def __init__(self, reduction: str, accumulation_steps: int) -> None:
        super().__init__(accumulation_steps=accumulation_steps)
        self.reduction = check_reduction(reduction)


class BagLevelLoss(_AggregateBase):
    r"""Bag-level loss: regress each bag's mean prediction on its aggregate response.

    $$L_{bag}=\frac1{|\mathcal B|}\sum_B\Big(\bar y_B-\frac1{|B|}\sum_{i\in B}f(x_i)\Big)^2$$

    Paper: Javanmard, Chen, Mirrokni, Badanidiyuru & Fu, "Learning from Aggregate
    Responses: Instance Level versus Bag Level Loss Functions" (ICLR 2024).

    Shapes: pred (N,), bag_index (N,) int64 in [0, K), bag_response (K,) → 0-d, or (K,)
    per bag with ``reduction="none"``. Batch-coupled.

    Args:
        reduction: ``"mean"`` (over non-empty bags), ``"sum"`` or ``"none"``.
        accumulation_steps: see :class:`~stepguard.losses.base.GuardedLoss`.
    """

    def __init__(self, reduction: str = "mean", *, accumulation_steps: int = 1) -> None:
        super().__init__(reduction, accumulation_steps)

    def forward(self, pred: Tensor, bag_index: Tensor, bag_response: Tensor) -> Tensor:
        loss = bag_level_loss(pred, bag_index, bag_response, self.reduction)
        self._record(bag_level=loss)
        return loss


class InstanceLevelLoss(_AggregateBase):
    r"""Instance-level loss: regress every instance on its bag's aggregate response.

    $$L_{inst}=\frac1N\sum_B\sum_{i\in B}(\bar y_B-f(x_i))^2
    =\frac1N\sum_B\Big[|B|(\bar y_B-\bar f_B)^2+\sum_{i\in B}(f_i-\bar f_B)^2\Big]$$

    Paper: Javanmard et al., "Learning from Aggregate Responses: Instance Level versus Bag
    Level Loss Functions" (ICLR 2024).

    Shapes: pred (N,), bag_index (N,) int64, bag_response (K,) → 0-d, or (N,) with
    ``reduction="none"``. Batch-coupled (instances share their bag's response).

    Args:
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        accumulation_steps: see :class:`~stepguard.losses.base.GuardedLoss`.
    """

    def __init__(self, reduction: str = "mean", *, accumulation_steps: int = 1) -> None:
        super().__init__(reduction, accumulation_steps)

    def forward(self, pred: Tensor, bag_index: Tensor, bag_response: Tensor) -> Tensor:
        loss = instance_level_loss(pred, bag_index, bag_response, self.reduction)
        with torch.no_grad():
            means, _ = bag_means(pred, bag_index, bag_response.shape[0])
            spread = ((pred - means[bag_index]) ** 2).mean()
        self._record(instance_level=loss, within_bag_variance=spread)
        return loss


class AggregateInterpolatedLoss(_AggregateBase):
    r"""Interpolation between bag-level (ρ = 0) and instance-level (ρ = 1) losses.

    $$L_\rho=\frac1N\sum_B\Big[|B|(\bar y_B-\bar f_B)^2+\rho\sum_{i\in B}(f_i-\bar f_B)^2
    \Big],\qquad\rho\in[0,1]$$

    The paper combines the two with a tuning parameter; this normalisation (per instance)
    and parametrisation are one natural choice, exact at both ends.

    Paper: Javanmard et al., "Learning from Aggregate Responses: Instance Level versus Bag
    Level Loss Functions" (ICLR 2024).

    Shapes: pred (N,), bag_index (N,) int64, bag_response (K,) → 0-d, or (K,) per bag with
    ``reduction="none"``. Batch-coupled.

    Args:
        rho: ρ ∈ [0, 1].
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        accumulation_steps: see :class:`~stepguard.losses.base.GuardedLoss`.
    """

    def __init__(self, rho: float, reduction: str = "mean", *, accumulation_steps: int = 1) -> None:
        super().__init__(reduction, accumulation_steps)
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"rho must lie in [0, 1], got {rho}")
        self.rho = float(rho)

    def forward(self, pred: Tensor, bag_index: Tensor, bag_response: Tensor) -> Tensor:
        loss = interpolated_aggregate_loss(pred, bag_index, bag_response, self.rho, self.reduction)
        self._record(interpolated=loss)
        return loss
