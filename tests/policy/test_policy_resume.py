"""The policy's whole state survives a resume: save mid-run, load into a fresh policy, same decisions."""

from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stepguard import StepGuard, StepReport
from stepguard.policy import RulePolicy, SafePolicy

STATEFUL = {
    "name": "stateful",
    "max_consecutive_vetoes": 4,
    "on_max_vetoes": "allow",
    "rules": [
        {"name": "nonfinite", "condition": "nonfinite", "action": "veto"},
        {
            "name": "loss_spike",
            "condition": {"kind": "spike", "field": "loss", "z": 2.5, "window": 8, "warmup": 4},
            "action": "veto",
            "escalate": {"after": 2, "action": {"kind": "backoff", "factor": 0.5, "recover_steps": 5}},
        },
        {"name": "collapse", "condition": "sc_fraction > 0.5", "action": {"kind": "warn", "every": 4}},
        {
            "name": "streak",
            "condition": {"kind": "consecutive", "condition": "r > 1.5", "count": 2},
            "action": {"kind": "backoff", "factor": 0.7, "recover_steps": 6, "schedule": "cosine"},
            "cooldown": 2,
        },
        {"name": "clip_r", "condition": "r > 1", "action": "clip"},
    ],
}


def reports(n: int, seed: int = 0) -> list[StepReport]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        r = rng.choice([0.3, 0.8, 1.2, 2.0, 4.0, math.nan])
        tau = math.nan if math.isnan(r) else rng.uniform(0.1, 2.0)
        loss = rng.gauss(2.0, 0.1) if rng.random() > 0.2 else rng.uniform(3.0, 6.0)
        out.append(
            StepReport(step=i, tau=tau, rho_a=tau / r, r=r, delta_a=0.0, loss=loss, sc_fraction=rng.random())
        )
    return out


@pytest.mark.parametrize("split", [1, 7, 23, 40])
def test_save_mid_run_load_into_a_fresh_policy_same_decisions(split: int) -> None:
    stream = reports(60)
    original = RulePolicy.from_config(STATEFUL)
    expected = [original.decide(r) for r in stream]
    assert {d.action for d in expected} == {"allow", "clip", "veto"}

    first = RulePolicy.from_config(STATEFUL)
    for r in stream[:split]:
        first.decide(r)
    saved = json.loads(json.dumps(first.state_dict(), allow_nan=False))
    resumed = RulePolicy.from_config(STATEFUL)
    resumed.load_state_dict(saved)
    assert resumed.state_dict() == first.state_dict()
    assert [resumed.decide(r) for r in stream[split:]] == expected[split:]


def test_state_dict_is_a_copy_and_an_empty_state_resets() -> None:
    policy = RulePolicy.from_config(STATEFUL)
    for r in reports(10):
        policy.decide(r)
    saved = policy.state_dict()
    saved["rules"]["loss_spike"]["condition"]["values"].append(1e9)
    assert 1e9 not in policy.state_dict()["rules"]["loss_spike"]["condition"]["values"]
    policy.load_state_dict({})
    assert policy.state_dict() == policy.init()


def test_loading_a_state_with_unknown_rules_is_an_error_and_missing_rules_start_fresh() -> None:
    policy = RulePolicy.from_config(STATEFUL)
    for r in reports(10):
        policy.decide(r)
    saved = policy.state_dict()
    fewer = RulePolicy([{"name": "clip_r", "condition": "r > 1", "action": "clip"}])
    with pytest.raises(ValueError, match=r"rules \['collapse', 'loss_spike', 'nonfinite', 'streak'\]"):
        fewer.load_state_dict(saved)
    more = dict(
        STATEFUL, rules=[*STATEFUL["rules"], {"name": "new", "condition": "tau > 100", "action": "veto"}]
    )
    grown = RulePolicy.from_config(more)
    grown.load_state_dict(saved)
    assert grown.state_dict()["t"] == 10
    assert grown.state_dict()["rules"]["new"] == grown.init()["rules"]["new"]
    with pytest.raises(ValueError, match="missing"):
        grown.load_state_dict({"rules": {}})


def test_the_guard_checkpoint_carries_the_policy_state() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))

    def make(model):
        policy = SafePolicy(spike_window=6, spike_warmup=3)
        return StepGuard(torch.optim.Adam(model.parameters(), lr=1e-2), model=model, policy=policy)

    def train(guard, model, losses):
        out = []
        for extra in losses:
            guard.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            out.append(guard.step(loss=float(loss.detach()) + extra))
        return out

    guard = make(net)
    train(guard, net, [0.0] * 5)
    saved = copy.deepcopy(guard.state_dict())
    def no_constants(name: str) -> None:
        raise AssertionError(f"{name} in the policy state")

    json.loads(saved["stepguard"]["policy"], parse_constant=no_constants)  # strict JSON: no NaN or inf
    twin_net = copy.deepcopy(net)
    twin = make(twin_net)
    twin.load_state_dict(saved)
    assert twin.policy.state_dict() == guard.policy.state_dict()
    after = [0.0, 50.0, 0.0]
    a, b = train(guard, net, after), train(twin, twin_net, after)
    assert [(r.action, r.rule) for r in a] == [(r.action, r.rule) for r in b]
    assert a[1].action == "veto" and a[1].rule == "loss_spike"
