"""Prometheus sink: a ``/metrics`` endpoint on loopback, or pushes to a Pushgateway.

Metrics (see :mod:`stepguard.integrations.naming` for the full table):

* gauges of the last report: ``stepguard_normalized_step`` (r), ``stepguard_radius`` (ρ_a),
  ``stepguard_step_length`` (τ), ``stepguard_logit_spread`` (Δ_a),
  ``stepguard_softmax_collapse_ratio``, ``stepguard_entanglement{entry=...}``, ...;
* ``stepguard_normalized_step_max``: the largest r since the previous scrape or push;
* ``stepguard_normalized_step_distribution``: a histogram of r (``le="1.0"`` is a bound);
* counters ``stepguard_steps_total``, ``stepguard_actions_total{action}``,
  ``stepguard_measurements_total{estimator}``, ``stepguard_steps_outside_radius_total``,
  ``stepguard_nonfinite_steps_total``.

Labels stay low-cardinality: ``run`` (when given) and ``rank`` (only with
``per_rank=True``). The sink keeps its own ``CollectorRegistry``; it never touches
``prometheus_client``'s global registry.

Distributed training: the guard reduces each step's numbers across ranks before the
report reaches the sink, so every rank holds the same values. By default only global
rank 0 exports (the other ranks' sinks are inert: no server, no pushes). With
``per_rank=True`` every rank exports with a ``rank`` label, and a fixed ``port`` is
offset by the node-local rank so that the ranks of one host do not collide.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

from stepguard._extras import install_hint
from stepguard.integrations import naming
from stepguard.integrations._dist import process_rank
from stepguard.integrations._http import MetricsServer, PortInUseError
from stepguard.integrations._prometheus_collector import StepGuardCollector
from stepguard.report import StepReport

__all__ = ["DEFAULT_PORT", "PortInUseError", "PrometheusSink"]

DEFAULT_PORT = 9478
"""Default ``/metrics`` port (any free port works; ``port=0`` picks one)."""

logger = logging.getLogger("stepguard.integrations.prometheus")


def _prometheus_client() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:
        raise ImportError(
            f"PrometheusSink needs the prometheus-client package ({exc}); install it with "
            f"{install_hint('prometheus')}"
        ) from exc
    return prometheus_client


class PrometheusSink:
    """Exports StepGuard step reports to Prometheus.

    Scrape mode (default) serves ``/metrics`` on ``addr:port`` from a background thread.
    Push mode (``pushgateway=...``) serves nothing and pushes the metrics to a Pushgateway
    instead: on the first report, then at most every ``push_interval_s`` seconds, and on
    :meth:`flush` and :meth:`close`. That suits batch jobs that end before a scrape.

    Args:
        port: the port to serve on; 0 picks a free one (see :attr:`port`). Ignored in push
            mode.
        addr: the address to listen on. The default keeps the endpoint on loopback; pass
            ``"0.0.0.0"`` deliberately to expose it to other hosts.
        run: a ``run`` label on every series (a short, stable name, not a UUID per restart).
        pushgateway: Pushgateway address (``"127.0.0.1:9091"`` or ``"http://host:9091"``);
            switches to push mode.
        job: the Pushgateway job name.
        push_interval_s: minimum seconds between two pushes triggered by :meth:`write`
            (after a failed push too, so a missing gateway is retried at this pace).
        push_timeout_s: timeout of one push; a push blocks the training step that
            triggers it.
        delete_on_close: delete this sink's group from the Pushgateway on :meth:`close`
            (by default the last push stays there for Prometheus to scrape).
        per_rank: under torch.distributed, export from every rank with a ``rank`` label
            instead of from global rank 0 only.
        rank: global rank of this process (detected when ``None``).
        local_rank: node-local rank (detected when ``None``); offsets ``port`` in per-rank
            mode.
        r_limit: r at or above this counts in ``stepguard_steps_outside_radius_total``.
        buckets: upper bounds of the r histogram.
        registry: the ``CollectorRegistry`` to register in (a new one by default).

    Raises:
        ImportError: when prometheus-client is not installed.
        PortInUseError: when ``port`` is taken.
    """

    name = "prometheus"

    def __init__(
        self,
        port: int = DEFAULT_PORT,
        addr: str = "127.0.0.1",
        *,
        run: str | None = None,
        pushgateway: str | None = None,
        job: str = "stepguard",
        push_interval_s: float = 10.0,
        push_timeout_s: float = 2.0,
        delete_on_close: bool = False,
        per_rank: bool = False,
        rank: int | None = None,
        local_rank: int | None = None,
        r_limit: float = 1.0,
        buckets: Sequence[float] = naming.R_BUCKETS,
        registry: Any = None,
    ) -> None:
        client = _prometheus_client()
        detected_rank, detected_local = process_rank()
        self.rank = detected_rank if rank is None else rank
        self.local_rank = detected_local if local_rank is None else local_rank
        self.per_rank = per_rank
        self.active = per_rank or self.rank == 0
        self.labels: dict[str, str] = {}
        if run is not None:
            self.labels["run"] = run
        if per_rank:
            self.labels["rank"] = str(self.rank)

        from stepguard import __version__

        self.registry = registry if registry is not None else client.CollectorRegistry()
        self.collector = StepGuardCollector(
            self.labels, r_limit=r_limit, buckets=buckets, version=__version__
        )
        self.pushgateway = pushgateway
        self.job = job
        self.push_interval_s = float(push_interval_s)
        self.push_timeout_s = float(push_timeout_s)
        self.delete_on_close = delete_on_close
        self.pushes = 0
        self._last_push_attempt = -math.inf
        self._unpushed = False
        self._closed = False
        self._server: MetricsServer | None = None
        if not self.active:
            return
        self.registry.register(self.collector)
        if pushgateway is None:
            if port and per_rank:
                port += self.local_rank
            try:
                self._server = MetricsServer(client.make_wsgi_app(self.registry), addr, port)
            except OSError:
                self.registry.unregister(self.collector)
                raise
            logger.info("stepguard metrics at %s", self._server.url)

    @property
    def port(self) -> int | None:
        """The port ``/metrics`` is served on (``None`` in push mode or on an inert rank)."""
        return self._server.port if self._server is not None else None

    @property
    def url(self) -> str | None:
        """The ``/metrics`` URL (``None`` in push mode or on an inert rank)."""
        return self._server.url if self._server is not None else None

    @property
    def grouping_key(self) -> dict[str, str]:
        """The Pushgateway grouping key: the ``run`` and ``rank`` labels."""
        return dict(self.labels)

    def write(self, report: StepReport) -> None:
        """Account for one report; in push mode, push when ``push_interval_s`` has passed.

        Raises:
            OSError: in push mode, when the Pushgateway cannot be reached (the guard's
                sink isolation counts it; the next push is tried ``push_interval_s`` later).
        """
        if self._closed:
            raise RuntimeError("PrometheusSink is closed")
        if not self.active:
            return
        self.collector.observe(report)
        self._unpushed = True
        due = time.monotonic() - self._last_push_attempt >= self.push_interval_s
        if self.pushgateway is not None and due:
            self.push()

    def push(self) -> None:
        """Push the current metrics to the Pushgateway now (replacing this sink's group).

        Raises:
            OSError: when the Pushgateway cannot be reached or refuses the push.
        """
        if self.pushgateway is None:
            raise RuntimeError("push() needs a pushgateway address")
        from prometheus_client import push_to_gateway

        self._last_push_attempt = time.monotonic()
        push_to_gateway(
            self.pushgateway,
            job=self.job,
            registry=self.registry,
            grouping_key=self.grouping_key,
            timeout=self.push_timeout_s,
        )
        self.pushes += 1
        self._unpushed = False

    def flush(self) -> None:
        """In push mode, push what has not been pushed yet."""
        if self.active and not self._closed and self.pushgateway is not None and self._unpushed:
            self.push()

    def close(self) -> None:
        """Stop the HTTP server, or push a last time (and delete the group if asked)."""
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            self._server.close()
            self._server = None
        if self.active and self.pushgateway is not None:
            if self._unpushed:
                self.push()
            if self.delete_on_close:
                from prometheus_client import delete_from_gateway

                delete_from_gateway(
                    self.pushgateway, job=self.job, grouping_key=self.grouping_key,
                    timeout=self.push_timeout_s,
                )

    def sample(self, name: str, labels: Mapping[str, str] | None = None) -> float | None:
        """Current value of one series, as a scrape would see it (for tests and debugging).

        Note that collecting starts a new window for ``stepguard_normalized_step_max``.
        """
        return self.registry.get_sample_value(name, {**self.labels, **(labels or {})})
