"""Properties over random rule sets and random reports: decisions are always valid, clip never
lengthens a step, veto never moves a parameter, counters add up, and a resume changes nothing."""

from __future__ import annotations

import copy
import json
import math
from collections import Counter

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from stepguard import HaltTraining, StepGuard, StepReport
from stepguard.policy import (
    MAX_VETOES_RULE,
    AllOf,
    Allow,
    Always,
    AnyOf,
    Backoff,
    Clip,
    Consecutive,
    Escalation,
    Halt,
    NonFinite,
    Not,
    Rule,
    RulePolicy,
    Spike,
    Threshold,
    Veto,
    Warn,
)

FIELDS = ("r", "tau", "rho_a", "loss", "grad_norm", "sc_fraction")
OPS = (">", ">=", "<", "<=", "==", "!=")

anything = st.one_of(
    st.floats(min_value=0.0, max_value=8.0),
    st.sampled_from([0.0, 1.0, math.nan, math.inf, -math.inf, 1e300]),
    st.floats(allow_nan=True, allow_infinity=True),
)

lengths = st.one_of(  # τ is a norm: never negative, possibly non-finite
    st.floats(min_value=0.0, max_value=8.0),
    st.sampled_from([0.0, math.nan, math.inf, 1e300]),
    st.floats(min_value=0.0, allow_infinity=True),
)

thresholds = st.builds(
    Threshold,
    field=st.sampled_from(FIELDS),
    op=st.sampled_from(OPS),
    value=st.floats(min_value=-1.0, max_value=6.0),
)
leaves = st.one_of(
    thresholds,
    st.builds(NonFinite),
    st.builds(
        Spike,
        field=st.sampled_from(FIELDS),
        z=st.floats(min_value=0.5, max_value=5.0),
        window=st.just(6),
        warmup=st.integers(2, 6),
        direction=st.sampled_from(["up", "down", "both"]),
        include_spikes=st.booleans(),
    ),
    st.builds(Always),
)
conditions = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.builds(Consecutive, condition=inner, count=st.integers(1, 3)),
        st.builds(Not, condition=inner),
        st.builds(AllOf, conditions=st.lists(inner, min_size=1, max_size=2).map(tuple)),
        st.builds(AnyOf, conditions=st.lists(inner, min_size=1, max_size=2).map(tuple)),
    ),
    max_leaves=3,
)
actions = st.one_of(
    st.builds(Allow),
    st.builds(Clip, target=st.floats(min_value=0.05, max_value=4.0), field=st.sampled_from(["r", "tau"])),
    st.builds(Veto),
    st.builds(Halt, step_action=st.sampled_from(["veto", "allow"])),
    st.builds(Warn, every=st.integers(1, 4)),
    st.builds(
        Backoff,
        factor=st.floats(min_value=0.1, max_value=0.9),
        min_scale=st.floats(min_value=0.01, max_value=0.5),
        recover_steps=st.integers(1, 6),
        schedule=st.sampled_from(["linear", "cosine", "exponential"]),
    ),
)


@st.composite
def policies(draw, allow_halt: bool = True) -> RulePolicy:
    acts = actions if allow_halt else actions.filter(lambda a: not isinstance(a, Halt))
    rules = []
    for i in range(draw(st.integers(1, 5))):
        escalate = draw(st.one_of(st.none(), st.builds(Escalation, after=st.integers(2, 4), action=acts)))
        rules.append(
            Rule(
                name=f"rule{i}",
                condition=draw(conditions),
                action=draw(acts),
                continue_=draw(st.sampled_from([None, True, False])),
                cooldown=draw(st.integers(0, 3)),
                escalate=escalate,
            )
        )
    return RulePolicy(
        rules,
        max_consecutive_vetoes=draw(st.one_of(st.none(), st.integers(1, 4))),
        on_max_vetoes=draw(st.sampled_from(["halt", "allow"])),
        restore_optimizer_state=draw(st.booleans()),
    )


@st.composite
def report_streams(draw) -> list[StepReport]:
    out = []
    for step in range(draw(st.integers(1, 14))):
        optional = {
            name: draw(st.one_of(st.none(), anything)) for name in ("loss", "grad_norm", "sc_fraction")
        }
        out.append(
            StepReport(
                step=step,
                tau=draw(lengths),
                rho_a=draw(anything),
                r=draw(anything),
                delta_a=0.0,
                **optional,
            )
        )
    return out


def check_decision(decision, report, names) -> None:
    assert 0.0 <= decision.scale <= 1.0
    assert decision.action in ("allow", "clip", "veto")
    if decision.action == "allow":
        assert decision.scale == 1.0
    if decision.action == "veto":
        assert decision.scale == 0.0
    if decision.action == "clip":
        # a clip of a non-finite update would leave θ non-finite: it must have been vetoed
        assert math.isfinite(report.tau) and decision.scale < 1.0
        assert report.tau * decision.scale <= report.tau
    assert decision.rule is None or decision.rule in names
    assert isinstance(decision.reason, str) and decision.reason


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=policies(), stream=report_streams(), data=st.data())
def test_random_rules_and_reports_give_valid_decisions_and_resume_exactly(policy, stream, data) -> None:
    names = {r.name for r in policy.rules} | {MAX_VETOES_RULE}
    decisions = []
    for report in stream:
        decision = policy.decide(report)
        check_decision(decision, report, names)
        decisions.append(decision)
    counters = Counter(d.action for d in decisions)
    assert sum(counters.values()) == len(stream) == policy.state_dict()["t"]
    json.dumps(policy.state_dict(), allow_nan=False)

    split = data.draw(st.integers(0, len(stream)))
    first = RulePolicy.from_config(policy.config)
    for report in stream[:split]:
        first.decide(report)
    resumed = RulePolicy.from_config(policy.config)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert [resumed.decide(r) for r in stream[split:]] == decisions[split:]


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


NET = _net()
X = torch.randn(10, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 3, (10,), generator=torch.Generator().manual_seed(2))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    policy=policies(),
    lrs=st.lists(st.sampled_from([1e-3, 0.05, 1.0, 20.0]), min_size=1, max_size=6),
    poison=st.lists(st.booleans(), min_size=6, max_size=6),
    momentum=st.sampled_from([0.0, 0.9]),
)
def test_through_the_guard_veto_never_moves_parameters_and_clip_never_lengthens(
    policy, lrs, poison, momentum
) -> None:
    net = copy.deepcopy(NET)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=momentum)
    guard = StepGuard(opt, model=net, policy=policy)
    steps = 0
    for lr, bad in zip(lrs, poison, strict=False):
        for group in guard.param_groups:
            group["lr"] = lr
        guard.zero_grad()
        loss = F.cross_entropy(net(X), Y)
        loss.backward()
        if bad:
            net[0].weight.grad[0, 0] = math.nan
        before = [p.detach().clone() for p in net.parameters()]
        if not all(torch.isfinite(b).all() for b in before):
            break  # an allowed non-finite step has already ruined the run; nothing more to check
        state_before = copy.deepcopy(opt.state_dict()["state"])
        halted = False
        try:
            report = guard.step(loss=float(loss.detach()))
        except HaltTraining as exc:
            report, halted = exc.report, True
        steps += 1
        moved = math.sqrt(
            sum(float(((p.detach() - b) ** 2).sum()) for p, b in zip(net.parameters(), before, strict=True))
        )
        if report.action == "veto":
            assert all(torch.equal(p.detach(), b) for p, b in zip(net.parameters(), before, strict=True))
            if policy.needs_state_backup:
                after = opt.state_dict()["state"]
                assert after.keys() == state_before.keys()
                for k in after:
                    for key, value in after[k].items():
                        assert torch.equal(torch.as_tensor(value), torch.as_tensor(state_before[k][key]))
        if report.action == "clip":
            assert math.isfinite(report.tau)
            assert report.applied_tau <= report.tau
            assert moved <= report.tau * (1 + 1e-9) + 1e-12
            assert math.isclose(moved, report.applied_tau, rel_tol=1e-6, abs_tol=1e-12)
        if report.action == "allow" and math.isfinite(report.tau):
            assert math.isclose(moved, report.tau, rel_tol=1e-6, abs_tol=1e-12)
        if report.action != "allow":
            assert all(torch.isfinite(p).all() for p in net.parameters())
        if halted:
            break
    assert sum(guard.counters.values()) == steps
    assert sum(guard.engine.rule_counters.values()) <= steps
