"""NLM cosine (logit space) and update/parameter cosine (parameter space)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from stepguard.diagnostics import nlm_cosine, update_param_cosine


def test_pure_rescaling_gives_plus_or_minus_one():
    z = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, 1.0]])
    assert nlm_cosine(z, 0.7 * z).item() == pytest.approx(1.0, abs=1e-6)
    assert nlm_cosine(z, -2.0 * z).item() == pytest.approx(-1.0, abs=1e-6)


def test_rescaling_plus_a_per_row_shift_is_still_pure_rescaling():
    z = torch.tensor([[5.0, 6.0, 4.0], [1.0, 0.0, -2.0]], dtype=torch.float64)
    shift = torch.tensor([[30.0], [-7.0]], dtype=torch.float64)
    a = 0.5 * z + shift
    assert nlm_cosine(z, a).item() == pytest.approx(1.0, abs=1e-12)
    # The uncentred cosine would not see it as rescaling.
    assert F.cosine_similarity(z, a, dim=-1).max().item() < 0.99


def test_shift_only_change_has_zero_cosine():
    z = torch.tensor([[5.0, 6.0], [1.0, -3.0]])
    a = torch.tensor([[1.0, 1.0], [-4.0, -4.0]])
    assert nlm_cosine(z, a).item() == 0.0
    # Uncentred, the first row would read ≈ 0.996.
    assert F.cosine_similarity(z[:1], a[:1]).item() == pytest.approx(11 / math.sqrt(122), rel=1e-6)


def test_hand_derived_cosine():
    # z̄ = [2, -1, -1]/3 and ā = [-1, 2, -1]/3: ⟨z̄, ā⟩ = -3/9, ‖z̄‖² = ‖ā‖² = 6/9 → -1/2.
    z = torch.tensor([[1.0, 0.0, 0.0]])
    a = torch.tensor([[0.0, 1.0, 0.0]])
    assert nlm_cosine(z, a).item() == pytest.approx(-0.5, abs=1e-7)


def test_rows_are_averaged_over_the_counted_rows_only():
    z = torch.tensor([[1.0, 0.0, 0.0], [2.0, -1.0, 0.5], [3.0, 3.0, 3.0], [1.0, 2.0, 3.0]])
    a = torch.tensor([[0.0, 1.0, 0.0], [4.0, -2.0, 1.0], [1.0, -1.0, 0.0], [math.nan] * 3])
    # Per row: -1/2, 1, 0 (equal logits have no scale to change), and a masked NaN row.
    mask = torch.tensor([True, True, True, False])
    assert nlm_cosine(z, a, mask).item() == pytest.approx(1 / 6, abs=1e-7)
    assert math.isnan(nlm_cosine(z, a, torch.zeros(4, dtype=torch.bool)).item())


def test_sequence_shape_with_mask():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64)
    a = 3.0 * z
    a[1, 2] = torch.randn(5, generator=gen, dtype=torch.float64)
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 2] = False
    assert nlm_cosine(z, a, mask).item() == pytest.approx(1.0, abs=1e-12)
    assert nlm_cosine(z, a).item() < 0.99
    with pytest.raises(ValueError, match="velocity"):
        nlm_cosine(z, a[:, :2])


# Multiples of 1/8 keep the shifted logits exact, so the invariance is not blurred by rounding.
finite = st.integers(-400, 400).map(lambda k: k / 8)


@settings(max_examples=60, deadline=None)
@given(
    z=st.lists(finite, min_size=12, max_size=12),
    a=st.lists(finite, min_size=12, max_size=12),
    shifts=st.lists(finite, min_size=6, max_size=6),
    scale=st.floats(0.01, 100),
)
def test_invariances(z, a, shifts, scale):
    z = torch.tensor(z, dtype=torch.float64).reshape(3, 4)
    a = torch.tensor(a, dtype=torch.float64).reshape(3, 4)
    shift_z = torch.tensor(shifts[:3], dtype=torch.float64)[:, None]
    shift_a = torch.tensor(shifts[3:], dtype=torch.float64)[:, None]
    base = nlm_cosine(z, a).item()
    assert -1.0 - 1e-12 <= base <= 1.0 + 1e-12
    assert nlm_cosine(z + shift_z, a + shift_a).item() == pytest.approx(base, abs=1e-6)
    assert nlm_cosine(z, scale * a).item() == pytest.approx(base, abs=1e-9)
    assert nlm_cosine(z, -a).item() == pytest.approx(-base, abs=1e-12)


def test_update_param_cosine_against_the_flattened_vectors():
    gen = torch.Generator().manual_seed(2)
    params = [
        torch.randn(3, 4, generator=gen),
        torch.randn(5, generator=gen),
        torch.randn(2, 2, 2, generator=gen),
    ]
    update = [torch.randn(p.shape, generator=gen) + 0.5 * p for p in params]
    flat_u = torch.cat([u.reshape(-1) for u in update]).double()
    flat_p = torch.cat([p.reshape(-1) for p in params]).double()
    expected = F.cosine_similarity(flat_u, flat_p, dim=0).item()
    got = update_param_cosine(update, params)
    assert got.dim() == 0
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_update_param_cosine_hand_cases():
    params = [torch.ones(3), -torch.ones(2, 2)]
    assert update_param_cosine([2.0 * p for p in params], params).item() == pytest.approx(1.0)
    # Pure weight decay: Δθ = -ηλθ.
    assert update_param_cosine([-1e-3 * p for p in params], params).item() == pytest.approx(-1.0)
    # ⟨Δθ, θ⟩ = 1 − 1 + 0 = 0.
    ortho = [torch.tensor([1.0, -1.0, 0.0]), torch.zeros(2, 2)]
    assert update_param_cosine(ortho, params).item() == 0.0
    assert update_param_cosine([torch.zeros(3), torch.zeros(2, 2)], params).item() == 0.0
    # dot = 3·2 + 4·(−1) = 2, ‖Δθ‖ = √7, ‖θ‖ = √16.
    update = [torch.ones(3), torch.ones(2, 2)]
    params = [2.0 * torch.ones(3), -torch.ones(2, 2)]
    assert update_param_cosine(update, params).item() == pytest.approx(2 / (4 * math.sqrt(7)))


def test_update_param_cosine_mixed_precision_and_validation():
    params = [torch.full((4,), 300.0, dtype=torch.float16), torch.ones(2)]
    update = [torch.full((4,), 300.0, dtype=torch.float16), torch.ones(2)]
    # Each float16 product 300·300 = 90000 would overflow float16 (max 65504).
    assert update_param_cosine(update, params).item() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        update_param_cosine(update[:1], params)
    with pytest.raises(ValueError):
        update_param_cosine([torch.ones(3), torch.ones(2)], params)
