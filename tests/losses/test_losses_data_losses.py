"""Soft-label logistic loss, aggregate-response losses and CLD coreset scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import load_golden, t64

from stepguard.losses import (
    AggregateInterpolatedLoss,
    BagLevelLoss,
    HadamardLinear,
    HardLabelLogisticLoss,
    InstanceLevelLoss,
    SoftTargetBCELoss,
)
from stepguard.losses.functional import (
    bag_level_loss,
    instance_level_loss,
    interpolated_aggregate_loss,
)
from stepguard.losses.metrics import cld_coreset, cld_ranking, cld_scores


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


CLD = load_golden("cld_scores.json")


def test_cld_matches_reference_ranking() -> None:
    inputs = CLD["inputs"]
    train_labels = torch.tensor(inputs["train_labels"])
    scores = cld_scores(
        t64(inputs["train_losses_E_by_N"]),
        t64(inputs["val_losses_E_by_N"]),
        train_labels,
        torch.tensor(inputs["val_labels"]),
        num_classes=10,
    )
    ranking = cld_ranking(scores, train_labels, 10)
    for cls, expected in CLD["outputs"]["sorted_indices_per_class"].items():
        assert ranking[int(cls)].tolist() == expected
    assert all(ranking[c].numel() == 0 for c in range(2, 10))
    assert float(scores[6]) == 0.0


def test_cld_scores_against_numpy_pearson() -> None:
    inputs = CLD["inputs"]
    train = np.array(inputs["train_losses_E_by_N"])
    val = np.array(inputs["val_losses_E_by_N"])
    labels, val_labels = np.array(inputs["train_labels"]), np.array(inputs["val_labels"])
    scores = cld_scores(
        torch.tensor(train), torch.tensor(val), torch.tensor(labels), torch.tensor(val_labels)
    )
    for m in range(train.shape[1]):
        d_train = np.diff(train[:, m])
        d_val = np.diff(val[:, val_labels == labels[m]].mean(axis=1))
        expected = 0.0 if d_train.std() == 0 else np.corrcoef(d_train, d_val)[0, 1]
        assert float(scores[m]) == pytest.approx(expected, abs=1e-12)


def test_cld_coreset_takes_the_top_of_each_class() -> None:
    scores = torch.tensor([0.9, 0.1, 0.5, -0.2, 0.7, 0.3])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    assert cld_coreset(scores, labels, 2, per_class=1).tolist() == [0, 4]
    assert cld_coreset(scores, labels, 2, fraction=2 / 3).tolist() == [0, 2, 4, 5]
    with pytest.raises(ValueError, match="exactly one"):
        cld_coreset(scores, labels, 2)


def test_cld_bad_inputs() -> None:
    with pytest.raises(ValueError, match="at least 3"):
        cld_scores(
            torch.rand(2, 4),
            torch.rand(2, 3),
            torch.zeros(4, dtype=torch.long),
            torch.zeros(3, dtype=torch.long),
        )
