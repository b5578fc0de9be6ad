"""Paths of the ops files that ship with StepGuard (Grafana dashboard, Prometheus rules)."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def grafana_dashboard() -> Path:
    """The Grafana dashboard JSON (import it, or provision it from this path)."""
    return _HERE / "grafana" / "stepguard.json"


def prometheus_alerts() -> Path:
    """The Prometheus alerting rules (``rule_files`` entry)."""
    return _HERE / "prometheus" / "alerts.yml"


def prometheus_alert_tests() -> Path:
    """The ``promtool test rules`` unit tests of :func:`prometheus_alerts`."""
    return _HERE / "prometheus" / "alerts_test.yml"


def prometheus_scrape_config() -> Path:
    """An example ``prometheus.yml`` that scrapes StepGuard and loads the alerts."""
    return _HERE / "prometheus" / "scrape.yml"
