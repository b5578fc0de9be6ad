"""Conditions: when a rule fires, as a test on the step's report and on running statistics.

Each condition is a frozen pydantic model (its hyperparameters) with two pure methods in the
manner of optax's ``(init, update)`` pairs:

* ``init() -> state``: the state before the first step (a JSON-ready dict);
* ``update(values, state) -> (detail, state)``: ``values`` are the report's numbers by
  dotted name (:meth:`StepReport.scalars`); ``detail`` is a short sentence saying why the
  condition holds, or ``None`` when it does not.

Every condition sees every step, whichever rule ends up deciding, so running statistics
(a spike's window, a streak) stay the same whatever the other rules do.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from stepguard.policy.fields import check_field

State = dict[str, Any]

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}
# YAML reads a bare `>` as a folded block, so the operators also have names.
_OP_NAMES = {"gt": ">", "ge": ">=", "lt": "<", "le": "<=", "eq": "==", "ne": "!="}


def _num(value: float) -> str:
    return f"{value:.4g}"


class _Condition(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def init(self) -> State:
        """The state before the first step."""
        return {}

    def update(self, values: Mapping[str, float], state: State) -> tuple[str | None, State]:
        """Test one step; returns ``(detail or None, new state)`` without mutating ``state``."""
        raise NotImplementedError

    def describe(self) -> str:
        """The condition in words, e.g. ``"r > 1"``."""
        raise NotImplementedError


class Threshold(_Condition):
    """``field op value``: a report number compared with a constant.

    A field the report does not carry this step (``loss`` when no loss was given) never
    satisfies the condition, and neither does NaN. Put a :class:`NonFinite` rule first.

    Args:
        field: a dotted report field (``r``, ``tau``, ``loss``, ``entanglement.ratio_chosen``, …).
        op: ``>``, ``>=``, ``<``, ``<=``, ``==``, ``!=`` (or ``gt``, ``ge``, ``lt``, ``le``, ``eq``, ``ne``).
        value: the constant.
    """

    kind: Literal["threshold"] = "threshold"
    field: str
    op: str = ">"
    value: float

    @field_validator("field")
    @classmethod
    def _check_field(cls, name: str) -> str:
        return check_field(name)

    @field_validator("op")
    @classmethod
    def _check_op(cls, op: str) -> str:
        op = _OP_NAMES.get(op, op)
        if op not in _OPS:
            known = ", ".join([*_OPS, *_OP_NAMES])
            raise ValueError(f"unknown operator {op!r}; use one of {known}")
        return op

    @field_validator("value")
    @classmethod
    def _check_value(cls, value: float) -> float:
        if math.isnan(value):
            raise ValueError("a threshold cannot be NaN")
        return value

    def update(self, values: Mapping[str, float], state: State) -> tuple[str | None, State]:
        x = values.get(self.field)
        if x is not None and _OPS[self.op](x, self.value):
            return f"{self.field}={_num(x)} {self.op} {self.value:g}", state
        return None, state

    def describe(self) -> str:
        return f"{self.field} {self.op} {self.value:g}"


#: The report numbers a :class:`NonFinite` condition checks by default.
NONFINITE_FIELDS: tuple[str, ...] = ("tau", "r", "rho_a", "loss", "grad_norm")
#: Radii are legitimately +inf (Δ_a = 0: the step does not move the logits).
INF_OK_FIELDS: tuple[str, ...] = ("rho_a", "rho_binary", "rho_top2")


class NonFinite(_Condition):
    """Any of ``fields`` is NaN or infinite (``+inf`` is fine for the fields in ``inf_ok``).

    A non-finite update τ cannot be applied or scaled (θ₀ + s·Δθ stays non-finite), and a
    non-finite r or ρ_a means the measurement itself failed.

    Args:
        fields: the report numbers to check; absent ones are skipped.
        inf_ok: fields for which ``+inf`` is a valid value (the radii, by default).
    """

    kind: Literal["nonfinite"] = "nonfinite"
    fields: tuple[str, ...] = NONFINITE_FIELDS
    inf_ok: tuple[str, ...] = INF_OK_FIELDS

    @field_validator("fields", "inf_ok")
    @classmethod
    def _check_fields(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(check_field(n) for n in names)

    def update(self, values: Mapping[str, float], state: State) -> tuple[str | None, State]:
        bad = []
        for name in self.fields:
            x = values.get(name)
            if x is None or math.isfinite(x) or (x == math.inf and name in self.inf_ok):
                continue
            bad.append(f"{name}={x}")
        return (f"non-finite {', '.join(bad)}" if bad else None), state

    def describe(self) -> str:
        return f"any of {', '.join(self.fields)} is non-finite"


class Spike(_Condition):
    """A value far from its running mean: a z-score over a sliding window, after a warm-up.

    With μ and σ the mean and standard deviation of the last ``window`` accepted values,

        z = (x − μ) / max(σ, min_std, min_rel_std·|μ|)

    fires when z > ``z`` (direction ``"up"``), z < −``z`` (``"down"``) or |z| > ``z``
    (``"both"``), once at least ``warmup`` values have been seen. The floor on σ keeps a
    flat series from turning a rounding difference into a spike. Non-finite and missing
    values are skipped; values that fire are left out of the window unless
    ``include_spikes``, so a spike does not raise the bar for the next one.

    Args:
        field: the report number to watch (typically ``loss``, ``grad_norm`` or ``r``).
        z: the z-score threshold.
        window: how many past values the statistics use.
        warmup: how many values must be in the window before the condition can fire.
        direction: ``"up"``, ``"down"`` or ``"both"``.
        min_std: an absolute floor on σ.
        min_rel_std: a floor on σ relative to |μ|.
        include_spikes: add values that fire to the window too.
    """

    kind: Literal["spike"] = "spike"
    field: str
    z: float = Field(default=6.0, gt=0)
    window: int = Field(default=100, ge=2)
    warmup: int = Field(default=20, ge=2)
    direction: Literal["up", "down", "both"] = "up"
    min_std: float = Field(default=0.0, ge=0)
    min_rel_std: float = Field(default=1e-3, ge=0)
    include_spikes: bool = False

    @field_validator("field")
    @classmethod
    def _check_field(cls, name: str) -> str:
        return check_field(name)

    @model_validator(mode="after")
    def _warmup_fits(self) -> Spike:
        if self.warmup > self.window:
            raise ValueError(f"warmup ({self.warmup}) cannot exceed window ({self.window})")
        return self

    def init(self) -> State:
        return {"values": []}

    def update(self, values: Mapping[str, float], state: State) -> tuple[str | None, State]:
        history = [float(v) for v in state.get("values", [])][-self.window :]
        x = values.get(self.field)
        if x is None or not math.isfinite(x):
            return None, {"values": history}
        detail = None
        n = len(history)
        if n >= self.warmup:
            mean = sum(history) / n
            std = math.sqrt(sum((h - mean) * (h - mean) for h in history) / n)
            floor = max(std, self.min_std, self.min_rel_std * abs(mean))
            if floor > 0:
                z = (x - mean) / floor
            elif x == mean:
                z = 0.0
            else:
                z = math.copysign(math.inf, x - mean)
            fired = {"up": z > self.z, "down": z < -self.z, "both": abs(z) > self.z}[self.direction]
            if fired:
                side = "above" if z > 0 else "below"
                detail = (
                    f"{self.field}={_num(x)} is {abs(z):.3g}σ {side} its mean {_num(mean)} "
                    f"over {n} steps (σ={std:.3g})"
                )
        if detail is None or self.include_spikes:
            history = [*history, float(x)][-self.window :]
        return detail, {"values": history}

    def describe(self) -> str:
        sign = {"up": "z >", "down": "z < -", "both": "|z| >"}[self.direction]
        return f"{self.field} spikes ({sign} {self.z:g} over the last {self.window} values)"


class Consecutive(_Condition):
    """``condition`` has held on each of the last ``count`` steps, this one included.

    It keeps firing while the run goes on, and resets at the first step where
    ``condition`` does not hold.

    Args:
        condition: the inner condition.
        count: how many steps in a row.
    """

    kind: Literal["consecutive"] = "consecutive"
    condition: AnyCondition
    count: int = Field(ge=1)

    def init(self) -> State:
        return {"run": 0, "inner": self.condition.init()}

    def update(self, values: Mapping[str, float], state: State) -> tuple[str | None, State]:
        detail, inner = self.condition.update(values, state.get("inner", self.condition.init()))
        run = int(state.get("run", 0)) + 1 if detail is not None else 0
        out = f"{detail} ({run} steps in a row)" if detail is not None and run >= self.count else None
        return out, {"run": run, "inner": inner}

    def describe(self) -> str:
        return f"{self.condition.describe()} on {self.count} consecutive steps"


class _Several(_Condition):
    conditions: tuple[AnyCondition, ...] = Field(min_length=1)

    def init(self) -> State:
        return {"inner": [c.init() for c in self.conditions]}

    def _each(self, values: Mapping[str, float], state: State) -> tuple[list[str | None], State]:
        states = list(state.get("inner", []))
        if len(states) != len(self.conditions):
            states = [c.init() for c in self.conditions]
        details, new = [], []
        for c, s in zip(self.conditions, states, strict=True):
            detail, s = c.update(values, s)
            details.append(detail)
            new.append(s)
        return details, {"inner": new}


class AllOf(_Several):
    """Every one of ``conditions`` holds (all are evaluated every step, so their statistics advance)."""

    kind: Literal["all"] = "all"

    def update(self, values: Mapping[str, float], state: State) -> tuple[str | None, State]:
        details, state = self._each(values, state)
        if all(d is not None for d in details):
            return " and ".join(d for d in details if d is not None), state
        return None, state

    def describe(self) -> str:
        return "(" + " and ".join(c.describe() for c in self.conditions) + ")"


class AnyOf(_Several):
    """At least one of ``conditions`` holds (all are evaluated every step)."""

    kind: Literal["any"] = "any"

    def update(self, values: Mapping[str, float], state: State) -> tuple[str | None, State]:
        details, state = self._each(values, state)
        hits = [d for d in details if d is not None]
        return ("; ".join(hits) if hits else None), state

    def describe(self) -> str:
        return "(" + " or ".join(c.describe() for c in self.conditions) + ")"


class Not(_Condition):
    """``condition`` does not hold."""

    kind: Literal["not"] = "not"
    condition: AnyCondition

    def init(self) -> State:
        return {"inner": self.condition.init()}

    def update(self, values: Mapping[str, float], state: State) -> tuple[str | None, State]:
        detail, inner = self.condition.update(values, state.get("inner", self.condition.init()))
        return (f"not ({self.condition.describe()})" if detail is None else None), {"inner": inner}

    def describe(self) -> str:
        return f"not ({self.condition.describe()})"


class Always(_Condition):
    """Every step (a catch-all, or a rule that only carries a stateful action)."""

    kind: Literal["always"] = "always"

    def update(self, values: Mapping[str, float], state: State) -> tuple[str | None, State]:
        return "always", state

    def describe(self) -> str:
        return "always"


_SHORTHAND = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(>=|<=|==|!=|>|<)\s*(\S+)\s*$")
_BARE_KINDS = ("nonfinite", "always")


def _parse_condition(value: Any) -> Any:
    """Accept ``"r > 1"``, ``"nonfinite"`` and ``"always"`` as short forms of a condition."""
    if not isinstance(value, str):
        return value
    if value.strip() in _BARE_KINDS:
        return {"kind": value.strip()}
    match = _SHORTHAND.match(value)
    if match is None:
        raise ValueError(
            f"cannot read condition {value!r}: write 'FIELD OP VALUE' (e.g. 'r > 1'), "
            f"{' or '.join(repr(k) for k in _BARE_KINDS)}, or a mapping with a 'kind'"
        )
    field, op, number = match.groups()
    try:
        threshold = float(number)
    except ValueError:
        raise ValueError(f"cannot read condition {value!r}: {number!r} is not a number") from None
    return {"kind": "threshold", "field": field, "op": op, "value": threshold}


#: Any condition, told apart by its ``kind`` (strings are read as short forms).
AnyCondition = Annotated[
    Union[Threshold, NonFinite, Spike, Consecutive, AllOf, AnyOf, Not, Always],  # noqa: UP007
    Field(discriminator="kind"),
    BeforeValidator(_parse_condition),
]

CONDITION_KINDS: tuple[str, ...] = (
    "threshold",
    "nonfinite",
    "spike",
    "consecutive",
    "all",
    "any",
    "not",
    "always",
)

for _model in (Consecutive, _Several, AllOf, AnyOf, Not):
    _model.model_rebuild()
