"""Table tests: sequences of reports → the decisions and counters each rule set must give."""

from __future__ import annotations

import logging
import math
from collections import Counter

import pytest

from stepguard.policy import (
    MAX_VETOES_RULE,
    AllOf,
    Allow,
    Always,
    AnyOf,
    Backoff,
    Clip,
    ClipPolicy,
    Consecutive,
    Escalation,
    Halt,
    MonitorPolicy,
    NonFinite,
    Not,
    Rule,
    RulePolicy,
    SafePolicy,
    Spike,
    VetoPolicy,
    Warn,
    resolve_policy,
)
from stepguard.report import StepReport

NAN, INF = math.nan, math.inf


def rep(step: int, r: float = 0.5, tau: float = 1.0, **fields) -> StepReport:
    """A proposal report with normalized step r (ρ_a = τ/r unless given)."""
    values = {"rho_a": tau / r if r else INF, "delta_a": 0.0, **fields}
    return StepReport(step=step, tau=tau, r=r, **values)


def run(policy, reports):
    """Decide each report; return (decisions, per-action counters, per-rule counters) as the guard keeps them."""
    decisions = [policy.decide(report) for report in reports]
    actions = Counter(d.action for d in decisions)
    rules = Counter(d.rule for d in decisions if d.rule is not None)
    return decisions, actions, rules


def summary(decisions):
    return [(d.action, d.rule, round(d.scale, 6), d.halt) for d in decisions]


# ----------------------------------------------------------------------------- presets


@pytest.mark.parametrize(
    ("policy", "reports", "expected"),
    [
        (
            ClipPolicy(target_r=1.0),
            [rep(0, r=0.5), rep(1, r=4.0), rep(2, r=NAN, tau=NAN), rep(3, r=1.0), rep(4, r=INF)],
            [
                ("allow", None, 1.0, False),
                ("clip", "clip_r", 0.25, False),
                ("veto", "nonfinite", 0.0, False),
                ("allow", None, 1.0, False),
                ("veto", "nonfinite", 0.0, False),
            ],
        ),
        (
            ClipPolicy(0.5),
            [rep(0, r=2.0), rep(1, r=0.4)],
            [("clip", "clip_r", 0.25, False), ("allow", None, 1.0, False)],
        ),
        (
            VetoPolicy(max_r=1.0),
            [rep(0, r=0.99), rep(1, r=1.01), rep(2, r=0.2, loss=NAN), rep(3, r=0.3, rho_a=NAN)],
            [
                ("allow", None, 1.0, False),
                ("veto", "veto_r", 0.0, False),
                ("veto", "nonfinite", 0.0, False),
                ("veto", "nonfinite", 0.0, False),
            ],
        ),
        (
            MonitorPolicy(),
            [rep(0, r=50.0), rep(1, r=NAN, tau=INF)],
            [("allow", None, 1.0, False), ("allow", None, 1.0, False)],
        ),
    ],
    ids=["clip", "clip-half", "veto", "monitor"],
)
def test_presets_decide_as_documented(policy, reports, expected) -> None:
    decisions, actions, _ = run(policy, reports)
    assert summary(decisions) == expected
    assert sum(actions.values()) == len(reports)


def test_preset_names_reasons_and_needs_state_backup() -> None:
    assert [p.name for p in (MonitorPolicy(), ClipPolicy(), VetoPolicy(), SafePolicy())] == [
        "monitor",
        "clip-fixed",
        "veto",
        "safe",
    ]
    assert not MonitorPolicy().needs_state_backup
    assert ClipPolicy().needs_state_backup and VetoPolicy().needs_state_backup and SafePolicy().needs_state_backup
    assert [r.name for r in SafePolicy().rules] == ["nonfinite", "loss_spike", "clip_r"]
    d = ClipPolicy(1.0).decide(rep(0, r=31.2))
    assert d.reason == "r=31.2 > 1: step scaled by 0.03205 to r=1"
    assert isinstance(resolve_policy("safe"), SafePolicy)
    assert ClipPolicy(2.0).target_r == 2.0 and VetoPolicy(3.0).max_r == 3.0
    with pytest.raises(ValueError, match="target_r"):
        ClipPolicy(0.0)
    with pytest.raises(ValueError, match="max_r"):
        VetoPolicy(-1.0)
    with pytest.raises(ValueError, match="unknown policy 'yolo'"):
        resolve_policy("yolo")


def test_safe_skips_a_loss_spike_and_halts_after_repeated_vetoes() -> None:
    policy = SafePolicy(spike_window=10, spike_warmup=5, max_consecutive_vetoes=3)
    calm = [rep(i, r=0.5, loss=2.0 + 0.01 * (i % 3)) for i in range(8)]
    spikes = [rep(8 + i, r=0.5, loss=9.0) for i in range(3)]
    decisions, actions, rules = run(policy, calm + spikes)
    assert [d.action for d in decisions[:8]] == ["allow"] * 8
    assert [(d.action, d.rule, d.halt) for d in decisions[8:]] == [
        ("veto", "loss_spike", False),
        ("veto", "loss_spike", False),
        ("veto", MAX_VETOES_RULE, True),
    ]
    assert "3 consecutive vetoes" in decisions[-1].reason and "step 10" in decisions[-1].reason
    assert rules == {"loss_spike": 2, MAX_VETOES_RULE: 1}
    assert actions == {"allow": 8, "veto": 3}


# ----------------------------------------------------------------------------- conditions


@pytest.mark.parametrize(
    ("condition", "values", "fires"),
    [
        ("r > 1", [0.5, 1.0, 1.5, NAN, INF], [False, False, True, False, True]),
        ("r >= 1", [0.5, 1.0, 1.5], [False, True, True]),
        ({"kind": "threshold", "field": "r", "op": "lt", "value": 1}, [0.5, 1.0], [True, False]),
        ("r <= 1", [1.0, 1.1], [True, False]),
        ("r == 1", [1.0, 1.1], [True, False]),
        ("r != 1", [1.0, 1.1], [False, True]),
    ],
)
def test_threshold_operators(condition, values, fires) -> None:
    policy = RulePolicy([Rule(name="t", condition=condition, action="veto")])
    got = [policy.decide(rep(i, r=v)).rule == "t" for i, v in enumerate(values)]
    assert got == fires


def test_threshold_reads_dotted_fields_and_skips_absent_ones() -> None:
    policy = RulePolicy(
        [
            Rule(name="entangled", condition="entanglement.ratio_chosen > 1", action="veto"),
            Rule(name="collapse", condition="sc_fraction >= 0.5", action="veto"),
            Rule(name="wide", condition="spread.q99 > 3", action="veto"),
            Rule(name="lossy", condition="loss > 10", action="veto"),
        ]
    )
    assert policy.decide(rep(0, entanglement={"ratio_chosen": 1.5})).rule == "entangled"
    assert policy.decide(rep(1, entanglement={"ratio_chosen": 0.5}, sc_fraction=0.6)).rule == "collapse"
    assert policy.decide(rep(2)).rule is None  # no loss, no sc_fraction: nothing to compare


def test_nonfinite_accepts_an_infinite_radius_but_not_an_infinite_step() -> None:
    policy = RulePolicy([Rule(name="nf", condition=NonFinite(), action="veto")])
    assert policy.decide(StepReport(step=0, tau=0.0, rho_a=INF, r=0.0, delta_a=0.0)).action == "allow"
    d = policy.decide(rep(1, r=0.5, tau=1.0, grad_norm=INF))
    assert d.action == "veto" and "grad_norm=inf" in d.reason
    assert policy.decide(rep(2, rho_a=-INF)).action == "veto"
    only_loss = RulePolicy([Rule(name="nf", condition=NonFinite(fields=("loss",)), action="veto")])
    assert only_loss.decide(rep(0, r=NAN)).action == "allow"


def test_spike_waits_for_warmup_uses_a_window_and_leaves_spikes_out() -> None:
    spike = Spike(field="loss", z=4.0, window=6, warmup=4)
    warming = RulePolicy([Rule(name="spike", condition=spike, action="veto")])
    assert [warming.decide(rep(i, loss=v)).action for i, v in enumerate([1.0, 50.0])] == ["allow", "allow"]
    policy = RulePolicy([Rule(name="spike", condition=spike, action="veto")])
    losses = [1.0, 1.1, 0.9, 1.0, 8.0, 8.0, 1.05, 8.0]
    decisions = [policy.decide(rep(i, loss=v)) for i, v in enumerate(losses)]
    assert [d.action for d in decisions] == ["allow"] * 4 + ["veto", "veto", "allow", "veto"]
    assert "σ above its mean" in decisions[4].reason
    assert policy.state_dict()["rules"]["spike"]["condition"]["values"] == [1.0, 1.1, 0.9, 1.0, 1.05]


def test_spike_directions_floor_and_included_spikes() -> None:
    down = RulePolicy(
        [Rule(name="dip", condition=Spike(field="r", direction="down", z=3, warmup=3), action="veto")]
    )
    assert [down.decide(rep(i, r=v)).action for i, v in enumerate([1.0, 1.01, 0.99, 1.0, 0.2])][-1] == "veto"
    flat = RulePolicy([Rule(name="s", condition=Spike(field="loss", z=3, warmup=3), action="veto")])
    # a flat series: the relative floor (1e-3·|μ|) keeps a rounding difference from firing
    assert [flat.decide(rep(i, loss=v)).action for i, v in enumerate([2.0, 2.0, 2.0, 2.000001])][
        -1
    ] == "allow"
    keep = Spike(field="loss", z=3, warmup=3, include_spikes=True)
    state = keep.init()
    for v in [1.0, 1.1, 0.9, 9.0]:
        _, state = keep.update({"loss": v}, state)
    assert state["values"] == [1.0, 1.1, 0.9, 9.0]


def test_consecutive_all_any_not_always() -> None:
    policy = RulePolicy(
        [
            Rule(name="both", condition=AllOf(conditions=("r > 1", "loss > 5")), action="veto"),
            Rule(name="streak", condition=Consecutive(condition="r > 1", count=3), action="halt"),
            Rule(name="either", condition=AnyOf(conditions=("loss > 20", "tau > 100")), action="veto"),
            Rule(name="quiet", condition=Not(condition="r > 0.1"), action="allow"),
            Rule(name="rest", condition=Always(), action={"kind": "clip", "target": 0.3}),
        ]
    )
    reports = [
        rep(0, r=2.0, loss=6.0),  # both
        rep(1, r=2.0, loss=1.0),  # r > 1 twice in a row: not yet a streak → rest clips
        rep(2, r=2.0, loss=1.0),  # third in a row → halt
        rep(3, r=0.5, loss=30.0),  # either
        rep(4, r=0.05, loss=1.0),  # quiet → allowed, rest never reached
        rep(5, r=0.6, loss=1.0),  # rest: clip 0.3/0.6
    ]
    decisions, _, rules = run(policy, reports)
    assert summary(decisions) == [
        ("veto", "both", 0.0, False),
        ("clip", "rest", 0.15, False),
        ("veto", "streak", 0.0, True),
        ("veto", "either", 0.0, False),
        ("allow", "quiet", 1.0, False),
        ("clip", "rest", 0.5, False),
    ]
    assert "3 steps in a row" in decisions[2].reason and "step 2" in decisions[2].reason
    assert rules == {"both": 1, "rest": 2, "streak": 1, "either": 1, "quiet": 1}


# ----------------------------------------------------------------------------- actions


def test_clip_on_tau_and_never_on_a_non_finite_update() -> None:
    policy = RulePolicy([Rule(name="len", condition="tau > 0.5", action=Clip(field="tau", target=0.5))])
    d = policy.decide(rep(0, tau=2.0, r=0.1))
    assert d.action == "clip" and d.scale == 0.25
    d = policy.decide(rep(1, tau=INF, r=INF))
    assert d.action == "veto" and "cannot be scaled" in d.reason


def test_halt_names_the_step_and_the_reason_and_can_keep_the_step() -> None:
    policy = RulePolicy(
        [
            Rule(name="stop", condition="loss > 100", action=Halt(message="check the data loader")),
            Rule(name="stop_soft", condition="loss > 50", action=Halt(step_action="allow")),
        ]
    )
    d = policy.decide(rep(7, loss=500.0))
    assert (d.action, d.halt, d.rule) == ("veto", True, "stop")
    assert d.reason == "loss=500 > 100: training halted at step 7; check the data loader"
    d = policy.decide(rep(8, loss=60.0))
    assert (d.action, d.scale, d.halt) == ("allow", 1.0, True)


def test_warn_logs_once_per_every_steps_allows_and_lets_later_rules_decide(caplog) -> None:
    policy = RulePolicy(
        [
            Rule(name="collapse", condition="sc_fraction > 0.1", action=Warn(every=3)),
            Rule(name="clip_r", condition="r > 1", action="clip"),
        ]
    )
    caplog.set_level(logging.WARNING, logger="stepguard.policy")
    reports = [rep(i, r=2.0 if i == 1 else 0.5, sc_fraction=0.5) for i in range(7)]
    decisions, actions, rules = run(policy, reports)
    assert [(d.action, d.rule) for d in decisions] == [("allow", "collapse")] + [("clip", "clip_r")] + [
        ("allow", "collapse")
    ] * 5
    assert decisions[1].reason.startswith("collapse: sc_fraction=0.5 > 0.1; clip_r: r=2 > 1")
    logged = [r for r in caplog.records if r.name == "stepguard.policy"]
    assert [r.getMessage() for r in logged] == [
        "step 0: rule collapse: sc_fraction=0.5 > 0.1",
        "step 3: rule collapse: sc_fraction=0.5 > 0.1",
        "step 6: rule collapse: sc_fraction=0.5 > 0.1",
    ]
    assert actions == {"allow": 6, "clip": 1} and rules == {"collapse": 6, "clip_r": 1}
    assert policy.state_dict()["rules"]["collapse"]["matched"] == 7


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("linear", [0.5, 0.625, 0.75, 0.875, 1.0]),
        ("cosine", [0.5, 0.5 + 0.5 * (1 - (1 + math.cos(math.pi / 4)) / 2), 0.75, None, 1.0]),
        ("exponential", [0.5, 0.5**0.75, 0.5**0.5, 0.5**0.25, 1.0]),
    ],
)
def test_backoff_recovers_over_n_steps(schedule, expected) -> None:
    policy = RulePolicy(
        [
            Rule(
                name="lr_backoff",
                condition="loss > 10",
                action=Backoff(factor=0.5, recover_steps=4, schedule=schedule),
            )
        ]
    )
    reports = [rep(0, loss=20.0)] + [rep(i, loss=1.0) for i in range(1, 5)]
    decisions = [policy.decide(r) for r in reports]
    for d, want in zip(decisions, expected, strict=True):
        if want is None:
            continue
        assert d.scale == pytest.approx(want)
        assert d.action == ("allow" if want == 1.0 else "clip")
        assert d.rule == (None if want == 1.0 else "lr_backoff")
    assert policy.state_dict()["rules"]["lr_backoff"]["action"] == {}


def test_backoff_compounds_floors_and_combines_with_a_clip_as_a_chain() -> None:
    backoff = Backoff(factor=0.5, min_scale=0.2, recover_steps=10)
    policy = RulePolicy(
        [
            Rule(name="lr_backoff", condition="loss > 10", action=backoff),
            Rule(name="clip_r", condition="r > 1", action="clip"),
        ]
    )
    assert policy.decide(rep(0, loss=20.0, r=0.5)).scale == 0.5
    assert policy.decide(rep(1, loss=20.0, r=0.5)).scale == pytest.approx(0.5 * (0.5 + 0.05))
    assert policy.decide(rep(2, loss=20.0, r=0.5)).scale == pytest.approx(0.2)
    # recovering at 0.28 with r = 2: the clip sees r·0.28 = 0.56 ≤ 1 and adds nothing
    d = policy.decide(rep(3, loss=1.0, r=2.0))
    assert d.scale == pytest.approx(0.28) and d.rule == "lr_backoff"
    # r = 10: the chain applies min(0.36, 1/10)
    d = policy.decide(rep(4, loss=1.0, r=10.0))
    assert d.scale == pytest.approx(0.1) and d.action == "clip"
    assert d.reason.startswith("lr_backoff: learning-rate backoff at 0.36x") and "clip_r" in d.reason


def test_a_scaled_step_with_a_non_finite_update_is_vetoed() -> None:
    policy = RulePolicy([Rule(name="lr_backoff", condition="loss > 10", action=Backoff())])
    d = policy.decide(rep(0, loss=20.0, tau=NAN, r=NAN))
    assert d.action == "veto" and "non-finite" in d.reason


def test_first_match_decides_unless_a_rule_continues() -> None:
    def policy(cont):
        return RulePolicy(
            [
                Rule(name="a", condition="r > 1", action={"kind": "clip", "target": 1.0}, continue_=cont),
                Rule(name="b", condition="r > 1", action={"kind": "clip", "target": 0.5}),
            ]
        )

    assert policy(None).decide(rep(0, r=4.0)).scale == 0.25
    d = policy(True).decide(rep(0, r=4.0))
    assert d.scale == 0.125 and d.rule == "a"
    allow_first = RulePolicy(
        [
            Rule(name="warmup", condition="step < 2", action=Allow()),
            Rule(name="v", condition="r > 1", action="veto"),
        ]
    )
    assert [allow_first.decide(rep(i, r=5.0)).rule for i in range(3)] == ["warmup", "warmup", "v"]


def test_cooldown_silences_a_rule_and_the_next_one_decides() -> None:
    policy = RulePolicy(
        [
            Rule(name="veto_big", condition="r > 2", action="veto", cooldown=2),
            Rule(name="clip_r", condition="r > 1", action="clip"),
        ]
    )
    decisions = [policy.decide(rep(i, r=4.0)) for i in range(5)]
    assert [d.rule for d in decisions] == ["veto_big", "clip_r", "clip_r", "veto_big", "clip_r"]


def test_escalation_after_n_in_a_row_and_reset() -> None:
    policy = RulePolicy(
        [
            Rule(
                name="spiky",
                condition="loss > 10",
                action="veto",
                escalate=Escalation(after=3, action=Halt()),
            )
        ]
    )
    losses = [20, 20, 1, 20, 20, 20]
    decisions = [policy.decide(rep(i, loss=v)) for i, v in enumerate(losses)]
    assert [(d.action, d.halt) for d in decisions] == [
        ("veto", False),
        ("veto", False),
        ("allow", False),
        ("veto", False),
        ("veto", False),
        ("veto", True),
    ]
    assert "fired 3 steps in a row: escalated" in decisions[-1].reason


def test_max_consecutive_vetoes_halts_or_gives_up_like_apply_if_finite() -> None:
    rules = [
        Rule(name="nonfinite", condition="nonfinite", action="veto"),
        Rule(name="big", condition="r > 1", action="veto"),
    ]
    halting = RulePolicy(rules, max_consecutive_vetoes=2)
    d = [halting.decide(rep(i, r=5.0)) for i in range(2)]
    assert (d[1].rule, d[1].halt) == (MAX_VETOES_RULE, True)
    giving_up = RulePolicy(rules, max_consecutive_vetoes=2, on_max_vetoes="allow")
    d = [
        giving_up.decide(r)
        for r in [rep(0, r=5.0), rep(1, r=5.0), rep(2, r=5.0), rep(3, tau=NAN, r=NAN), rep(4, tau=NAN, r=NAN)]
    ]
    assert [(x.action, x.rule) for x in d] == [
        ("veto", "big"),
        ("allow", MAX_VETOES_RULE),
        ("veto", "big"),
        ("veto", "nonfinite"),
        ("veto", "nonfinite"),  # a non-finite update is never applied, even when giving up
    ]


def test_restore_optimizer_state_is_what_needs_state_backup_reports() -> None:
    veto = [Rule(name="big", condition="r > 1", action="veto")]
    assert RulePolicy(veto).needs_state_backup
    assert not RulePolicy(veto, restore_optimizer_state=False).needs_state_backup
    assert not RulePolicy([Rule(name="w", condition="r > 1", action="warn")]).needs_state_backup


def test_changes_steps_comes_from_the_rules_actions_and_defaults_to_true() -> None:
    from stepguard.policy import Policy
    from stepguard.report import Decision

    warn = Rule(name="w", condition="r > 1", action="warn")
    assert not MonitorPolicy().changes_steps and not RulePolicy().changes_steps
    assert not RulePolicy([warn]).changes_steps
    assert not RulePolicy([warn, Rule(name="ok", condition="r < 0.1", action="allow")]).changes_steps
    for action in ("clip", "veto", "halt", "backoff"):
        policy = RulePolicy([Rule(name="x", condition="r > 1", action=action)], restore_optimizer_state=False)
        assert policy.changes_steps and not policy.needs_state_backup, action
    escalating = RulePolicy([{"name": "w", "condition": "r > 1", "action": "warn",
                              "escalate": {"after": 3, "action": "veto"}}])
    assert escalating.changes_steps
    assert all(preset().changes_steps for preset in (ClipPolicy, VetoPolicy, SafePolicy))

    class Custom(Policy):  # the guard cannot see into decide(): assume it changes steps
        needs_state_backup = False

        def decide(self, report: StepReport) -> Decision:
            return Decision()

    assert Custom().changes_steps


def test_pure_update_does_not_touch_the_policy_or_its_input_state() -> None:
    policy = SafePolicy(spike_warmup=2, spike_window=4)
    state = policy.init()
    snapshot = repr(state)
    evaluation = policy.update(rep(0, loss=1.0), state)
    assert repr(state) == snapshot
    assert evaluation.state["t"] == 1 and policy.state_dict()["t"] == 0


def test_rules_read_exactly_the_numbers_of_report_scalars() -> None:
    from stepguard.policy.fields import report_values
    from stepguard.report import SpreadSummary, StepReport

    report = StepReport(
        step=7,
        tau=0.5,
        rho_a=math.inf,
        r=0.0,
        delta_a=0.0,
        spread=SpreadSummary(count=3, max=1.0, q99=0.9, mean=0.5),
        measured=False,
        loss=None,
        grad_norm=2.5,
        entanglement={"ratio_chosen": 1.5},
        extras={"loss.base": 0.25},
        timings={"jvp": 0.001},
    )
    values = report_values(report)
    assert dict(values) == report.scalars()
    for absent in ("loss", "rho_binary", "halt", "rank", "extras.loss.other", "spread.values", "action"):
        assert values.get(absent) is None, absent


def test_presets_take_restore_optimizer_state() -> None:
    for preset in (ClipPolicy, VetoPolicy, SafePolicy):
        assert preset().needs_state_backup
        policy = preset(restore_optimizer_state=False)
        assert not policy.needs_state_backup and not policy.config.restore_optimizer_state


def test_a_policy_subclass_setting_may_veto_is_told_the_new_name() -> None:
    from stepguard.policy import Policy

    with pytest.raises(TypeError, match="needs_state_backup"):

        class Old(Policy):
            may_veto = False

            def decide(self, report: StepReport) -> None:  # pragma: no cover - never built
                raise AssertionError


def test_from_config_and_from_path_build_the_class_they_are_called_on(tmp_path) -> None:
    import json

    class Mine(RulePolicy):
        pass

    data = {"name": "mine", "rules": [{"name": "clip_r", "condition": "r > 1", "action": "clip"}]}
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(data))
    for policy in (Mine.from_config(data), Mine.from_path(path)):
        assert type(policy) is Mine and policy.name == "mine"
        assert policy.decide(rep(0, r=4.0)).scale == pytest.approx(0.25)
    clip = ClipPolicy.from_config(ClipPolicy(0.5).config)
    assert type(clip) is ClipPolicy and repr(clip) == "RulePolicy(name='clip-fixed', rules=['nonfinite', 'clip_r'])"


def test_the_policy_protocol_module_does_not_import_its_subclass() -> None:
    import ast
    import inspect

    from stepguard.policy import base

    imported = [
        node.module
        for node in ast.walk(ast.parse(inspect.getsource(base)))
        if isinstance(node, ast.ImportFrom) and node.module is not None
    ]
    assert not [m for m in imported if m.startswith("stepguard.policy")]
    assert not hasattr(base.Policy, "from_dict") and not hasattr(base.Policy, "from_file")
