"""examples/fsdp2_llama.py end to end: a Hugging Face Llama under FSDP2 on two gloo processes,
guarded with the clip policy through an LR spike."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fsdp2_llama.py"
STEPS, SPIKE_AT = 6, 3

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available"),
]


def test_the_fsdp2_llama_example_clips_at_the_spike_and_the_ranks_agree(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    out = tmp_path / "run.json"
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--steps", str(STEPS), "--spike-at", str(SPIKE_AT), "--batch", "4",
         "--seq", "32", "--json", str(out)],
        capture_output=True, text=True, timeout=400, env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "same r and decisions on every rank: yes" in done.stdout
    run = json.loads(out.read_text())
    rows, ranks = run["rows"], run["ranks"]
    assert len(ranks) == 2 and [row["step"] for row in rows] == list(range(STEPS))
    assert {row["action"] for row in rows[:SPIKE_AT]} == {"allow"}
    assert [row["action"] for row in rows[SPIKE_AT:]] == ["clip"] * (STEPS - SPIKE_AT)
    assert all(row["r"] > 1 for row in rows[SPIKE_AT:]) and all(row["r"] < 1 for row in rows[:SPIKE_AT])
    for other in ranks[1:]:
        assert [(r["r"], r["tau"], r["action"], r["scale"]) for r in other["rows"]] == \
            [(r["r"], r["tau"], r["action"], r["scale"]) for r in rows]
        assert [r["loss"] for r in other["rows"]] != [r["loss"] for r in rows]  # each rank its own data
