"""Soft-Binary-Argmax projections, their Jacobian and the hypersimplex losses."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import F64, close, load_golden, t64

from stepguard.losses import HypersimplexBinaryLoss, HypersimplexMulticlassLoss
from stepguard.losses.functional import (
    hypersimplex_k,
    hypersimplex_threshold,
    soft_binary_argmax,
    soft_binary_argmax_jacobian,
)

GOLDEN = load_golden("hypersimplex_soft_binary_argmax.json")
LABELS = torch.tensor(GOLDEN["inputs"]["labels"])
PROJECTIONS = [k for k in GOLDEN["cases"] if k.startswith("soft_binary_argmax")]


@pytest.mark.parametrize("name", PROJECTIONS)
def test_projection_and_jacobian_match_reference(name: str) -> None:
    case = GOLDEN["cases"][name]
    theta = t64(case["input"])
    mu = soft_binary_argmax(theta, case["k"], case["regularization_strength"])
    close(mu, case["output"], F64)
    close(mu.sum(1), case["row_sums"], F64)
    jac = soft_binary_argmax_jacobian(mu[0], case["regularization_strength"])
    close(jac, case["jacobian_row0"], F64)
    autograd_jac = torch.autograd.functional.jacobian(
        lambda row: soft_binary_argmax(row, case["k"], case["regularization_strength"]), theta[0]
    )
    close(autograd_jac, case["jacobian_row0"], F64)


def _brute_force_projection(s: torch.Tensor, k: int) -> torch.Tensor:
    """Projection by enumerating which coordinates sit at 0, at 1 or in between (KKT)."""
    n = s.numel()
    best, best_dist = None, float("inf")
    for states in itertools.product((0, 1, 2), repeat=n):
        free = [i for i in range(n) if states[i] == 2]
        ones = sum(1 for st in states if st == 1)
        mu = torch.tensor([float(st == 1) for st in states], dtype=s.dtype)
        if free:
            tau = (s[free].sum() + ones - k) / len(free)
            mu[free] = s[free] - tau
        elif ones != k:
            continue
        if mu.sum().sub(k).abs() > 1e-9 or (mu < -1e-12).any() or (mu > 1 + 1e-12).any():
            continue
        dist = float(((mu - s) ** 2).sum())
        if dist < best_dist:
            best, best_dist = mu, dist
    assert best is not None
    return best


def test_projection_agrees_with_brute_force_enumeration() -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(10):
        s = torch.randn(5, generator=generator, dtype=torch.float64) * 2
        for k in (1, 2, 3):
            close(soft_binary_argmax(s, k), _brute_force_projection(s, k), F64)


def test_k_one_is_sparsemax() -> None:
    s = torch.tensor([0.3, 1.2, -0.5, 1.0], dtype=torch.float64)
    # sparsemax by hand: support {1, 3, 0}? tau from sorted 1.2, 1.0, 0.3 -> (2.5 - 1)/3 = 0.5 > 0.3
    # so support {1, 3}: tau = (2.2 - 1)/2 = 0.6
    close(soft_binary_argmax(s, 1), [0.0, 0.6, 0.0, 0.4], F64)


def test_small_epsilon_gives_the_hard_top_k() -> None:
    s = torch.tensor([0.3, 1.2, -0.5, 1.0, 0.9], dtype=torch.float64)
    close(soft_binary_argmax(s, 2, 1e-3), [0.0, 1.0, 0.0, 1.0, 0.0], F64)


def test_threshold_handles_batches_and_tensor_k() -> None:
    s = torch.randn(3, 6, dtype=torch.float64)
    k = torch.tensor([1.0, 2.5, 4.0], dtype=torch.float64)
    tau = hypersimplex_threshold(s, k)
    torch.testing.assert_close((s - tau[:, None]).clamp(0, 1).sum(1), k)


@pytest.mark.parametrize(
    "name", ["multiclass_hypersimplex_loss_eps1.5", "multiclass_hypersimplex_loss_eps1.0"]
)
def test_multiclass_loss_matches_reference(name: str) -> None:
    case = GOLDEN["cases"][name]
    eps = float(name.rsplit("eps", 1)[1])
    logits = t64(case["logits"]).requires_grad_(True)
    loss = HypersimplexMulticlassLoss(eps)
    value = loss(logits, LABELS)
    close(value, case["loss"], F64)
    value.backward()
    close(logits.grad, case["grad_logits"], F64)
    assert case["basis_k"] == hypersimplex_k(4, 0.5)


def test_binary_objective_matches_reference_in_faithful_mode() -> None:
    case = GOLDEN["cases"]["binary_lightgbm_objective"]
    scores = t64(case["raw_scores"]).requires_grad_(True)
    labels = t64(case["labels"])
    HypersimplexBinaryLoss(regularization_strength=0.01, faithful=True)(scores, labels).backward()
    close(scores.grad, case["grad"], F64)
    assert case["hess"] == [1.0] * 8


def test_truncation_pitfall() -> None:
    case = GOLDEN["cases"]["pitfall_int_truncation"]
    assert (
        hypersimplex_k(case["n"], case["positives"] / case["n"], faithful=True)
        == case["int_n_times_p"]
    )
    assert hypersimplex_k(case["n"], case["positives"] / case["n"]) == case["positives"]
    labels = torch.zeros(case["n"], dtype=torch.float64)
    labels[: case["positives"]] = 1
    scores = torch.linspace(1, -1, case["n"], dtype=torch.float64)
    for faithful, expected in ((True, case["int_n_times_p"]), (False, case["positives"])):
        loss = HypersimplexBinaryLoss(1.0, faithful=faithful)
        loss(scores, labels)
        assert float(loss.components["projection_mean"]) * case["n"] == pytest.approx(expected)


def test_gradcheck_away_from_kinks() -> None:
    theta = torch.tensor(
        [[0.3, 1.2, -0.5, 1.0, 0.9], [2.0, -1.0, 0.1, 0.4, -0.2]], dtype=torch.float64
    )
    theta.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: soft_binary_argmax(t, 2, 1.0), (theta,))
    logits = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    logits.requires_grad_(True)
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    assert torch.autograd.gradcheck(lambda x: HypersimplexMulticlassLoss(1.5)(x, target), (logits,))


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="regularization_strength"):
        soft_binary_argmax(torch.randn(3), 1, 0.0)
    with pytest.raises(ValueError, match="fraction"):
        hypersimplex_k(4, 1.5)
    with pytest.raises(ValueError, match=r"\(n,\)"):
        HypersimplexBinaryLoss()(torch.randn(4), torch.ones(3))
