"""The guard's account of committed steps: how many, what was decided, and the veto streak."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from stepguard.config import GuardConfig
from stepguard.escalation import VetoStreak
from stepguard.report import ACTIONS, Decision, StepReport


class StepLedger:
    """Records each committed step: counts it, gives its report the decision, escalates vetoes.

    Attributes:
        step_count: committed steps so far (the next report's ``step``).
        counters: committed steps per action (``allow``, ``clip``, ``veto``).
        rule_counters: committed steps per deciding rule.
        last_report: the report of the last committed step (None before the first).
        vetoes: the vetoes in a row, which warn and then halt.
    """

    def __init__(self, config: GuardConfig) -> None:
        self.step_count = 0
        self.counters: dict[str, int] = dict.fromkeys(ACTIONS, 0)
        self.rule_counters: dict[str, int] = {}
        self.last_report: StepReport | None = None
        self.vetoes = VetoStreak(config)

    def record(self, report: StepReport, decision: Decision, timings: Mapping[str, float]) -> StepReport:
        """Count the committed step and return its report with the decision (and ``halt`` when
        vetoes keep coming); the realized changes of watched objectives follow the applied step."""
        self.counters[decision.action] += 1
        if decision.rule is not None:
            self.rule_counters[decision.rule] = self.rule_counters.get(decision.rule, 0) + 1
        changes: dict[str, Any] = {}
        if report.entanglement:  # the realized changes follow the applied (scaled) update
            changes["entanglement"] = {
                n: v * decision.scale if n.startswith("realized.") else v
                for n, v in report.entanglement.items()
            }
        report = dataclasses.replace(
            report,
            **changes,
            action=decision.action,
            scale=decision.scale,
            applied_tau=report.tau * decision.scale if decision.scale else 0.0,
            reason=decision.reason,
            rule=decision.rule,
            halt=decision.halt,
            timings=timings,
        )
        report = self.vetoes.record(report)
        self.step_count += 1
        self.last_report = report
        return report
