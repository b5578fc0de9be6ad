"""Negative flips and CLD scores against hand-computed values and the reference code's output."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from stepguard.analysis import cld_coreset, cld_ranking, cld_scores, negative_flip_rate
from stepguard.analysis.metrics import evaluate_rows, flip_rate, negative_flips

DATA = Path(__file__).parent / "data"


def test_negative_flip_rate_by_hand() -> None:
    old = torch.tensor([True, True, False, False, True])
    new = torch.tensor([True, False, True, False, False])
    assert negative_flips(old, new).tolist() == [False, True, False, False, True]
    assert negative_flip_rate(old, new) == pytest.approx(2 / 5)
    assert negative_flip_rate(new, old) == pytest.approx(1 / 5)  # not symmetric
    assert math.isnan(negative_flip_rate(torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.bool)))
    with pytest.raises(ValueError, match="same rows"):
        negative_flips(old, new[:3])


def test_flip_rate_from_logits_multiclass_and_binary() -> None:
    y = torch.tensor([0, 1, 2, 1])
    before = evaluate_rows(torch.tensor([[3.0, 0, 0], [0, 3, 0], [0, 0, 3], [3, 0, 0]]), y)
    after = evaluate_rows(torch.tensor([[0.0, 3, 0], [0, 3, 0], [0, 0, 3], [0, 3, 0]]), y)
    assert before.correct.tolist() == [True, True, True, False]
    assert flip_rate(before, after) == (pytest.approx(0.25), 1)
    assert before.accuracy == pytest.approx(0.75)
    # one-logit head, targets 0/1: correct when (z > 0) == y
    yb = torch.tensor([1.0, 0.0, 1.0])
    b0 = evaluate_rows(torch.tensor([2.0, -1.0, 0.5]), yb)
    b1 = evaluate_rows(torch.tensor([-2.0, -1.0, 0.5]), yb)
    assert flip_rate(b0, b1) == (pytest.approx(1 / 3), 1)
    assert b0.loss[0].item() == pytest.approx(math.log1p(math.exp(-2.0)))


def test_flip_rate_matches_the_reference_metric_on_its_golden_data() -> None:
    golden = json.loads((DATA / "mpt_negative_flip_metrics.json").read_text())
    m = golden["metrics"]
    old = torch.tensor(m["eval_old_logits"])
    new = torch.tensor(m["eval_new_logits"])
    y = torch.tensor(m["eval_targets"])
    keep = y < old.shape[1]  # the reference evaluates on samples of the old classes only
    correct_old = old.argmax(1)[keep] == y[keep]
    correct_new = new.argmax(1)[keep] == y[keep]
    assert negative_flip_rate(correct_old, correct_new) == pytest.approx(m["NFR"])


def test_evaluate_rows_drops_masked_and_ignored_rows() -> None:
    logits = torch.tensor([[[2.0, 0.0], [0.0, 2.0]], [[2.0, 0.0], [2.0, 0.0]]])  # (N=2, T=2, K=2)
    targets = torch.tensor([[0, -100], [1, 0]])
    mask = torch.tensor([[True, True], [True, False]])
    ev = evaluate_rows(logits, targets, mask)
    assert ev.positions.tolist() == [0, 2]
    assert ev.correct.tolist() == [True, False]
    assert ev.loss[0].item() == pytest.approx(math.log1p(math.exp(-2.0)))


def _pearson(a: list[float], b: list[float]) -> float:
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    sa = math.sqrt(sum((x - ma) ** 2 for x in a) / n)
    sb = math.sqrt(sum((x - mb) ** 2 for x in b) / n)
    if sa == 0 or sb == 0:
        return 0.0
    return sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True)) / n / (sa * sb)


def test_cld_scores_by_hand() -> None:
    # 4 checkpoints, 3 training samples (classes 0, 0, 1), 3 validation samples (0, 1, 1)
    train = torch.tensor(
        [[3.0, 1.0, 2.0], [2.0, 1.5, 2.0], [1.5, 1.0, 1.0], [1.0, 2.0, 0.5]], dtype=torch.float64
    )
    val = torch.tensor(
        [[2.0, 4.0, 2.0], [1.0, 3.0, 1.0], [0.5, 2.0, 1.0], [0.4, 1.0, 0.0]], dtype=torch.float64
    )
    ty, vy = torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1])
    scores = cld_scores(train, ty, val, vy)
    d_val0 = [-1.0, -0.5, -0.1]  # class-0 mean validation loss 2, 1, .5, .4
    d_val1 = [-1.0, -0.5, -1.0]  # class-1 mean validation loss 3, 2, 1.5, .5
    expected = [
        _pearson([-1.0, -0.5, -0.5], d_val0),
        _pearson([0.5, -0.5, 1.0], d_val0),
        _pearson([0.0, -1.0, -0.5], d_val1),
    ]
    assert scores.tolist() == pytest.approx(expected, abs=1e-12)
    ranking = cld_ranking(scores, ty)
    assert ranking == {0: [0, 1] if expected[0] > expected[1] else [1, 0], 1: [2]}
    assert cld_coreset(ranking, 0.5) == sorted([ranking[0][0], 2])


def test_cld_zero_std_gives_zero_and_missing_class_gives_nan() -> None:
    train = torch.tensor([[1.0, 2.0], [1.0, 1.0], [1.0, 0.5]], dtype=torch.float64)
    val = torch.tensor([[2.0], [1.0], [0.5]], dtype=torch.float64)
    scores = cld_scores(train, torch.tensor([0, 1]), val, torch.tensor([0]))
    assert scores[0].item() == 0.0  # constant loss: zero std
    assert math.isnan(scores[1].item())  # class 1 has no validation sample
    assert cld_ranking(scores, torch.tensor([0, 1])) == {0: [0], 1: []}
    with pytest.raises(ValueError, match="2 or more checkpoints"):
        cld_scores(train[:1], torch.tensor([0, 1]), val[:1], torch.tensor([0]))
    with pytest.raises(ValueError, match="coreset fraction"):
        cld_coreset({0: [0]}, 0.0)


def test_cld_ranking_matches_the_reference_code_output() -> None:
    golden = json.loads((DATA / "cld_scores.json").read_text())
    inputs = golden["inputs"]
    scores = cld_scores(
        torch.tensor(inputs["train_losses_E_by_N"], dtype=torch.float64),
        torch.tensor(inputs["train_labels"]),
        torch.tensor(inputs["val_losses_E_by_N"], dtype=torch.float64),
        torch.tensor(inputs["val_labels"]),
    )
    ranking = cld_ranking(scores, torch.tensor(inputs["train_labels"]))
    expected = {int(c): v for c, v in golden["outputs"]["sorted_indices_per_class"].items()}
    assert ranking == expected
