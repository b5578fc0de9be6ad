"""``stepguard demo``: the main job, end to end, and the paper's finding it must reproduce."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from stepguard.cli import main
from stepguard.demo import DemoSettings, run_demo
from stepguard.sinks.jsonl import read_jsonl


def test_demo_cli_writes_logs_summary_and_table(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    code = main(["demo", "--steps", "30", "--spike-at", "20", "--out", str(out), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "final acc" in printed and "guarded" in printed and "plain" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert [row["run"] for row in summary["runs"]] == ["plain", "guarded"]
    plain, guarded = read_jsonl(out / "plain.jsonl"), read_jsonl(out / "guarded.jsonl")
    assert len(plain) == len(guarded) == 30
    # identical until the spike: same seed, same batches, and r < 1 so nothing is clipped
    for a, b in zip(plain[:20], guarded[:20], strict=True):
        assert a.r == b.r and b.action == "allow"
    assert all(r.action == "allow" for r in plain)
    assert summary["runs"][1]["clipped"] == sum(r.action == "clip" for r in guarded)


def test_demo_rejects_bad_flags(capsys) -> None:
    assert main(["demo", "--steps", "10", "--spike-at", "20", "--quiet"]) == 2
    assert "spike_at" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--policy", "sometimes"])


def test_python_dash_m_entry_point() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "stepguard", "--help"], capture_output=True, text=True, check=True
    )
    assert "demo" in done.stdout


@pytest.mark.slow
@pytest.mark.parametrize(("lr", "plain_max"), [(1e-3, 0.3), (1e-2, 0.2)])
def test_demo_reproduces_the_papers_lr_spike_finding(tmp_path, lr: float, plain_max: float) -> None:
    """Paper's code (seed median): plain Adam 0.164 / 0.100, rho-controller 0.961 / 0.975."""
    summary = run_demo(DemoSettings(lr=lr, out=str(tmp_path)), progress=False)
    plain, guarded = summary["runs"]
    assert plain["final_accuracy"] <= plain_max
    assert guarded["final_accuracy"] >= 0.93
    assert guarded["max_applied_r"] <= 1.0 + 1e-9
    assert guarded["clipped"] > 0 and plain["max_r"] > 100
