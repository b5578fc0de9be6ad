"""ArcFace / CosFace / ElasticFace(+) against the official ElasticFace outputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import close, load_golden, t32

from stepguard.losses import (
    ArcFaceLoss,
    CosFaceLoss,
    ElasticArcFaceLoss,
    ElasticArcFacePlusLoss,
    ElasticCosFaceLoss,
    ElasticCosFacePlusLoss,
)
from stepguard.losses.functional import (
    arc_margin_logits,
    cos_margin_logits,
    cosine_logits,
    plus_margins,
)

GOLDEN = load_golden("elasticface.json")
EMB = t32(GOLDEN["inputs"]["embeddings"])
LABELS = torch.tensor(GOLDEN["inputs"]["labels"])

CLASSES = {
    "ArcFace": ArcFaceLoss,
    "CosFace": CosFaceLoss,
    "ElasticArcFace": ElasticArcFaceLoss,
    "ElasticArcFacePlus": ElasticArcFacePlusLoss,
    "ElasticCosFace": ElasticCosFaceLoss,
    "ElasticCosFacePlus": ElasticCosFacePlusLoss,
    "ElasticArcFace_std0_equals_ArcFace": ElasticArcFaceLoss,
}


def _head(case: str, faithful: bool) -> torch.nn.Module:
    hp = dict(GOLDEN["cases"][case]["hyperparameters"])
    hp.pop("plus", None)
    cls = CLASSES[case]
    kwargs = {"s": hp["s"], "m": hp["m"]}
    if "std" in hp:
        kwargs["std"] = hp["std"]
    if faithful and cls not in (CosFaceLoss, ElasticCosFaceLoss):
        kwargs["faithful"] = True
    head = cls(8, 5, **kwargs)
    with torch.no_grad():
        head.weight.copy_(t32(GOLDEN["cases"][case]["kernel_in_by_out"]))
    return head


@pytest.mark.parametrize("case", list(CLASSES))
@pytest.mark.parametrize("faithful", [True, False])
def test_logits_loss_and_gradient_match_official(case: str, faithful: bool) -> None:
    ref = GOLDEN["cases"][case]
    head = _head(case, faithful)
    emb = EMB.clone().requires_grad_(True)
    seed = ref["rng_seed_before_forward"]
    if seed is not None:
        torch.manual_seed(seed)
    logits = head.logits(emb, LABELS)
    if ref["sampled_margins_raw"] is not None:
        torch.manual_seed(seed)
        draws = torch.normal(
            ref["hyperparameters"]["m"], ref["hyperparameters"]["std"], size=(4, 1)
        )
        close(draws, ref["sampled_margins_raw"])
    close(cosine_logits(EMB, head.weight), ref["cos_theta"])
    close(logits, ref["output_logits"])
    loss = F.cross_entropy(logits, LABELS)
    close(loss, ref["ce_loss_mean"])
    loss.backward()
    close(emb.grad, ref["grad_ce_wrt_embeddings"])


def test_forward_is_the_mean_cross_entropy_of_the_logits() -> None:
    head = _head("ArcFace", faithful=False)
    close(head(EMB, LABELS), GOLDEN["cases"]["ArcFace"]["ce_loss_mean"])
    assert set(head.components) == {"cross_entropy", "target_logit", "margin"}


def test_explicit_generator_reproduces_the_seeded_draw() -> None:
    ref = GOLDEN["cases"]["ElasticArcFace"]
    head = _head("ElasticArcFace", faithful=False)
    head.generator = torch.Generator().manual_seed(ref["rng_seed_before_forward"])
    close(head.logits(EMB, LABELS), ref["output_logits"])
    close(head.last_margins, ref["sampled_margins_raw"])


@pytest.mark.parametrize("case", ["ElasticArcFacePlus", "ElasticCosFacePlus"])
def test_plus_assignment_recorded_in_golden(case: str) -> None:
    detail = GOLDEN["cases"][case]["plus_detail"]
    draws = t32(GOLDEN["cases"][case]["sampled_margins_raw"])
    target_cos = t32(detail["target_cos"])
    close(
        plus_margins(draws, target_cos, assignment="official"),
        detail["margin_assigned_by_official_code"],
    )
    close(
        plus_margins(draws, target_cos, assignment="rank"),
        detail["margin_assigned_if_rank_matched"],
    )


def test_plus_permutation_demo_official_rule_differs_from_rank_rule() -> None:
    demo = GOLDEN["plus_permutation_demo"]
    emb = t32(demo["embeddings"])
    labels = torch.tensor(demo["labels"])
    torch.manual_seed(demo["rng_seed_before_forward"])
    draws = torch.normal(demo["m"], demo["std"], size=(6, 1))
    close(torch.sort(draws.reshape(-1)).values, demo["margins_sorted_asc"])
    target_cos = t32(demo["target_cos"])
    close(plus_margins(draws, target_cos, assignment="official"), demo["official_rule_prediction"])
    close(plus_margins(draws, target_cos, assignment="rank"), demo["rank_matched_prediction"])

    head = ElasticArcFacePlusLoss(8, 5, s=demo["s"], m=demo["m"], std=demo["std"], faithful=True)
    with torch.no_grad():
        head.weight.copy_(t32(GOLDEN["cases"]["ArcFace"]["kernel_in_by_out"]))
    close(head.logits(emb, labels, margins=draws), demo["output_logits"])
    rank_head = ElasticArcFacePlusLoss(8, 5, s=demo["s"], m=demo["m"], std=demo["std"])
    rank_head.load_state_dict(head.state_dict())
    assert not torch.allclose(
        rank_head.logits(emb, labels, margins=draws), t32(demo["output_logits"])
    )


def test_rank_assignment_gives_larger_margins_to_smaller_cosines() -> None:
    cos = torch.tensor([0.9, -0.3, 0.1, 0.5])
    margins = torch.tensor([0.4, 0.7, 0.5, 0.6])
    assigned = plus_margins(margins, cos, assignment="rank")
    order = torch.argsort(cos, descending=True)
    assert torch.all(torch.diff(assigned[order]) >= 0)
    torch.testing.assert_close(torch.sort(assigned).values, torch.sort(margins).values)


def test_ignored_label_gets_no_margin() -> None:
    edge = GOLDEN["edge_cases_ignore_label_minus1"]
    labels = torch.tensor(edge["ArcFace"]["labels"])
    for faithful in (True, False):
        head = _head("ArcFace", faithful)
        close(head.logits(EMB, labels), edge["ArcFace"]["output_logits"])
        loss = head(EMB, labels)
        expected = F.cross_entropy(head.logits(EMB, labels)[[0, 2, 3]], labels[[0, 2, 3]])
        torch.testing.assert_close(loss, expected)


def test_plus_with_ignored_label_works_by_rank_and_refuses_the_official_rule() -> None:
    assert GOLDEN["edge_cases_ignore_label_minus1"]["ElasticArcFacePlus"]["error"].startswith(
        "IndexError"
    )
    labels = torch.tensor(GOLDEN["edge_cases_ignore_label_minus1"]["ArcFace"]["labels"])
    head = ElasticArcFacePlusLoss(8, 5, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(head(EMB, labels))
    assert head.last_margins[1] == 0
    official = ElasticArcFacePlusLoss(8, 5, faithful=True)
    with pytest.raises(ValueError, match="ignored labels"):
        official(EMB, labels)


def test_cos_equal_one_gives_nan_only_in_faithful_mode() -> None:
    edge = GOLDEN["edge_case_cos_equals_1"]
    assert edge["grad_embeddings_has_nan"]
    torch.manual_seed(1)
    for faithful, expect_nan in ((True, True), (False, False)):
        head = ArcFaceLoss(4, 3, faithful=faithful)
        with torch.no_grad():
            head.weight.copy_(torch.randn(4, 3))
        emb = (3 * head.weight[:, 0].detach()).repeat(2, 1).requires_grad_(True)
        head(emb, torch.tensor([0, 1])).backward()
        assert bool(torch.isnan(emb.grad).any()) is expect_nan
        assert bool(torch.isnan(head.weight.grad).any()) is expect_nan


def test_margin_formula_matches_angle_addition_in_float64() -> None:
    cos = torch.tensor([[0.3, -0.999, 0.9999999]], dtype=torch.float64).repeat(3, 1)
    target = torch.tensor([0, 1, 2])
    logits = arc_margin_logits(cos, target, 0.5, 2.0)
    theta = torch.acos(cos[torch.arange(3), target])
    torch.testing.assert_close(logits[torch.arange(3), target], 2.0 * torch.cos(theta + 0.5))
    torch.testing.assert_close(logits[0, 1:], 2.0 * cos[0, 1:])


def test_insightface_fallback_only_changes_angles_beyond_pi_minus_m() -> None:
    m = 0.5
    cos = torch.tensor([[math.cos(math.pi - m) - 0.01, 0.2], [0.1, 0.2]], dtype=torch.float64)
    target = torch.tensor([0, 0])
    plain = arc_margin_logits(cos, target, m, 1.0)
    fallback = arc_margin_logits(cos, target, m, 1.0, fallback="insightface")
    torch.testing.assert_close(fallback[0, 0], cos[0, 0] - math.sin(math.pi - m) * m)
    torch.testing.assert_close(fallback[1], plain[1])


def test_zero_std_elastic_equals_arcface() -> None:
    elastic = _head("ElasticArcFace_std0_equals_ArcFace", faithful=False)
    arc = _head("ArcFace", faithful=False)
    torch.testing.assert_close(elastic(EMB, LABELS), arc(EMB, LABELS))


@pytest.mark.parametrize("kind", ["arc", "cos"])
def test_gradcheck_float64(kind: str) -> None:
    labels = torch.tensor([0, 1, 2])

    def loss(emb: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        cos = cosine_logits(emb, weight)
        if kind == "arc":
            logits = arc_margin_logits(cos, labels, 0.5, 4.0)
        else:
            logits = cos_margin_logits(cos, labels, 0.35, 4.0)
        return F.cross_entropy(logits, labels)

    emb = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(loss, (emb, weight))


def test_radius_logits_use_the_mean_margin() -> None:
    head = _head("ElasticArcFace", faithful=False)
    arc = _head("ArcFace", faithful=False)
    torch.testing.assert_close(head.radius_logits(EMB, LABELS), arc.logits(EMB, LABELS))
    torch.testing.assert_close(head.radius_logits(EMB), 64.0 * cosine_logits(EMB, head.weight))


def test_bad_inputs_are_refused() -> None:
    head = ArcFaceLoss(8, 5)
    with pytest.raises(ValueError, match=r"\(B, 8\)"):
        head(torch.randn(4, 7), LABELS)
    with pytest.raises(TypeError, match="int64"):
        head(EMB, LABELS.float())
    with pytest.raises(ValueError, match="shape"):
        head(EMB, LABELS[:3])
    with pytest.raises(ValueError, match="plus_assignment"):
        ElasticArcFacePlusLoss(8, 5, plus_assignment="sorted")
    with pytest.raises(ValueError, match="fallback"):
        ArcFaceLoss(8, 5, fallback="easy")
