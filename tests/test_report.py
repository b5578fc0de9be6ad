"""The StepReport record, its JSON form, and the JSON-lines and console sinks."""

from __future__ import annotations

import io
import json
import math

import pytest

from stepguard import Decision, SpreadSummary, StepReport
from stepguard.sinks import ConsoleSink, JsonlSink, SinkSet, read_jsonl


def sample(step: int = 3, **kw) -> StepReport:
    fields = dict(
        step=step,
        tau=2.0,
        rho_a=0.5,
        r=4.0,
        delta_a=2 * math.pi,
        spread=SpreadSummary(
            count=3, max=6.28, q99=6.0, q90=5.0, median=3.0, mean=3.5, min=1.0, values=(1.0, 3.0, 6.28)
        ),
        action="clip",
        scale=0.25,
        applied_tau=0.5,
        reason="r=4 > 1",
        rule="clip_r",
        binding=(2, 0),
        entanglement={"gram.chosen.rejected": 0.5},
        extras={"loss.base": 1.25},
    )
    fields.update(kw)
    return StepReport(**fields)


def test_json_round_trip_keeps_every_field_including_non_finite() -> None:
    report = sample(rho_a=math.inf, r=0.0, loss=math.nan)
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    back = StepReport.from_dict(data)
    assert back.rho_a == math.inf and math.isnan(back.loss)
    assert back == StepReport.from_dict(sample(rho_a=math.inf, r=0.0, loss=math.nan).to_dict())
    assert back.spread == report.spread and back.binding == (2, 0)


def test_unknown_fields_are_rejected() -> None:
    data = sample().to_dict() | {"rr": 1.0}
    with pytest.raises(ValueError, match="rr"):
        StepReport.from_dict(data)


def test_scalars_flatten_numeric_fields() -> None:
    s = sample().scalars()
    assert s["r"] == 4.0 and s["spread.max"] == 6.28 and s["entanglement.gram.chosen.rejected"] == 0.5
    assert s["extras.loss.base"] == 1.25 and "reason" not in s and "rank" not in s


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"action": "skip"}, "action"),
        ({"action": "clip", "scale": 1.5}, "scale"),
        ({"action": "allow", "scale": 0.5}, "allow"),
        ({"action": "veto", "scale": 0.5}, "veto"),
    ],
)
def test_decision_validates(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        Decision(**kwargs)


def test_jsonl_sink_lines_are_readable_while_writing(tmp_path) -> None:
    path = tmp_path / "log" / "steps.jsonl"
    sink = JsonlSink(path)
    sink.write(sample(0))
    assert [r.step for r in read_jsonl(path)] == [0]  # flushed: visible before close
    sink.write(sample(1))
    with open(path, "a") as handle:
        handle.write('{"step": 2, "ta')  # a partially written line is skipped
    assert [r.step for r in read_jsonl(path)] == [0, 1]
    sink.close()
    sink.close()


def test_console_sink_prints_sampled_steps_and_every_intervention() -> None:
    stream = io.StringIO()
    sink = ConsoleSink(every=10, stream=stream)
    sink.write(sample(5, action="allow", scale=1.0, applied_tau=2.0))
    sink.write(sample(7))
    sink.write(sample(10, action="allow", scale=1.0))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and "clip" in lines[0] and "r=4 > 1" in lines[0] and "step     10" in lines[1]


def test_sinkset_drops_a_sink_after_consecutive_failures() -> None:
    class Flaky:
        def __init__(self) -> None:
            self.calls = 0

        def write(self, report):
            self.calls += 1
            raise ConnectionError("server gone")

        def flush(self):
            pass

        def close(self):
            pass

    flaky = Flaky()
    sinks = SinkSet([flaky], max_failures=2)
    for i in range(4):
        sinks.write(sample(i))
    assert flaky.calls == 2 and sinks.failures["Flaky"] == 2 and not sinks.sinks
    with pytest.raises(TypeError, match="not a sink"):
        SinkSet([object()])


def test_the_ledger_gives_the_committed_report_its_decision_and_counts_it() -> None:
    from stepguard import Decision, GuardConfig
    from stepguard.ledger import StepLedger

    report = StepReport(
        step=3, tau=0.5, rho_a=2.0, r=0.25, delta_a=1.5, spread=SpreadSummary(count=4, max=1.5),
        entanglement={"realized.chosen": 2.0, "ratio_chosen": 3.0},
    )
    ledger = StepLedger(GuardConfig())
    recorded = ledger.record(report, Decision("clip", 0.5, "r=2 > 1", "clip_r"), {"jvp": 0.1})
    assert (recorded.action, recorded.scale, recorded.applied_tau, recorded.reason, recorded.rule) == (
        "clip", 0.5, 0.25, "r=2 > 1", "clip_r"
    )
    assert recorded.entanglement == {"realized.chosen": 1.0, "ratio_chosen": 3.0}  # the applied half
    assert recorded.timings == {"jvp": 0.1} and recorded.spread == report.spread
    assert report.action == "allow" and report.entanglement["realized.chosen"] == 2.0  # untouched
    assert (ledger.step_count, ledger.counters["clip"], ledger.rule_counters) == (1, 1, {"clip_r": 1})
    assert ledger.last_report is recorded
