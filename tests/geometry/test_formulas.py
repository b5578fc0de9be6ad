"""The closed-form radii against hand-derived cases and numerically located complex zeros."""

from __future__ import annotations

import cmath
import math

import pytest
import torch

from stepguard.geometry import binary_radius, logit_spread, rho_from_spread, top2_radius

PI = math.pi


def nearest_zero(z: list[float], a: list[float]) -> float:
    """|t*| of the zero of F(t) = Σ_k exp(z_k + a_k t) nearest 0, by Newton from a grid of starts."""

    def f(t: complex) -> complex:
        return sum(cmath.exp(zk + ak * t) for zk, ak in zip(z, a, strict=True))

    def df(t: complex) -> complex:
        return sum(ak * cmath.exp(zk + ak * t) for zk, ak in zip(z, a, strict=True))

    best = math.inf
    for re in [x * 0.5 for x in range(-20, 21)]:
        for im in [y * 0.25 for y in range(1, 41)]:
            t = complex(re, im)
            try:
                for _ in range(80):
                    step = f(t) / df(t)
                    t -= step
                    if abs(step) < 1e-14 or abs(t) > 50:
                        break
                scale = max(abs(cmath.exp(zk + ak * t)) for zk, ak in zip(z, a, strict=True))
                if abs(t) < 50 and abs(f(t)) < 1e-10 * scale:
                    best = min(best, abs(t))
            except (OverflowError, ZeroDivisionError):
                continue
    return best


def test_spread_is_max_minus_min_per_row() -> None:
    a = torch.tensor([[0.3, -0.5, 0.8], [1.0, 1.0, 1.0]])
    assert torch.allclose(logit_spread(a), torch.tensor([1.3, 0.0]))


def test_one_logit_head_is_the_pair_s_zero() -> None:
    a = torch.tensor([[-2.0], [0.5]])
    assert torch.equal(logit_spread(a), torch.tensor([2.0, 0.5]))


def test_rho_is_pi_over_spread_and_infinite_at_zero() -> None:
    rho = rho_from_spread(torch.tensor([1.0, 10.0, 30.0, 0.0]))
    assert rho[:3].tolist() == pytest.approx([PI, PI / 10, PI / 30])
    assert rho[3] == math.inf
    assert rho_from_spread(torch.tensor(2.0), temperature=4.0) == pytest.approx(2 * PI)


@pytest.mark.parametrize(
    ("z", "a", "expected"),
    [
        ([0.0, 0.0], [0.0, 1.0], PI),
        ([2.0, 0.0], [0.0, 1.0], math.sqrt(4 + PI**2)),
        ([-3.5, 1.0], [0.7, -0.2], math.sqrt(4.5**2 + PI**2) / 0.9),
    ],
)
def test_binary_radius_is_the_exact_nearest_zero(z: list[float], a: list[float], expected: float) -> None:
    got = binary_radius(torch.tensor([z], dtype=torch.float64), torch.tensor([a], dtype=torch.float64))
    assert got.item() == pytest.approx(expected, rel=1e-12)
    assert got.item() == pytest.approx(nearest_zero(z, a), rel=1e-9)


def test_one_logit_binary_radius_matches_two_logit_form() -> None:
    s, a = torch.tensor([[1.7]], dtype=torch.float64), torch.tensor([[-0.4]], dtype=torch.float64)
    pair = binary_radius(torch.cat([torch.zeros_like(s), s], 1), torch.cat([torch.zeros_like(a), a], 1))
    assert binary_radius(s, a).item() == pytest.approx(pair.item(), rel=1e-15)
    assert binary_radius(s, a).item() >= PI / 0.4


@pytest.mark.parametrize(
    ("z", "a", "t_star"),
    [  # nearest zeros located independently (grid search + Newton)
        ([0.0, 0.0, 0.0], [-1.0, 0.0, 1.0], 2.094395),
        ([1.0, 2.0, 0.5], [0.3, -0.5, 0.8], 3.141975),
        ([3.0, 0.0, 0.0], [0.0, 1.0, 0.5], 4.508269),
        ([0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 2.0, 3.0], 1.570796),
    ],
)
def test_multiclass_rho_is_a_lower_bound_on_the_nearest_zero(
    z: list[float], a: list[float], t_star: float
) -> None:
    found = nearest_zero(z, a)
    assert found == pytest.approx(t_star, abs=2e-6)
    rho = rho_from_spread(logit_spread(torch.tensor([a], dtype=torch.float64))).item()
    assert rho <= found


def test_rho_bound_holds_on_random_cases() -> None:
    gen = torch.Generator().manual_seed(3)
    for _ in range(15):
        k = int(torch.randint(2, 5, (1,), generator=gen))
        z = (torch.randn(k, generator=gen, dtype=torch.float64) * 2).tolist()
        a = torch.randn(k, generator=gen, dtype=torch.float64).tolist()
        rho = rho_from_spread(logit_spread(torch.tensor([a], dtype=torch.float64))).item()
        assert rho <= nearest_zero(z, a) * (1 + 1e-9)


def test_top2_radius_by_hand() -> None:
    z = torch.tensor([[3.0, 1.0, 2.5]], dtype=torch.float64)
    a = torch.tensor([[0.1, 0.9, -0.4]], dtype=torch.float64)
    # target 0: strongest other class is 2, δ = 0.5, s = a_2 − a_0 = −0.5
    expected = math.sqrt(0.25 + PI**2) / 0.5
    assert top2_radius(z, a, torch.tensor([0])).item() == pytest.approx(expected, rel=1e-12)
    # without targets the predicted class (0) is used
    assert top2_radius(z, a).item() == pytest.approx(expected, rel=1e-12)
    # target 1: strongest other class is 0, δ = −2, s = a_0 − a_1 = −0.8
    assert top2_radius(z, a, torch.tensor([1])).item() == pytest.approx(math.sqrt(4 + PI**2) / 0.8, rel=1e-12)
    assert (top2_radius(z, a) >= rho_from_spread(logit_spread(a))).all()
