"""When to run a fresh JVP: every N steps, or within a time budget with triggers.

ρ_a depends on the direction of the update, not on its length, so between measurements
r is estimated for free as τ_t/ρ_a(last measured direction). A fresh measurement is due
when the schedule says so, or whenever the estimate can no longer be trusted:

* τ jumped: τ_t/τ_ref ∉ [1/``tau_jump``, ``tau_jump``] (τ_ref: τ at the last measurement),
  or the last measured step did not move (τ_ref = 0) and this one does; a learning-rate
  spike multiplies τ on the very step it happens;
* the estimate nears the boundary: τ_t/ρ_a(last) ≥ ``r_alert``;
* the direction turned: the cosine between Δθ_t and the last measured Δθ, on a fixed
  random sample of coordinates, fell below ``min_cosine``. In budget mode a turn is
  measured only when the budget can afford it (below).

In budget mode the interval is set from measured costs so that the guard's own time stays
within ``budget`` × the time T the step takes without it (data, forward, backward,
optimizer): with c_m the guard's cost on a measured step and c_0 on an unmeasured one,
one measurement every N = ⌈(c_m − c_0) / (budget·T − c_0)⌉ steps (at most
``max_interval``). A τ jump and a non-finite τ (or estimate) are measured whatever the
budget says: a spike is measured on the step it happens. An estimate near the boundary
and a turn of the direction are measured only out of saved credit (early in training an
estimate near the boundary can hold for hundreds of steps; measuring each would spend the
budget many times over, while the estimate itself is already what the policy clips on):
every step earns budget·T minus its modelled cost (c_0, or c_m when measured), and these
two trigger a measurement only while the credit covers one (c_m). Without a budget
(``measure_every``) every trigger measures at once. The credit uses the modelled costs,
which every rank shares after the cross-rank reduction, so ranks agree on every decision
to measure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class MeasurementSchedule:
    """Decides, step by step, whether the guard runs a fresh JVP.

    Args:
        every: measure every this many steps (without a budget).
        budget: target fraction of the step time spent in the guard (None: no budget).
        tau_jump: ratio of τ to τ_ref beyond which a measurement is forced.
        r_alert: an estimated r at or above this asks for a measurement (in budget mode,
            out of saved credit).
        min_cosine: a direction cosine below this forces a measurement.
        max_interval: the longest run of estimated steps.
    """

    every: int = 1
    budget: float | None = None
    tau_jump: float = 1.5
    r_alert: float = 0.5
    min_cosine: float = 0.5
    max_interval: int = 64
    interval: int = 1
    since: int = 0
    tau_ref: float | None = None
    measure_cost: float | None = None
    idle_cost: float | None = None
    step_period: float | None = None  # T: the step's time without the guard
    credit: float = 0.0

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"measure_every must be >= 1, got {self.every}")
        if self.budget is not None and not 0 < self.budget < 1:
            raise ValueError(f"budget must lie in (0, 1), got {self.budget}")
        self.interval = self.every if self.budget is None else 1

    @property
    def needs_triggers(self) -> bool:
        """Whether :meth:`due` reads τ and the direction cosine (budget or sparse schedules)."""
        return self.budget is not None or self.every > 1

    def due(self, tau: float | None, r_estimate: float | None, cosine: float | None) -> tuple[bool, str]:
        """Whether to measure this step, and why."""
        if self.tau_ref is None or r_estimate is None:
            return True, "first"
        if self.since + 1 >= self.interval:
            return True, "schedule"
        if tau is not None and not math.isfinite(tau):
            return True, "nonfinite"
        if tau is not None and self.tau_ref > 0:
            ratio = tau / self.tau_ref
            if ratio > self.tau_jump or ratio < 1.0 / self.tau_jump:
                return True, "tau_jump"
        elif tau is not None and tau > 0:
            return True, "tau_jump"  # the last measured step did not move at all
        if math.isnan(r_estimate):
            return True, "r_alert"
        if r_estimate >= self.r_alert and self._affordable():
            return True, "r_alert"
        if cosine is not None and cosine < self.min_cosine and self._affordable():
            return True, "direction"
        return False, "estimate"

    def _affordable(self) -> bool:
        """Whether an unplanned measurement fits the budget: the saved credit covers one."""
        if self.budget is None or self.measure_cost is None:
            return True
        return self.credit >= self.measure_cost

    def measured(self, tau: float) -> None:
        self.since = 0
        self.tau_ref = tau
        self._earn(self.measure_cost)

    def skipped(self) -> None:
        self.since += 1
        self._earn(self.idle_cost or 0.0)

    def _earn(self, cost: float | None) -> None:
        """credit += allowance − (this step's modelled cost), kept within ±2 measurements."""
        allowance = self._allowance()
        if allowance is None or cost is None or self.measure_cost is None:
            return
        cap = 2.0 * self.measure_cost
        self.credit = max(-cap, min(cap, self.credit + allowance - cost))

    def _allowance(self) -> float | None:
        """The guard time one step may use: budget × T, T the step without the guard."""
        if self.budget is None or self.step_period is None or not math.isfinite(self.step_period):
            return None
        return self.budget * self.step_period

    def set_costs(self, *, measure: float, idle: float | None, period: float | None) -> None:
        """Set the interval from the costs (seconds): N = ⌈(c_m − c_0) / (budget·T − c_0)⌉.

        Over N steps, one measured, the guard spends c_m + (N − 1)·c_0, which must stay
        within N·budget·T; ``period`` is T, the step's time without the guard.
        """
        self.measure_cost, self.idle_cost, self.step_period = measure, idle, period
        allowance = self._allowance()
        if allowance is None:
            return
        idle = idle or 0.0
        room = allowance - idle
        if room <= 0:
            self.interval = self.max_interval
        else:
            self.interval = max(1, min(self.max_interval, math.ceil(max(measure - idle, 0.0) / room)))

    def state_dict(self) -> dict[str, float | int | None]:
        return {
            "interval": self.interval,
            "since": self.since,
            "tau_ref": self.tau_ref,
            "measure_cost": self.measure_cost,
            "idle_cost": self.idle_cost,
            "step_period": self.step_period,
            "credit": self.credit,
        }

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            if key in self.state_dict():
                setattr(self, key, value)
