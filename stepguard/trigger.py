"""The budget scheduler: whether a step gets a fresh JVP, and what the guard costs.

One object owns everything budget mode needs: the :class:`~stepguard.schedule.MeasurementSchedule`
(the rules), the :class:`~stepguard.costs.CostMeter` (the running costs it plans with), the last
measured radius ρ_a and a fixed sample of Δθ's coordinates that tells when the direction turns.
On an unmeasured step everything it needs comes to the host in one read (τ, the loss, the
sketch's cosine); the engine reuses those numbers for the report. Under FSDP2 each rank
holds a shard of Δθ, so that read is one ``all_reduce`` of four sums (this rank's ‖Δθ‖²,
its sketch's dot product with the reference sketch, and both sketches' squared norms):
every rank then plans with the same global τ and cosine.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from stepguard.config import GuardConfig
from stepguard.costs import CostMeter
from stepguard.distributed import summed
from stepguard.schedule import MeasurementSchedule
from stepguard.snapshot import ParameterSnapshot, Update

SKETCH_SIZE = 4096
"""Coordinates of Δθ kept to compare directions between measurements."""


class MeasurementTrigger:
    """Decides, step by step, whether to measure; keeps the costs and the last radius."""

    def __init__(self, config: GuardConfig, *, sharded: bool = False) -> None:
        self.schedule = MeasurementSchedule(
            every=config.measure_every,
            budget=config.budget,
            tau_jump=config.tau_jump,
            r_alert=config.r_alert,
            min_cosine=config.min_cosine,
        )
        self.costs = CostMeter()
        self.last_rho: float | None = None
        self.host_values: dict[str, float] | None = None
        self._sketch_index: list[Tensor] = []
        self._sketch_ref: tuple[Tensor, Tensor] | None = None
        self._sharded = sharded

    @property
    def every_step(self) -> bool:
        return not self.schedule.needs_triggers

    def rebind(self) -> None:
        """The parameters changed: the sketch's coordinates must be drawn again."""
        self._sketch_index = []
        self._sketch_ref = None

    def due(
        self, snapshot: ParameterSnapshot, update: Update | None, tau: Tensor, loss: Any, timings: dict
    ) -> tuple[bool, str]:
        """Whether this step gets a fresh JVP, and why (see :class:`MeasurementSchedule`)."""
        self.host_values = None
        if self.every_step:
            return True, "every step"
        if self.last_rho is None or self._sketch_ref is None:
            return True, "first"
        started = time.perf_counter()
        if self._sharded:
            tau_value, cosine = self._read_sharded(tau, self._sketch(snapshot, update))
            self.host_values = {"tau": tau_value}
            timings["trigger"] = time.perf_counter() - started
            return self.schedule.due(tau_value, self._estimate(tau_value), cosine)
        names, parts = ["tau"], [tau]
        if isinstance(loss, Tensor) and loss.numel() == 1:
            names.append("loss")
            parts.append(loss.detach().reshape(()).to(tau.device))
        sketch = self._sketch(snapshot, update)
        if sketch is not None:
            parts += [sketch @ self._sketch_ref[0], torch.linalg.vector_norm(sketch), self._sketch_ref[1]]
        numbers = torch.stack(parts).tolist()  # the one host read of an unmeasured step
        self.host_values = dict(zip(names, numbers, strict=False))
        cosine = None
        if sketch is not None:
            along, length, reference = numbers[-3:]
            cosine = along / length if length > 0 and reference > 0 else 1.0
        timings["trigger"] = time.perf_counter() - started
        return self.schedule.due(numbers[0], self._estimate(numbers[0]), cosine)

    def _estimate(self, tau: float) -> float:
        """r estimated from this step's τ and the last measured radius."""
        rho = self.last_rho
        return 0.0 if rho == math.inf else (tau / rho if rho is not None and rho > 0 else math.nan)

    def _read_sharded(self, local_tau: Tensor, sketch: Tensor | None) -> tuple[float, float | None]:
        """The global τ and the sketch's cosine from this rank's shard, in one ``all_reduce``."""
        wide = torch.float64
        parts = [local_tau.to(wide).square()]
        if sketch is not None and self._sketch_ref is not None:
            s, ref = sketch.to(wide), self._sketch_ref[0].to(wide)
            parts += [s @ ref, s @ s, ref @ ref]
        numbers = summed(torch.stack(parts)).tolist()
        cosine = None
        if len(numbers) == 4:
            along, length_sq, reference_sq = numbers[1:]
            both = length_sq * reference_sq
            cosine = along / math.sqrt(both) if both > 0 else 1.0
        return math.sqrt(numbers[0]), cosine

    def remember_direction(self, snapshot: ParameterSnapshot, update: Update | None) -> None:
        """A measured step's direction becomes the reference for the next turns."""
        if self.every_step:
            return
        sketch = self._sketch(snapshot, update)
        if self._sharded:  # a shard's part: normalized only once summed over the ranks
            self._sketch_ref = None if sketch is None else (sketch, torch.zeros(()))
        else:
            self._sketch_ref = _unit(sketch)

    def measured_radius(self, rho: float) -> None:
        if math.isfinite(rho) or rho == math.inf:
            self.last_rho = rho

    def account(self, *, measured_values: Mapping[str, Any] | None, measured: bool, own: float) -> None:
        """Keep the running costs the budget needs, identical on every rank.

        ``own`` is all of the guard's time in the step (report, policy and sinks included),
        less the inner optimizer. ``measured_values`` are the synced (under
        ``torch.distributed``, reduced) numbers of a step that ran the measurement; the
        schedule only ever plans with those, so every rank plans alike. ``measured`` says
        whether that measurement produced a radius (a batch with no counted row does not).
        """
        now = time.perf_counter()
        self.costs.record(measured=measured_values is not None, own=own, now=now)
        if measured_values is None or not measured:
            self.schedule.skipped()
        else:
            self.schedule.measured(measured_values["tau"])
        if measured_values is not None and self.schedule.budget is not None:
            plan = self.costs.plan(measured_values)
            if plan is not None:
                self.schedule.set_costs(**plan)

    def _sketch(self, snapshot: ParameterSnapshot, update: Update | None) -> Tensor | None:
        """Δθ at a fixed uniform sample of coordinates, to tell when the direction turns."""
        if update is None:
            return None
        if not self._sketch_index:
            self._sketch_index = snapshot.sketch_indices(SKETCH_SIZE)
        return update.sketch(self._sketch_index)

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": self.schedule.state_dict(), "last_rho": self.last_rho}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.schedule.load_state_dict(state.get("schedule", {}))
        self.last_rho = state.get("last_rho")


def _unit(v: Tensor | None) -> tuple[Tensor, Tensor] | None:
    """(v/‖v‖, ‖v‖); a zero v stays zero, and a cosine against it reads as 1 ("no turn")."""
    if v is None:
        return None
    norm = torch.linalg.vector_norm(v)
    return torch.where(norm > 0, v / torch.where(norm > 0, norm, 1.0), v), norm
