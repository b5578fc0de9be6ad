"""StableMax cross-entropy, with the golden file's Softmax-Collapse thresholds and ⊥Grad steps.

The collapse diagnostics (:mod:`stepguard.diagnostics`) and the ⊥Grad optimizer
(:mod:`stepguard.optim`) are checked here against the same reference run.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import F64, close, load_golden, t32, t64

from stepguard.diagnostics import gradient_weight_cosine, softmax_collapse
from stepguard.losses import StableMaxCrossEntropyLoss
from stepguard.losses.functional import (
    cross_entropy_in_dtype,
    log_stablemax,
    stablemax,
    stablemax_s,
)
from stepguard.optim import PerpGrad, perp_gradient

GOLDEN = load_golden("stablemax_perpgrad.json")
CASES = GOLDEN["cases"]
LOGITS = t32(GOLDEN["inputs"]["logits"])
LABELS = torch.tensor(GOLDEN["inputs"]["labels"])


def test_faithful_stablemax_ce_matches_reference_in_float64() -> None:
    logits = LOGITS.clone().requires_grad_(True)
    loss = StableMaxCrossEntropyLoss(faithful=True)(logits, LABELS)
    assert loss.dtype == torch.float64
    close(loss, CASES["stablemax_cross_entropy_mean"]["loss"], F64)
    loss.backward()
    close(logits.grad, CASES["stablemax_cross_entropy_mean"]["grad_logits"])
    per_sample = StableMaxCrossEntropyLoss(reduction="none", faithful=True)(LOGITS, LABELS)
    close(per_sample, CASES["stablemax_cross_entropy_none"]["loss"], F64)


def test_default_mode_keeps_the_input_dtype() -> None:
    loss = StableMaxCrossEntropyLoss()(LOGITS, LABELS)
    assert loss.dtype == torch.float32
    close(loss, CASES["stablemax_cross_entropy_mean"]["loss"])


def test_s_function_and_its_derivative() -> None:
    case = CASES["s_function_grid_float64"]
    x = t64(case["x"]).requires_grad_(True)
    s = stablemax_s(x)
    close(s, case["s"], F64)
    s.sum().backward()
    close(x.grad, case["ds_dx"], F64)


def test_log_stablemax_and_ratio_definition() -> None:
    close(
        log_stablemax(LOGITS.double()), CASES["log_stablemax_std_logits_float64"]["log_probs"], F64
    )
    x = LOGITS.double()
    s = stablemax_s(x)
    torch.testing.assert_close(stablemax(x), s / s.sum(1, keepdim=True))


def test_stablemax_grows_linearly_not_exponentially() -> None:
    x = torch.tensor([[0.0, 1000.0]], dtype=torch.float64)
    torch.testing.assert_close(
        stablemax(x)[0, 1], torch.tensor(1001.0 / 1002.0, dtype=torch.float64)
    )


@pytest.mark.parametrize(
    ("dtype", "key"),
    [
        (torch.float16, "cross_entropy_float16_mean"),
        (torch.float32, "cross_entropy_float32_mean"),
        (torch.float64, "cross_entropy_float64_mean"),
    ],
)
def test_reference_cross_entropy_in_each_precision(dtype: torch.dtype, key: str) -> None:
    case = CASES[key]
    logits = LOGITS.clone().requires_grad_(True)
    loss = cross_entropy_in_dtype(logits, LABELS, dtype, faithful=True)
    assert str(loss.dtype) == case["loss_dtype"]
    tol = {"rtol": 1e-3, "atol": 1e-3} if dtype == torch.float16 else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(
        loss.double(), torch.tensor(case["loss"], dtype=torch.float64), **tol
    )
    loss.backward()
    torch.testing.assert_close(logits.grad, t32(case["grad_logits"]), **tol)


def test_softmax_collapse_thresholds_by_precision() -> None:
    # One other class: Σ exp(z_j − max z) = 1 + e^{-gap} rounds to 1 once e^{-gap} is below
    # half an ulp of 1: 2^-24 in float32 (gap > 16.64), 2^-11 in float16 (gap > 7.62).
    rows = torch.tensor([[0.0, 16.0], [0.0, 17.0], [0.0, 7.0], [0.0, 8.0]])
    assert softmax_collapse(rows).fraction == 0.25
    assert softmax_collapse(rows.to(torch.float16)).fraction == 0.75
    assert softmax_collapse(rows.to(torch.float64)).fraction == 0.0
    assert 24 * math.log(2) == pytest.approx(16.64, abs=0.01)


def test_zero_loss_fraction_by_precision() -> None:
    # Target logit 0, other −20: the loss log(1 + e^-20) ≈ 2e-9 is 0 in float32 (1 + 2e-9
    # rounds to 1) and positive in float64, also after the float32 cast of faithful mode:
    # a positive float64 cross-entropy is at least ~1e-16, far above float32's underflow.
    rows = torch.tensor([[-20.0, 0.0], [0.0, 5.0]], dtype=torch.float64)
    target = torch.tensor([1, 1])
    assert softmax_collapse(rows.to(torch.float32), target).zero_loss_fraction == 0.5
    assert softmax_collapse(rows, target).zero_loss_fraction == 0.0
    faithful = cross_entropy_in_dtype(rows, target, torch.float64, "none", faithful=True)
    assert int((faithful == 0).sum()) == 0
    assert softmax_collapse(rows * 2, target).zero_loss_fraction == 0.5


def test_orthograd_single_step_matches_reference() -> None:
    case = CASES["orthograd_single_step"]
    param = torch.nn.Parameter(t32(case["param_before"]))
    param.grad = t32(case["grad_before"])
    close(perp_gradient(param.detach(), param.grad), case["projected_rescaled_grad"])
    optimizer = PerpGrad([param], torch.optim.SGD, lr=0.1)
    optimizer.step()
    close(param.detach(), case["param_after"])
    close(param.grad, case["projected_rescaled_grad"])


def test_perp_gradient_is_orthogonal_per_tensor_and_keeps_the_norm() -> None:
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    g = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    perp = perp_gradient(w, g)
    assert abs(float((perp * w).sum())) < 1e-12
    assert float(perp.norm()) == pytest.approx(float(g.norm()), rel=1e-12)
    plain = perp_gradient(w, g, rescale=False)
    torch.testing.assert_close(plain, g - (w * g).sum() / (w * w).sum() * w)


def test_perpgrad_projects_each_parameter_separately_and_saves_base_state() -> None:
    a = torch.nn.Parameter(torch.tensor([1.0, 0.0]))
    b = torch.nn.Parameter(torch.tensor([0.0, 1.0]))
    a.grad = torch.tensor([1.0, 1.0])
    b.grad = torch.tensor([1.0, 1.0])
    optimizer = PerpGrad([a, b], torch.optim.SGD, lr=1.0, momentum=0.9)
    optimizer.step()
    torch.testing.assert_close(a.detach(), torch.tensor([1.0, -math.sqrt(2)]))
    torch.testing.assert_close(b.detach(), torch.tensor([-math.sqrt(2), 1.0]))
    state = optimizer.state_dict()
    assert len(state["state"]) == 2
    fresh = PerpGrad([a, b], torch.optim.SGD, lr=1.0, momentum=0.9)
    fresh.load_state_dict(state)
    assert fresh.state_dict()["state"].keys() == state["state"].keys()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    optimizer.step()
    scheduler.step()
    assert optimizer.base_optimizer.param_groups[0]["lr"] == 0.5


def test_gradient_weight_cosine_detects_the_scaling_direction() -> None:
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    w.grad = -0.3 * w.detach().clone()
    assert float(gradient_weight_cosine([w])) == pytest.approx(1.0)
    w.grad = torch.tensor([2.0, -1.0])
    assert float(gradient_weight_cosine([w])) == pytest.approx(0.0, abs=1e-7)


def test_gradcheck_float64() -> None:
    logits = LOGITS.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: StableMaxCrossEntropyLoss()(x, LABELS), (logits,))
