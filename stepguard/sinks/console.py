"""Console sink: a compact line per step for humans."""

from __future__ import annotations

import sys
from typing import TextIO

from stepguard.report import StepReport


def format_report(report: StepReport) -> str:
    """One line: step, r, ρ_a, τ, the action and, when the step was changed, why."""
    text = (
        f"step {report.step:>6}  r={report.r:<9.4g} rho_a={report.rho_a:<9.4g} "
        f"tau={report.tau:<9.4g} {report.action}"
    )
    if report.action != "allow":
        text += f"  ({report.reason})"
    return text


class ConsoleSink:
    """Print a line every ``every`` steps, and always for a clipped or vetoed step.

    Args:
        every: print one step in this many (clips and vetoes are always printed).
        stream: where to print (default: standard error).
    """

    name = "console"

    def __init__(self, every: int = 1, stream: TextIO | None = None) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = every
        self.stream = stream

    def write(self, report: StepReport) -> None:
        if report.action != "allow" or report.step % self.every == 0:
            print(format_report(report), file=self.stream or sys.stderr)

    def flush(self) -> None:
        (self.stream or sys.stderr).flush()

    def close(self) -> None:
        self.flush()
