"""PrometheusSink in push mode against a real Pushgateway, including one that goes away."""

from __future__ import annotations

import logging
from typing import Any

import pytest

pytest.importorskip("prometheus_client", reason="needs the prometheus extra")

from prometheus_client.parser import text_string_to_metric_families

from stepguard.integrations.prometheus import PrometheusSink

pytestmark = pytest.mark.requires_binary("prometheus-pushgateway")


def pushed(helpers: Any, gateway: str, run: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The gateway's samples of one pushed group (job="stepguard", run=...), labels minus those."""
    text = helpers.http_get(f"http://{gateway}/metrics").decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("job") == "stepguard" and s.labels.get("run") == run:
                rest = {k: v for k, v in s.labels.items() if k not in ("job", "run", "instance")}
                out[(s.name, tuple(sorted(rest.items())))] = s.value
    return out


def test_push_mode_pushes_on_first_write_flush_and_close(processes: Any, helpers: Any) -> None:
    gateway, _ = helpers.start_pushgateway(processes)
    sink = PrometheusSink(pushgateway=gateway, run="b1", push_interval_s=3600)
    assert sink.port is None and sink.url is None
    reports = [helpers.make_report(i) for i in range(3)]

    sink.write(reports[0])  # the first report is pushed at once
    assert sink.pushes == 1
    group = pushed(helpers, gateway, "b1")
    assert group[("stepguard_steps_total", ())] == 1
    assert group[("stepguard_normalized_step", ())] == reports[0].r

    sink.write(reports[1])
    sink.write(reports[2])  # within push_interval_s: not pushed yet
    assert sink.pushes == 1
    assert pushed(helpers, gateway, "b1")[("stepguard_steps_total", ())] == 1

    sink.flush()
    assert sink.pushes == 2
    group = pushed(helpers, gateway, "b1")
    assert group[("stepguard_steps_total", ())] == 3
    assert group[("stepguard_normalized_step", ())] == reports[2].r
    assert group[("stepguard_entanglement", (("entry", "cos.chosen.rejected"),))] == -0.75
    sink.flush()  # nothing new: no push
    assert sink.pushes == 2
    sink.close()  # the group stays for Prometheus to scrape
    assert pushed(helpers, gateway, "b1")[("stepguard_steps_total", ())] == 3

    other = PrometheusSink(pushgateway=gateway, run="b2", delete_on_close=True)
    other.write(reports[0])
    assert pushed(helpers, gateway, "b2")
    other.close()
    assert pushed(helpers, gateway, "b2") == {}


def test_a_lost_gateway_never_stops_training(
    processes: Any, helpers: Any, caplog: pytest.LogCaptureFixture
) -> None:
    port = helpers.free_port()
    gateway, proc = helpers.start_pushgateway(processes, port)
    sink = PrometheusSink(pushgateway=gateway, run="lost", push_interval_s=0, push_timeout_s=2)

    def weather(step: int) -> None:
        if step == 2:
            processes.stop(proc)  # the gateway goes away mid-training
        if step == 5:
            helpers.start_pushgateway(processes, port)  # and comes back

    with caplog.at_level(logging.WARNING, logger="stepguard.sinks"):
        guard, reports = helpers.tiny_guarded_run(7, [sink], before_step=weather)
    assert [r.step for r in reports] == list(range(7))  # training went on
    assert guard.engine.sinks.failures["prometheus"] == 3  # steps 2, 3, 4
    assert sink in guard.engine.sinks.sinks  # retried, not dropped (the default)
    assert sink.pushes == 4  # steps 0, 1, 5, 6
    warnings = [r for r in caplog.records if "prometheus" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]  # logged once
    assert "training continues" in warnings[0].getMessage()
    group = pushed(helpers, gateway, "lost")
    assert group[("stepguard_steps_total", ())] == 7  # nothing counted was lost
    assert group[("stepguard_normalized_step", ())] == reports[-1].r
    guard.close()


def test_a_lost_gateway_is_dropped_after_max_failures(processes: Any, helpers: Any) -> None:
    from stepguard import GuardConfig

    gateway, proc = helpers.start_pushgateway(processes)
    sink = PrometheusSink(pushgateway=gateway, run="dropped", push_interval_s=0, push_timeout_s=2)

    def weather(step: int) -> None:
        if step == 1:
            processes.stop(proc)

    guard, reports = helpers.tiny_guarded_run(
        5, [sink], before_step=weather, config=GuardConfig(sink_max_failures=2))
    assert len(reports) == 5
    assert guard.engine.sinks.failures["prometheus"] == 2
    assert sink not in guard.engine.sinks.sinks
    guard.close()
