"""The record that flows through StepGuard: one :class:`StepReport` per optimizer step.

Live training and the post-hoc analyzer both produce ``StepReport`` objects, so every
sink and every renderer serves both. A report holds Python scalars only (no tensors), so a
JSON line stores it losslessly and a sink can never keep a training tensor alive.

Every number has one definition (see ``docs/concepts.md``) and one name everywhere: the
report field ``r`` is the TensorBoard tag ``stepguard/r`` and the Prometheus metric
``stepguard_normalized_step``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Action = Literal["allow", "clip", "veto"]
Estimator = Literal["jvp", "finite_difference", "estimate", "none"]
Source = Literal["live", "replay"]

ACTIONS: tuple[Action, ...] = ("allow", "clip", "veto")


@dataclass(frozen=True)
class Decision:
    """What the policy decided for one step.

    Attributes:
        action: ``"allow"`` keeps the proposed update, ``"clip"`` applies
            ``θ₀ + scale·Δθ``, ``"veto"`` restores θ₀ (and the optimizer state).
        scale: the fraction of the proposed update that is applied: 1 for allow,
            ``c·ρ_a/τ`` for clip, 0 for veto.
        reason: a sentence a person can read, e.g. ``"r=31.2 > 1.0: clipped to r=1"``.
        rule: the name of the rule that decided (``None`` when no rule fired).
        halt: stop training after this step is committed: the guard sends the report to
            the sinks, then raises :class:`~stepguard.HaltTraining` naming the step and reason.
        restore_state: on a veto, also restore the optimizer state (Adam's moments,
            momentum) to what it was before the step; False keeps the state's update and
            only skips the parameter change.
    """

    action: Action = "allow"
    scale: float = 1.0
    reason: str = ""
    rule: str | None = None
    halt: bool = False
    restore_state: bool = True

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"Decision.action must be one of {ACTIONS}, got {self.action!r}")
        if not (0.0 <= self.scale <= 1.0) or math.isnan(self.scale):
            raise ValueError(f"Decision.scale must lie in [0, 1], got {self.scale!r}")
        if self.action == "allow" and self.scale != 1.0:
            raise ValueError("an 'allow' decision applies the whole step: scale must be 1")
        if self.action == "veto" and self.scale != 0.0:
            raise ValueError("a 'veto' decision applies nothing: scale must be 0")


@dataclass(frozen=True)
class SpreadSummary:
    """Distribution of the per-sample logit spreads Δ_n = max_k a_{n,k} − min_k a_{n,k}.

    ``values`` holds the per-sample spreads themselves when there are at most
    ``GuardConfig.max_spread_values`` of them (for histograms); otherwise it is empty and
    only the summary statistics are kept.
    """

    count: int = 0
    max: float = 0.0
    q99: float = 0.0
    q90: float = 0.0
    median: float = 0.0
    mean: float = 0.0
    min: float = 0.0
    values: tuple[float, ...] = ()


@dataclass(frozen=True)
class StepReport:
    """Everything StepGuard measured and decided for one optimizer step.

    Geometry ("Ghosts of Softmax", arXiv 2603.13552):

    * ``tau`` τ = ‖Δθ‖₂, the length of the optimizer's proposed update.
    * ``delta_a`` Δ_a = max_n (max_k a_{n,k} − min_k a_{n,k}), with a = J_z·Δθ/τ.
    * ``rho_a`` ρ_a = π/Δ_a, the safe-step radius (``inf`` when Δ_a = 0).
    * ``r`` r = τ/ρ_a, the normalized step; r < 1 is inside the radius.
    * ``rho_binary`` ρ* = min_n √(s_n² + π²)/|a_n|, exact for one- and two-logit heads.
    * ``rho_top2`` min over samples of the top-2 radius √(δ_n² + π²)/|s_n| (≥ ρ_a).
    * ``binding`` indices (within the measured batch) of the samples with the smallest
      top-2 radius: the samples that limit the step.

    Decision: ``action``, ``scale``, ``applied_tau`` (= scale·τ), ``reason``, ``rule``.

    ``estimator`` says how the logit velocities were obtained: ``"jvp"`` (forward-mode
    AD), ``"finite_difference"`` (an op without forward-mode support), ``"estimate"``
    (no fresh measurement: r estimated as τ/ρ_a of the last measured direction) or
    ``"none"`` (nothing measurable, e.g. a zero update).

    Softmax collapse and naive loss minimization ("Grokking at the Edge of Numerical
    Stability", arXiv 2501.04697), gradient entanglement ("A Common Pitfall of
    Margin-based Language Model Alignment", arXiv 2410.13828) and loss components land in
    the optional fields and in ``extras``.

    ``grad_norm`` (the gradient as the optimizer left it), ``update_param_cosine``, the
    spread, radii and softmax-collapse fields come with a fresh measurement; on an
    estimated step (``measured=False``) they are ``None`` (or empty) and the report carries
    τ, the estimated r, the loss and the decision.
    """

    step: int
    tau: float
    rho_a: float
    r: float
    delta_a: float
    spread: SpreadSummary = field(default_factory=SpreadSummary)
    action: Action = "allow"
    scale: float = 1.0
    applied_tau: float = 0.0
    reason: str = ""
    rule: str | None = None
    halt: bool = False
    estimator: Estimator = "jvp"
    measured: bool = True
    rho_binary: float | None = None
    rho_top2: float | None = None
    binding: tuple[int, ...] = ()
    loss: float | None = None
    lr: float | None = None
    grad_norm: float | None = None
    update_param_cosine: float | None = None
    sc_fraction: float | None = None
    sc_zero_loss_fraction: float | None = None
    max_logit_gap: float | None = None
    logz_mean: float | None = None
    logz_sq_mean: float | None = None
    nlm_cosine: float | None = None
    entanglement: Mapping[str, float] = field(default_factory=dict)
    extras: Mapping[str, float] = field(default_factory=dict)
    timings: Mapping[str, float] = field(default_factory=dict)
    source: Source = "live"
    rank: int = 0
    world_size: int = 1

    @property
    def decision(self) -> Decision:
        """The decision part of the report as a :class:`Decision`."""
        return Decision(
            action=self.action, scale=self.scale, reason=self.reason, rule=self.rule, halt=self.halt
        )

    def scalars(self) -> dict[str, float]:
        """Every numeric field as a flat ``name → float`` mapping (for sinks).

        Optional fields that are ``None`` are left out, and so are the decision's text and
        its ``halt`` flag (a halted run stops at that step); nested mappings are flattened with
        a dot (``entanglement.gram.chosen.rejected``, ``extras.loss.base``,
        ``timings.jvp``); the spread summary appears as ``spread.max`` and so on.
        """
        out: dict[str, float] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("entanglement", "extras", "timings"):
                out.update({f"{f.name}.{k}": float(v) for k, v in value.items()})
            elif f.name == "spread":
                for s in dataclasses.fields(SpreadSummary):
                    if s.name != "values":
                        out[f"spread.{s.name}"] = float(getattr(value, s.name))
            elif isinstance(value, (bool, int, float)) and f.name not in ("rank", "world_size", "halt"):
                out[f.name] = float(value)
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: non-finite floats become the strings ``"inf"``, ``"-inf"``, ``"nan"``."""
        return json_ready(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StepReport:
        """Inverse of :meth:`to_dict` (unknown keys raise, so a schema change is never silent)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown StepReport fields {sorted(unknown)}; known: {sorted(known)}")
        values = {k: _from_json(v) for k, v in data.items()}
        if isinstance(values.get("spread"), Mapping):
            spread = dict(values["spread"])
            spread["values"] = tuple(spread.get("values", ()))
            values["spread"] = SpreadSummary(**spread)
        if "binding" in values:
            values["binding"] = tuple(values["binding"])
        return cls(**values)


def evolve(report: StepReport, **changes: Any) -> StepReport:
    """``dataclasses.replace(report, **changes)`` for the guard's hot path.

    A :class:`StepReport` has no ``__post_init__`` to re-run, so the copy is made by
    copying the instance dict (one dict update instead of a 35-argument ``__init__``).
    Unknown field names raise, as with ``dataclasses.replace``.
    """
    unknown = changes.keys() - _FIELD_NAMES
    if unknown:
        raise TypeError(f"StepReport has no fields {sorted(unknown)}")
    new = object.__new__(StepReport)
    new.__dict__.update(report.__dict__)
    new.__dict__.update(changes)
    return new


def json_ready(value: Any) -> Any:
    """Non-finite floats become the strings ``"nan"``, ``"inf"``, ``"-inf"``, recursively (strict JSON)."""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(StepReport))


def _from_json(value: Any) -> Any:
    if isinstance(value, str) and value in _NON_FINITE:
        return _NON_FINITE[value]
    if isinstance(value, Mapping):
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value
