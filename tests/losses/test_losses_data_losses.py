"""Soft-label logistic loss (with its Hadamard layer) and aggregate-response losses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stepguard.layers import HadamardLinear
from stepguard.losses import (
    AggregateInterpolatedLoss,
    BagLevelLoss,
    HardLabelLogisticLoss,
    InstanceLevelLoss,
    SoftTargetBCELoss,
)
from stepguard.losses.functional import (
    bag_level_loss,
    instance_level_loss,
    interpolated_aggregate_loss,
)


def test_soft_target_bce_closed_form_and_hard_label_special_case() -> None:
    z = torch.tensor([-1.5, 0.0, 2.0], dtype=torch.float64)
    p = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    expected = (F.softplus(z) - p * z).mean()
    torch.testing.assert_close(SoftTargetBCELoss()(z, p), expected)
    hard = torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(
        SoftTargetBCELoss()(z, hard), HardLabelLogisticLoss()(z, 2 * hard - 1)
    )


def test_soft_target_loss_is_stationary_at_the_teacher_weight() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=generator, dtype=torch.float64)
    w_star = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    p = torch.sigmoid(x @ w_star)
    w = w_star.clone().requires_grad_(True)
    SoftTargetBCELoss()(x @ w, p).backward()
    assert float(w.grad.abs().max()) < 1e-15
    hard = (torch.rand(200, generator=generator, dtype=torch.float64) < p).double()
    w.grad = None
    SoftTargetBCELoss()(x @ w, hard).backward()
    assert float(w.grad.abs().max()) > 1e-3


def test_hadamard_linear_weight_is_the_product() -> None:
    layer = HadamardLinear(4, init_scale=0.1)
    torch.testing.assert_close(layer.weight, torch.full((1, 4), 0.01))
    x = torch.randn(3, 4)
    torch.testing.assert_close(layer(x), x @ layer.weight.T)
    layer(x).sum().backward()
    torch.testing.assert_close(layer.u.grad, x.sum(0, keepdim=True) * layer.v.detach())


PRED = torch.tensor([0.2, -0.4, 1.0, 2.0, 1.5, -1.0, 0.3], dtype=torch.float64)
BAGS = torch.tensor([0, 0, 0, 1, 1, 3, 3])
RESP = torch.tensor([0.5, 1.0, 7.0, 0.0], dtype=torch.float64)


def test_bag_and_instance_losses_by_hand() -> None:
    means = [np.mean([0.2, -0.4, 1.0]), np.mean([2.0, 1.5]), np.mean([-1.0, 0.3])]
    bag = [(0.5 - means[0]) ** 2, (1.0 - means[1]) ** 2, (0.0 - means[2]) ** 2]
    torch.testing.assert_close(
        bag_level_loss(PRED, BAGS, RESP), torch.tensor(np.mean(bag), dtype=torch.float64)
    )
    per_bag = bag_level_loss(PRED, BAGS, RESP, "none")
    assert float(per_bag[2]) == 0.0
    inst = (
        [(0.5 - v) ** 2 for v in (0.2, -0.4, 1.0)]
        + [(1.0 - v) ** 2 for v in (2.0, 1.5)]
        + [v**2 for v in (-1.0, 0.3)]
    )
    torch.testing.assert_close(
        instance_level_loss(PRED, BAGS, RESP), torch.tensor(np.mean(inst), dtype=torch.float64)
    )


def test_instance_loss_is_weighted_bag_loss_plus_within_bag_variance() -> None:
    torch.testing.assert_close(
        interpolated_aggregate_loss(PRED, BAGS, RESP, 1.0), instance_level_loss(PRED, BAGS, RESP)
    )
    counts = torch.tensor([3.0, 2.0, 0.0, 2.0], dtype=torch.float64)
    weighted = (counts * bag_level_loss(PRED, BAGS, RESP, "none")).sum() / PRED.numel()
    torch.testing.assert_close(interpolated_aggregate_loss(PRED, BAGS, RESP, 0.0), weighted)
    loss = InstanceLevelLoss()
    loss(PRED, BAGS, RESP)
    variance = loss.components["within_bag_variance"]
    torch.testing.assert_close(loss(PRED, BAGS, RESP), weighted + variance)
    half = AggregateInterpolatedLoss(0.5)(PRED, BAGS, RESP)
    torch.testing.assert_close(half, weighted + 0.5 * variance)


def test_aggregate_gradcheck_float64() -> None:
    pred = PRED.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: BagLevelLoss()(f, BAGS, RESP), (pred,))
    assert torch.autograd.gradcheck(
        lambda f: AggregateInterpolatedLoss(0.3)(f, BAGS, RESP), (pred,)
    )


def test_aggregate_bad_inputs() -> None:
    with pytest.raises(ValueError, match="rho"):
        AggregateInterpolatedLoss(1.5)
    with pytest.raises(ValueError, match="bag_index"):
        BagLevelLoss()(PRED, BAGS.float(), RESP)
    with pytest.raises(ValueError, match=r"\(N,\)"):
        BagLevelLoss()(PRED[None], BAGS, RESP)
