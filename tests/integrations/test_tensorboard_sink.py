"""TensorBoardSink: event files read back with TensorBoard's own EventAccumulator."""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("tensorboard", reason="needs the tensorboard extra")

import numpy as np
from tensorboard.backend.event_processing import event_accumulator as ea_module

from stepguard.integrations.tensorboard import (
    DECISION_TAG,
    R_LIMIT_TAG,
    SPREAD_HISTOGRAM_TAG,
    TensorBoardSink,
    action_tag,
    custom_scalars_layout,
)
from stepguard.report import ACTIONS
from stepguard.sinks.base import SinkSet


def f32(value: float) -> float:
    """What TensorBoard stores for a scalar: the value rounded to float32."""
    return float(np.float32(value))


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def load(log_dir: Path) -> Any:
    acc = ea_module.EventAccumulator(
        str(log_dir),
        size_guidance={ea_module.SCALARS: 0, ea_module.HISTOGRAMS: 0, ea_module.TENSORS: 0},
    )
    acc.Reload()
    return acc


@pytest.fixture
def fed(tmp_path: Path, report: Any) -> tuple[Path, list[Any]]:
    """Six reports written to a sink: allows, a clip, a veto, and a non-finite step."""
    reports = [report(i) for i in range(6)]
    reports[2] = report(2, action="clip", scale=0.5, applied_tau=reports[2].tau * 0.5,
                        reason="r above the target: clipped to r=1", rule="radius")
    reports[3] = report(3, action="veto", scale=0.0, applied_tau=0.0,
                        reason="non-finite update", rule="nonfinite", r=math.nan,
                        rho_a=math.inf, delta_a=0.0, tau=math.nan)
    sink = TensorBoardSink(tmp_path / "run", flush_secs=3600, max_queue=10_000)
    for rep in reports:
        sink.write(rep)
    sink.close()
    return tmp_path / "run", reports


def test_every_report_scalar_round_trips_exactly(fed: tuple[Path, list[Any]]) -> None:
    log_dir, reports = fed
    acc = load(log_dir)
    tags = set(acc.Tags()["scalars"])
    expected_keys = {k for rep in reports for k in rep.scalars() if k != "step"}
    for key in ("r", "rho_a", "tau", "delta_a", "spread.max", "sc_fraction",
                "entanglement.gram.chosen.rejected", "extras.loss.base"):
        assert key in expected_keys
    assert {f"stepguard/{k}" for k in expected_keys} <= tags
    assert "stepguard/step" not in tags  # the step is the x-axis, not a series
    for key in expected_keys:
        events = acc.Scalars(f"stepguard/{key}")
        assert [e.step for e in events] == [rep.step for rep in reports], key
        for event, rep in zip(events, reports, strict=True):
            want = f32(rep.scalars()[key])
            assert same(event.value, want), (key, rep.step, event.value, want)


def test_nonfinite_values_are_stored_as_they_are(fed: tuple[Path, list[Any]]) -> None:
    log_dir, _ = fed
    acc = load(log_dir)
    at_step_3 = {tag: next(e.value for e in acc.Scalars(tag) if e.step == 3)
                 for tag in ("stepguard/r", "stepguard/rho_a", "stepguard/tau")}
    assert math.isnan(at_step_3["stepguard/r"])
    assert math.isnan(at_step_3["stepguard/tau"])
    assert at_step_3["stepguard/rho_a"] == math.inf


def test_boundary_and_action_counts(fed: tuple[Path, list[Any]]) -> None:
    log_dir, reports = fed
    acc = load(log_dir)
    assert [e.value for e in acc.Scalars(R_LIMIT_TAG)] == [1.0] * len(reports)
    for action in ACTIONS:
        running = np.cumsum([rep.action == action for rep in reports]).tolist()
        assert [e.value for e in acc.Scalars(action_tag(action))] == running, action


def test_spread_histograms(fed: tuple[Path, list[Any]]) -> None:
    log_dir, reports = fed
    histograms = load(log_dir).Histograms(SPREAD_HISTOGRAM_TAG)
    assert [h.step for h in histograms] == [rep.step for rep in reports]
    for event, rep in zip(histograms, reports, strict=True):
        value = event.histogram_value
        spreads = rep.spread.values
        assert value.num == len(spreads)
        assert value.min == min(spreads)
        assert value.max == max(spreads)
        assert value.sum == pytest.approx(math.fsum(spreads), rel=1e-12)
        assert sum(value.bucket) == len(spreads)


def test_histogram_leaves_out_nonfinite_spreads(tmp_path: Path, report: Any) -> None:
    from stepguard.report import SpreadSummary

    sink = TensorBoardSink(tmp_path)
    sink.write(report(0, spread=SpreadSummary(count=3, max=math.inf, values=(0.5, math.inf,
                                                                             math.nan))))
    sink.write(report(1, spread=SpreadSummary(count=1, max=math.nan, values=(math.nan,))))
    sink.close()
    histograms = load(tmp_path).Histograms(SPREAD_HISTOGRAM_TAG)
    assert [(h.step, h.histogram_value.num, h.histogram_value.max) for h in histograms] == [
        (0, 1, 0.5)
    ]


def test_decisions_are_written_as_text(fed: tuple[Path, list[Any]]) -> None:
    log_dir, reports = fed
    texts = load(log_dir).Tensors(f"{DECISION_TAG}/text_summary")
    assert [t.step for t in texts] == [rep.step for rep in reports if rep.action != "allow"]
    by_step = {t.step: t.tensor_proto.string_val[0].decode() for t in texts}
    assert by_step[2].startswith("**clip** at step 2 (rule `radius`)")
    assert "clipped to r=1" in by_step[2]
    assert by_step[3].startswith("**veto** at step 3 (rule `nonfinite`): non-finite update")


def test_custom_scalars_layout_puts_r_against_the_boundary(fed: tuple[Path, list[Any]]) -> None:
    from tensorboard.plugins.custom_scalar import layout_pb2

    log_dir, _ = fed
    acc = load(log_dir)
    events = acc.Tensors("custom_scalars__config__")
    assert len(events) == 1  # written once per sink
    layout = layout_pb2.Layout()
    layout.ParseFromString(events[0].tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for cat in layout.category
              for chart in cat.chart}
    assert [cat.title for cat in layout.category] == list(custom_scalars_layout())
    written = acc.Tags()["scalars"]

    def matched(regexes: list[str]) -> set[str]:
        return {tag for tag in written if any(re.search(rx, tag) for rx in regexes)}

    assert matched(charts["normalized step r against the r = 1 boundary"]) == {
        "stepguard/r", R_LIMIT_TAG}
    assert matched(charts["radius rho_a and step length tau"]) == {
        "stepguard/rho_a", "stepguard/tau", "stepguard/applied_tau"}
    assert matched(charts["actions (cumulative)"]) == {action_tag(a) for a in ACTIONS}
    assert matched(charts["gradient entanglement"]) == {
        "stepguard/entanglement.gram.chosen.rejected", "stepguard/entanglement.cos.chosen.rejected"}
    assert "stepguard/sc_fraction" in matched(charts["softmax collapse"])


def test_close_flushes_pending_events(tmp_path: Path, report: Any) -> None:
    sink = TensorBoardSink(tmp_path, flush_secs=3600, max_queue=10_000)
    for i in range(3):
        sink.write(report(i))
    sink.close()
    sink.close()  # closing twice is harmless
    assert [e.step for e in load(tmp_path).Scalars("stepguard/r")] == [0, 1, 2]
    with pytest.raises(RuntimeError, match="closed"):
        sink.write(report(3))


def test_a_resumed_run_shows_every_step_once(tmp_path: Path, report: Any) -> None:
    crashed = TensorBoardSink(tmp_path, flush_secs=3600, max_queue=10_000)
    for i in range(8):  # the run checkpointed at step 5 and crashed after step 7
        crashed.write(report(i, r=float(i)))
    crashed.close()
    resumed = TensorBoardSink(tmp_path, flush_secs=3600, max_queue=10_000)
    for i in range(5, 10):
        resumed.write(report(i, r=100.0 + i))
    resumed.close()
    events = load(tmp_path).Scalars("stepguard/r")
    assert [e.step for e in events] == list(range(10))
    assert [e.value for e in events] == [*map(float, range(5)), *(100.0 + i for i in range(5, 10))]


def test_only_rank_zero_writes_by_default(tmp_path: Path, report: Any) -> None:
    quiet = TensorBoardSink(tmp_path / "rank1", rank=1)
    quiet.write(report(0))
    quiet.close()
    assert not quiet.active
    assert not (tmp_path / "rank1").exists()

    loud = TensorBoardSink(tmp_path / "rank1_all", rank=1, rank_zero_only=False)
    loud.write(report(0))
    loud.close()
    assert [e.step for e in load(tmp_path / "rank1_all").Scalars("stepguard/r")] == [0]


def test_rank_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "3")
    assert TensorBoardSink(tmp_path).rank == 3
    monkeypatch.setenv("RANK", "0")
    assert TensorBoardSink(tmp_path).active


def test_missing_tensorboard_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=re.escape("pip install -e '.[tensorboard]'")):
        TensorBoardSink(tmp_path)


def test_unknown_decision_action_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="decisions"):
        TensorBoardSink(tmp_path, decisions=("skip",))


def test_a_full_disk_is_isolated_counted_and_logged_once(
    tmp_path: Path, report: Any, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink = TensorBoardSink(tmp_path)
    calls = []

    def disk_full(*args: Any, **kwargs: Any) -> None:
        calls.append(args)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sink._writer_class, "add_scalar", disk_full)  # the writer opens at the first report
    sinks = SinkSet([sink], max_failures=3)
    with caplog.at_level(logging.WARNING, logger="stepguard.sinks"):
        for i in range(5):
            sinks.write(report(i))  # never raises
    assert sinks.failures["tensorboard"] == 3
    assert sink not in sinks.sinks  # dropped after 3 consecutive failures
    assert len(calls) == 3
    failed = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(failed) == 1 and "No space left on device" in failed[0].getMessage()
    sink.close()


def test_a_guarded_training_loop_round_trips(tmp_path: Path, helpers: Any) -> None:
    sink = TensorBoardSink(tmp_path / "guarded")
    guard, reports = helpers.tiny_guarded_run(8, [sink], spike_at=5, policy="clip")
    guard.close()  # closes (and flushes) the sink
    assert guard.engine.sinks.failures["tensorboard"] == 0
    acc = load(tmp_path / "guarded")
    for key in ("r", "rho_a", "tau", "delta_a", "applied_tau", "loss", "lr", "sc_fraction",
                "spread.max"):
        events = acc.Scalars(f"stepguard/{key}")
        assert [e.step for e in events] == [r.step for r in reports], key
        assert [e.value for e in events] == [f32(r.scalars()[key]) for r in reports], key
    clipped = [r.step for r in reports if r.action == "clip"]
    assert clipped, "the LR spike should have been clipped"
    texts = acc.Tensors(f"{DECISION_TAG}/text_summary")
    assert [t.step for t in texts] == clipped
    assert [e.value for e in acc.Scalars(action_tag("clip"))][-1] == len(clipped)
    with_values = [r for r in reports if r.spread.values]
    histograms = acc.Histograms(SPREAD_HISTOGRAM_TAG)
    assert [h.step for h in histograms] == [r.step for r in with_values]
    for event, rep in zip(histograms, with_values, strict=True):
        assert event.histogram_value.num == len(rep.spread.values)
        assert event.histogram_value.max == max(rep.spread.values)


def test_a_resumed_writer_s_file_sorts_after_the_files_already_there(tmp_path: Path, report: Any) -> None:
    """TensorBoard reads event files in name order; a file of the same second whose counter has
    more digits ("...10" against "...9") would sort first and undo the resumed run's purge."""
    import socket
    import time

    earlier = tmp_path / f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.9"
    earlier.write_bytes(b"")
    resumed = TensorBoardSink(tmp_path, flush_secs=3600)
    resumed.write(report(5))
    resumed.close()
    files = sorted(p.name for p in tmp_path.glob("events.out.tfevents.*"))
    assert len(files) == 2 and files[0] == earlier.name
