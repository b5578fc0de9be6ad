"""EnsLoss, the symmetric losses, and the soft-margin hinge."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import close, load_golden, t32

from stepguard.losses import BinaryUnhingedLoss, EnsLoss, SoftMarginLoss, SymmetricCELoss
from stepguard.losses.functional import (
    ensloss_derivatives,
    hinge_loss,
    inverse_box_cox,
    symmetric_ce_loss,
    symmetrize,
)

ENS = load_golden("ensloss.json")
OUTPUT = t32(ENS["inputs"]["output"])
TARGET = t32(ENS["inputs"]["target01"])


@pytest.mark.parametrize("name", ["lambda_0.0", "lambda_0.5", "lambda_-0.5"])
def test_ensloss_matches_reference_with_seeded_global_rng(name: str) -> None:
    case = ENS["cases"][name]
    output = OUTPUT.clone().requires_grad_(True)
    loss = EnsLoss(lam=case["hyperparameters"]["lam"])
    torch.manual_seed(case["rng_seed_before_forward"])
    value = loss(output, TARGET)
    close(value, case["loss"])
    value.backward()
    close(output.grad, case["grad_output"])
    margins = (2 * TARGET - 1).reshape(-1) * OUTPUT.reshape(-1)
    close(margins, case["margins_z"])
    draws = t32(case["standard_normal_draws"])
    close(
        ensloss_derivatives(margins, draws, case["hyperparameters"]["lam"]),
        case["recovered_loss_derivative_g"],
    )


def test_ensloss_explicit_generator_reproduces_the_draws() -> None:
    case = ENS["cases"]["lambda_0.0"]
    loss = EnsLoss(generator=torch.Generator().manual_seed(case["rng_seed_before_forward"]))
    close(loss(OUTPUT, TARGET), case["loss"])


def test_ensloss_derivatives_are_calibrated_and_convex() -> None:
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(64, generator=generator) * 3
    for lam in (0.0, 0.7, -0.7):
        g = ensloss_derivatives(z, torch.randn(64, generator=generator), lam)
        assert torch.all(g < 0) and torch.all(g >= -1 - 1e-6)
        order = torch.argsort(z)
        assert torch.all(torch.diff(g[order]) >= 0)
        undecayed = torch.where(z > 1, (g + 1e-6) * z, g + 1e-6)[order]
        assert torch.all(torch.diff(undecayed) >= -1e-6)


def test_inverse_box_cox() -> None:
    eps = torch.tensor([-3.0, 0.0, 1.0])
    torch.testing.assert_close(inverse_box_cox(eps, 0.0), torch.exp(eps))
    torch.testing.assert_close(inverse_box_cox(eps, 0.5), torch.tensor([0.0, 1.0, 2.25]))
    assert torch.isinf(inverse_box_cox(torch.tensor([-3.0]), -0.5)).item() is False
    assert torch.isinf(inverse_box_cox(torch.tensor([3.0]), -0.5)).item()


@pytest.mark.parametrize(("name", "fn"), [("BCE", "bce"), ("Hinge", "hinge")])
def test_fixed_baselines_of_the_reference_file(name: str, fn: str) -> None:
    case = ENS["cases"][name]
    output = OUTPUT.clone().requires_grad_(True)
    if fn == "bce":
        value = F.binary_cross_entropy_with_logits(output, TARGET)
    else:
        value = hinge_loss(output, 2 * TARGET - 1)
    close(value, case["loss"])
    value.backward()
    close(output.grad, case["grad_output"])


def test_ensloss_components_and_value_flag() -> None:
    loss = EnsLoss()
    loss(OUTPUT, TARGET)
    assert not loss.meaningful_value
    close(loss.components["bce_reference"], ENS["cases"]["BCE"]["loss"])


SOFT = load_golden("soft_margin_nn_svm.json")


@pytest.mark.parametrize("name", list(SOFT["cases"]))
def test_soft_margin_matches_reference(name: str) -> None:
    case = SOFT["cases"][name]
    inputs = SOFT["inputs"]
    output = t32(inputs["output_minus_init"]).requires_grad_(True)
    weight = t32(inputs["last_layer_weight"]).requires_grad_(True)
    loss = SoftMarginLoss(lam=case["lam"], width=inputs["width"])
    value = loss(output, t32(inputs["y_pm1"]), weight)
    close(value, case["loss"])
    close(loss.components["hinge"], case["hinge_mean"])
    value.backward()
    close(output.grad, case["grad_output"])
    close(weight.grad, case["grad_last_layer_weight"])


def test_soft_margin_centres_by_the_initial_output() -> None:
    inputs = SOFT["inputs"]
    diff = t32(inputs["output_minus_init"])
    init = torch.linspace(-1, 1, diff.numel())
    loss = SoftMarginLoss(lam=0.0)
    torch.testing.assert_close(
        loss(diff + init, t32(inputs["y_pm1"]), init_output=init), loss(diff, t32(inputs["y_pm1"]))
    )


LOGITS = torch.randn(5, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
LABELS = torch.tensor([0, 1, 2, 3, 1])


def _ce_none(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, target, reduction="none")


def test_symmetric_part_of_ce_is_the_multiclass_unhinged_loss() -> None:
    sym, insensitive = symmetrize(_ce_none, LOGITS, LABELS)
    torch.testing.assert_close(sym, symmetric_ce_loss(LOGITS, LABELS, "none"))
    torch.testing.assert_close(insensitive, torch.logsumexp(LOGITS, 1) - LOGITS.mean(1))
    coeffs = (
        -(LOGITS.gather(1, LABELS[:, None]).squeeze(1)) * 3 / 4
        + (LOGITS.sum(1) - LOGITS.gather(1, LABELS[:, None]).squeeze(1)) / 4
    )
    torch.testing.assert_close(sym, coeffs)


def test_symmetric_losses_sum_to_a_constant_over_classes() -> None:
    for loss in (
        SymmetricCELoss(allow_unbounded=True, reduction="none"),
        SymmetricCELoss(bound=2.0, reduction="none"),
    ):
        total = sum(loss(LOGITS, torch.full_like(LABELS, c)) for c in range(4))
        torch.testing.assert_close(total, torch.zeros(5, dtype=torch.float64))
    for fn in (
        lambda f, y: F.cross_entropy(f, y, reduction="none"),
        lambda f, y: 1 - F.softmax(f, 1).gather(1, y[:, None]).squeeze(1),
    ):
        every = torch.stack(
            [symmetrize(fn, LOGITS, torch.full_like(LABELS, c))[0] for c in range(4)], 1
        )
        torch.testing.assert_close(every.sum(1), torch.zeros(5, dtype=torch.float64))
    unhinged = BinaryUnhingedLoss(allow_unbounded=True, reduction="none")
    v = LOGITS[:, 0]
    torch.testing.assert_close(
        unhinged(v, torch.ones(5)) + unhinged(v, -torch.ones(5)),
        torch.full((5,), 2.0, dtype=torch.float64),
    )


def test_mae_is_already_symmetric() -> None:
    def mae(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 2 * (1 - F.softmax(f, 1).gather(1, y[:, None]).squeeze(1))

    _, insensitive = symmetrize(mae, LOGITS, LABELS)
    torch.testing.assert_close(insensitive, torch.full((5,), 2 * (1 - 1 / 4), dtype=torch.float64))


def test_unbounded_linear_losses_must_be_bounded_or_regularised() -> None:
    for cls in (SymmetricCELoss, BinaryUnhingedLoss):
        with pytest.raises(ValueError, match="unbounded below"):
            cls()
    bounded = BinaryUnhingedLoss(bound=1.0)
    assert float(bounded(torch.tensor([1e6]), torch.tensor([1.0]))) == pytest.approx(0.0, abs=1e-6)
    penalised = BinaryUnhingedLoss(score_l2=0.5)
    torch.testing.assert_close(
        penalised(torch.tensor([2.0]), torch.tensor([1.0])), torch.tensor(1 - 2 + 0.25 * 4)
    )


def test_gradcheck_float64() -> None:
    logits = LOGITS.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: SymmetricCELoss(bound=2.0)(f, LABELS), (logits,))
    output = OUTPUT.double().requires_grad_(True)
    y = 2 * TARGET.double() - 1
    assert torch.autograd.gradcheck(lambda f: SoftMarginLoss()(f, y, f.T @ f), (output,))


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\(B,\) or \(B, 1\)"):
        EnsLoss()(torch.randn(4, 2), torch.ones(4, 2))
    with pytest.raises(ValueError, match="labels"):
        EnsLoss()(torch.randn(4), torch.ones(3))
    with pytest.raises(ValueError, match="bound"):
        BinaryUnhingedLoss(bound=-1.0)
    with pytest.raises(ValueError, match="lam"):
        SoftMarginLoss(lam=-1.0)
    with pytest.raises(ValueError, match="entries"):
        hinge_loss(torch.randn(4), torch.ones(3))
