"""End to end: a real Prometheus server scrapes StepGuard sinks and evaluates the shipped alerts.

One server (1 s scrapes, the shipped alerts.yml) scrapes three sources for the whole module:

* ``run="guarded"``: a small MLP trained under ``StepGuard(policy="clip")``, with a 10,000x
  learning-rate spike;
* ``run="handmade"``: hand-made reports, then a burst of r = 40 steps between two scrapes;
* ``run="batch"``: reports pushed through a Pushgateway (scraped with ``honor_labels``).
"""

from __future__ import annotations

import math
import subprocess
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("prometheus_client", reason="needs the prometheus extra")

from stepguard.integrations import assets, naming
from stepguard.integrations.prometheus import PrometheusSink

pytestmark = [
    pytest.mark.slow,
    pytest.mark.requires_binary("prometheus"),
    pytest.mark.requires_binary("prometheus-pushgateway"),
]

SPIKE_R = 40.0
SPIKES = 5


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, module_processes: Any, helpers: Any
) -> Iterator[SimpleNamespace]:
    work = tmp_path_factory.mktemp("prometheus")
    handmade = PrometheusSink(port=0, run="handmade")
    guarded = PrometheusSink(port=0, run="guarded")
    gateway, _ = helpers.start_pushgateway(module_processes)
    batch = PrometheusSink(pushgateway=gateway, run="batch", push_interval_s=0)
    sinks = [handmade, guarded, batch]
    try:
        base = helpers.start_prometheus(
            module_processes, work,
            {"stepguard": [f"127.0.0.1:{handmade.port}", f"127.0.0.1:{guarded.port}"],
             "pushgateway": [gateway]},
            rule_files=[assets.prometheus_alerts()], honor_labels=["pushgateway"],
        )
        # Phase 1: ordinary steps from all three sources.
        calm = [helpers.make_report(i) for i in range(10)]
        for report in calm:
            handmade.write(report)
        _, guard_reports = helpers.tiny_guarded_run(8, [guarded], spike_at=5, policy="clip")
        pushed = [helpers.make_report(i, r=0.01 * (i + 1)) for i in range(3)]
        for report in pushed:
            batch.write(report)

        def scraped(run: str, steps: int) -> bool:
            return helpers.prom_value(base, f'stepguard_steps_total{{run="{run}"}}') == steps

        helpers.poll(lambda: scraped("handmade", 10) and scraped("guarded", 8)
                     and scraped("batch", 3), timeout=30, interval=0.5,
                     what="the first scrape of every source")

        # Phase 2: a burst of vetoed r = 40 steps and two calm ones, all between two scrapes.
        burst = [helpers.make_report(10 + i, r=SPIKE_R, action="veto", scale=0.0,
                                     reason="r=40 > 1", rule="radius") for i in range(SPIKES)]
        after = [helpers.make_report(10 + SPIKES + i, r=0.2) for i in range(2)]
        for report in burst + after:
            handmade.write(report)
        total = len(calm) + len(burst) + len(after)
        helpers.poll(lambda: scraped("handmade", total), timeout=15, interval=0.5,
                     what="the scrape after the burst")
        time.sleep(2.5)  # two more scrapes, so that rate() has points on both sides
        yield SimpleNamespace(
            base=base, handmade=calm + burst + after, guard_reports=guard_reports,
            pushed=pushed, helpers=helpers,
        )
    finally:
        for sink in sinks:
            sink.close()


def gauge(stack: SimpleNamespace, metric: str, run: str, **labels: str) -> float | None:
    selector = ",".join([f'run="{run}"', *(f'{k}="{v}"' for k, v in labels.items())])
    return stack.helpers.prom_value(stack.base, f"{metric}{{{selector}}}")


def assert_same(got: float | None, want: float, what: str) -> None:
    assert got is not None, f"{what}: no series"
    assert (math.isnan(got) and math.isnan(want)) or got == want, f"{what}: {got} != {want}"


def test_every_report_number_reaches_prometheus_exactly(stack: SimpleNamespace) -> None:
    last = stack.handmade[-1]
    for key, value in last.scalars().items():
        series = naming.prometheus_series(key)
        assert series is not None, key
        name, labels = series
        assert_same(gauge(stack, name, "handmade", **labels), value, key)
    assert gauge(stack, "stepguard_actions_total", "handmade", action="veto") == SPIKES
    assert gauge(stack, "stepguard_actions_total", "handmade", action="allow") == (
        len(stack.handmade) - SPIKES)
    assert gauge(stack, "stepguard_steps_outside_radius_total", "handmade") == SPIKES
    finite = [r.r for r in stack.handmade]
    assert gauge(stack, "stepguard_normalized_step_distribution_count", "handmade") == len(finite)
    inside = stack.helpers.prom_value(  # le="1.0" from the client; Prometheus 3 writes le="1"
        stack.base, 'stepguard_normalized_step_distribution_bucket{run="handmade",le=~"1|1.0"}')
    assert inside == sum(r <= 1.0 for r in finite)


def test_a_guarded_training_loop_is_scraped(stack: SimpleNamespace) -> None:
    reports = stack.guard_reports
    last = reports[-1]
    assert any(r.action == "clip" for r in reports), "the LR spike should have been clipped"
    for field, metric in (("r", "stepguard_normalized_step"), ("rho_a", "stepguard_radius"),
                          ("tau", "stepguard_step_length"), ("delta_a", "stepguard_logit_spread"),
                          ("applied_tau", "stepguard_applied_step_length"),
                          ("sc_fraction", "stepguard_softmax_collapse_ratio"),
                          ("loss", "stepguard_loss"), ("lr", "stepguard_learning_rate")):
        assert_same(gauge(stack, metric, "guarded"), float(getattr(last, field)), field)
    for action in ("allow", "clip", "veto"):
        assert gauge(stack, "stepguard_actions_total", "guarded", action=action) == sum(
            r.action == action for r in reports)
    outside = sum(r.r >= 1.0 for r in reports)
    assert outside >= 1
    assert gauge(stack, "stepguard_steps_outside_radius_total", "guarded") == outside


def test_a_spike_between_scrapes_is_not_lost(stack: SimpleNamespace) -> None:
    helpers, base = stack.helpers, stack.base
    assert gauge(stack, "stepguard_normalized_step", "handmade") == 0.2  # the gauge moved on
    peak = helpers.prom_value(base, 'max_over_time(stepguard_normalized_step_max{run="handmade"}[10m])')
    assert peak == SPIKE_R


def test_the_shipped_alerts_fire_on_the_injected_spike(stack: SimpleNamespace) -> None:
    helpers, base = stack.helpers, stack.base

    def firing() -> dict[str, dict[str, Any]] | None:
        alerts = helpers.http_json(f"{base}/api/v1/alerts")["data"]["alerts"]
        mine = {a["labels"]["alertname"]: a for a in alerts
                if a["labels"].get("run") == "handmade" and a["state"] == "firing"}
        return mine if {"StepGuardOutsideRadius", "StepGuardRadiusSpike"} <= set(mine) else None

    alerts = helpers.poll(firing, timeout=20, interval=0.5,
                          what="StepGuardOutsideRadius and StepGuardRadiusSpike to fire")
    assert alerts["StepGuardRadiusSpike"]["annotations"]["summary"] == (
        "handmade: step spike r = 40")
    assert alerts["StepGuardOutsideRadius"]["labels"]["severity"] == "warning"
    rules = helpers.http_json(f"{base}/api/v1/rules")["data"]["groups"]
    assert all(rule["health"] == "ok" for group in rules for rule in group["rules"])
    calm = helpers.prom_query(base, 'ALERTS{run="batch"}')
    assert calm == []


def test_pushed_batch_metrics_reach_prometheus(stack: SimpleNamespace) -> None:
    last = stack.pushed[-1]
    result = stack.helpers.prom_query(stack.base, 'stepguard_normalized_step{run="batch"}')
    assert len(result) == 1
    assert result[0]["metric"]["job"] == "stepguard"  # the pushed job, kept by honor_labels
    assert float(result[0]["value"][1]) == last.r
    assert gauge(stack, "stepguard_radius", "batch") == last.rho_a


def test_every_dashboard_query_returns_data(stack: SimpleNamespace) -> None:
    empty = [
        f"{title} [{ref}]: {expr}"
        for title, ref, expr in stack.helpers.dashboard_queries(rate_interval="1m")
        if not stack.helpers.prom_query(stack.base, expr)
    ]
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)


@pytest.mark.requires_binary("promtool")
def test_exporter_output_passes_promtool(stack: SimpleNamespace) -> None:
    targets = stack.helpers.http_json(f"{stack.base}/api/v1/targets")["data"]["activeTargets"]
    assert {t["health"] for t in targets} == {"up"}, targets
    for target in targets:
        text = stack.helpers.http_get(target["scrapeUrl"])
        done = subprocess.run(["promtool", "check", "metrics"], input=text,
                              capture_output=True, timeout=30)
        assert done.returncode == 0, (target["scrapeUrl"], done.stdout + done.stderr)
