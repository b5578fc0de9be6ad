"""The DPO entanglement example, run as a user runs it: the chosen likelihood falls, the margin grows."""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "dpo_entanglement.py"


@pytest.mark.slow
def test_chosen_falls_while_the_margin_grows_and_the_probe_says_why(tmp_path: Path) -> None:
    out = tmp_path / "dpo.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quiet", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "ratio_chosen > 1" in proc.stdout
    history = json.loads(out.read_text())["history"]
    assert len(history) == 100

    margins = [row["margin"] for row in history]
    chosen = [row["chosen_change"] for row in history]
    assert margins[-1] > margins[0] + 5
    assert all(b > a for a, b in itertools.pairwise(margins))
    peak = max(chosen)
    assert chosen[-1] < 0 < peak and chosen[-1] < peak - 0.5

    late = history[len(history) // 2 :]
    assert sum(row["ratio_chosen"] > 1 for row in late) >= 0.7 * len(late)
    assert sum(row["realized_chosen"] < 0 for row in late) >= 0.7 * len(late)
    assert statistics.mean(row["cosine"] for row in late) > statistics.mean(
        row["cosine"] for row in history[:10]
    )
    # The first-order change along the applied step matches the measured one.
    errors = [
        abs(row["realized_chosen"] - row["actual_chosen"]) / max(abs(row["actual_chosen"]), 1e-3)
        for row in history
    ]
    assert statistics.median(errors) < 0.1
