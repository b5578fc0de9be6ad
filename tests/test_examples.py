"""The paper-reproduction examples, each run end to end in a tiny configuration.

Each example runs as a subprocess (as a user runs it), with a few steps and one seed,
and must write a well-formed JSON summary whose numbers show the guard doing its job.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_example(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
        check=False,
    )


def load(path: Path) -> dict[str, Any]:
    # strict JSON: non-finite numbers must have been written as strings
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))


@pytest.mark.parametrize("script", ["lr_spike.py", "architecture_grid.py"])
def test_help(script: str) -> None:
    proc = run_example(script, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--seeds" in proc.stdout and "--out" in proc.stdout and "--spike" in proc.stdout


@pytest.mark.slow
def test_lr_spike_tiny(tmp_path: Path) -> None:
    out = tmp_path / "lr_spike.json"
    spike_at, steps = 6, 14
    proc = run_example(
        "lr_spike.py",
        *("--seeds", "0", "--lrs", "1e-3", "--steps", str(steps), "--spike-at", str(spike_at)),
        *("--spike", "1000", "--out", str(out), "--history", "--quiet"),
    )
    assert proc.returncode == 0, proc.stderr
    assert "final test acc" in proc.stdout and "guarded" in proc.stdout
    summary = load(out)
    assert summary["settings"]["seeds"] == [0] and summary["settings"]["policy"] == "clip"
    entry = summary["results"]["0.001"]
    for name in ("plain", "guarded"):
        for metric in ("final_accuracy", "lowest_accuracy_after_spike", "max_r", "clipped"):
            assert set(entry[name][metric]) == {"median", "min", "max", "values"}
        assert set(entry[name]["per_seed"]) == {"0"}
    plain, guarded = entry["history"]["plain"]["0"], entry["history"]["guarded"]["0"]
    assert len(plain["accuracy"]) == len(guarded["accuracy"]) == steps
    # Same seed, same batches and r < 1 before the spike: the two runs are identical until it.
    assert plain["r"][:spike_at] == guarded["r"][:spike_at]
    assert plain["accuracy"][:spike_at] == guarded["accuracy"][:spike_at]
    assert guarded["actions"][:spike_at] == ["allow"] * spike_at
    # The held 1000x spike puts plain Adam far outside the radius; the guard applies r <= 1.
    assert entry["plain"]["max_r"]["median"] > 10
    assert entry["plain"]["clipped"]["median"] == 0
    assert entry["guarded"]["clipped"]["median"] >= steps - spike_at - 1
    assert entry["guarded"]["max_applied_r"]["max"] <= 1 + 1e-6
    assert math.isfinite(entry["guarded"]["final_loss"]["median"])


@pytest.mark.slow
def test_architecture_grid_tiny(tmp_path: Path) -> None:
    out = tmp_path / "grid.json"
    spike_at, steps = 4, 10
    proc = run_example(
        "architecture_grid.py",
        *("--archs", "MLP+LN", "--seeds", "0", "--methods", "plain,guard,paper", "--monitor"),
        *("--steps", str(steps), "--spike-at", str(spike_at), "--spike", "10000", "--out", str(out)),
    )
    assert proc.returncode == 0, proc.stderr
    assert "Median final test accuracy" in proc.stdout and "MLP+LN" in proc.stdout
    summary = load(out)
    assert summary["settings"]["spike"] == 10000 and summary["settings"]["archs"] == ["MLP+LN"]
    row = summary["summary"]["MLP+LN"]
    assert set(row) == {"plain", "guard", "paper"}
    for method in row.values():
        assert set(method["final_acc"]) == {"median", "min", "max", "values"}
        assert set(method["per_seed"]) == {"0"}
    history = summary["history"]["MLP+LN"]
    for by_seed in history.values():
        log = by_seed["0"]
        assert len(log["acc"]) == len(log["loss"]) == len(log["r"]) == steps
    # Plain and the guard start from the same init: the same first loss.
    assert history["plain"]["0"]["loss"][0] == history["guard"]["0"]["loss"][0]
    # The 10,000x spike step: plain Adam takes it at r >> 1; the guard applies at most r = 1.
    assert history["plain"]["0"]["r"][spike_at] > 100
    guard = history["guard"]["0"]
    assert guard["actions"][spike_at] == "clip"
    applied = [r for r in guard["applied_r"] if isinstance(r, (int, float))]  # "nan" where unmeasured
    assert len(applied) == steps and max(applied) <= 1 + 1e-6
    assert all(isinstance(v, float) and math.isfinite(v) for v in guard["loss"])
    # The paper's controller shrinks the spike step's learning rate.
    assert history["paper"]["0"]["scale"][spike_at] < 1


def test_overhead_floor_tiny(tmp_path: Path) -> None:
    out = tmp_path / "floor.json"
    proc = run_example(
        "overhead_floor.py", "--rounds", "2", "--block", "2", "--warmup", "2", "--json", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    result = load(out)
    rows = result["variants"]
    assert list(rows) == ["plain", "floor estimated", "floor measured", "StepGuard budget", "StepGuard every 1"]
    assert rows["plain"]["ratio"]["values"] == [1.0, 1.0]
    for row in rows.values():
        assert len(row["step_ms"]["values"]) == 2 and all(v > 0 for v in row["step_ms"]["values"])
    assert "floor measured" in proc.stdout and "StepGuard every 1" in proc.stdout


@pytest.mark.slow
def test_clip_candidates_tiny(tmp_path: Path) -> None:
    out = tmp_path / "candidates.json"
    proc = run_example(
        "clip_candidates.py", "--seeds", "0", "--candidates", "clip-fixed,relative alone,clip (sustained r>2 x3)",
        "--cells", "digits-mlp:1:spike", "--steps", "30", "--out", str(out),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = load(out)
    runs = {r["candidate"]: r for r in summary["runs"]}
    assert set(runs) == {"clip-fixed", "relative alone", "clip (sustained r>2 x3)"}
    assert all(r["status"] == "ok" and r["condition"] == "spike" for r in runs.values())
    # at 100x its best learning rate every step of the digits MLP has r > 10: every rule clips it
    assert runs["clip-fixed"]["clipped"] >= runs["relative alone"]["clipped"] > 20
    assert [m["median_final"] for m in summary["medians"]] == [r["final"] for r in summary["runs"]]
