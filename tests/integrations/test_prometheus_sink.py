"""PrometheusSink on its own: registry values, the /metrics endpoint, ports, ranks, failures."""

from __future__ import annotations

import errno
import math
import re
import socket
import subprocess
import sys
import urllib.error
from typing import Any

import pytest

pytest.importorskip("prometheus_client", reason="needs the prometheus extra")

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from stepguard.integrations import naming
from stepguard.integrations.prometheus import PortInUseError, PrometheusSink
from stepguard.report import ACTIONS


@pytest.fixture
def sink() -> Any:
    s = PrometheusSink(port=0, run="unit")
    yield s
    s.close()


def scrape(helpers: Any, url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` over HTTP, parsed: (sample name, sorted labels) → value."""
    text = helpers.http_get(url).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def same(a: float | None, b: float) -> bool:
    return a is not None and ((math.isnan(a) and math.isnan(b)) or a == b)


def test_gauges_hold_the_last_report_exactly(sink: PrometheusSink, report: Any) -> None:
    reports = [report(i) for i in range(3)]
    for rep in reports:
        sink.write(rep)
    last = reports[-1].scalars()
    exported = 0
    for key, value in last.items():
        series = naming.prometheus_series(key)
        assert series is not None, f"report field {key} is not exported"
        name, labels = series
        assert same(sink.sample(name, labels), value), (key, name, labels)
        exported += 1
    assert exported == len(last)
    # the headline names
    assert sink.sample("stepguard_normalized_step") == reports[-1].r
    assert sink.sample("stepguard_radius") == reports[-1].rho_a
    assert sink.sample("stepguard_step_length") == reports[-1].tau
    assert sink.sample("stepguard_logit_spread") == reports[-1].delta_a
    assert sink.sample("stepguard_entanglement", {"entry": "gram.chosen.rejected"}) == (
        reports[-1].entanglement["gram.chosen.rejected"])
    assert sink.sample("stepguard_phase_duration_seconds", {"phase": "jvp"}) == 0.002


def test_counters_and_the_r_histogram(sink: PrometheusSink, report: Any) -> None:
    rs = [0.05, 0.5, 1.0, 1.0000001, 3.0, 250.0, math.inf, math.nan, 0.9]
    actions = ["allow", "allow", "clip", "clip", "veto", "veto", "veto", "veto", "allow"]
    estimators = ["jvp", "jvp", "estimate", "jvp", "finite_difference", "jvp", "jvp", "none",
                  "jvp"]
    for i, (r, action, est) in enumerate(zip(rs, actions, estimators, strict=True)):
        scale = {"allow": 1.0, "clip": 0.5, "veto": 0.0}[action]
        sink.write(report(i, r=r, action=action, scale=scale, estimator=est))
    assert sink.sample("stepguard_steps_total") == len(rs)
    for action in ACTIONS:
        assert sink.sample("stepguard_actions_total", {"action": action}) == actions.count(action)
    for est in ("jvp", "finite_difference", "estimate", "none"):
        assert sink.sample("stepguard_measurements_total", {"estimator": est}) == (
            estimators.count(est))
    assert sink.sample("stepguard_steps_outside_radius_total") == 5  # 1.0, 1.0000001, 3, 250, inf
    assert sink.sample("stepguard_nonfinite_steps_total") == 2

    finite = [r for r in rs if math.isfinite(r)]
    name = naming.R_HISTOGRAM.name
    for bound in naming.R_BUCKETS:
        le = repr(float(bound))
        assert sink.sample(f"{name}_bucket", {"le": le}) == sum(r <= bound for r in finite), le
    assert sink.sample(f"{name}_bucket", {"le": "+Inf"}) == len(finite)
    assert sink.sample(f"{name}_count") == len(finite)
    assert sink.sample(f"{name}_sum") == sum(finite)


def test_outside_radius_counts_at_the_configured_limit(report: Any) -> None:
    sink = PrometheusSink(port=0, r_limit=0.5)
    try:
        for i, r in enumerate([0.4, 0.5, 0.6]):
            sink.write(report(i, r=r))
        assert sink.sample("stepguard_steps_outside_radius_total") == 2
    finally:
        sink.close()


def test_max_since_last_scrape_keeps_spikes(sink: PrometheusSink, report: Any) -> None:
    assert sink.sample("stepguard_normalized_step_max") is None  # nothing reported yet
    for i, r in enumerate([0.2, 7.5, 0.3]):
        sink.write(report(i, r=r))
    assert sink.sample("stepguard_normalized_step_max") == 7.5  # this read starts a new window
    assert sink.sample("stepguard_normalized_step") == 0.3
    assert sink.sample("stepguard_normalized_step_max") == 0.3  # no step since: the last r
    for i, r in enumerate([0.1, 0.6, 0.2], start=3):
        sink.write(report(i, r=r))
    assert sink.sample("stepguard_normalized_step_max") == 0.6
    sink.write(report(6, r=math.nan))
    sink.write(report(7, r=0.05))
    assert sink.sample("stepguard_normalized_step_max") == 0.2  # NaN ignored; window began at 0.2
    sink.write(report(8, r=math.inf))
    assert sink.sample("stepguard_normalized_step_max") == math.inf


def test_nonfinite_gauges_are_exported_as_they_are(
    sink: PrometheusSink, report: Any, helpers: Any
) -> None:
    sink.write(report(0, r=math.nan, rho_a=math.inf, tau=math.nan, delta_a=0.0))
    samples = scrape(helpers, sink.url)
    labels = (("run", "unit"),)
    assert math.isnan(samples[("stepguard_normalized_step", labels)])
    assert samples[("stepguard_radius", labels)] == math.inf
    assert samples[("stepguard_normalized_step_distribution_count", labels)] == 0


def test_endpoint_serves_the_same_values_on_loopback(
    sink: PrometheusSink, report: Any, helpers: Any
) -> None:
    assert sink.port and sink.port > 0
    assert sink.url == f"http://127.0.0.1:{sink.port}/metrics"
    rep = report(4, r=0.123456789012345)
    sink.write(rep)
    samples = scrape(helpers, sink.url)
    labels = (("run", "unit"),)
    assert samples[("stepguard_normalized_step", labels)] == rep.r
    assert samples[("stepguard_radius", labels)] == rep.rho_a
    assert samples[("stepguard_steps_total", labels)] == 1
    assert samples[("stepguard_build_info", (("run", "unit"), ("version", "0.1.0")))] == 1
    assert not any(name.endswith("_created") for name, _ in samples)


def test_each_sink_has_its_own_registry(report: Any) -> None:
    a, b = PrometheusSink(port=0, run="a"), PrometheusSink(port=0, run="b")
    try:
        a.write(report(0, r=0.25))
        b.write(report(0, r=0.75))
        assert a.registry is not b.registry
        assert a.sample("stepguard_normalized_step") == 0.25
        assert b.sample("stepguard_normalized_step") == 0.75
        assert REGISTRY.get_sample_value("stepguard_normalized_step", {"run": "a"}) is None
        assert not [n for n in REGISTRY._names_to_collectors if n.startswith("stepguard")]
    finally:
        a.close()
        b.close()


def test_a_port_in_use_gives_a_clear_error(helpers: Any) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortInUseError, match=rf"127\.0\.0\.1:{port}.*already in use.*port=0") as err:
            PrometheusSink(port=port)
        assert err.value.errno == errno.EADDRINUSE
    first = PrometheusSink(port=0)
    try:
        with pytest.raises(PortInUseError):
            PrometheusSink(port=first.port)
    finally:
        first.close()


def test_close_shuts_the_server_down(report: Any, helpers: Any) -> None:
    sink = PrometheusSink(port=0)
    url, port = sink.url, sink.port
    sink.write(report(0))
    helpers.http_get(url)
    sink.close()
    sink.close()  # harmless twice
    with pytest.raises(urllib.error.URLError):
        helpers.http_get(url, timeout=2)
    with pytest.raises(RuntimeError, match="closed"):
        sink.write(report(1))
    again = PrometheusSink(port=port)  # the port is free again
    again.close()


def test_only_rank_zero_exports_by_default(report: Any, helpers: Any) -> None:
    quiet = PrometheusSink(port=0, rank=1, local_rank=1)
    quiet.write(report(0))
    assert not quiet.active and quiet.port is None and quiet.url is None
    assert quiet.sample("stepguard_steps_total") is None
    quiet.close()


def test_per_rank_export_labels_and_offsets_the_port(report: Any, helpers: Any) -> None:
    base = helpers.free_port()
    for _ in range(20):  # the second rank serves on base + 1, which must be free too
        try:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", base + 1))
            break
        except OSError:
            base = helpers.free_port()
    sinks = [PrometheusSink(port=base, per_rank=True, rank=r, local_rank=r, run="ddp")
             for r in (0, 1)]
    try:
        assert [s.port for s in sinks] == [base, base + 1]
        for r, s in enumerate(sinks):
            s.write(report(0, r=0.1 * (r + 1)))
        for r, s in enumerate(sinks):
            samples = scrape(helpers, s.url)
            assert samples[("stepguard_normalized_step", (("rank", str(r)), ("run", "ddp")))] == (
                0.1 * (r + 1))
    finally:
        for s in sinks:
            s.close()


def test_rank_is_detected_from_the_launcher_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    sink = PrometheusSink(port=0)
    assert (sink.rank, sink.local_rank, sink.active) == (3, 1, False)
    sink.close()
    sink = PrometheusSink(port=0, per_rank=True)
    assert sink.active and sink.labels == {"rank": "3"}
    sink.close()


def test_missing_prometheus_client_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ImportError, match=re.escape("pip install -e '.[prometheus]'")):
        PrometheusSink(port=0)


@pytest.mark.requires_binary("promtool")
def test_promtool_accepts_the_exposition(sink: PrometheusSink, report: Any, helpers: Any) -> None:
    sink.write(report(0))
    sink.write(report(1, r=math.nan, rho_a=math.inf, action="veto", scale=0.0))
    text = helpers.http_get(sink.url)
    done = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                          timeout=30)
    assert done.returncode == 0, (done.stdout + done.stderr).decode()
