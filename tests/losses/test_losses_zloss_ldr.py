"""Spherical Z-loss, PaLM's log²Z penalty, LDR-KL and ALDR-KL."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import close, load_golden, t32

from stepguard.losses import (
    ALDRKLLoss,
    CrossEntropyWithZLoss,
    LDRKLLoss,
    LogZSquaredPenalty,
    SphericalZLoss,
)
from stepguard.losses.functional import ldr_kl_loss, spherical_z_loss, z_scores

ZL = load_golden("zloss_logZ_squared.json")
LOGITS = t32(ZL["inputs"]["logits"])
LABELS = torch.tensor(ZL["inputs"]["labels"])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ce_plus_logz_squared_matches_reference(reduction: str) -> None:
    case = ZL["cases"][f"reduction_{reduction}"]
    logits = LOGITS.clone().requires_grad_(True)
    loss = CrossEntropyWithZLoss(ZL["inputs"]["z_loss_multiplier"], reduction)
    value = loss(logits, LABELS)
    close(
        loss.components["cross_entropy"],
        torch.as_tensor(case["ce"]).mean() if reduction == "none" else case["ce"],
    )
    if reduction == "none":
        close(value, torch.tensor(case["ce"]) + torch.tensor(case["z_loss"]))
        value = value.sum()
    else:
        close(loss.components["z_loss"], case["z_loss"])
    value.backward()
    close(logits.grad, case["grad_of_ce_plus_zloss"])


def test_ignore_index_excludes_rows() -> None:
    case = ZL["cases"]["ignore_index_-100_on_row1"]
    loss = CrossEntropyWithZLoss()
    loss(LOGITS, torch.tensor(case["labels"]))
    close(loss.components["cross_entropy"], case["ce"])
    close(loss.components["z_loss"], case["z_loss"])
    penalty = LogZSquaredPenalty()
    close(penalty(LOGITS, torch.tensor(case["labels"])), case["z_loss"])


def test_log_partition() -> None:
    penalty = LogZSquaredPenalty(multiplier=1.0, reduction="none")
    logz = torch.tensor(ZL["cases"]["log_partition_per_row"]["logZ"])
    close(penalty(LOGITS), logz**2)


def test_spherical_z_loss_by_hand_and_invariances() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, 6.0]], dtype=torch.float64)
    target = torch.tensor([3])
    mean, var = 3.0, (1 + 4 + 9 + 36) / 4 - 9.0
    z = (6.0 - mean) / math.sqrt(var)
    expected = math.log1p(math.exp(2.0 * (1.5 - z))) / 2.0
    torch.testing.assert_close(
        spherical_z_loss(logits, target, 2.0, 1.5), torch.tensor(expected, dtype=torch.float64)
    )
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    base = spherical_z_loss(x, y, 1.0, 1.0)
    torch.testing.assert_close(spherical_z_loss(3.7 * x - 2.0, y, 1.0, 1.0), base)
    torch.testing.assert_close(z_scores(x).mean(1), torch.zeros(6, dtype=torch.float64))


def test_spherical_z_loss_with_two_classes_is_nearly_constant() -> None:
    z = z_scores(torch.randn(10, 2, dtype=torch.float64))
    torch.testing.assert_close(z.abs(), torch.ones(10, 2, dtype=torch.float64))


def test_spherical_z_loss_equal_logits_are_finite() -> None:
    logits = torch.zeros(2, 4, requires_grad=True)
    value = SphericalZLoss(1.0, 1.0)(logits, torch.tensor([0, 1]))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()


def test_spherical_radius_logits_are_the_sigmoid_argument() -> None:
    loss = SphericalZLoss(2.0, 1.0, reduction="none")
    arg = loss.radius_logits(LOGITS, LABELS)
    torch.testing.assert_close(loss(LOGITS, LABELS), -F.logsigmoid(arg) / 2.0)


LDR = load_golden("ldr_kl.json")
LDR_LOGITS = t32(LDR["inputs"]["logits"])
LDR_LABELS = torch.tensor(LDR["inputs"]["labels"])


@pytest.mark.parametrize("name", [k for k in LDR["cases"] if k.startswith("LDRLoss")])
def test_ldr_faithful_matches_reference(name: str) -> None:
    case = LDR["cases"][name]
    logits = LDR_LOGITS.clone().requires_grad_(True)
    loss = LDRKLLoss(
        case["hyperparameters"]["threshold"], case["hyperparameters"]["Lambda"], faithful=True
    )
    value = loss(logits, LDR_LABELS)
    close(value, case["loss"])
    value.backward()
    close(logits.grad, case["grad_logits"])


def test_ldr_onehot_input_of_reference_matches_labels() -> None:
    onehot = torch.tensor(LDR["inputs"]["y_true_onehot"])
    torch.testing.assert_close(onehot.argmax(1), LDR_LABELS)


def test_ldr_paper_form_limits() -> None:
    logits = LDR_LOGITS.double()
    c = 0.1
    gaps = logits - logits.gather(1, LDR_LABELS[:, None]) + c * (1 - F.one_hot(LDR_LABELS, 5))
    big = ldr_kl_loss(logits, LDR_LABELS, c, 1e6, "none")
    torch.testing.assert_close(big, gaps.mean(1), atol=1e-5, rtol=1e-5)
    small = ldr_kl_loss(logits, LDR_LABELS, c, 1e-4, "none")
    torch.testing.assert_close(small, gaps.amax(1) - 1e-4 * math.log(5), atol=1e-6, rtol=1e-6)
    lam = 0.7
    by_hand = lam * torch.log(torch.exp(gaps / lam).mean(1))
    torch.testing.assert_close(ldr_kl_loss(logits, LDR_LABELS, c, lam, "none"), by_hand)


def test_ldr_is_the_kl_regularised_worst_case() -> None:
    logits = LDR_LOGITS.double()[:1]
    target = LDR_LABELS[:1]
    lam, c = 0.5, 0.1
    gaps = (logits - logits[0, target] + c * (1 - F.one_hot(target, 5)))[0]
    q = torch.softmax(gaps / lam, 0)
    kl = (q * torch.log(q * 5)).sum()
    torch.testing.assert_close(ldr_kl_loss(logits, target, c, lam), (q * gaps).sum() - lam * kl)


@pytest.mark.parametrize("name", [k for k in LDR["cases"] if k.startswith("ALDR")])
def test_aldr_faithful_matches_reference_over_calls(name: str) -> None:
    case = LDR["cases"][name]
    hp = case["hyperparameters"]
    loss = ALDRKLLoss(
        hp["N"], hp["Lambda"], hp["alpha"], hp["threshold"], faithful=True, softplus=hp["softplus"]
    )
    ids = torch.tensor(hp.get("ids", list(range(hp["N"]))))
    for call in case.get("calls", [case]):
        logits = LDR_LOGITS.clone().requires_grad_(True)
        value = loss(logits, LDR_LABELS, ids)
        close(value, call["loss"])
        value.backward()
        close(logits.grad, call["grad_logits"])
        close(loss.lam[ids], call["per_sample_lambda_after_call"])
        close(
            loss.components["lam_mean"], torch.tensor(call["per_sample_lambda_after_call"]).mean()
        )


def test_aldr_state_updates_only_in_training_mode() -> None:
    loss = ALDRKLLoss(4)
    ids = torch.arange(4)
    loss.eval()
    loss(LDR_LOGITS, LDR_LABELS, ids)
    torch.testing.assert_close(loss.lam, torch.full((4,), 10.0))
    loss.train()
    loss(LDR_LOGITS, LDR_LABELS, ids)
    assert torch.all(loss.lam < 10.0) and torch.all(loss.lam >= 5.0)


def test_aldr_lambda_update_by_hand() -> None:
    loss = ALDRKLLoss(1, lam0=2.0, alpha=3.0, margin=0.0).double()
    logits = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    target = torch.tensor([0])
    loss(logits, target, torch.tensor([0]))
    p = torch.tensor([1.0, 3.0], dtype=torch.float64) ** 0.5
    p = p / p.sum() + 1e-5
    p = p / p.sum()
    kl = float((p * torch.log(2 * p)).sum())
    assert float(loss.lam[0]) == pytest.approx(2.0 - 2.0 * kl / (3.0 * math.log(2)), rel=1e-12)


def test_gradcheck_float64() -> None:
    logits = LDR_LOGITS.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: ldr_kl_loss(x, LDR_LABELS, 0.1, 1.0), (logits,))
    assert torch.autograd.gradcheck(
        lambda x: ldr_kl_loss(x, LDR_LABELS, 0.1, 1.0, faithful=True), (logits,)
    )
    assert torch.autograd.gradcheck(lambda x: spherical_z_loss(x, LDR_LABELS, 1.0, 0.5), (logits,))
    aldr = ALDRKLLoss(4).double().eval()
    assert torch.autograd.gradcheck(lambda x: aldr(x, LDR_LABELS, torch.arange(4)), (logits,))


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="lam"):
        LDRKLLoss(lam=0.0)
    with pytest.raises(ValueError, match="alpha > 1"):
        ALDRKLLoss(4, alpha=1.0)
    with pytest.raises(ValueError, match="index"):
        ALDRKLLoss(4)(LDR_LOGITS, LDR_LABELS, torch.arange(3))
    with pytest.raises(ValueError, match="a must be positive"):
        SphericalZLoss(0.0, 1.0)
    with pytest.raises(ValueError, match="target"):
        SphericalZLoss(1.0, 1.0).radius_logits(LOGITS)
