"""Sparse and budgeted measurement: estimates between JVPs, and spikes caught on their step."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stepguard import GuardConfig, StepGuard
from stepguard.schedule import MeasurementSchedule


def test_schedule_triggers() -> None:
    s = MeasurementSchedule(every=8)
    assert s.due(1.0, None, None) == (True, "first")
    s.measured(tau=1.0)
    assert s.due(1.2, 0.1, 0.99) == (False, "estimate")
    assert s.due(1.6, 0.1, 0.99) == (True, "tau_jump")
    assert s.due(0.6, 0.1, 0.99) == (True, "tau_jump")
    assert s.due(1.0, 0.6, 0.99) == (True, "r_alert")
    assert s.due(1.0, 0.1, 0.2) == (True, "direction")
    assert s.due(math.inf, 0.1, 0.99) == (True, "nonfinite")
    for _ in range(7):
        s.skipped()
    assert s.due(1.0, 0.1, 0.99) == (True, "schedule")


def test_a_step_after_a_still_measured_step_is_a_tau_jump() -> None:
    s = MeasurementSchedule(every=8)
    s.measured(tau=0.0)
    assert s.due(0.0, 0.0, None) == (False, "estimate")
    assert s.due(1e-6, 0.0, None) == (True, "tau_jump")


def test_a_turn_is_measured_only_out_of_saved_budget_credit() -> None:
    s = MeasurementSchedule(budget=0.1)
    s.measured(tau=1.0)
    # c_m = 4 ms, c_0 = 0.2 ms, T = 10 ms: allowance 1 ms, N = ⌈3.8/0.8⌉ = 5; an estimated
    # step saves 1 − 0.2 = 0.8 ms, so the schedule uses about the credit it earns
    s.set_costs(measure=0.004, idle=0.0002, period=0.01)
    assert s.interval == 5
    turned = (1.0, 0.1, 0.2)  # τ steady, r small, cosine 0.2 < min_cosine
    for step in range(1, 5):
        assert s.due(*turned) == (False, "estimate")
        s.skipped()
        assert s.credit == pytest.approx(0.0008 * step)
    assert s.due(*turned) == (True, "schedule")
    s.measured(tau=1.0)  # a measured step costs c_m − allowance = 3 ms of credit
    assert s.credit == pytest.approx(0.0032 - 0.003)
    s.load_state_dict({**s.state_dict(), "credit": 0.004})  # credit saved over earlier cycles
    assert s.due(*turned) == (True, "direction")
    s.measured(tau=1.0)
    assert s.credit == pytest.approx(0.001)
    assert s.due(*turned) == (False, "estimate")
    assert s.due(2.0, 0.1, 0.2) == (True, "tau_jump")  # a jump never waits for credit
    assert s.due(1.0, 0.7, 0.99) == (False, "estimate")  # near the boundary: out of credit only
    assert s.due(1.0, math.nan, 0.99) == (True, "r_alert")  # an estimate that failed never waits
    s.interval = 1000  # as if the schedule were far away
    for _ in range(100):
        s.skipped()
    assert s.credit == pytest.approx(2 * 0.004)  # saved credit is capped at two measurements
    assert s.due(1.0, 0.7, 0.99) == (True, "r_alert")  # with credit saved, it is measured
    unbudgeted = MeasurementSchedule(every=8)
    unbudgeted.measured(tau=1.0)
    assert unbudgeted.due(*turned) == (True, "direction")
    assert unbudgeted.due(1.0, 0.7, 0.99) == (True, "r_alert")


def test_budget_interval_from_costs() -> None:
    s = MeasurementSchedule(budget=0.1)
    s.set_costs(measure=0.004, idle=0.0002, period=0.01)
    # allowance = 0.1·10 ms = 1 ms; N = ⌈(4 − 0.2)/(1 − 0.2)⌉ = ⌈4.75⌉ = 5
    assert s.interval == 5
    s.set_costs(measure=0.004, idle=0.002, period=0.01)  # c_0 = 2 ms > allowance = 1 ms
    assert s.interval == s.max_interval
    with pytest.raises(ValueError, match="budget"):
        MeasurementSchedule(budget=1.5)


def train(guard: StepGuard, net: nn.Module, steps: int, lr_at, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 10, generator=gen)
    y = (x[:, :4].argmax(1) + (x[:, 4] > 0)).clamp(max=4)
    reports = []
    for step in range(steps):
        for g in guard.param_groups:
            g["lr"] = lr_at(step)
        idx = torch.randint(0, 256, (32,), generator=gen)
        guard.zero_grad()
        F.cross_entropy(net(x[idx]), y[idx]).backward()
        reports.append(guard.step())
    return reports


def net_() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 5))


def test_sparse_schedule_estimates_r_between_measurements() -> None:
    torch.manual_seed(0)
    net = net_()
    guard = StepGuard(
        torch.optim.Adam(net.parameters(), lr=1e-3), model=net, config=GuardConfig(measure_every=4)
    )
    reports = train(guard, net, 24, lambda s: 1e-3)
    measured = [r for r in reports if r.measured]
    estimated = [r for r in reports if not r.measured]
    assert estimated and len(measured) < len(reports)
    for r in estimated:
        assert r.estimator == "estimate"
        last = max((m for m in measured if m.step < r.step), key=lambda m: m.step)
        assert r.rho_a == last.rho_a
        assert r.r == pytest.approx(r.tau / last.rho_a, rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_budget_mode_catches_every_spike_on_its_step(seed: int) -> None:
    rng = random.Random(seed)
    spikes = {rng.randrange(10, 150): rng.choice([10.0, 100.0, 1000.0, 10000.0]) for _ in range(4)}
    torch.manual_seed(seed)
    net = net_()
    guard = StepGuard(torch.optim.Adam(net.parameters(), lr=1e-4), model=net, policy="clip", budget=0.10)
    reports = train(guard, net, 160, lambda s: 1e-4 * spikes.get(s, 1.0), seed)
    for step, factor in spikes.items():
        report = reports[step]
        # a single-step spike multiplies τ by the factor: caught and measured afresh on that step
        assert report.measured, (step, factor, report.reason)
        if report.r > 1:
            assert report.action in ("clip", "veto") and report.applied_tau <= report.rho_a * (1 + 1e-9)
    assert sum(r.measured for r in reports) < len(reports)  # the budget did skip measurements
    for r in reports:
        if r.action == "allow":
            assert r.r <= 1.0 + 1e-9


def test_budget_round_trips_through_state_dict() -> None:
    net = net_()
    guard = StepGuard(torch.optim.Adam(net.parameters(), lr=1e-3), model=net, budget=0.2)
    train(guard, net, 12, lambda s: 1e-3)
    saved = guard.state_dict()["stepguard"]["schedule"]
    other = StepGuard(torch.optim.Adam(net_().parameters(), lr=1e-3), model=net_(), budget=0.2)
    other.load_state_dict(guard.state_dict())
    assert other.engine.trigger.schedule.state_dict() == saved


class FakeClock:
    """Stands in for time.perf_counter inside the engine: each call advances by ``tick``."""

    def __init__(self) -> None:
        self.now = 0.0
        self.tick = 1e-6

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def test_budget_costs_leave_out_the_first_replay_and_pauses(monkeypatch) -> None:
    import stepguard.engine as engine_module

    clock = FakeClock()
    monkeypatch.setattr(engine_module.time, "perf_counter", clock)
    net = net_()
    guard = StepGuard(torch.optim.SGD(net.parameters(), lr=1e-3), model=net, budget=0.1)
    engine = guard.engine
    x, y = torch.randn(8, 10), torch.randint(0, 5, (8,))

    def step(work: float) -> None:
        guard.zero_grad()
        F.cross_entropy(net(x), y).backward()
        clock.now += work  # the training step's own time, outside the guard
        guard.step()

    step(0.01)  # the first step: measured, its replay's set-up is not a running cost
    assert engine.trigger.costs.measure is None and engine.trigger.schedule.measure_cost is None
    for _ in range(3):
        step(0.01)
    assert engine.trigger.costs.measure is not None  # the second measurement is a running cost
    assert engine.trigger.costs.plain == pytest.approx(0.01, rel=0.01)  # T: the step without the guard
    step(10.0)  # an evaluation loop between two steps: a pause, not a step period
    assert engine.trigger.costs.plain == pytest.approx(0.01, rel=0.01)
    assert engine.trigger.schedule.step_period == pytest.approx(0.01, rel=0.01)


def test_cost_meter_averages_clips_outliers_and_plans_with_reduced_costs() -> None:
    from stepguard.costs import PAUSE, CostMeter

    meter = CostMeter(decay=0.5)
    meter.record(measured=True, own=1.0, now=10.0)  # the first measurement: set-up, left out
    assert meter.measure is None and meter.plan({}) is None
    meter.record(measured=False, own=0.001, now=10.011)  # T = 0.011 − 0.001
    meter.record(measured=True, own=0.004, now=10.025)  # T = 0.014 − 0.004
    assert (meter.idle, meter.measure) == (0.001, 0.004)
    assert meter.plain == pytest.approx(0.01)
    meter.record(measured=True, own=1.0, now=11.035)  # T = 0.01; a cost 250× its average
    assert meter.measure == pytest.approx(0.5 * 0.004 + 0.5 * PAUSE * 0.004)
    assert meter.plan({}) == {"measure": meter.measure, "idle": 0.001, "period": meter.plain}
    reduced = {"cost_measure": 0.02, "cost_idle": float("nan"), "cost_period": 0.03}
    assert meter.plan(reduced) == {"measure": 0.02, "idle": None, "period": 0.03}
    tensors = meter.tensors(torch.zeros(()))
    assert {k: v.item() for k, v in tensors.items()} == {
        "cost_measure": meter.measure, "cost_idle": 0.001, "cost_period": meter.plain
    }


def test_an_estimate_near_the_boundary_for_hundreds_of_steps_keeps_the_budget() -> None:
    """Early training can sit at r ≥ r_alert for hundreds of steps; the budget still holds,
    and a spike is still measured on its own step."""
    c_m, c_0, period, budget, steps = 0.004, 0.0002, 0.01, 0.1, 200
    s = MeasurementSchedule(budget=budget)
    s.measured(tau=1.0)
    s.set_costs(measure=c_m, idle=c_0, period=period)
    measured = spikes_missed = 0
    for step in range(steps):
        spike = step in (50, 120)
        tau = 1000.0 if spike else 1.0
        due, _ = s.due(tau, 0.8 * tau, 0.99)  # the estimate sits above r_alert = 0.5 throughout
        spikes_missed += spike and not due
        if due:
            measured += 1
            s.measured(tau=tau)
        else:
            s.skipped()
        if spike:  # the step after a spike is a τ jump back down: measured too
            s.tau_ref = 1.0
    guard_time = measured * c_m + (steps - measured) * c_0
    assert spikes_missed == 0
    assert guard_time <= (budget + 0.05) * period * steps
