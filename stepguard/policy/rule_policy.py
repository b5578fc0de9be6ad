"""The rule engine: an ordered set of rules with explicit state, evaluated once per step."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

from stepguard.policy.actions import SEVERITY, Proposal, StepContext
from stepguard.policy.base import Policy
from stepguard.policy.config import PolicyConfig, load_policy_config, policy_config
from stepguard.policy.fields import report_values
from stepguard.policy.rules import MAX_VETOES_RULE, Rule
from stepguard.report import Decision, StepReport

logger = logging.getLogger("stepguard.policy")

STATE_FORMAT = 1

_RP = TypeVar("_RP", bound="RulePolicy")


@dataclass(frozen=True)
class Alert:
    """A message a ``warn`` rule wants logged this step."""

    rule: str
    level: str
    message: str
    step: int


class Evaluation(NamedTuple):
    """What :meth:`RulePolicy.update` returns: the decision, the next state, and the alerts to log."""

    decision: Decision
    state: dict[str, Any]
    alerts: tuple[Alert, ...]


class RulePolicy(Policy):
    """A policy made of rules: each a condition on the step's report and an action.

    Evaluation of one step, in the manner of optax's ``chain`` of ``(init, update)`` pairs:

    1. every rule's condition sees the report and updates its state (running statistics
       advance on every step, whichever rule decides);
    2. the rules are walked in order: a rule fires when its condition holds and it is not
       cooling down; its action (or its escalation action, after enough firings in a row)
       proposes allow, a scale s ∈ (0, 1) or a veto, with or without halt; a backoff that is
       still recovering proposes its scale on steps where it does not fire;
    3. the walk stops at the first rule that fires and does not continue;
    4. the proposals combine: the scales multiply (each clip sees the step as scaled so
       far), any veto vetoes, any halt halts. The decision names the first rule of the
       strongest action (halt > veto > clip > allow) and joins every reason;
    5. a clip of a non-finite update becomes a veto (θ₀ + s·Δθ would stay non-finite);
    6. the consecutive-veto guard (``max_consecutive_vetoes``) halts, or gives up and
       applies the step.

    The whole state (``init``/``update`` are pure; ``decide`` keeps it) is a JSON-ready
    dict in :meth:`state_dict`, so a resumed run decides exactly as the original would.

    Args:
        rules: the rules, in order (:class:`~stepguard.policy.Rule` objects or mappings).
        name: the policy's name.
        max_consecutive_vetoes: halt (or give up) after this many vetoes in a row.
        on_max_vetoes: ``"halt"`` or ``"allow"``.
        restore_optimizer_state: a veto also restores the optimizer state (this sets
            :attr:`~stepguard.policy.Policy.needs_state_backup` when a rule can veto).

    Example:
        >>> from stepguard.policy import RulePolicy, Rule
        >>> policy = RulePolicy(
        ...     [Rule(name="nonfinite", condition="nonfinite", action="veto"),
        ...      Rule(name="clip_r", condition="r > 1", action={"kind": "clip", "target": 1.0})],
        ...     name="mine", max_consecutive_vetoes=5)
        >>> report = StepReport(step=0, tau=2.0, rho_a=0.5, r=4.0, delta_a=6.28)
        >>> policy.decide(report).scale
        0.25
    """

    def __init__(
        self,
        rules: Iterable[Rule | Mapping[str, Any]] = (),
        *,
        name: str = "policy",
        max_consecutive_vetoes: int | None = None,
        on_max_vetoes: Literal["halt", "allow"] = "halt",
        restore_optimizer_state: bool = True,
    ) -> None:
        config = policy_config(
            {
                "name": name,
                "rules": list(rules),
                "max_consecutive_vetoes": max_consecutive_vetoes,
                "on_max_vetoes": on_max_vetoes,
                "restore_optimizer_state": restore_optimizer_state,
            }
        )
        self._configure(config)

    def _configure(self, config: PolicyConfig) -> None:
        self.config = config
        self.name = config.name
        self.changes_steps = any(a.can_veto for rule in config.rules for a in _actions_of(rule))
        self.needs_state_backup = config.restore_optimizer_state and self.changes_steps
        self._state = self.init()

    @classmethod
    def from_config(cls: type[_RP], config: PolicyConfig | Mapping[str, Any]) -> _RP:
        """A policy of this class from a :class:`PolicyConfig` or a mapping.

        Raises:
            PolicyConfigError: a line per problem, each naming its key
                (``rules[2].condition.field: unknown report field 'rr'; known: …``).
        """
        policy = cls.__new__(cls)
        policy._configure(policy_config(config))
        return policy

    @classmethod
    def from_path(cls: type[_RP], path: str | Path) -> _RP:
        """A policy of this class from a ``.yaml``/``.yml`` (needs PyYAML), ``.json`` or ``.toml`` file.

        Raises:
            FileNotFoundError: no such file.
            PolicyConfigError: a syntax error or an invalid policy, naming the key.
            ModuleNotFoundError: YAML without PyYAML installed.
        """
        return cls.from_config(load_policy_config(path))

    @property
    def rules(self) -> tuple[Rule, ...]:
        """The rules, in evaluation order."""
        return self.config.rules

    def to_dict(self) -> dict[str, Any]:
        """The configuration as plain data (``RulePolicy.from_config(p.to_dict())`` rebuilds it)."""
        return self.config.model_dump(mode="json", by_alias=True, exclude_none=True)

    # ---------------------------------------------------------------- pure core

    def init(self) -> dict[str, Any]:
        """The state before the first step."""
        return {
            "format": STATE_FORMAT,
            "t": 0,
            "veto_streak": 0,
            "rules": {rule.name: _rule_init(rule) for rule in self.rules},
        }

    def update(self, report: StepReport, state: Mapping[str, Any]) -> Evaluation:
        """Decide one step from ``report`` and ``state`` without touching ``self``.

        Returns:
            The decision, the state after this step, and the alerts due.
        """
        values = report_values(report)
        t = int(state["t"])
        if not self.rules:  # nothing to evaluate: allow, and count the step
            return Evaluation(_combine([], values), {**state, "t": t + 1, "veto_streak": 0}, ())
        rules_state = {name: dict(s) for name, s in state["rules"].items()}

        details: dict[str, str | None] = {}
        for rule in self.rules:
            rs = rules_state[rule.name]
            detail, rs["condition"] = rule.condition.update(values, rs["condition"])
            if detail is not None:
                rs["matched"] += 1
            details[rule.name] = detail

        parts: list[tuple[str, Proposal]] = []
        fired: set[str] = set()
        scale = 1.0
        for rule in self.rules:
            rs = rules_state[rule.name]
            last = rs["last_fired"]
            detail = details[rule.name] if last is None or t - int(last) > rule.cooldown else None
            slots = [("action", rule.action)]
            if rule.escalate is not None:
                slots.append(("escalation", rule.escalate.action))
            chosen = None
            if detail is not None:
                chosen = 0
                if rule.escalate is not None and rs["streak"] + 1 >= rule.escalate.after:
                    chosen = 1
                    detail = f"{detail} (fired {rs['streak'] + 1} steps in a row: escalated)"
                fired.add(rule.name)
            proposals: list[Proposal] = []
            for i, (slot, action) in enumerate(slots):
                ctx = StepContext(t=t, step=report.step, values=values, scale=scale)
                if i == chosen:
                    assert detail is not None
                    proposal, rs[slot] = action.fire(ctx, rs[slot], detail)
                else:
                    proposal, rs[slot] = action.idle(ctx, rs[slot])
                if proposal is not None:
                    proposals.append(proposal)
                    scale = 0.0 if proposal.action == "veto" else scale * proposal.scale
            parts.extend((rule.name, p) for p in proposals)
            if chosen is not None and not rule.continues_after(slots[chosen][1]):
                break

        decision = _combine(parts, values)
        streak = int(state["veto_streak"]) + 1 if decision.action == "veto" else 0
        decision, streak = self._veto_guard(decision, streak, values, report.step)

        for rule in self.rules:
            rs = rules_state[rule.name]
            if rule.name in fired:
                rs["streak"] += 1
                rs["fired"] += 1
                rs["last_fired"] = t
            else:
                rs["streak"] = 0
        alerts = tuple(Alert(name, p.level, p.alert, report.step) for name, p in parts if p.alert is not None)
        new_state = {"format": STATE_FORMAT, "t": t + 1, "veto_streak": streak, "rules": rules_state}
        return Evaluation(decision, new_state, alerts)

    def _veto_guard(
        self, decision: Decision, streak: int, values: Mapping[str, float], step: int
    ) -> tuple[Decision, int]:
        limit = self.config.max_consecutive_vetoes
        if limit is None or decision.action != "veto" or streak < limit or decision.halt:
            return decision, streak
        cause = f"{streak} consecutive vetoes, the last by {decision.rule} ({decision.reason})"
        if self.config.on_max_vetoes == "halt":
            reason = f"{cause}: training halted at step {step}"
            return Decision("veto", 0.0, reason, MAX_VETOES_RULE, halt=True), streak
        if not math.isfinite(values.get("tau", math.nan)):
            return decision, streak
        return Decision("allow", 1.0, f"{cause}: giving up and applying the step", MAX_VETOES_RULE), 0

    # ---------------------------------------------------------------- Policy protocol

    def decide(self, report: StepReport) -> Decision:
        """Decide one step and keep the new state; log the alerts that are due."""
        evaluation = self.update(report, self._state)
        self._state = evaluation.state
        for alert in evaluation.alerts:
            logger.log(
                logging.getLevelName(alert.level.upper()),
                "step %d: rule %s: %s",
                alert.step,
                alert.rule,
                alert.message,
            )
        return evaluation.decision

    def state_dict(self) -> dict[str, Any]:
        """The policy's whole state, JSON-ready (a deep copy)."""
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`; an empty mapping resets to :meth:`init`.

        Rules missing from ``state`` start fresh; rules ``state`` has but this policy lacks
        are an error, since their state cannot be carried over.
        """
        fresh = self.init()
        if not state:
            self._state = fresh
            return
        missing = {"t", "rules"} - set(state)
        if missing:
            raise ValueError(f"not a {type(self).__name__} state: missing {sorted(missing)}")
        if int(state.get("format", STATE_FORMAT)) != STATE_FORMAT:
            raise ValueError(f"policy state format {state['format']} is not {STATE_FORMAT}")
        unknown = sorted(set(state["rules"]) - set(fresh["rules"]))
        if unknown:
            raise ValueError(
                f"the saved policy state has rules {unknown} that policy {self.name!r} does not have "
                f"(its rules: {[r.name for r in self.rules]})"
            )
        rules = fresh["rules"]
        for name, saved in state["rules"].items():
            rules[name] = {**rules[name], **copy.deepcopy(dict(saved))}
        self._state = {
            "format": STATE_FORMAT,
            "t": int(state["t"]),
            "veto_streak": int(state.get("veto_streak", 0)),
            "rules": rules,
        }

    def __repr__(self) -> str:
        return f"RulePolicy(name={self.name!r}, rules={[r.name for r in self.rules]})"


def _actions_of(rule: Rule) -> list[Any]:
    return [rule.action] + ([rule.escalate.action] if rule.escalate is not None else [])


def _rule_init(rule: Rule) -> dict[str, Any]:
    state: dict[str, Any] = {
        "condition": rule.condition.init(),
        "action": rule.action.init(),
        "streak": 0,
        "matched": 0,
        "fired": 0,
        "last_fired": None,
    }
    if rule.escalate is not None:
        state["escalation"] = rule.escalate.action.init()
    return state


def _combine(parts: list[tuple[str, Proposal]], values: Mapping[str, float]) -> Decision:
    if not parts:
        r = values.get("r")
        return Decision("allow", 1.0, "no rule fired" + (f" (r={r:.4g})" if r is not None else ""), None)
    lead_name, lead = max(parts, key=lambda part: (part[1].halt, SEVERITY[part[1].action]))
    halt = any(p.halt for _, p in parts)
    scale = 1.0
    for _, p in parts:
        scale = 0.0 if p.action == "veto" else scale * p.scale
    if any(p.action == "veto" for _, p in parts):
        action, scale = "veto", 0.0
    elif scale < 1.0:
        action = "clip"
    else:
        action, scale = "allow", 1.0
    reason = lead.reason if len(parts) == 1 else "; ".join(f"{name}: {p.reason}" for name, p in parts)
    if action == "clip" and not math.isfinite(values.get("tau", 0.0)):
        action, scale = "veto", 0.0
        reason += "; the update is non-finite, so it was skipped instead of scaled"
    return Decision(action, scale, reason, lead_name, halt)
