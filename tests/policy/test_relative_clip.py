"""The clip preset (RelativeClipPolicy): r above the hard limit is clipped at once, r above the
sustained level several steps in a row too; r above the target only when it stands out against
the run's own recent r (a z-score over a window, after a warm-up)."""

from __future__ import annotations

import math

import pytest

from stepguard import StepReport
from stepguard.policy import PRESETS, RelativeClipPolicy, resolve_policy


def report(step: int, r: float, tau: float = 1.0) -> StepReport:
    return StepReport(step=step, tau=tau, rho_a=tau / r, r=r, delta_a=math.pi * r / tau)


def test_a_steady_r_above_one_is_allowed_and_a_spike_is_clipped_to_the_target() -> None:
    policy = RelativeClipPolicy(z=3.0, window=50, warmup=10, hard_r=10.0, sustained_r=2.0)
    rs = [1.5 + 0.1 * (i % 3) for i in range(30)]  # a healthy run at r ≈ 1.5–1.7
    assert [policy.decide(report(i, r)).action for i, r in enumerate(rs)] == ["allow"] * 30
    spike = policy.decide(report(30, 4.0))  # 4.0 is far above mean 1.6 (σ ≈ 0.08): z ≫ 3
    assert spike.action == "clip" and spike.rule == "clip_r"
    assert spike.scale == pytest.approx(1.0 / 4.0)  # applied r = target_r = 1


def test_above_the_hard_limit_a_step_is_clipped_even_during_the_warm_up() -> None:
    policy = RelativeClipPolicy(hard_r=10.0)
    decision = policy.decide(report(0, 25.0))
    assert (decision.action, decision.rule) == ("clip", "clip_hard")
    assert decision.scale == pytest.approx(1.0 / 25.0)


def test_a_step_within_the_target_is_never_clipped_whatever_its_z_score() -> None:
    policy = RelativeClipPolicy(warmup=3)
    for i in range(5):
        policy.decide(report(i, 0.01))
    assert policy.decide(report(5, 0.9)).action == "allow"  # z is huge, but r ≤ 1


def test_non_finite_steps_are_vetoed_and_bad_limits_refused() -> None:
    assert RelativeClipPolicy().decide(report(0, math.nan, tau=math.nan)).action == "veto"
    with pytest.raises(ValueError, match="target_r < hard_r"):
        RelativeClipPolicy(target_r=2.0, hard_r=1.5)
    with pytest.raises(ValueError, match="target_r <= sustained_r < hard_r"):
        RelativeClipPolicy(sustained_r=12.0)
    with pytest.raises(ValueError, match="sustained_steps"):
        RelativeClipPolicy(sustained_steps=0)
    assert isinstance(resolve_policy("clip"), RelativeClipPolicy) and resolve_policy("clip").name == "clip"
    assert PRESETS["clip"] is RelativeClipPolicy


def test_r_above_the_sustained_level_is_clipped_from_its_third_step_in_a_row() -> None:
    policy = RelativeClipPolicy(sustained_r=2.0, sustained_steps=3)
    rs = [2.5, 2.6, 2.4, 2.7, 1.5, 2.5, 2.5]
    decisions = [policy.decide(report(i, r)) for i, r in enumerate(rs)]
    assert [(d.action, d.rule) for d in decisions] == [
        ("allow", None), ("allow", None), ("clip", "clip_sustained"), ("clip", "clip_sustained"),
        ("allow", None),  # r ≤ 2 ends the run of steps
        ("allow", None), ("allow", None),
    ]
    assert decisions[2].scale == pytest.approx(1.0 / 2.4)  # clipped to r = target_r


def test_without_the_sustained_rule_a_steady_high_r_is_allowed() -> None:
    policy = RelativeClipPolicy(sustained_r=None)
    assert [r.name for r in policy.rules] == ["nonfinite", "clip_hard", "clip_r"]
    assert {policy.decide(report(i, 5.0)).action for i in range(20)} == {"allow"}
