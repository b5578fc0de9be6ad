"""Helpers of the analyzer tests: a narrow digits MLP and small guarded runs with checkpoints."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from stepguard import GuardConfig, StepGuard, StepReport
from stepguard.datasets import digits_split

HIDDEN = 16


def small_mlp() -> nn.Module:
    """The digits MLP, narrow (the model factory of these tests)."""
    return nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 10))


@dataclass
class GuardedRun:
    """Checkpoints ``step_<k>.pt`` (k = 0 … steps) of a run on one fixed batch, and its live reports."""

    ckpt_dir: Path
    files: list[Path]
    reports: list[StepReport]
    x: torch.Tensor
    y: torch.Tensor


def guarded_run(
    out: Path,
    *,
    policy: str = "monitor",
    lr: float = 0.05,
    steps: int = 5,
    samples: int = 96,
    factory=small_mlp,
    config: GuardConfig | None = None,
) -> GuardedRun:
    """Train with Adam on a fixed full batch under a guard; save the state dict before and after each step."""
    out.mkdir(parents=True, exist_ok=True)
    data = digits_split(0)
    x, y = data.x_train[:samples], data.y_train[:samples]
    torch.manual_seed(0)
    model = factory()
    guard = StepGuard(torch.optim.Adam(model.parameters(), lr=lr), model=model, policy=policy, config=config)
    files = [out / "step_0.pt"]
    torch.save(model.state_dict(), files[0])
    reports = []
    for k in range(steps):
        loss = F.cross_entropy(model(x), y)
        guard.zero_grad()
        loss.backward()
        reports.append(guard.step(loss=loss, targets=y))
        files.append(out / f"step_{k + 1}.pt")
        torch.save(model.state_dict(), files[-1])
    guard.close()
    return GuardedRun(out, files, reports, x, y)
