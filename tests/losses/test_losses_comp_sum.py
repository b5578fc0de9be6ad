"""Comp-sum Φ^τ and the robust CE family (GCE, MAE, RCE, SCE, NCE)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import close, load_golden, t32

from stepguard.losses import (
    AdvCompSumLoss,
    CompSumLoss,
    GCELoss,
    MAELoss,
    NCELoss,
    RCELoss,
    SCELoss,
)
from stepguard.losses.functional import comp_sum_loss, gce_loss, mae_loss, sce_loss

GOLDEN = load_golden("robust_ce_family_apl.json")
LOGITS = t32(GOLDEN["inputs"]["logits"])
LABELS = torch.tensor(GOLDEN["inputs"]["labels"])

BUILDERS = {
    "SCE_alpha0.1_beta1.0_(cifar10 config)": lambda f: SCELoss(0.1, 1.0, faithful=f),
    "SCE_alpha6.0_beta0.1_(cifar100 config)": lambda f: SCELoss(6.0, 0.1, faithful=f),
    "RCE_scale1": lambda f: RCELoss(faithful=f),
    "GCE_q0.7": lambda f: GCELoss(0.7, faithful=f),
    "MAE_scale1_(reduced form 1-p_y)": lambda f: MAELoss(faithful=True),
    "NCE_scale1": lambda f: NCELoss(),
}


@pytest.mark.parametrize("case", list(BUILDERS))
@pytest.mark.parametrize("faithful", [True, False])
def test_reference_values_and_gradients(case: str, faithful: bool) -> None:
    ref = GOLDEN["cases"][case]
    logits = LOGITS.clone().requires_grad_(True)
    loss = BUILDERS[case](faithful)(logits, LABELS)
    close(loss, ref["loss"])
    loss.backward()
    close(logits.grad, ref["grad_logits"])


def test_gce_of_the_ldr_reference_repository() -> None:
    ref = load_golden("ldr_kl.json")
    case = ref["cases"]["GCELoss_q0.7_k0_(LDR repo)"]
    logits = t32(ref["inputs"]["logits"]).requires_grad_(True)
    value = GCELoss(case["hyperparameters"]["q"])(logits, torch.tensor(ref["inputs"]["labels"]))
    close(value, case["loss"])
    value.backward()
    close(logits.grad, case["grad_logits"])


def _ce(logits: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, LABELS)


def test_special_values_of_tau() -> None:
    p_y = F.softmax(LOGITS.double(), 1).gather(1, LABELS[:, None]).squeeze(1)
    logits = LOGITS.double()
    torch.testing.assert_close(comp_sum_loss(logits, LABELS, 1.0), -p_y.log().mean())
    torch.testing.assert_close(comp_sum_loss(logits, LABELS, 0.0), (1 / p_y - 1).mean())
    torch.testing.assert_close(comp_sum_loss(logits, LABELS, 2.0), (1 - p_y).mean())
    torch.testing.assert_close(comp_sum_loss(logits, LABELS, 1.7), gce_loss(logits, LABELS, 0.7))
    torch.testing.assert_close(comp_sum_loss(logits, LABELS, 2.0), 0.5 * mae_loss(logits, LABELS))
    torch.testing.assert_close(
        comp_sum_loss(logits, LABELS, 2.0), mae_loss(logits, LABELS, faithful=True)
    )


def test_tau_zero_is_the_sum_exponential_loss() -> None:
    logits = LOGITS.double()
    h_y = logits.gather(1, LABELS[:, None])
    others = torch.exp(logits - h_y).sum(1) - 1.0
    torch.testing.assert_close(comp_sum_loss(logits, LABELS, 0.0, "none"), others)


def test_phi_tau_in_terms_of_u_matches_the_stable_form() -> None:
    logits = LOGITS.double()
    h_y = logits.gather(1, LABELS[:, None])
    u = torch.exp(logits - h_y).sum(1) - 1.0
    for tau in (0.3, 0.999, 1.5, 3.0):
        phi = ((1 + u) ** (1 - tau) - 1) / (1 - tau)
        torch.testing.assert_close(comp_sum_loss(logits, LABELS, tau, "none"), phi)


def test_continuity_across_tau_one() -> None:
    logits = LOGITS.double()
    at_one = comp_sum_loss(logits, LABELS, 1.0)
    for tau in (1 - 1e-5, 1 + 1e-5):
        assert abs(float(comp_sum_loss(logits, LABELS, tau)) - float(at_one)) < 1e-4


def test_large_tau_tends_to_zero_not_mae() -> None:
    assert float(comp_sum_loss(LOGITS, LABELS, 60.0)) < 0.02


def test_stable_form_survives_confident_wrong_predictions() -> None:
    logits = torch.tensor([[0.0, 200.0]])
    target = torch.tensor([0])
    assert math.isfinite(float(comp_sum_loss(logits, target, 1.5)))
    torch.testing.assert_close(comp_sum_loss(logits, target, 1.0), torch.tensor(200.0))


def test_rce_is_scaled_mae_and_sce_combines() -> None:
    logits = LOGITS.double()
    a = math.log(1e-4)
    p_y = F.softmax(logits, 1).gather(1, LABELS[:, None]).squeeze(1)
    torch.testing.assert_close(RCELoss()(logits, LABELS), (-a * (1 - p_y)).mean())
    expected = 6.0 * _ce(logits) + 0.1 * (-a * (1 - p_y)).mean()
    torch.testing.assert_close(sce_loss(logits, LABELS, 6.0, 0.1), expected)


def test_nce_is_between_zero_and_one() -> None:
    values = NCELoss(reduction="none")(LOGITS, LABELS)
    assert torch.all((values > 0) & (values < 1))


def test_sce_components() -> None:
    loss = SCELoss()
    loss(LOGITS, LABELS)
    assert set(loss.components) == {"ce", "rce"}
    close(loss.components["ce"], float(_ce(LOGITS)))


def test_adversarial_comp_sum_adds_the_logit_difference_norm() -> None:
    adv = LOGITS + torch.tensor([[3.0, 4.0, 0.0, 0.0, 0.0]])
    loss = AdvCompSumLoss(nu=0.5, tau=1.0)
    value = loss(LOGITS, adv, LABELS)
    torch.testing.assert_close(value, _ce(LOGITS) + 0.5 * 5.0)
    torch.testing.assert_close(loss.components["regularizer"], torch.tensor(5.0))
    torch.testing.assert_close(AdvCompSumLoss(nu=1.0)(LOGITS, LOGITS, LABELS), _ce(LOGITS))


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: comp_sum_loss(x, LABELS, 0.5),
        lambda x: comp_sum_loss(x, LABELS, 1.0),
        lambda x: comp_sum_loss(x, LABELS, 1.7),
        lambda x: mae_loss(x, LABELS),
        lambda x: sce_loss(x, LABELS),
        lambda x: NCELoss()(x, LABELS),
    ],
)
def test_gradcheck_float64(fn: object) -> None:
    logits = LOGITS.double().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (logits,))


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="tau"):
        CompSumLoss(tau=-1.0)
    with pytest.raises(ValueError, match="q"):
        GCELoss(q=0.0)
    with pytest.raises(ValueError, match="negative"):
        SCELoss(log_zero=1.0)
    with pytest.raises(ValueError, match=r"\(B, C\)"):
        CompSumLoss()(LOGITS[0], LABELS)
    with pytest.raises(TypeError, match="int64"):
        CompSumLoss()(LOGITS, LABELS.float())
    with pytest.raises(ValueError, match="target must have shape"):
        CompSumLoss()(LOGITS, LABELS[:2])
    with pytest.raises(ValueError, match="adv_logits"):
        AdvCompSumLoss(nu=1.0)(LOGITS, LOGITS[:2], LABELS)
