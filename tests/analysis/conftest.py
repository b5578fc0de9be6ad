"""Fixtures of the analyzer tests: small guarded runs with a checkpoint after every step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from analysis_helpers import HIDDEN, GuardedRun, guarded_run


@pytest.fixture(scope="session")
def monitor_run(tmp_path_factory: pytest.TempPathFactory) -> GuardedRun:
    return guarded_run(tmp_path_factory.mktemp("monitor") / "ckpt")


@pytest.fixture(scope="session")
def clip_run(tmp_path_factory: pytest.TempPathFactory) -> GuardedRun:
    return guarded_run(tmp_path_factory.mktemp("clip") / "ckpt", policy="clip-fixed", lr=1.0)


@pytest.fixture
def factory_file(tmp_path: Path) -> Path:
    """A Python file defining ``build()``: the small MLP (for ``--model file.py:build``)."""
    path = tmp_path / "net_factory.py"
    path.write_text(
        "from torch import nn\n\n"
        f"def build():\n    return nn.Sequential(nn.Linear(64, {HIDDEN}), nn.ReLU(), nn.Linear({HIDDEN}, 10))\n"
    )
    return path


@pytest.fixture
def probe_file(tmp_path: Path, monitor_run: GuardedRun) -> Path:
    """The monitor run's batch saved as a probe file."""
    path = tmp_path / "probe.pt"
    torch.save({"inputs": monitor_run.x, "targets": monitor_run.y}, path)
    return path
