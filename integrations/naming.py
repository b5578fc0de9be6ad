"""One name per number: report field ↔ TensorBoard tag ↔ Prometheus metric.

Every key of :meth:`stepguard.report.StepReport.scalars` has a TensorBoard tag
``stepguard/<key>`` and a Prometheus metric ``stepguard_<name>`` in base units. The
nested mappings of a report (``spread``, ``entanglement``, ``extras``, ``timings``) become
one Prometheus metric each, with the key as a label, so a run adds series, not metric
names.

The names and help texts of the report's metrics are declared with the report fields
(:data:`stepguard.report.FIELDS`); this module arranges them for the exporters and adds
the metrics derived from the stream of reports.
"""

from __future__ import annotations

from dataclasses import dataclass

from stepguard.report import FIELDS, TAG_PREFIX, FieldInfo


@dataclass(frozen=True)
class Metric:
    """The Prometheus side of one report field.

    Attributes:
        name: the metric family name.
        help: the ``# HELP`` text.
        label: for nested report fields, the label that carries the key.
    """

    name: str
    help: str
    label: str | None = None


def _metric(info: FieldInfo) -> Metric:
    assert info.prometheus is not None and info.help is not None
    return Metric(info.prometheus, info.help, info.label)


GAUGES: dict[str, Metric] = {
    key: _metric(info)
    for key, info in FIELDS.items()
    if info.prometheus is not None and info.label is None and "." not in key
}
"""Scalar report fields exported as one gauge each (the value of the last report)."""

SPREAD = _metric(FIELDS["spread.max"])
"""``spread.<stat>`` for ``stat`` in max, q99, q90, median, mean, min."""

SPREAD_COUNT = _metric(FIELDS["spread.count"])
"""``spread.count``."""

_SPREAD_GAUGES: dict[str, Metric] = {
    key: _metric(info)
    for key, info in FIELDS.items()
    if key.startswith("spread.") and info.prometheus is not None and info.label is None
}
"""Spread statistics exported as a gauge of their own (``spread.count``)."""

NESTED: dict[str, Metric] = {key: _metric(info) for key, info in FIELDS.items() if info.nested}
"""Nested report mappings: ``<field>.<key>`` becomes ``metric{label="<key>"}``."""

# Metrics derived from the stream of reports rather than from one report.
STEPS_TOTAL = Metric("stepguard_steps_total", "Optimizer steps reported.")
ACTIONS_TOTAL = Metric(
    "stepguard_actions_total", "Policy decisions by action (allow, clip, veto).", label="action"
)
MEASUREMENTS_TOTAL = Metric(
    "stepguard_measurements_total",
    "Steps by how r was obtained (jvp, finite_difference, estimate, none).",
    label="estimator",
)
OUTSIDE_RADIUS_TOTAL = Metric(
    "stepguard_steps_outside_radius_total",
    "Steps whose normalized step r reached the limit (r >= 1 by default).",
)
NONFINITE_TOTAL = Metric(
    "stepguard_nonfinite_steps_total", "Steps whose normalized step r was NaN or infinite."
)
R_MAX = Metric(
    "stepguard_normalized_step_max",
    "Largest r since the previous scrape or push (NaN ignored; the last r when no step "
    "arrived in between), so spikes between scrapes are not lost.",
)
R_HISTOGRAM = Metric(
    "stepguard_normalized_step_distribution", "Distribution of the finite normalized steps r."
)
BUILD_INFO = Metric("stepguard_build_info", "StepGuard version of the exporting process.")

R_BUCKETS: tuple[float, ...] = (
    0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 0.7, 0.85, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 100.0,
)
"""Default upper bounds of the r histogram (r = 1 is a bound, so ``le="1.0"`` splits the
steps inside the radius from those outside)."""


def tensorboard_tag(key: str) -> str:
    """The TensorBoard tag of a :meth:`StepReport.scalars` key, e.g. ``r`` → ``stepguard/r``."""
    return TAG_PREFIX + key


def prometheus_series(key: str) -> tuple[str, dict[str, str]] | None:
    """The Prometheus metric and labels of a :meth:`StepReport.scalars` key.

    Args:
        key: a scalars key such as ``"r"``, ``"spread.q99"`` or ``"entanglement.cos.w.l"``.

    Returns:
        ``(metric name, labels)``, or ``None`` for a key that is not exported.
    """
    if key in GAUGES:
        return GAUGES[key].name, {}
    head, _, rest = key.partition(".")
    if head == "spread" and rest:
        if key in _SPREAD_GAUGES:
            return _SPREAD_GAUGES[key].name, {}
        assert SPREAD.label is not None
        return SPREAD.name, {SPREAD.label: rest}
    if head in NESTED and rest:
        metric = NESTED[head]
        assert metric.label is not None
        return metric.name, {metric.label: rest}
    return None
