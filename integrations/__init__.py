"""Adapters that send StepGuard's step reports to monitoring systems.

* :class:`~stepguard.integrations.tensorboard.TensorBoardSink`: TensorBoard event files
  (scalars, per-sample spread histograms, decision texts, a custom-scalars layout).
* :class:`~stepguard.integrations.prometheus.PrometheusSink`: a Prometheus ``/metrics``
  endpoint on loopback, or pushes to a Pushgateway for batch jobs.

Ops assets ship next to them: ``grafana/stepguard.json`` (a Grafana dashboard),
``prometheus/alerts.yml`` (alerting rules, with ``promtool`` unit tests) and
``prometheus/scrape.yml`` (an example scrape configuration); see
:mod:`stepguard.integrations.assets`.

Each adapter imports its heavy dependency only when it is constructed, and says which
extra to install when it is missing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stepguard.integrations.prometheus import PrometheusSink
    from stepguard.integrations.tensorboard import TensorBoardSink

__all__ = ["PrometheusSink", "TensorBoardSink"]

_LAZY = {
    "PrometheusSink": "stepguard.integrations.prometheus",
    "TensorBoardSink": "stepguard.integrations.tensorboard",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
