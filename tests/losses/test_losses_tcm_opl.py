"""TCM, OPIS and OPL: embedding-space losses that couple the pairs of a batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import close, load_golden, t32

from stepguard.diagnostics import opis, opis_from_embeddings
from stepguard.losses import OPLLoss, TCMLoss
from stepguard.losses.functional import opl_loss, tcm_loss

TCM = load_golden("tcm.json")
OPL = load_golden("opl.json")


@pytest.mark.parametrize("name", list(TCM["cases"]))
def test_tcm_matches_reference(name: str) -> None:
    case = TCM["cases"][name]
    emb = t32(TCM["inputs"]["embeddings"]).requires_grad_(True)
    loss = TCMLoss(**case["hyperparameters"])
    value = loss(emb, torch.tensor(TCM["inputs"]["labels"]))
    close(value, case["loss"])
    value.backward()
    close(emb.grad, case["grad_embeddings"])


def test_tcm_counts_only_violating_pairs() -> None:
    emb = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 2])
    value, l_pos, l_neg = tcm_loss(emb, labels, 1.0, 1.0, 0.9, 0.5)
    torch.testing.assert_close(l_pos, torch.tensor(0.9 - 0.8))
    # negative pairs with s >= 0.5: (0,3) twice with s=1, (1,2)/(2,1) s=0.6, (1,3)/(3,1) s=0.8
    torch.testing.assert_close(l_neg, torch.tensor((2 * 0.5 + 2 * 0.1 + 2 * 0.3) / 6))
    torch.testing.assert_close(value, l_pos + l_neg)


def test_tcm_empty_sets_give_zero() -> None:
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    value, l_pos, l_neg = tcm_loss(emb, torch.tensor([0, 0, 1]))
    assert float(value) == 0.0 and float(l_pos) == 0.0 and float(l_neg) == 0.0


def test_opis_by_hand() -> None:
    sim = torch.tensor(
        [
            [1.0, 0.9, 0.2, 0.1],
            [0.9, 1.0, 0.6, 0.3],
            [0.2, 0.6, 1.0, 0.4],
            [0.1, 0.3, 0.4, 1.0],
        ]
    )
    labels = torch.tensor([0, 0, 1, 1])
    thresholds = torch.tensor([0.5])
    # class 0: positive (0,1) accepted -> TPR 1; negatives (0,2),(0,3),(1,2),(1,3): (1,2) accepted -> TNR 3/4
    # class 1: positive (2,3) rejected -> TPR 0 -> U = 0; overall: TPR 1/2, TNR 3/4
    u0 = 2 * 1.0 * 0.75 / 1.75
    u_all = 2 * 0.5 * 0.75 / 1.25
    expected = ((u0 - u_all) ** 2 + (0.0 - u_all) ** 2) / 2
    torch.testing.assert_close(opis(sim, labels, thresholds), torch.tensor(expected))


def test_opis_is_zero_when_classes_behave_identically() -> None:
    sim = torch.tensor(
        [
            [1.0, 0.8, 0.1, 0.1],
            [0.8, 1.0, 0.1, 0.1],
            [0.1, 0.1, 1.0, 0.8],
            [0.1, 0.1, 0.8, 1.0],
        ]
    )
    value = opis(sim, torch.tensor([0, 0, 1, 1]), torch.linspace(0.0, 1.0, 11))
    assert float(value) == 0.0


def test_opis_from_embeddings_runs_on_the_far_range() -> None:
    emb = t32(TCM["inputs"]["embeddings"])
    value = opis_from_embeddings(emb, torch.tensor(TCM["inputs"]["labels"]), (0.1, 0.9), 21)
    assert value.ndim == 0 and 0.0 <= float(value) <= 1.0
    with pytest.raises(ValueError, match="far_range"):
        opis_from_embeddings(emb, torch.tensor(TCM["inputs"]["labels"]), (0.5, 0.1))


OPL_BUILD = {
    "root_loss.py_gamma0.5_(README default)": lambda: OPLLoss(0.5, faithful=True),
    "root_loss.py_gamma2.0": lambda: OPLLoss(2.0, faithful=True),
    "cifar_losses.py_gamma2_(train.py default)": lambda: OPLLoss(2.0, "abs_elementwise"),
    "cifar_losses.py_gamma0.5": lambda: OPLLoss(0.5, "abs_elementwise"),
    "imagenet_custom_loss.py_(fixed 2.0)": lambda: OPLLoss(2.0, "abs_elementwise"),
    "edge_no_positive_pairs_root_gamma0.5": lambda: OPLLoss(0.5, faithful=True),
}


@pytest.mark.parametrize("name", list(OPL_BUILD))
def test_opl_matches_reference_variants(name: str) -> None:
    case = OPL["cases"][name]
    features = t32(case.get("features", OPL["inputs"]["features"])).requires_grad_(True)
    labels = torch.tensor(case.get("labels", OPL["inputs"]["labels"]))
    loss = OPL_BUILD[name]()
    value = loss(features, labels)
    close(value, case["loss"])
    if "pos_pairs_mean" in case:
        close(loss.components["positive_mean"], case["pos_pairs_mean"])
        close(loss.components["negative_mean"], case["neg_pairs_mean"])
    if "grad_features" in case:
        value.backward()
        close(features.grad, case["grad_features"])


def test_opl_paper_form_takes_the_absolute_mean() -> None:
    features = torch.tensor([[1.0, 0.0], [1.0, 0.1], [-1.0, 0.0], [-1.0, 0.1]])
    labels = torch.tensor([0, 0, 1, 1])
    paper, s, d = opl_loss(features, labels, 0.5, "abs_mean")
    signed, _, d_signed = opl_loss(features, labels, 0.5, "signed")
    torch.testing.assert_close(signed, (1 - s) + 0.5 * d_signed)
    assert float(d_signed) < 0
    torch.testing.assert_close(d, d_signed.abs())
    torch.testing.assert_close(paper, (1 - s) + 0.5 * d_signed.abs())
    unit = F.normalize(features, dim=1)
    torch.testing.assert_close(s, unit[0] @ unit[1], atol=1e-5, rtol=1e-5)


def test_opl_gradcheck_float64() -> None:
    features = t32(OPL["inputs"]["features"]).double().requires_grad_(True)
    labels = torch.tensor(OPL["inputs"]["labels"])
    for negatives in ("abs_mean", "signed", "abs_elementwise"):
        assert torch.autograd.gradcheck(
            lambda f, negatives=negatives: opl_loss(f, labels, 0.5, negatives)[0], (features,)
        )
    emb = t32(TCM["inputs"]["embeddings"]).double().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda e: tcm_loss(e, torch.tensor(TCM["inputs"]["labels"]))[0], (emb,)
    )


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="negatives"):
        OPLLoss(negatives="abs")
    with pytest.raises(ValueError, match="labels"):
        OPLLoss()(torch.randn(4, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        TCMLoss()(torch.randn(4), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="lambda"):
        TCMLoss(lambda_plus=-1.0)
