"""What the framework callbacks share: logging windows, the sink that collects reports, and
the wrapper that keeps a user's sinks open across fits. Imports no framework."""

from __future__ import annotations

import math
from collections import deque

from stepguard.report import StepReport
from stepguard.sinks.base import Sink, SinkSet

DEFAULT_MAX_REPORTS = 1000
"""How many of the most recent reports a callback keeps (``None`` keeps all)."""

LOGGED_FIELDS: tuple[str, ...] = ("r", "rho_a", "tau", "applied_tau", "delta_a", "scale")
"""Report fields logged with their value at the last step of each logging window."""


class LogWindow:
    """The reports since the last log point, reduced to what the log shows (constant memory)."""

    def __init__(self) -> None:
        self.last: StepReport | None = None
        self.r_max = math.nan
        self.clipped = 0
        self.vetoed = 0

    def add(self, report: StepReport) -> None:
        self.last = report
        if not math.isnan(report.r) and (math.isnan(self.r_max) or report.r > self.r_max):
            self.r_max = report.r
        self.clipped += report.action == "clip"
        self.vetoed += report.action == "veto"

    def metrics(self, suffix: str = "") -> dict[str, float]:
        """``stepguard/<field><suffix>`` of the last report, plus r_max and the action counts."""
        assert self.last is not None
        values = {name: float(getattr(self.last, name)) for name in LOGGED_FIELDS}
        values |= {"r_max": self.r_max, "clipped": float(self.clipped), "vetoed": float(self.vetoed)}
        return {f"stepguard/{name}{suffix}": value for name, value in values.items()}


class CollectSink:
    """The sink through which a callback sees every report: kept in ``stores``, summed in a window."""

    def __init__(self, name: str, *stores: deque[StepReport]) -> None:
        self.name = name
        self.stores = stores
        self.window = LogWindow()

    def write(self, report: StepReport) -> None:
        for store in self.stores:
            store.append(report)
        self.window.add(report)

    def take_window(self) -> LogWindow | None:
        """The window since the last call (None when no step was reported in it)."""
        if self.window.last is None:
            return None
        window, self.window = self.window, LogWindow()
        return window

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class KeepOpen:
    """A user's sink as a guard sees it: the guard's ``close()`` only flushes it.

    A callback builds (or re-attaches) guards at every fit or ``train()``; the user's sinks
    outlive each of them and are closed by the callback's own ``close()``.
    """

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.name = SinkSet.name_of(sink)

    def write(self, report: StepReport) -> None:
        self.sink.write(report)

    def flush(self) -> None:
        self.sink.flush()

    def close(self) -> None:
        self.sink.flush()


def check_max_reports(max_reports: int | None) -> int | None:
    """``max_reports`` if it is a positive int or None; a clear error otherwise."""
    if max_reports is not None and (not isinstance(max_reports, int) or max_reports < 1):
        raise ValueError(
            f"max_reports must be a positive int (or None to keep every report), got {max_reports!r}"
        )
    return max_reports
