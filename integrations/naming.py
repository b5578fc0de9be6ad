"""One name per number: report field ↔ TensorBoard tag ↔ Prometheus metric.

Every key of :meth:`stepguard.report.StepReport.scalars` has a TensorBoard tag
``stepguard/<key>`` and a Prometheus metric ``stepguard_<name>`` in base units. The
nested mappings of a report (``spread``, ``entanglement``, ``extras``, ``timings``) become
one Prometheus metric each, with the key as a label, so a run adds series, not metric
names.
"""

from __future__ import annotations

from dataclasses import dataclass

TAG_PREFIX = "stepguard/"
"""Prefix of every TensorBoard tag StepGuard writes."""


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


GAUGES: dict[str, Metric] = {
    "step": Metric("stepguard_step", "Index of the last reported optimizer step."),
    "tau": Metric("stepguard_step_length", "Step length tau = ||dtheta||_2 of the proposed update."),
    "rho_a": Metric(
        "stepguard_radius",
        "Safe-step radius rho_a = pi / delta_a along the update direction (+Inf when delta_a = 0).",
    ),
    "r": Metric(
        "stepguard_normalized_step",
        "Normalized step r = tau / rho_a of the last step; r >= 1 leaves the softmax's radius.",
    ),
    "delta_a": Metric(
        "stepguard_logit_spread",
        "Batch logit spread delta_a = max over samples of max_k a_nk - min_k a_nk.",
    ),
    "scale": Metric(
        "stepguard_step_scale", "Fraction of the proposed update that was applied (0 to 1)."
    ),
    "applied_tau": Metric(
        "stepguard_applied_step_length", "Length of the update that was applied (scale * tau)."
    ),
    "measured": Metric(
        "stepguard_step_measured",
        "1 when the last step was freshly measured, 0 when r was estimated.",
    ),
    "rho_binary": Metric(
        "stepguard_binary_radius", "Exact radius rho* for one- and two-logit heads."
    ),
    "rho_top2": Metric(
        "stepguard_top2_radius", "Smallest per-sample top-2 radius over the measured batch."
    ),
    "loss": Metric("stepguard_loss", "Training loss of the last step."),
    "lr": Metric("stepguard_learning_rate", "Learning rate of the last step."),
    "grad_norm": Metric("stepguard_grad_norm", "Gradient 2-norm of the last step."),
    "update_param_cosine": Metric(
        "stepguard_update_param_cosine", "Cosine between the update and the parameters."
    ),
    "sc_fraction": Metric(
        "stepguard_softmax_collapse_ratio",
        "Fraction of samples whose softmax is exactly one-hot in the training dtype.",
    ),
    "sc_zero_loss_fraction": Metric(
        "stepguard_softmax_collapse_zero_loss_ratio",
        "Fraction of samples whose loss is exactly zero in the training dtype.",
    ),
    "max_logit_gap": Metric(
        "stepguard_max_logit_gap", "Largest gap between the top logit and the runner-up."
    ),
    "logz_mean": Metric("stepguard_log_partition_mean", "Mean log-partition log sum_k exp z_k."),
    "logz_sq_mean": Metric(
        "stepguard_log_partition_squared_mean", "Mean squared log-partition."
    ),
    "nlm_cosine": Metric(
        "stepguard_naive_loss_minimization_cosine",
        "Mean cosine between the logit change and the logits (naive loss minimization).",
    ),
}
"""Scalar report fields exported as one gauge each (the value of the last report)."""

SPREAD = Metric(
    "stepguard_sample_logit_spread",
    "Distribution of the per-sample logit spreads of the last measured batch.",
    label="stat",
)
"""``spread.<stat>`` for ``stat`` in max, q99, q90, median, mean, min."""

SPREAD_COUNT = Metric(
    "stepguard_measured_samples", "Number of samples (or tokens) in the last measured batch."
)
"""``spread.count``."""

NESTED: dict[str, Metric] = {
    "entanglement": Metric(
        "stepguard_entanglement",
        "Gradient entanglement entries (Gram matrix entries and cosines of the objectives).",
        label="entry",
    ),
    "extras": Metric("stepguard_extra", "Additional numbers reported by losses and policies.",
                     label="name"),
    "timings": Metric(
        "stepguard_phase_duration_seconds", "Wall time of each phase of the last step.",
        label="phase",
    ),
}
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
        if rest == "count":
            return SPREAD_COUNT.name, {}
        return SPREAD.name, {"stat": rest}
    if head in NESTED and rest:
        metric = NESTED[head]
        assert metric.label is not None
        return metric.name, {metric.label: rest}
    return None
