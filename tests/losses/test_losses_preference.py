"""DPO / cDPO / IPO / SimPO against closed-form values computed independently here."""

from __future__ import annotations

import math

import pytest
import torch

from stepguard.diagnostics import entanglement_ratios
from stepguard.losses import DPOLoss, IPOLoss, SimPOLoss, get
from stepguard.losses.functional import dpo_loss, ipo_loss, sequence_log_probs, simpo_loss

# Four pairs of summed log-probs: policy chosen/rejected, reference chosen/rejected.
PC = torch.tensor([-12.0, -30.5, -8.25, -50.0], dtype=torch.float64)
PR = torch.tensor([-14.0, -29.0, -9.0, -61.0], dtype=torch.float64)
RC = torch.tensor([-13.0, -31.0, -8.0, -52.0], dtype=torch.float64)
RR = torch.tensor([-13.5, -30.0, -9.5, -58.0], dtype=torch.float64)
H = [
    (pc - pr) - (rc - rr)
    for pc, pr, rc, rr in zip(PC.tolist(), PR.tolist(), RC.tolist(), RR.tolist(), strict=True)
]


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_dpo_per_pair_values(beta: float, eps: float) -> None:
    expected = [-(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h) for h in H]
    loss = DPOLoss(beta=beta, label_smoothing=eps, reduction="none")
    torch.testing.assert_close(loss(PC, PR, RC, RR), torch.tensor(expected, dtype=torch.float64))
    mean = DPOLoss(beta=beta, label_smoothing=eps)(PC, PR, RC, RR)
    torch.testing.assert_close(mean, torch.tensor(sum(expected) / 4, dtype=torch.float64))


def test_dpo_gradient_in_closed_form() -> None:
    beta, eps = 0.5, 0.1
    pc, pr = PC.clone().requires_grad_(True), PR.clone().requires_grad_(True)
    dpo_loss(pc, pr, RC, RR, beta, eps, reduction="sum")[0].backward()
    sig = [1 / (1 + math.exp(-beta * h)) for h in H]
    d_margin = [-(1 - eps) * beta * (1 - s) + eps * beta * s for s in sig]
    torch.testing.assert_close(pc.grad, torch.tensor(d_margin, dtype=torch.float64))
    torch.testing.assert_close(pr.grad, -torch.tensor(d_margin, dtype=torch.float64))


def test_dpo_rewards_and_components() -> None:
    loss = DPOLoss(beta=0.1)
    loss(PC, PR, RC, RR)
    chosen = 0.1 * (PC - RC)
    rejected = 0.1 * (PR - RR)
    torch.testing.assert_close(loss.components["chosen_reward"], chosen.mean())
    torch.testing.assert_close(loss.components["rejected_reward"], rejected.mean())
    torch.testing.assert_close(loss.components["reward_margin"], (chosen - rejected).mean())
    torch.testing.assert_close(
        loss.components["reward_accuracy"], (chosen > rejected).double().mean()
    )
    _, c, r = dpo_loss(PC, PR, RC, RR, beta=0.1)
    torch.testing.assert_close(c, chosen)
    torch.testing.assert_close(r, rejected)
    assert not c.requires_grad


def test_dpo_with_equal_references_is_reference_free() -> None:
    ref = torch.full_like(PC, -20.0)
    with_ref = DPOLoss(beta=0.3, reduction="none")(PC, PR, ref, ref)
    free = DPOLoss(beta=0.3, reference_free=True, reduction="none")(PC, PR)
    torch.testing.assert_close(with_ref, free)
    expected = [
        -_log_sigmoid(0.3 * (pc - pr)) for pc, pr in zip(PC.tolist(), PR.tolist(), strict=True)
    ]
    torch.testing.assert_close(free, torch.tensor(expected, dtype=torch.float64))


def test_zero_label_smoothing_is_plain_dpo() -> None:
    plain = -torch.nn.functional.logsigmoid(0.1 * torch.tensor(H, dtype=torch.float64))
    torch.testing.assert_close(
        DPOLoss(beta=0.1, label_smoothing=0.0, reduction="none")(PC, PR, RC, RR), plain
    )


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_ipo_per_pair_values_and_gradient(beta: float) -> None:
    expected = [(h - 1 / (2 * beta)) ** 2 for h in H]
    pc = PC.clone().requires_grad_(True)
    value = IPOLoss(beta=beta, reduction="none")(pc, PR, RC, RR)
    torch.testing.assert_close(value, torch.tensor(expected, dtype=torch.float64))
    value.sum().backward()
    torch.testing.assert_close(
        pc.grad, torch.tensor([2 * (h - 1 / (2 * beta)) for h in H], dtype=torch.float64)
    )
    torch.testing.assert_close(
        ipo_loss(PC, PR, RC, RR, beta)[0], torch.tensor(sum(expected) / 4, dtype=torch.float64)
    )


AVG_C = torch.tensor([-0.8, -1.25, -0.4, -2.0], dtype=torch.float64)
AVG_R = torch.tensor([-1.1, -1.0, -0.9, -2.1], dtype=torch.float64)


@pytest.mark.parametrize(("beta", "ratio"), [(2.0, 0.25), (2.5, 0.55), (10.0, 0.3)])
def test_simpo_per_pair_values(beta: float, ratio: float) -> None:
    margins = [beta * (c - r - ratio) for c, r in zip(AVG_C.tolist(), AVG_R.tolist(), strict=True)]
    expected = torch.tensor([-_log_sigmoid(m) for m in margins], dtype=torch.float64)
    loss = SimPOLoss(beta=beta, gamma_beta_ratio=ratio, reduction="none")
    torch.testing.assert_close(loss(AVG_C, AVG_R), expected)
    hinge = simpo_loss(AVG_C, AVG_R, beta, ratio, loss_type="hinge", reduction="none")[0]
    torch.testing.assert_close(
        hinge, torch.tensor([max(0.0, 1 - m) for m in margins], dtype=torch.float64)
    )
    torch.testing.assert_close(
        loss.radius_logits((AVG_C, AVG_R)), torch.tensor(margins, dtype=torch.float64)
    )
    torch.testing.assert_close(loss.components["chosen_reward"], (beta * AVG_C).mean())


def test_simpo_sft_term_adds_the_average_chosen_nll() -> None:
    plain = SimPOLoss()(AVG_C, AVG_R)
    with_sft = SimPOLoss(sft_weight=0.3)
    torch.testing.assert_close(with_sft(AVG_C, AVG_R), plain + 0.3 * (-AVG_C).mean())
    torch.testing.assert_close(with_sft.components["sft"], (-AVG_C).mean())


def test_dpo_radius_logits_are_the_sigmoid_argument() -> None:
    loss = DPOLoss(beta=0.2, reduction="none")
    logits = loss.radius_logits((PC, PR, RC, RR))
    torch.testing.assert_close(loss(PC, PR, RC, RR), -torch.nn.functional.logsigmoid(logits))
    free = DPOLoss(beta=0.2, reference_free=True)
    torch.testing.assert_close(free.radius_logits((PC, PR)), 0.2 * (PC - PR))


def test_registry_builds_preference_losses_with_their_hyperparameters() -> None:
    dpo = get("dpo", beta=0.5, label_smoothing=0.1, reference_free=True)
    assert (dpo.beta, dpo.label_smoothing, dpo.reference_free) == (0.5, 0.1, True)
    assert get("ipo", beta=1.0).beta == 1.0
    simpo = get("simpo", beta=2.5, gamma_beta_ratio=0.55)
    assert (simpo.beta, simpo.gamma_beta_ratio) == (2.5, 0.55)
    assert get("dpo", reduction="none")(PC, PR, RC, RR).shape == (4,)


def test_sequence_log_probs_by_hand() -> None:
    logits = torch.zeros(1, 4, 3)
    logits[0, 0, 2] = math.log(2.0)
    logits[0, 1, 1] = math.log(3.0)
    labels = torch.tensor([[-100, 2, 1, -100]])
    summed = sequence_log_probs(logits, labels)
    expected = math.log(2 / 4) + math.log(3 / 5)
    assert float(summed) == pytest.approx(expected, rel=1e-6)
    assert float(sequence_log_probs(logits, labels, average=True)) == pytest.approx(
        expected / 2, rel=1e-6
    )


def test_entanglement_ratios_by_hand() -> None:
    g_w = torch.tensor([1.0, 0.0])
    g_l = torch.tensor([0.6, 0.8])
    out = entanglement_ratios(g_w, g_l)
    assert float(out["inner"]) == pytest.approx(0.6)
    assert float(out["cosine"]) == pytest.approx(0.6)
    assert float(out["chosen_ratio"]) == pytest.approx(0.6)
    assert float(out["rejected_ratio"]) == pytest.approx(0.6)
    skewed = entanglement_ratios(g_w, 3 * g_l, d_chosen=2.0, d_rejected=1.0)
    assert float(skewed["chosen_ratio"]) == pytest.approx(1.8 / 2.0)
    assert float(skewed["rejected_ratio"]) == pytest.approx(1.8 / (9.0 / 2.0))


def test_gradcheck_float64() -> None:
    pc, pr = PC.clone().requires_grad_(True), PR.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: dpo_loss(a, b, RC, RR, 0.1, 0.1)[0], (pc, pr))
    assert torch.autograd.gradcheck(lambda a, b: ipo_loss(a, b, RC, RR, 0.5)[0], (pc, pr))
    c, r = AVG_C.clone().requires_grad_(True), AVG_R.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: simpo_loss(a, b)[0], (c, r))


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="reference_chosen_logps"):
        DPOLoss()(PC, PR)
    with pytest.raises(ValueError, match="shape"):
        DPOLoss()(PC, PR[:2], RC, RR)
    with pytest.raises(ValueError, match="beta"):
        DPOLoss(beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        DPOLoss(label_smoothing=0.7)
    with pytest.raises(ValueError, match="loss_type"):
        SimPOLoss(loss_type="ipo")
    with pytest.raises(ValueError, match=r"\(B,\)"):
        SimPOLoss()(AVG_C[None], AVG_R[None])
    with pytest.raises(NotImplementedError, match="IPOLoss"):
        IPOLoss().radius_logits((PC, PR, RC, RR))
