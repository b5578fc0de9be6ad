"""The record that flows through StepGuard: one :class:`StepReport` per optimizer step.

Live training and the post-hoc analyzer both produce ``StepReport`` objects, so every
sink and every renderer serves both. A report holds Python scalars only (no tensors), so a
JSON line stores it losslessly and a sink can never keep a training tensor alive.

Every number has one definition (see ``docs/concepts.md``) and one name everywhere: the
report field ``r`` is the TensorBoard tag ``stepguard/r`` and the Prometheus metric
``stepguard_normalized_step``.

Each field is declared once, on the dataclass, with :func:`declare`: its meaning, unit,
cross-rank reduction, the name of the measured tensor that carries it, and its exported
names. :data:`FIELDS` reads the declarations; the cross-rank reduction
(:mod:`stepguard.distributed`), the row summaries of the measurement
(:mod:`stepguard.measure`) and the exporters (:mod:`stepguard.integrations.naming`) are
built from it, so a new metric is one declaration and the kernel that computes it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, get_args

Action = Literal["allow", "clip", "veto"]
Estimator = Literal["jvp", "finite_difference", "estimate", "none"]
Source = Literal["live", "replay"]

ACTIONS: tuple[Action, ...] = ("allow", "clip", "veto")

Reduction = Literal["max", "min", "sum", "row_mean", "mean", "none"]
"""How a measured number is combined across data-parallel ranks (see :mod:`stepguard.distributed`).

* ``"max"`` / ``"min"``: the largest / smallest value over the ranks (NaN on any rank stays NaN).
* ``"sum"``: the total over the ranks (the row count).
* ``"row_mean"``: a per-row average, weighted by each rank's row count.
* ``"mean"``: the plain average over the ranks.
* ``"none"``: never sent to the reduction: derived on every rank from reduced numbers, the
  same on every rank, or this rank's own (``timings``, ``rank``).
"""

REDUCTIONS: tuple[Reduction, ...] = get_args(Reduction)

TAG_PREFIX = "stepguard/"
"""Prefix of every TensorBoard tag StepGuard writes."""

_DECLARATION = "stepguard"


@dataclass(frozen=True)
class FieldInfo:
    """The declaration of one report field: what it means and how it travels and is exported.

    Attributes:
        name: the key in :meth:`StepReport.scalars` (``"r"``, ``"spread.q99"``); for a
            nested mapping (``label`` set) the prefix of its keys (``"extras"``).
        meaning: one sentence, its definition.
        unit: its unit (``"1"`` for a ratio, a cosine or a fraction).
        reduce: its cross-rank :data:`Reduction`.
        wire: the name of the measured tensor that carries it to the reduction and the
            host (the field's own name unless given); for a nested mapping, each key
            travels as ``"<wire>.<key>"``.
        prometheus: the Prometheus metric family (``None``: not exported, and not a key of
            :meth:`StepReport.scalars`).
        help: the Prometheus ``# HELP`` text.
        label: for a nested mapping or a spread statistic, the Prometheus label that
            carries the key.
        row_summary: a summary over the counted rows of the batch, left out of the
            report of a step in which no row counts.
        tensorboard: written as the TensorBoard scalar :attr:`tag`.
        direction_power: p such that the value measured along s·u is s^p times its value
            along the unit direction u: 1 for a logit velocity statistic (Δ_a, the
            spreads), −1 for a radius, 0 for everything else. A measurement along a
            direction of assumed length (FSDP2 replays before the global τ is known) is
            corrected by (assumed/actual)^p after the reduction.
    """

    name: str
    meaning: str
    unit: str
    reduce: Reduction
    wire: str
    prometheus: str | None = None
    help: str | None = None
    label: str | None = None
    row_summary: bool = False
    tensorboard: bool = True
    direction_power: int = 0

    @property
    def tag(self) -> str | None:
        """The TensorBoard tag (``stepguard/<name>``, or ``stepguard/<name>.<key>`` when nested)."""
        if not self.tensorboard or self.prometheus is None:
            return None
        return TAG_PREFIX + self.name + (".<key>" if self.nested else "")

    @property
    def nested(self) -> bool:
        """True for a mapping field whose keys become ``<name>.<key>``."""
        return self.label is not None and "." not in self.name


def declare(
    meaning: str,
    unit: str = "1",
    *,
    reduce: Reduction,
    wire: str | None = None,
    prometheus: str | None = None,
    help: str | None = None,
    label: str | None = None,
    row_summary: bool = False,
    tensorboard: bool = True,
    direction_power: int = 0,
) -> Mapping[str, FieldInfo]:
    """The ``metadata`` of a report field: ``x: float = field(default=0.0, metadata=declare(...))``.

    See :class:`FieldInfo` for the arguments; the name is the field's own.
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce={reduce!r} is not a reduction; use one of {REDUCTIONS}")
    if (prometheus is None) != (help is None):
        raise ValueError(f"declare {meaning!r}: a Prometheus metric needs both a name and a help text")
    if direction_power not in (-1, 0, 1):
        raise ValueError(f"declare {meaning!r}: direction_power must be -1, 0 or 1, got {direction_power!r}")
    info = FieldInfo(
        "", meaning, unit, reduce, wire or "", prometheus, help, label, row_summary, tensorboard,
        direction_power,
    )
    return MappingProxyType({_DECLARATION: info})


_SPREAD_METRIC = "stepguard_sample_logit_spread"
_SPREAD_HELP = "Distribution of the per-sample logit spreads of the last measured batch."


def _spread_stat(
    meaning: str, *, wire: str, reduce: Reduction, row_summary: bool = True
) -> Mapping[str, FieldInfo]:
    """The declaration of a statistic of the per-sample spreads: a label value of one metric."""
    return declare(
        meaning, "logit / parameter norm", reduce=reduce, wire=wire, prometheus=_SPREAD_METRIC,
        help=_SPREAD_HELP, label="stat", row_summary=row_summary, direction_power=1,
    )


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

    Whether a veto also restores the optimizer state is the policy's
    ``needs_state_backup`` (declared before the step, when the copy is taken).
    """

    action: Action = "allow"
    scale: float = 1.0
    reason: str = ""
    rule: str | None = None
    halt: bool = False

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

    count: int = field(default=0, metadata=declare(
        "Rows (samples or tokens) that counted in the measured batch.", "rows", reduce="sum",
        wire="count", prometheus="stepguard_measured_samples",
        help="Number of samples (or tokens) in the last measured batch.",
    ))
    max: float = field(default=0.0, metadata=_spread_stat(
        "Largest spread: Δ_a itself.", wire="delta_a", reduce="max", row_summary=False
    ))
    q99: float = field(default=0.0, metadata=_spread_stat(
        "99th percentile of the spreads.", wire="spread_q", reduce="max"
    ))
    q90: float = field(default=0.0, metadata=_spread_stat(
        "90th percentile of the spreads.", wire="spread_q", reduce="max"
    ))
    median: float = field(default=0.0, metadata=_spread_stat(
        "Median of the spreads.", wire="spread_q", reduce="max"
    ))
    mean: float = field(default=0.0, metadata=_spread_stat(
        "Mean of the spreads.", wire="spread_mean", reduce="row_mean"
    ))
    min: float = field(default=0.0, metadata=_spread_stat(
        "Smallest spread.", wire="spread_min", reduce="min"
    ))
    values: tuple[float, ...] = field(default=(), metadata=declare(
        "The per-sample spreads (for histograms), when there are few enough.",
        "logit / parameter norm", reduce="none", wire="values", row_summary=True, direction_power=1,
    ))


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

    step: int = field(metadata=declare(
        "Index of the optimizer step.", "step", reduce="none",
        prometheus="stepguard_step", help="Index of the last reported optimizer step.",
        tensorboard=False,
    ))
    tau: float = field(metadata=declare(
        "τ = ‖Δθ‖₂, the length of the proposed update.", "parameter norm", reduce="max",
        prometheus="stepguard_step_length",
        help="Step length tau = ||dtheta||_2 of the proposed update.",
    ))
    rho_a: float = field(metadata=declare(
        "ρ_a = π/Δ_a, the safe-step radius along the update direction.", "parameter norm",
        reduce="none", prometheus="stepguard_radius", direction_power=-1,
        help="Safe-step radius rho_a = pi / delta_a along the update direction (+Inf when delta_a = 0).",
    ))
    r: float = field(metadata=declare(
        "r = τ/ρ_a, the normalized step; r < 1 is inside the radius.", reduce="none",
        prometheus="stepguard_normalized_step",
        help="Normalized step r = tau / rho_a of the last step; r >= 1 leaves the softmax's radius.",
    ))
    delta_a: float = field(metadata=declare(
        "Δ_a = max_n (max_k a_nk − min_k a_nk), the batch logit spread along Δθ/τ.",
        "logit / parameter norm", reduce="max", prometheus="stepguard_logit_spread", direction_power=1,
        help="Batch logit spread delta_a = max over samples of max_k a_nk - min_k a_nk.",
    ))
    spread: SpreadSummary = field(default_factory=SpreadSummary, metadata=declare(
        "Distribution of the per-sample spreads; each statistic is declared on SpreadSummary.",
        "logit / parameter norm", reduce="none", direction_power=1,
    ))
    action: Action = field(default="allow", metadata=declare(
        "The policy's decision: allow, clip or veto.", "", reduce="none"))
    scale: float = field(default=1.0, metadata=declare(
        "Fraction of the proposed update that was applied.", reduce="none",
        prometheus="stepguard_step_scale", help="Fraction of the proposed update that was applied (0 to 1).",
    ))
    applied_tau: float = field(default=0.0, metadata=declare(
        "Length of the applied update, scale·τ.", "parameter norm", reduce="none",
        prometheus="stepguard_applied_step_length",
        help="Length of the update that was applied (scale * tau).",
    ))
    reason: str = field(default="", metadata=declare(
        "The decision in a sentence a person can read.", "", reduce="none"))
    rule: str | None = field(default=None, metadata=declare(
        "The policy rule that decided (None when no rule fired).", "", reduce="none"))
    halt: bool = field(default=False, metadata=declare(
        "Training stops after this step.", "bool", reduce="none"))
    estimator: Estimator = field(default="jvp", metadata=declare(
        "How the logit velocities were obtained.", "", reduce="none"))
    measured: bool = field(default=True, metadata=declare(
        "The step was freshly measured (False: r estimated).", "bool", reduce="none",
        prometheus="stepguard_step_measured",
        help="1 when the last step was freshly measured, 0 when r was estimated.",
    ))
    rho_binary: float | None = field(default=None, metadata=declare(
        "ρ* = min_n √(s_n² + π²)/|a_n|, exact for one- and two-logit heads.", "parameter norm",
        reduce="min", row_summary=True, prometheus="stepguard_binary_radius", direction_power=-1,
        help="Exact radius rho* for one- and two-logit heads.",
    ))
    rho_top2: float | None = field(default=None, metadata=declare(
        "Smallest per-sample top-2 radius √(δ_n² + π²)/|s_n| (≥ ρ_a).", "parameter norm",
        reduce="min", row_summary=True, prometheus="stepguard_top2_radius", direction_power=-1,
        help="Smallest per-sample top-2 radius over the measured batch.",
    ))
    binding: tuple[int, ...] = field(default=(), metadata=declare(
        "Rows with the smallest top-2 radius: the samples that limit the step.", "row index",
        reduce="none", row_summary=True,
    ))
    loss: float | None = field(default=None, metadata=declare(
        "The training loss of the step.", "loss", reduce="mean",
        prometheus="stepguard_loss", help="Training loss of the last step.",
    ))
    lr: float | None = field(default=None, metadata=declare(
        "Learning rate of the first parameter group.", "lr", reduce="none",
        prometheus="stepguard_learning_rate", help="Learning rate of the last step.",
    ))
    grad_norm: float | None = field(default=None, metadata=declare(
        "‖g‖₂ of the gradient as the optimizer left it.", "gradient norm", reduce="max",
        prometheus="stepguard_grad_norm", help="Gradient 2-norm of the last step.",
    ))
    update_param_cosine: float | None = field(default=None, metadata=declare(
        "Cosine between the update Δθ and the parameters θ₀.", reduce="mean",
        prometheus="stepguard_update_param_cosine", help="Cosine between the update and the parameters.",
    ))
    sc_fraction: float | None = field(default=None, metadata=declare(
        "Fraction of rows whose softmax is exactly one-hot (softmax collapse).", reduce="row_mean",
        row_summary=True, prometheus="stepguard_softmax_collapse_ratio",
        help="Fraction of samples whose softmax is exactly one-hot in the training dtype.",
    ))
    sc_zero_loss_fraction: float | None = field(default=None, metadata=declare(
        "Fraction of rows whose cross-entropy is exactly 0.", reduce="row_mean", row_summary=True,
        prometheus="stepguard_softmax_collapse_zero_loss_ratio",
        help="Fraction of samples whose loss is exactly zero in the training dtype.",
    ))
    max_logit_gap: float | None = field(default=None, metadata=declare(
        "Largest gap between the top logit and the runner-up.", "logit", reduce="max",
        row_summary=True, prometheus="stepguard_max_logit_gap",
        help="Largest gap between the top logit and the runner-up.",
    ))
    logz_mean: float | None = field(default=None, metadata=declare(
        "Mean log-partition log Σ_k exp z_k.", "logit", reduce="row_mean", row_summary=True,
        prometheus="stepguard_log_partition_mean", help="Mean log-partition log sum_k exp z_k.",
    ))
    logz_sq_mean: float | None = field(default=None, metadata=declare(
        "Mean squared log-partition.", "logit²", reduce="row_mean", row_summary=True,
        prometheus="stepguard_log_partition_squared_mean", help="Mean squared log-partition.",
    ))
    nlm_cosine: float | None = field(default=None, metadata=declare(
        "Mean centred cosine between the logit change and the logits (naive loss minimization).",
        reduce="row_mean", row_summary=True, prometheus="stepguard_naive_loss_minimization_cosine",
        help="Mean cosine between the logit change and the logits (naive loss minimization).",
    ))
    entanglement: Mapping[str, float] = field(default_factory=dict, metadata=declare(
        "Gradient entanglement: Gram entries, ratios and realized changes of watched objectives.",
        reduce="mean", prometheus="stepguard_entanglement", label="entry",
        help="Gradient entanglement entries (Gram matrix entries and cosines of the objectives).",
    ))
    extras: Mapping[str, float] = field(default_factory=dict, metadata=declare(
        "Further numbers from losses (``loss.<component>``) and policies.", reduce="mean",
        prometheus="stepguard_extra", label="name",
        help="Additional numbers reported by losses and policies.",
    ))
    timings: Mapping[str, float] = field(default_factory=dict, metadata=declare(
        "Host wall time of each phase of the step (this rank's own).", "s", reduce="none",
        prometheus="stepguard_phase_duration_seconds", label="phase",
        help="Wall time of each phase of the last step.",
    ))
    source: Source = field(default="live", metadata=declare(
        "Where the report comes from: live training or a replay.", "", reduce="none"))
    rank: int = field(default=0, metadata=declare(
        "This process's data-parallel rank.", "", reduce="none"))
    world_size: int = field(default=1, metadata=declare(
        "Number of data-parallel ranks.", "", reduce="none"))

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
        for name, kind in _SCALAR_LAYOUT:
            value = getattr(self, name)
            if kind == "nested":
                out.update({f"{name}.{k}": float(v) for k, v in value.items()})
            elif kind == "spread":
                for stat in _SPREAD_STATS:
                    out[f"spread.{stat}"] = float(getattr(value, stat))
            elif isinstance(value, (bool, int, float)):
                out[name] = float(value)
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


def _declaration(owner: type, f: dataclasses.Field, name: str) -> FieldInfo:
    info = f.metadata.get(_DECLARATION)
    if not isinstance(info, FieldInfo):
        raise TypeError(
            f"{owner.__name__}.{f.name} has no declaration: give it "
            f"field(..., metadata=declare(meaning, unit, reduce=..., prometheus=..., help=...)) "
            "in stepguard/report.py"
        )
    return dataclasses.replace(info, name=name, wire=info.wire or f.name)


def _collect_fields() -> dict[str, FieldInfo]:
    out: dict[str, FieldInfo] = {}
    for f in dataclasses.fields(StepReport):
        info = _declaration(StepReport, f, f.name)
        if f.name != "spread":
            out[f.name] = info
            continue
        for s in dataclasses.fields(SpreadSummary):
            out[f"spread.{s.name}"] = _declaration(SpreadSummary, s, f"spread.{s.name}")
    return out


FIELDS: Mapping[str, FieldInfo] = MappingProxyType(_collect_fields())
"""Every report field's declaration, in field order, by :meth:`StepReport.scalars` key.

The spread's statistics appear as ``spread.<stat>``; a nested mapping (``extras``,
``entanglement``, ``timings``) under its own name, standing for its ``<name>.<key>`` keys.
"""


def _wire_table() -> tuple[dict[str, Reduction], frozenset[str], dict[str, int]]:
    """Measured tensor name → reduction (``"<prefix>."`` for nested mappings), the row summaries,
    and the tensors whose value depends on the length of the measured direction → its power."""
    reductions: dict[str, Reduction] = {}
    powers: dict[str, int] = {}
    seen: dict[str, FieldInfo] = {}
    for info in FIELDS.values():
        wire = info.wire + "." if info.nested else info.wire
        twin = seen.setdefault(wire, info)
        if (twin.reduce, twin.row_summary, twin.direction_power) != (
            info.reduce, info.row_summary, info.direction_power
        ):
            raise TypeError(
                f"report fields {twin.name!r} and {info.name!r} travel as {wire!r} but declare "
                f"different reductions, row summaries or direction powers: make their declarations agree"
            )
        if info.reduce != "none":
            reductions[wire] = info.reduce
            if info.direction_power:
                powers[wire] = info.direction_power
    rows = frozenset(info.wire for info in FIELDS.values() if info.row_summary)
    return reductions, rows, powers


_WIRE_REDUCTIONS, _ROW_SUMMARIES, _DIRECTION_POWERS = _wire_table()


def wire_reductions() -> dict[str, Reduction]:
    """Measured tensor name → cross-rank reduction, for every report field that is reduced.

    A nested mapping appears as its prefix with a dot (``"extras."``): every
    ``extras.<key>`` tensor is reduced alike.
    """
    return dict(_WIRE_REDUCTIONS)


def direction_powers() -> dict[str, int]:
    """Measured tensor name → its ``direction_power``, for the reduced tensors whose power is not 0."""
    return dict(_DIRECTION_POWERS)


def reduction_of(name: str) -> Reduction:
    """The cross-rank reduction of the measured tensor ``name`` (``"spread_q"``, ``"extras.loss.base"``).

    Raises:
        LookupError: ``name`` carries no report field that is reduced across ranks; the
            message says where to declare it.
    """
    found = _WIRE_REDUCTIONS.get(name)
    if found is None and "." in name:
        found = _WIRE_REDUCTIONS.get(name.split(".", 1)[0] + ".")
    if found is not None:
        return found
    info = FIELDS.get(name) or FIELDS.get(name.split(".", 1)[0])
    if info is not None and info.reduce != "none":
        raise LookupError(
            f"report field {info.name!r} travels to the reduction as {info.wire!r}, not {name!r}"
        )
    if info is not None:
        raise LookupError(
            f"report field {info.name!r} is declared with reduce='none' (stepguard/report.py): it is "
            "derived on every rank or is this rank's own, so it is never sent to the cross-rank "
            "reduction; send what it is derived from, or declare the reduction it needs"
        )
    raise LookupError(
        f"no cross-rank reduction is declared for the measured tensor {name!r}. A report field "
        "declares it on its StepReport or SpreadSummary field in stepguard/report.py "
        f"(field(..., metadata=declare(..., reduce=one of {REDUCTIONS[:-1]}))); a tensor that is "
        "not a report field declares it beside the code that produces it, as stepguard/costs.py "
        "does for cost_*, listed in stepguard.distributed"
    )


def row_summaries() -> frozenset[str]:
    """Measured names that summarize the counted rows (absent when no row of a step counts)."""
    return _ROW_SUMMARIES


def _scalar_layout() -> tuple[tuple[str, str], ...]:
    """``(field, kind)`` of the fields :meth:`StepReport.scalars` exports, in field order."""
    layout = []
    for f in dataclasses.fields(StepReport):
        info = FIELDS.get(f.name)
        if f.name == "spread":
            layout.append((f.name, "spread"))
        elif info is not None and info.prometheus is not None:
            layout.append((f.name, "nested" if info.nested else "scalar"))
    return tuple(layout)


_SCALAR_LAYOUT = _scalar_layout()
_SPREAD_STATS = tuple(
    s.name for s in dataclasses.fields(SpreadSummary) if FIELDS[f"spread.{s.name}"].prometheus is not None
)


def _from_json(value: Any) -> Any:
    if isinstance(value, str) and value in _NON_FINITE:
        return _NON_FINITE[value]
    if isinstance(value, Mapping):
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value
