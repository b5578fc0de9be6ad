"""Randomised properties (hypothesis) of a few losses whose invariants are exact."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stepguard.losses import DPOLoss, SymmetricCELoss
from stepguard.losses.functional import comp_sum_loss, hypersimplex_threshold, soft_binary_argmax

FLOATS = st.floats(min_value=-8.0, max_value=8.0, allow_nan=False, width=64)
SETTINGS = settings(max_examples=40, deadline=None, database=None)


@SETTINGS
@given(st.lists(FLOATS, min_size=12, max_size=12))
def test_symmetric_ce_sums_to_zero_over_labels(values: list[float]) -> None:
    logits = torch.tensor(values, dtype=torch.float64).reshape(3, 4)
    loss = SymmetricCELoss(allow_unbounded=True, reduction="none")
    total = sum(loss(logits, torch.full((3,), c)) for c in range(4))
    torch.testing.assert_close(total, torch.zeros(3, dtype=torch.float64))


@SETTINGS
@given(
    st.lists(FLOATS, min_size=6, max_size=6),
    st.integers(min_value=0, max_value=6),
    st.floats(0.05, 5.0),
)
def test_projection_is_feasible_and_satisfies_kkt(values: list[float], k: int, eps: float) -> None:
    theta = torch.tensor(values, dtype=torch.float64)
    mu = soft_binary_argmax(theta, k, eps)
    assert torch.all((mu >= 0) & (mu <= 1))
    assert abs(float(mu.sum()) - k) < 1e-9
    tau = hypersimplex_threshold(theta / eps, torch.tensor(float(k), dtype=torch.float64))
    torch.testing.assert_close(mu, (theta / eps - tau).clamp(0, 1))


@SETTINGS
@given(st.lists(FLOATS, min_size=10, max_size=10), st.floats(0.0, 3.0))
def test_comp_sum_is_monotone_in_the_target_probability(values: list[float], tau: float) -> None:
    logits = torch.tensor(values, dtype=torch.float64).reshape(2, 5)
    target = torch.tensor([0, 0])
    raised = logits.clone()
    raised[:, 0] += 0.5
    assert torch.all(
        comp_sum_loss(raised, target, tau, "none")
        <= comp_sum_loss(logits, target, tau, "none") + 1e-12
    )


@SETTINGS
@given(
    st.lists(st.floats(-50.0, 0.0), min_size=6, max_size=6),
    st.floats(-60.0, 0.0),
    st.floats(0.01, 2.0),
)
def test_dpo_with_equal_references_is_reference_free(
    values: list[float], ref: float, beta: float
) -> None:
    chosen = torch.tensor(values[:3], dtype=torch.float64)
    rejected = torch.tensor(values[3:], dtype=torch.float64)
    same = torch.full_like(chosen, ref)
    with_ref = DPOLoss(beta=beta, reduction="none")(chosen, rejected, same, same)
    free = DPOLoss(beta=beta, reference_free=True, reduction="none")(chosen, rejected)
    torch.testing.assert_close(with_ref, free)
