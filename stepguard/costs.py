"""What the guard costs, as running averages: the numbers the measurement budget plans with."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from stepguard.report import Reduction

REDUCTIONS: dict[str, Reduction] = {"cost_measure": "max", "cost_idle": "max", "cost_period": "max"}
"""Cross-rank reduction of each tensor of :meth:`CostMeter.tensors`: every rank plans with the
same costs, the largest (the slowest rank's)."""

PAUSE = 4.0
"""A sample more than this many times its running average is an outlier (a pause, a warm-up)."""


@dataclass
class CostMeter:
    """Exponential moving averages of the guard's cost and of the step without it (seconds).

    * ``measure`` (c_m): the guard's whole time on a measured step. The first measurement,
      which sets up the replay once, is left out.
    * ``idle`` (c_0): its time on an unmeasured step.
    * ``plain`` (T): the step without the guard, i.e. the time from the end of one step to
      the end of the next less the guard's own; a T more than ``PAUSE`` times its average
      is a pause (an evaluation loop, a checkpoint) and is left out.

    A cost sample more than ``PAUSE`` times its average is clipped to that.

    Args:
        decay: weight of the old average in each update.
    """

    decay: float = 0.8
    measure: float | None = None
    idle: float | None = None
    plain: float | None = None
    _last_end: float | None = None
    _first_measurement: bool = True

    def record(self, *, measured: bool, own: float, now: float) -> None:
        """One step ended at ``now`` (``time.perf_counter``) after ``own`` seconds in the guard."""
        if self._last_end is not None:
            plain = now - self._last_end - own
            if self.plain is None or plain <= PAUSE * self.plain:
                self.plain = self._ema(self.plain, plain)
        self._last_end = now
        if not measured:
            self.idle = self._ema(self.idle, _clipped(own, self.idle))
        elif self._first_measurement:
            self._first_measurement = False
        else:
            self.measure = self._ema(self.measure, _clipped(own, self.measure))

    def tensors(self, like: Tensor) -> dict[str, Tensor]:
        """The averages as 0-d float64 tensors on ``like``'s device (NaN when unknown), for a
        cross-rank reduction; fills, not host-to-device copies, so they never synchronize."""

        def fill(x: float | None) -> Tensor:
            return torch.full((), math.nan if x is None else x, dtype=torch.float64, device=like.device)

        return {
            "cost_measure": fill(self.measure),
            "cost_idle": fill(self.idle),
            "cost_period": fill(self.plain),
        }

    def plan(self, reduced: Mapping[str, Any]) -> dict[str, float | None] | None:
        """The costs to plan with: the reduced ones when given, this process's otherwise.

        Returns ``set_costs`` keywords, or None while c_m is unknown (the plan then waits).
        """
        measure = _known(reduced.get("cost_measure", self.measure))
        if measure is None:
            return None
        return {
            "measure": measure,
            "idle": _known(reduced.get("cost_idle", self.idle)),
            "period": _known(reduced.get("cost_period", self.plain)),
        }

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else self.decay * old + (1 - self.decay) * new


def _clipped(sample: float, average: float | None) -> float:
    return sample if average is None else min(sample, PAUSE * average)


def _known(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else x


class PhaseTimer:
    """Host seconds per named phase of a step: ``with timer.phase("measure"): ...``."""

    def __init__(self, **already: float) -> None:
        self.seconds: dict[str, float] = dict(already)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
