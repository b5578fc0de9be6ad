"""The exceptions a guarded step can raise."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stepguard.report import StepReport


class NoBatchError(RuntimeError):
    """The guard has no training batch (or no model) to measure the step on.

    Raised before the inner optimizer runs, so the step is not applied.
    """


class HaltTraining(RuntimeError):
    """A policy decided that training must stop; raised after the step was committed and reported.

    Attributes:
        step: the step index the guard was at.
        reason: the policy's reason.
        report: the :class:`~stepguard.StepReport` of that step.
    """

    def __init__(self, report: StepReport) -> None:
        self.step = report.step
        self.reason = report.reason
        self.report = report
        super().__init__(
            f"StepGuard halted training at step {report.step}: {report.reason} (rule {report.rule})"
        )
