"""The Prometheus collector behind :class:`~stepguard.integrations.prometheus.PrometheusSink`.

It keeps the last report and a few running totals, and turns them into metric families on
each scrape (or push). Gauges hold the last report's values; counters and the r histogram
accumulate over every report; ``stepguard_normalized_step_max`` is the largest r since the
previous collection, so a spike between two scrapes is not lost.

Non-finite values: gauges carry NaN and ±Inf as they are (Prometheus stores them). The r
histogram observes finite r only (one +Inf or NaN would poison its ``_sum`` for good);
non-finite r are counted in ``stepguard_nonfinite_steps_total`` instead, and an infinite r
also counts as outside the radius.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, get_args

from stepguard.integrations import naming
from stepguard.report import ACTIONS, Estimator, StepReport


def _go_float(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    return repr(float(value))


class StepGuardCollector:
    """Turns step reports into Prometheus metric families.

    Args:
        labels: constant labels on every series (``run``, ``rank``); keep them few.
        r_limit: r at or above this counts in ``stepguard_steps_outside_radius_total``.
        buckets: upper bounds of the r histogram (``+Inf`` is added).
        version: the StepGuard version for ``stepguard_build_info``.
    """

    def __init__(
        self,
        labels: Mapping[str, str],
        *,
        r_limit: float = 1.0,
        buckets: Sequence[float] = naming.R_BUCKETS,
        version: str = "",
    ) -> None:
        bounds = sorted(float(b) for b in buckets if math.isfinite(float(b)))
        self._bounds: list[float] = [*bounds, math.inf]
        self._labels = dict(labels)
        self._r_limit = float(r_limit)
        self._version = version
        self._lock = threading.Lock()
        self._last: StepReport | None = None
        self._last_scalars: dict[str, float] = {}
        self._steps = 0
        self._actions = dict.fromkeys(ACTIONS, 0)
        self._estimators: dict[str, int] = dict.fromkeys(get_args(Estimator), 0)
        self._outside = 0
        self._nonfinite = 0
        self._bucket_counts = [0] * len(self._bounds)
        self._r_sum = 0.0
        self._window_max: float | None = None

    def observe(self, report: StepReport) -> None:
        """Account for one report."""
        scalars = report.scalars()
        r = float(report.r)
        with self._lock:
            self._last = report
            self._last_scalars = scalars
            self._steps += 1
            self._actions[report.action] = self._actions.get(report.action, 0) + 1
            self._estimators[report.estimator] = self._estimators.get(report.estimator, 0) + 1
            if math.isfinite(r):
                for i, bound in enumerate(self._bounds):
                    if r <= bound:
                        self._bucket_counts[i] += 1
                        break
                self._r_sum += r
            else:
                self._nonfinite += 1
            if r >= self._r_limit:  # False for NaN
                self._outside += 1
            if not math.isnan(r) and (self._window_max is None or r > self._window_max):
                self._window_max = r

    def describe(self) -> list[Any]:
        """Nothing to describe up front (keeps registration from resetting the window max)."""
        return []

    def collect(self) -> Iterator[Any]:
        """Yield the metric families (and start a new window for the r maximum)."""
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        with self._lock:
            last, scalars = self._last, dict(self._last_scalars)
            steps, outside, nonfinite = self._steps, self._outside, self._nonfinite
            actions, estimators = dict(self._actions), dict(self._estimators)
            bucket_counts, r_sum = list(self._bucket_counts), self._r_sum
            window_max = self._window_max
            self._window_max = None if last is None else (
                None if math.isnan(last.r) else float(last.r)
            )

        keys, values = list(self._labels), list(self._labels.values())

        def gauge(metric: naming.Metric, value: float) -> Any:
            family = GaugeMetricFamily(metric.name, metric.help, labels=keys)
            family.add_metric(values, value)
            return family

        def counter(metric: naming.Metric, value: float) -> Any:
            family = CounterMetricFamily(metric.name, metric.help, labels=keys)
            family.add_metric(values, value)
            return family

        def counter_by(metric: naming.Metric, counts: Mapping[str, int]) -> Any:
            assert metric.label is not None
            family = CounterMetricFamily(metric.name, metric.help, labels=[*keys, metric.label])
            for key, count in counts.items():
                family.add_metric([*values, key], count)
            return family

        info = GaugeMetricFamily(naming.BUILD_INFO.name, naming.BUILD_INFO.help,
                                 labels=[*keys, "version"])
        info.add_metric([*values, self._version], 1.0)
        yield info
        yield counter(naming.STEPS_TOTAL, steps)
        yield counter_by(naming.ACTIONS_TOTAL, actions)
        yield counter_by(naming.MEASUREMENTS_TOTAL, estimators)
        yield counter(naming.OUTSIDE_RADIUS_TOTAL, outside)
        yield counter(naming.NONFINITE_TOTAL, nonfinite)

        cumulative, buckets = 0, []
        for bound, count in zip(self._bounds, bucket_counts, strict=True):
            cumulative += count
            buckets.append((_go_float(bound), cumulative))
        histogram = HistogramMetricFamily(naming.R_HISTOGRAM.name, naming.R_HISTOGRAM.help,
                                          labels=keys)
        histogram.add_metric(values, buckets, r_sum)
        yield histogram

        if last is None:
            return
        if window_max is not None:
            yield gauge(naming.R_MAX, window_max)
        yield from self._report_families(scalars, keys, values, GaugeMetricFamily)

    @staticmethod
    def _report_families(
        scalars: Mapping[str, float], keys: list[str], values: list[str], family_class: Any
    ) -> Iterator[Any]:
        families: dict[str, Any] = {}
        helps = {m.name: m.help for m in naming.GAUGES.values()}
        helps.update({m.name: m.help for m in (*naming.NESTED.values(), naming.SPREAD,
                                                naming.SPREAD_COUNT)})
        for key, value in scalars.items():
            series = naming.prometheus_series(key)
            if series is None:
                continue
            name, extra = series
            family = families.get(name)
            if family is None:
                family = family_class(name, helps[name], labels=keys + list(extra))
                families[name] = family
            family.add_metric([*values, *extra.values()], value)
        yield from families.values()
