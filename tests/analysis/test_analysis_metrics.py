"""Negative flips and CLD scores against hand-computed values and the reference code's output."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from stepguard.analysis import cld_coreset, cld_ranking, cld_scores, negative_flip_rate
from stepguard.analysis.metrics import (
    class_incremental_correctness,
    evaluate_rows,
    flip_rate,
    negative_flips,
    relative_negative_flip_rate,
)

DATA = Path(__file__).parent / "data"
GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"


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


def test_class_incremental_flip_rates_match_the_reference_code() -> None:
    m = json.loads((GOLDEN / "mpt_negative_flip.json").read_text())["metrics"]
    old, new = torch.tensor(m["eval_old_logits"]), torch.tensor(m["eval_new_logits"])
    correct_old, correct_new = class_incremental_correctness(old, new, torch.tensor(m["eval_targets"]))
    assert negative_flip_rate(correct_old, correct_new) == pytest.approx(m["NFR"], rel=1e-6)
    assert relative_negative_flip_rate(correct_old, correct_new) == pytest.approx(m["relative_NFR"], rel=1e-6)


def test_class_incremental_correctness_by_hand_and_restriction() -> None:
    old = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 2.0]])  # two old classes
    new = torch.tensor([[0.0, 2.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 3.0], [0.0, 0.0, 3.0]])
    target = torch.tensor([0, 0, 1, 2])
    # sample 0 flips; sample 2 flips (old right, new predicts class 2); sample 3 is a new class
    assert negative_flip_rate(*class_incremental_correctness(old, new, target)) == pytest.approx(0.5)
    restricted = class_incremental_correctness(old, new, target, num_old=2)
    assert negative_flip_rate(*restricted) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="share N"):
        class_incremental_correctness(old, new, target[:3])


def test_relative_flip_rate_edge_cases() -> None:
    right = torch.tensor([True, True])
    # nothing is wrong afterwards: no flip is possible, the relative rate is 0
    assert relative_negative_flip_rate(right, right) == 0.0
    # one of two right before, both wrong after: NFR 1/2 over (1/2 · 1)
    assert relative_negative_flip_rate(torch.tensor([True, False]), ~right) == pytest.approx(1.0)
    none = torch.zeros(0, dtype=torch.bool)
    assert math.isnan(relative_negative_flip_rate(none, none))


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
    with pytest.raises(ValueError, match="coreset fraction"):
        cld_coreset({0: [0]}, 0.0)


def test_cld_needs_two_loss_differences() -> None:
    # with two checkpoints every series has one difference: its std is 0 and r says nothing
    train, val = torch.rand(2, 4), torch.rand(2, 3)
    labels, val_labels = torch.zeros(4, dtype=torch.long), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="3 or more checkpoints"):
        cld_scores(train, labels, val, val_labels)


def test_cld_scores_in_the_wrong_argument_order_are_refused() -> None:
    train, val = torch.rand(3, 4), torch.rand(3, 2)
    labels, val_labels = torch.zeros(4, dtype=torch.long), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="train_losses, train_labels, val_losses, val_labels"):
        cld_scores(train, val, labels, val_labels)  # type: ignore[arg-type]


def test_cld_scores_against_numpy_pearson() -> None:
    np = pytest.importorskip("numpy")
    inputs = json.loads((GOLDEN / "cld_scores.json").read_text())["inputs"]
    train, val = np.array(inputs["train_losses_E_by_N"]), np.array(inputs["val_losses_E_by_N"])
    labels, val_labels = np.array(inputs["train_labels"]), np.array(inputs["val_labels"])
    scores = cld_scores(torch.tensor(train), torch.tensor(labels), torch.tensor(val), torch.tensor(val_labels))
    for m in range(train.shape[1]):
        d_train = np.diff(train[:, m])
        d_val = np.diff(val[:, val_labels == labels[m]].mean(axis=1))
        expected = 0.0 if d_train.std() == 0 else np.corrcoef(d_train, d_val)[0, 1]
        assert float(scores[m]) == pytest.approx(expected, abs=1e-12)


def test_cld_ranking_breaks_ties_as_the_reference_code() -> None:
    scores = torch.tensor([0.5, 0.5, 0.9, 0.5], dtype=torch.float64)
    assert cld_ranking(scores, torch.tensor([0, 0, 0, 0])) == {0: [2, 3, 1, 0]}


def test_cld_coreset_rounds_up_per_class_or_takes_k() -> None:
    ranking = {0: [4, 0, 2, 1, 3], 1: [7, 5, 6]}
    # half of 5 is 2.5: three samples (round-half-even would give two)
    assert cld_coreset(ranking, 0.5) == sorted([4, 0, 2, 7, 5])
    assert cld_coreset(ranking, 0.01) == [4, 7]  # every class keeps at least one sample
    assert cld_coreset(ranking, per_class=4) == sorted([4, 0, 2, 1, 7, 5, 6])
    with pytest.raises(ValueError, match="exactly one"):
        cld_coreset(ranking)
    with pytest.raises(ValueError, match="exactly one"):
        cld_coreset(ranking, 0.5, per_class=1)
    with pytest.raises(ValueError, match="per_class"):
        cld_coreset(ranking, per_class=-1)


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
