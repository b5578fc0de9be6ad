"""The sink protocol and the isolation layer that keeps a failing sink from stopping training."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from stepguard.report import StepReport

logger = logging.getLogger("stepguard.sinks")


@runtime_checkable
class Sink(Protocol):
    """Anything that receives step reports: ``write`` each one, ``flush`` and ``close`` at the end.

    A sink may raise: the guard isolates it (see :class:`SinkSet`), counts the failure,
    logs it once, and goes on training.
    """

    def write(self, report: StepReport) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class SinkSet:
    """Fans reports out to several sinks, isolating each one's failures.

    Args:
        sinks: the sinks to feed.
        max_failures: after this many consecutive failures a sink is dropped (``None``
            keeps retrying it on every report). A success resets its count.

    ``failures`` maps each sink's name to its total number of failures.
    """

    def __init__(self, sinks: Iterable[Sink] = (), *, max_failures: int | None = None) -> None:
        self.sinks: list[Sink] = []
        self.failures: dict[str, int] = {}
        self.max_failures = max_failures
        self._consecutive: dict[int, int] = {}
        self._logged: set[str] = set()
        for sink in sinks:
            self.add(sink)

    def add(self, sink: Sink) -> None:
        missing = [m for m in ("write", "flush", "close") if not callable(getattr(sink, m, None))]
        if missing:
            raise TypeError(
                f"{type(sink).__name__} is not a sink: it lacks {', '.join(missing)}(); "
                "a sink needs write(report), flush() and close()"
            )
        self.sinks.append(sink)
        self.failures.setdefault(self.name_of(sink), 0)

    @staticmethod
    def name_of(sink: Sink) -> str:
        return getattr(sink, "name", None) or type(sink).__name__

    def write(self, report: StepReport) -> None:
        for sink in list(self.sinks):
            self._call(sink, "write", report)

    def flush(self) -> None:
        for sink in list(self.sinks):
            self._call(sink, "flush")

    def close(self) -> None:
        for sink in list(self.sinks):
            self._call(sink, "close")

    def _call(self, sink: Sink, method: str, *args: object) -> None:
        name = self.name_of(sink)
        try:
            getattr(sink, method)(*args)
        except Exception as exc:  # a sink must never stop training
            self.failures[name] = self.failures.get(name, 0) + 1
            count = self._consecutive.get(id(sink), 0) + 1
            self._consecutive[id(sink)] = count
            if name not in self._logged:
                self._logged.add(name)
                logger.warning(
                    "stepguard sink %s failed in %s(): %s: %s (training continues; further "
                    "failures of this sink are counted, not logged)",
                    name,
                    method,
                    type(exc).__name__,
                    exc,
                )
            if self.max_failures is not None and count >= self.max_failures:
                self.sinks.remove(sink)
                logger.warning("stepguard sink %s dropped after %d consecutive failures", name, count)
        else:
            self._consecutive[id(sink)] = 0
