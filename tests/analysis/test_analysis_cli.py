"""``stepguard analyze`` end to end: outputs, progress, errors and exit codes."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stepguard.analysis.outputs import read_jsonl, write_jsonl
from stepguard.analysis.replay import Transition
from stepguard.cli import main
from stepguard.report import StepReport
from stepguard.sinks import CorruptLineWarning

REPO = Path(__file__).resolve().parents[2]


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(["analyze", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_analyze_writes_every_output(tmp_path, monitor_run, probe_file, factory_file, capsys) -> None:
    out = tmp_path / "out"
    code, stdout, stderr = _run(
        [
            str(monitor_run.ckpt_dir),
            "--model",
            f"{factory_file}:build",
            "--data",
            str(probe_file),
            "--validation",
            str(probe_file),
            "--out",
            str(out),
            "--flips",
            "--cld",
            "--cld-fraction",
            "0.5",
        ],
        capsys,
    )
    assert code == 0, stderr
    assert "5 transitions measured (0 flagged, 0 missing)" in stdout
    assert "analyze [" in stderr and "6/6" in stderr  # the progress bar
    lines = [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]
    assert len(lines) == 5
    for k, line in enumerate(lines):
        assert {"step_from", "step_to", "tau", "rho_a", "r", "loss", "binding", "binding_radii"} <= set(line)
        assert (line["step_from"], line["step_to"], line["source"]) == (k, k + 1, "replay")
        assert line["r"] == pytest.approx(monitor_run.reports[k].r, rel=1e-6)
        assert {"accuracy", "negative_flip_rate", "val_loss"} <= set(line["extras"])
    assert [t.report.r for t in read_jsonl(out / "report.jsonl")] == [line["r"] for line in lines]
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert [int(r["step_from"]) for r in rows] == list(range(5))
    assert float(rows[0]["r"]) == pytest.approx(lines[0]["r"])
    assert list(rows[0])[:7] == ["step_from", "step_to", "tau", "rho_a", "r", "loss", "extras.accuracy"]
    checkpoints = list(csv.DictReader((out / "checkpoints.csv").open()))
    assert len(checkpoints) == 6 and all(c["ok"] == "True" for c in checkpoints)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["transitions"] == 5 and summary["missing"] == [] and summary["cld"]["checkpoints"] == 6
    cld = json.loads((out / "cld.json").read_text())
    assert len(cld["scores"]) == 96 and cld["coreset"]
    assert (out / "cld.csv").read_text().startswith("index,label,score,rank_in_class,in_coreset")
    html = (out / "report.html").read_text()
    assert "<svg" in html and "Negative flips" in html and "CLD scores" in html
    pytest.importorskip("tensorboard")
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_tensorboard_events_hold_the_replayed_r(tmp_path, monitor_run, probe_file, capsys) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    code, _, err = _run(
        [
            str(monitor_run.ckpt_dir),
            "--model",
            "analysis_helpers:small_mlp",
            "--data",
            str(probe_file),
            "--out",
            str(out),
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, err
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    r = [e.value for e in acc.Scalars("stepguard/r")]
    assert [e.step for e in acc.Scalars("stepguard/r")] == list(range(5))
    assert r == pytest.approx([rep.r for rep in monitor_run.reports], rel=1e-6)


def test_explicit_checkpoint_list_with_a_bad_file(tmp_path, monitor_run, probe_file, capsys) -> None:
    bad = tmp_path / "step_2.pt"
    bad.write_bytes(b"not a checkpoint")
    files = [str(monitor_run.files[0]), str(monitor_run.files[1]), str(bad), str(monitor_run.files[3])]
    out = tmp_path / "out"
    code, stdout, stderr = _run(
        [
            "--checkpoints",
            *files,
            "--model",
            "stepguard.analysis.example:__name__",
            "--data",
            str(probe_file),
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 2 and "not a callable" in stderr
    code, stdout, stderr = _run(
        [
            "--checkpoints",
            *files,
            "--model",
            "analysis_helpers:small_mlp",
            "--data",
            str(probe_file),
            "--out",
            str(out),
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, stderr
    assert "1 transitions measured (0 flagged, 2 missing)" in stdout
    assert f"skipped {bad}: corrupt or not a PyTorch checkpoint" in stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [(m["step_from"], m["step_to"]) for m in summary["missing"]] == [(1, 2), (2, 3)]
    assert summary["skipped_checkpoints"][0]["path"] == str(bad)
    assert "Missing transitions (2)" in (out / "report.html").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{empty}"], "no checkpoints in"),
        (["{ckpt}", "--model", "no_such_pkg:build"], "cannot import module 'no_such_pkg'"),
        (["{ckpt}", "--data", "{missing}"], "no such file"),
        (["{ckpt}", "--checkpoints", "a.pt"], "either CKPT_DIR or --checkpoints"),
        (["{ckpt}", "--device", "cuda:7"], "CUDA is not available"),
        (["{ckpt}", "--cld"], "validation probe"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(
    tmp_path, monitor_run, probe_file, capsys, args, message
) -> None:
    if "cuda" in " ".join(args) and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    (tmp_path / "empty").mkdir()
    filled = [
        a.format(empty=tmp_path / "empty", ckpt=monitor_run.ckpt_dir, missing=tmp_path / "missing.pt")
        for a in args
    ]
    defaults = {"--model": "analysis_helpers:small_mlp", "--data": str(probe_file)}
    for flag, value in defaults.items():
        if flag not in filled:
            filled += [flag, value]
    code, _, stderr = _run([*filled, "--out", str(tmp_path / "out"), "--quiet"], capsys)
    assert code == 2
    assert stderr.startswith("stepguard analyze: error:") and message in stderr


def test_fail_on_flag(tmp_path, clip_run, capsys) -> None:
    probe = tmp_path / "p.pt"
    torch.save({"inputs": clip_run.x, "targets": clip_run.y}, probe)
    args = [
        str(clip_run.ckpt_dir),
        "--model",
        "analysis_helpers:small_mlp",
        "--data",
        str(probe),
        "--out",
        str(tmp_path / "out"),
        "--quiet",
        "--no-tensorboard",
    ]
    assert _run(args, capsys)[0] == 0
    assert _run([*args, "--fail-on-flag"], capsys)[0] == 1


def test_python_dash_m_stepguard_analyze(tmp_path, monitor_run) -> None:
    out = tmp_path / "out"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "stepguard",
            "analyze",
            str(monitor_run.ckpt_dir),
            "--model",
            "analysis_helpers:small_mlp",
            "--data",
            "digits:test",
            "--out",
            str(out),
            "--mode",
            "eval",
            "--no-tensorboard",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "5 transitions measured" in proc.stdout
    assert "analyze [" in proc.stderr
    line = json.loads((out / "report.jsonl").read_text().splitlines()[0])
    assert line["spread"]["count"] == 359


def test_nothing_measured_is_an_error(tmp_path, monitor_run, probe_file, capsys) -> None:
    bad = tmp_path / "step_1.pt"
    bad.write_bytes(b"not a checkpoint")
    files = [str(monitor_run.files[0]), str(bad), str(monitor_run.files[2])]
    out = tmp_path / "out"
    base = ["--model", "analysis_helpers:small_mlp", "--data", str(probe_file), "--out", str(out), "--quiet"]
    code, stdout, stderr = _run(["--checkpoints", *files, *base, "--no-tensorboard"], capsys)
    assert code == 2, stdout
    assert stderr.splitlines()[-1].startswith("stepguard analyze: error: no transition could be measured")
    assert "0 → 1: step_1.pt skipped: corrupt" in stderr and "--bridge" in stderr
    assert json.loads((out / "summary.json").read_text())["transitions"] == 0  # the outputs say why
    code, stdout, _ = _run(["--checkpoints", *files, *base, "--no-tensorboard", "--bridge"], capsys)
    assert code == 0 and "1 transitions measured" in stdout


def _transitions(n: int) -> list[Transition]:
    return [
        Transition(
            k,
            k + 1,
            f"step_{k}.pt",
            f"step_{k + 1}.pt",
            StepReport(step=k, tau=1.0, rho_a=2.0, r=0.5, delta_a=1.5),
        )
        for k in range(n)
    ]


def test_report_jsonl_reads_past_a_corrupt_or_torn_line(tmp_path) -> None:
    path = tmp_path / "report.jsonl"
    write_jsonl(_transitions(4), path)
    lines = path.read_text().splitlines(keepends=True)
    lines[1] = "{garbage\n"
    lines[3] = lines[3][:40]  # the writer died mid-line
    path.write_text("".join(lines))
    with pytest.warns(CorruptLineWarning) as caught:
        assert [t.step_from for t in read_jsonl(path)] == [0, 2]
    assert [str(w.message).split(": ", 1)[0] for w in caught] == [f"{path}, line 2", f"{path}, line 4"]


def test_report_jsonl_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch) -> None:
    path = tmp_path / "report.jsonl"
    write_jsonl(_transitions(3), path)
    before = path.read_bytes()

    def crash(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_jsonl(_transitions(5), path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["report.jsonl"]
