"""Vetoes in a row: a run whose every step is skipped is not training, whatever policy decided it."""

from __future__ import annotations

import dataclasses
import warnings

from stepguard.config import GuardConfig
from stepguard.report import StepReport


class VetoStreak:
    """Counts consecutive vetoes; warns after ``veto_warning_after``, halts after ``halt_after_vetoes``.

    A policy may veto the same non-finite or oversized step forever (a learning rate that
    is too high, an optimizer whose proposal stays non-finite); without escalation such
    a run stalls in silence. Any applied step (allow or clip) resets the count.
    """

    def __init__(self, config: GuardConfig) -> None:
        self.config = config
        self.count = 0

    def record(self, report: StepReport) -> StepReport:
        """The committed step's report, marked ``halt`` once the streak reaches the limit."""
        if report.action != "veto":
            self.count = 0
            return report
        self.count += 1
        cfg = self.config
        if self.count == cfg.veto_warning_after:
            warnings.warn(
                f"StepGuard: {self.count} steps in a row were vetoed (the last at step {report.step}: "
                f"{report.reason}); the run is not training. Lower the learning rate, check the "
                f"data, or loosen the policy; training halts after {cfg.halt_after_vetoes} "
                "(GuardConfig(veto_warning_after=..., halt_after_vetoes=...)).",
                UserWarning,
                stacklevel=6,
            )
        if cfg.halt_after_vetoes is not None and self.count >= cfg.halt_after_vetoes and not report.halt:
            why = f"{self.count} steps in a row were vetoed (GuardConfig.halt_after_vetoes)"
            reason = f"{report.reason}; {why}"
            return dataclasses.replace(report, halt=True, reason=reason)
        return report
