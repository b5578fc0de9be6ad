"""AUC-M, multi-label AUC-M and AUC square against LibAUC and against saddle-point algebra."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import close, load_golden, t32

from stepguard.losses import AUCMLoss, AUCSquareLoss, MultiLabelAUCMLoss
from stepguard.losses.functional import aucm_minmax, aucm_primal

GOLDEN = load_golden("aucm_libauc.json")
Y_PRED = t32(GOLDEN["inputs"]["y_pred"])
Y_TRUE = torch.tensor(GOLDEN["inputs"]["y_true"])


def _loss_with_state(case: dict, faithful: bool) -> AUCMLoss:
    hp = case["hyperparameters"]
    loss = AUCMLoss(hp["margin"], hp["imratio"], hp["version"], faithful=faithful, auto=hp["auto"])
    with torch.no_grad():
        loss.a.fill_(hp["a"])
        loss.b.fill_(hp["b"])
        loss.alpha.fill_(hp["alpha"])
    return loss


def _check(loss: AUCMLoss, case: dict) -> None:
    y_pred = Y_PRED.clone().requires_grad_(True)
    value = loss(y_pred, Y_TRUE)
    close(value, case["loss"])
    value.backward()
    close(y_pred.grad, case["grad_y_pred"])
    close(loss.a.grad, case["grad_a"])
    close(loss.b.grad, case["grad_b"])
    close(loss.alpha.grad, case["grad_alpha"])
    if case["p_used"] is not None:
        close(loss.components["p"], case["p_used"])


@pytest.mark.parametrize("name", list(GOLDEN["cases"]))
def test_faithful_mode_matches_libauc(name: str) -> None:
    case = GOLDEN["cases"][name]
    _check(_loss_with_state(case, faithful=True), case)


@pytest.mark.parametrize(
    "name", ["v1_zero_state", "v1_auto_p", "v1_fixed_imratio_0.1_auto_False", "v1_margin_0.5"]
)
def test_default_v1_agrees_with_libauc_where_libauc_uses_its_prior(name: str) -> None:
    case = GOLDEN["cases"][name]
    _check(_loss_with_state(case, faithful=False), case)


def test_default_mode_honours_imratio_where_libauc_ignores_it() -> None:
    case = GOLDEN["cases"]["v1_imratio_0.1_but_auto_True_(default)"]
    fixed = GOLDEN["cases"]["v1_fixed_imratio_0.1_auto_False"]
    loss = _loss_with_state(case, faithful=False)
    close(loss(Y_PRED, Y_TRUE), fixed["loss"])
    close(loss.components["p"], 0.1)


def test_default_v2_is_the_documented_formula() -> None:
    case = GOLDEN["cases"]["v2"]
    loss = _loss_with_state(case, faithful=False)
    close(loss(Y_PRED, Y_TRUE), case["documented_formula_value_for_comparison"])
    h, pos = Y_PRED.reshape(-1).double(), Y_TRUE.reshape(-1) == 1
    a, b, alpha, m = 0.6, 0.3, 0.2, 1.0
    by_hand = (
        ((h[pos] - a) ** 2).mean()
        + ((h[~pos] - b) ** 2).mean()
        + 2 * alpha * (m + h[~pos].mean() - h[pos].mean())
        - alpha**2
    )
    loss64 = _loss_with_state(case, faithful=False).double()
    torch.testing.assert_close(loss64(Y_PRED.double(), Y_TRUE), by_hand)


@pytest.mark.parametrize("name", [k for k in GOLDEN["multilabel_cases"] if k != "note"])
def test_multilabel_faithful_matches_libauc(name: str) -> None:
    case = GOLDEN["multilabel_cases"][name]
    hp = case["hyperparameters"]
    ml = GOLDEN["inputs"]["multilabel"]
    loss = MultiLabelAUCMLoss(hp["num_labels"], hp["margin"], hp["version"], faithful=True)
    with torch.no_grad():
        loss.a.copy_(t32(hp["a"]))
        loss.b.copy_(t32(hp["b"]))
        loss.alpha.copy_(t32(hp["alpha"]))
    close(loss(t32(ml["y_pred"]), torch.tensor(ml["y_true"])), case["loss"])


def test_multilabel_default_v1_uses_the_margin() -> None:
    ml = GOLDEN["inputs"]["multilabel"]
    values = []
    for margin in (1.0, 0.5):
        loss = MultiLabelAUCMLoss(3, margin, "v1")
        with torch.no_grad():
            loss.alpha.fill_(0.3)
        values.append(float(loss(t32(ml["y_pred"]), torch.tensor(ml["y_true"])).detach()))
    assert values[0] != values[1]


def test_multilabel_is_the_mean_of_single_label_objectives() -> None:
    ml = GOLDEN["inputs"]["multilabel"]
    y_pred, y_true = t32(ml["y_pred"]), torch.tensor(ml["y_true"])
    multi = MultiLabelAUCMLoss(3, 1.0, "v2")
    with torch.no_grad():
        multi.a.copy_(torch.tensor([0.6, 0.5, 0.4]))
        multi.alpha.copy_(torch.tensor([0.2, 0.3, 0.4]))
    singles = [
        aucm_minmax(
            y_pred[:, k], y_true[:, k], multi.a[k], multi.b[k], multi.alpha[k], 1.0, version="v2"
        )
        for k in range(3)
    ]
    torch.testing.assert_close(multi(y_pred, y_true), torch.stack(singles).mean())


def _pairwise(h: torch.Tensor, y: torch.Tensor, m: float) -> torch.Tensor:
    pos, neg = h[y == 1], h[y == 0]
    return torch.stack([(m - hp + hn) ** 2 for hp, hn in itertools.product(pos, neg)]).mean()


def test_aucm_saddle_value_is_the_primal_objective() -> None:
    h = Y_PRED.reshape(-1).double()
    y = Y_TRUE.reshape(-1)
    pos, neg = h[y == 1], h[y == 0]
    p = pos.numel() / h.numel()
    for m in (1.0, 0.1):
        a, b = pos.mean(), neg.mean()
        alpha = torch.clamp(m - a + b, min=0.0)
        saddle = aucm_minmax(h, y, a, b, alpha, m, p, "v1")
        primal = pos.var(correction=0) + neg.var(correction=0) + torch.relu(m - a + b) ** 2
        torch.testing.assert_close(saddle, p * (1 - p) * primal)
        torch.testing.assert_close(aucm_primal(h, y, m), primal)
        v2 = aucm_minmax(h, y, a, b, alpha, m, version="v2")
        torch.testing.assert_close(v2, primal)


def test_auc_square_saddle_value_is_the_pairwise_square_loss() -> None:
    h = Y_PRED.reshape(-1).double()
    y = Y_TRUE.reshape(-1)
    pos, neg = h[y == 1], h[y == 0]
    p = pos.numel() / h.numel()
    loss = AUCSquareLoss(margin=1.0).double()
    with torch.no_grad():
        loss.a.fill_(float(pos.mean()))
        loss.b.fill_(float(neg.mean()))
        loss.alpha.fill_(float(neg.mean() - pos.mean()))
    torch.testing.assert_close(loss(h, y), p * (1 - p) * _pairwise(h, y, 1.0))
    value = loss(h.clone().requires_grad_(True), y)
    value.backward()
    for param in (loss.a, loss.b, loss.alpha):
        assert abs(float(param.grad)) < 1e-12


def test_from_logits_applies_the_sigmoid_and_exposes_logits() -> None:
    logits = t32(GOLDEN["inputs"]["logits"]).requires_grad_(True)
    loss = AUCMLoss(from_logits=True)
    close(loss(logits, Y_TRUE), GOLDEN["cases"]["v1_zero_state"]["loss"])
    assert loss.radius_logits(logits) is logits
    with pytest.raises(NotImplementedError, match="from_logits=True"):
        AUCMLoss().radius_logits(logits)


def test_pesg_dual_step_keeps_alpha_in_range() -> None:
    loss = AUCMLoss()
    with torch.no_grad():
        loss.a.fill_(0.8)
        loss.b.fill_(0.2)
    loss.ascend_alpha(0.1)
    torch.testing.assert_close(loss.alpha.detach(), torch.tensor(0.1 * 2 * (1.0 + 0.2 - 0.8)))
    with torch.no_grad():
        loss.a.fill_(5.0)
    for _ in range(5):
        loss.ascend_alpha(1.0)
    assert float(loss.alpha.detach()) == 0.0


def test_gradcheck_float64() -> None:
    y = Y_TRUE.reshape(-1)
    args = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (0.6, 0.3, 0.2)]
    h = Y_PRED.reshape(-1).double().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda h, a, b, al: aucm_minmax(h, y, a, b, al, 1.0), (h, *args)
    )
    assert torch.autograd.gradcheck(
        lambda h, a, b, al: aucm_minmax(h, y, a, b, al, 1.0, version="v2"), (h, *args)
    )


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="version"):
        AUCMLoss(version="v3")
    with pytest.raises(ValueError, match="imratio"):
        AUCMLoss(imratio=1.5)
    with pytest.raises(ValueError, match=r"\(B,\) or \(B, 1\)"):
        AUCMLoss()(torch.rand(4, 2), torch.ones(4))
    with pytest.raises(ValueError, match="labels"):
        AUCMLoss()(torch.rand(4), torch.ones(3))
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        MultiLabelAUCMLoss(3)(torch.rand(4, 2), torch.ones(4, 2))
