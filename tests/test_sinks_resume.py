"""The JSON-lines log survives restarts: resuming keeps every step once, torn lines are repaired,
and reading skips a corrupt line anywhere with a warning naming the file and the line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stepguard import StepGuard
from stepguard.report import StepReport
from stepguard.sinks import CorruptLineWarning, JsonlSink, read_jsonl


def report(step: int, pad: int = 0) -> StepReport:
    return StepReport(step=step, tau=1.0, rho_a=2.0, r=0.5, delta_a=1.5, reason="x" * pad)


def write_steps(sink: JsonlSink, steps: range) -> None:
    for step in steps:
        sink.write(report(step))
    sink.close()


def steps_in(path: Path) -> list[int]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a repaired file reads without a single warning
        return [r.step for r in read_jsonl(path)]


def tear(path: Path, keep_bytes: int) -> None:
    """Append the first ``keep_bytes`` of a record, as a writer killed mid-line leaves it."""
    line = json.dumps(report(99).to_dict()) + "\n"
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line[:keep_bytes])


def test_resume_with_the_same_arguments_keeps_every_step_once(tmp_path) -> None:
    path = tmp_path / "steps.jsonl"
    write_steps(JsonlSink(path), range(10))
    write_steps(JsonlSink(path), range(6, 13))  # resumed from the checkpoint of step 6
    assert steps_in(path) == list(range(13))


def test_a_fresh_run_starts_a_new_file(tmp_path) -> None:
    path = tmp_path / "steps.jsonl"
    write_steps(JsonlSink(path), range(10))
    write_steps(JsonlSink(path), range(4))
    assert steps_in(path) == list(range(4))


def test_resume_repairs_a_torn_last_line(tmp_path) -> None:
    path = tmp_path / "steps.jsonl"
    write_steps(JsonlSink(path), range(8))
    tear(path, 20)
    with pytest.warns(CorruptLineWarning, match=r"line 9: incomplete last line"):
        write_steps(JsonlSink(path), range(8, 11))
    assert steps_in(path) == list(range(11))


def test_append_keeps_every_record_and_starts_on_a_new_line(tmp_path) -> None:
    path = tmp_path / "steps.jsonl"
    write_steps(JsonlSink(path), range(5))
    tear(path, 30)
    with pytest.warns(CorruptLineWarning):
        write_steps(JsonlSink(path, append=True), range(3, 6))
    assert steps_in(path) == [0, 1, 2, 3, 4, 3, 4, 5]
    assert JsonlSink(path, append=True).mode == JsonlSink(path, mode="append").mode == "append"


def test_overwrite_empties_the_file_at_once(tmp_path) -> None:
    path = tmp_path / "steps.jsonl"
    write_steps(JsonlSink(path), range(5))
    JsonlSink(path, mode="overwrite").close()
    assert path.read_text() == ""


def test_a_sink_that_never_writes_leaves_the_file_alone(tmp_path) -> None:
    path = tmp_path / "steps.jsonl"
    write_steps(JsonlSink(path), range(5))
    JsonlSink(path).close()
    assert steps_in(path) == list(range(5))


def test_resume_removes_records_from_the_middle_by_replacing_the_file(tmp_path) -> None:
    path = tmp_path / "steps.jsonl"
    write_steps(JsonlSink(path), range(6))
    write_steps(JsonlSink(path, mode="append"), range(2))  # a second run appended: 0..5, 0, 1
    write_steps(JsonlSink(path), range(4, 6))
    assert steps_in(path) == [0, 1, 2, 3, 0, 1, 4, 5]
    assert [p.name for p in tmp_path.iterdir()] == ["steps.jsonl"]  # no temporary file left


def test_a_crash_while_replacing_the_file_loses_nothing(tmp_path, monkeypatch) -> None:
    path = tmp_path / "steps.jsonl"
    write_steps(JsonlSink(path), range(6))
    write_steps(JsonlSink(path, mode="append"), range(2))
    before = path.read_bytes()

    def crash(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        JsonlSink(path).write(report(3))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["steps.jsonl"]


def test_read_skips_a_corrupt_line_anywhere_naming_file_and_line(tmp_path) -> None:
    path = tmp_path / "steps.jsonl"
    write_steps(JsonlSink(path), range(3))
    lines = path.read_text().splitlines(keepends=True)
    lines.insert(1, "not json at all\n")
    path.write_text("".join(lines))
    with pytest.warns(CorruptLineWarning, match=rf"{path.name}, line 2: not JSON"):
        assert [r.step for r in read_jsonl(path)] == [0, 1, 2]


def test_read_recovers_a_record_glued_to_a_torn_fragment(tmp_path) -> None:
    path = tmp_path / "steps.jsonl"
    write_steps(JsonlSink(path), range(3))
    tear(path, 25)
    with open(path, "a", encoding="utf-8") as handle:  # what an older append=True left
        handle.write(json.dumps(report(3).to_dict()) + "\n")
    with pytest.warns(CorruptLineWarning, match="line 4: 25 bytes of a torn record"):
        assert [r.step for r in read_jsonl(path)] == [0, 1, 2, 3]
    with pytest.warns(CorruptLineWarning):
        write_steps(JsonlSink(path), range(4, 5))  # resuming rewrites the glued line cleanly
    assert steps_in(path) == [0, 1, 2, 3, 4]


def test_bad_arguments_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown JsonlSink mode 'keep'"):
        JsonlSink(tmp_path / "a.jsonl", mode="keep")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not both"):
        JsonlSink(tmp_path / "a.jsonl", mode="append", append=True)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        JsonlSink(tmp_path)


def test_a_guard_resumed_from_its_state_dict_continues_the_log(tmp_path) -> None:
    path = tmp_path / "steps.jsonl"
    torch.manual_seed(0)
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))

    def train(steps: int, state: dict | None = None) -> dict:
        net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
        guard = StepGuard(torch.optim.SGD(net.parameters(), lr=0.1), model=net, sinks=[JsonlSink(path)])
        if state is not None:
            guard.load_state_dict(state)
        saved = {}
        for _ in range(steps):
            guard.zero_grad()
            F.cross_entropy(net(x), y).backward()
            guard.step()
            if guard.state_dict()["stepguard"]["step"] == 3:
                saved = guard.state_dict()
        guard.close()
        return saved

    checkpoint = train(6)
    train(4, checkpoint)  # the checkpoint of step 3: steps 3..6 again
    assert steps_in(path) == list(range(7))


_CHILD = """
import os, signal, sys
from stepguard.report import StepReport
from stepguard.sinks import JsonlSink

sink = JsonlSink(sys.argv[1])
for step in range(5):
    sink.write(StepReport(step=step, tau=1.0, rho_a=2.0, r=0.5, delta_a=1.5, reason="x" * 4000))
real_write = sink._file.write

def torn_write(text):
    real_write(text[: len(text) // 2])
    sink._file.flush()
    os.kill(os.getpid(), signal.SIGKILL)

sink._file.write = torn_write
sink.write(StepReport(step=5, tau=1.0, rho_a=2.0, r=0.5, delta_a=1.5, reason="x" * 4000))
"""


@pytest.mark.slow
def test_a_writer_killed_mid_line_is_repaired_on_resume(tmp_path) -> None:
    path = tmp_path / "steps.jsonl"
    child = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    assert not path.read_bytes().endswith(b"\n")  # the kill tore the last line
    with pytest.warns(CorruptLineWarning, match="line 6: incomplete last line"):
        assert [r.step for r in read_jsonl(path)] == list(range(5))
    with pytest.warns(CorruptLineWarning):
        write_steps(JsonlSink(path), range(3, 7))  # resumed from the checkpoint of step 3
    assert steps_in(path) == list(range(7))
