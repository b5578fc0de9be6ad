"""The learning-rate-spike demo ("Ghosts of Softmax", Fig. 6), on the embedded digits data.

The same MLP (64-128-10, ReLU) is trained twice with Adam (batch 64) from the same seed
and the same batches; from ``spike_at`` on, the learning rate is multiplied by ``spike``
and stays there. The plain run is watched by a guard in ``monitor`` mode (which never
changes a step, so it *is* plain Adam) and the guarded run uses the chosen policy.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

import torch
import torch.nn.functional as F
from torch import nn

from stepguard.datasets import Split, digits_split, minibatches
from stepguard.guard import StepGuard
from stepguard.policy import Policy
from stepguard.report import StepReport
from stepguard.sinks.base import Sink
from stepguard.sinks.jsonl import JsonlSink


def digits_mlp(hidden: int = 128) -> nn.Module:
    """The paper's lrspike network: Linear(64, hidden) → ReLU → Linear(hidden, 10)."""
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


@dataclass
class RunResult:
    """One training run of the demo."""

    name: str
    policy: str
    accuracy: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    r: list[float] = field(default_factory=list)
    rho_a: list[float] = field(default_factory=list)
    tau: list[float] = field(default_factory=list)
    applied_tau: list[float] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self, spike_at: int) -> dict[str, float | int | str]:
        after = self.accuracy[spike_at:] or self.accuracy[-1:]
        finite_r = [v for v in self.r if not math.isnan(v)]
        applied = [
            t / rho
            for t, rho in zip(self.applied_tau, self.rho_a, strict=True)
            if rho > 0 and not math.isnan(t / rho)
        ]
        return {
            "run": self.name,
            "policy": self.policy,
            "final_accuracy": self.accuracy[-1],
            "lowest_accuracy_after_spike": min(after),
            "clipped": self.actions.count("clip"),
            "vetoed": self.actions.count("veto"),
            "max_r": max(finite_r) if finite_r else math.nan,
            "max_applied_r": max(applied) if applied else math.nan,
            "final_loss": self.loss[-1],
            "seconds": round(self.seconds, 2),
        }


@dataclass(frozen=True)
class DemoSettings:
    """Settings of :func:`run_demo` (the CLI flags of ``stepguard demo``)."""

    lr: float = 1e-3
    spike: float = 1000.0
    spike_at: int = 50
    steps: int = 200
    seed: int = 0
    policy: str = "clip"
    batch_size: int = 64
    out: str = "runs/demo"
    threads: int = 1

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.spike <= 0:
            raise ValueError("lr and spike must be positive")
        if self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")
        if self.steps < 1 or not 0 <= self.spike_at <= self.steps:
            raise ValueError(f"need steps >= 1 and 0 <= spike_at <= steps, got {self.steps}, {self.spike_at}")


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    value = float((model(x).argmax(dim=1) == y).float().mean())
    model.train(was)
    return value


def train_run(
    name: str,
    settings: DemoSettings,
    policy: str | Policy,
    data: Split,
    out_dir: Path | None = None,
    on_step: Callable[[str, int, StepReport, float], None] | None = None,
    extra_sinks: Sequence[Sink] = (),
) -> RunResult:
    """Train the digits MLP once under a guard with ``policy``; returns its per-step history."""
    torch.manual_seed(settings.seed)
    model = digits_mlp()
    sinks: list[Sink] = [JsonlSink(out_dir / f"{name}.jsonl")] if out_dir is not None else []
    sinks.extend(extra_sinks)
    guard = StepGuard(
        torch.optim.Adam(model.parameters(), lr=settings.lr), model=model, policy=policy, sinks=sinks
    )
    batches = minibatches(len(data.x_train), settings.batch_size, settings.seed + 11)
    result = RunResult(name=name, policy=str(getattr(guard.policy, "name", policy)))
    start = time.perf_counter()
    for step in range(settings.steps):
        lr = settings.lr * (settings.spike if step >= settings.spike_at else 1.0)
        for group in guard.param_groups:
            group["lr"] = lr
        idx = next(batches)
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        guard.zero_grad()
        loss.backward()
        report = guard.step(loss=loss, targets=data.y_train[idx])
        acc = accuracy(model, data.x_test, data.y_test)
        result.accuracy.append(acc)
        result.loss.append(float(loss.detach()))
        result.r.append(report.r)
        result.rho_a.append(report.rho_a)
        result.tau.append(report.tau)
        result.applied_tau.append(report.applied_tau)
        result.actions.append(report.action)
        if on_step is not None:
            on_step(name, step, report, acc)
    result.seconds = time.perf_counter() - start
    guard.close()
    return result


_PAST = {"allow": "allowed", "clip": "clipped", "veto": "vetoed"}


class Progress:
    """Progress on a stream: one line redrawn in place on a terminal, else a compact log.

    Without a terminal (a pipe, a CI log) a line is printed every ``every`` steps of each
    run, with the largest r and the actions of the steps since the previous line.
    """

    def __init__(self, total: int, stream: TextIO | None = None, every: int = 25) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self.every = every
        self.done = 0
        self.tty = self.stream.isatty()
        self._max_r = math.nan
        self._actions: dict[str, int] = {}

    def __call__(self, name: str, step: int, report: StepReport, acc: float) -> None:
        self.done += 1
        last = step + 1
        if self.tty:
            self._draw(name, last, report, acc)
            return
        if not math.isnan(report.r) and not report.r <= self._max_r:
            self._max_r = report.r
        self._actions[report.action] = self._actions.get(report.action, 0) + 1
        if last % self.every == 0 or self.done == self.total:
            self._log(name, last, acc)

    def _draw(self, name: str, last: int, report: StepReport, acc: float) -> None:
        width = 24
        filled = int(width * self.done / self.total)
        line = (
            f"[{'#' * filled}{'.' * (width - filled)}] {name:>7} step {last:>4}  "
            f"r={report.r:<9.3g} {report.action:<5} test acc {acc:.3f}"
        )
        print(line, end="\r", file=self.stream, flush=True)

    def _log(self, name: str, last: int, acc: float) -> None:
        actions = ", ".join(
            f"{count} {_PAST.get(action, action)}" for action, count in sorted(self._actions.items())
        )
        print(
            f"{name:>7} step {last:>4}  max r {self._max_r:<9.3g} ({actions})  test acc {acc:.3f}",
            file=self.stream,
            flush=True,
        )
        self._max_r, self._actions = math.nan, {}

    def close(self) -> None:
        if self.tty:
            print(file=self.stream)


def format_table(rows: list[dict[str, float | int | str]]) -> str:
    """The comparison table printed by ``stepguard demo``."""
    head = (
        "run",
        "policy",
        "final acc",
        "lowest acc after spike",
        "clipped",
        "vetoed",
        "max r",
        "max applied r",
    )
    lines = [
        f"{head[0]:<8} {head[1]:<8} {head[2]:>9} {head[3]:>22} {head[4]:>7} {head[5]:>6} {head[6]:>10} "
        f"{head[7]:>13}"
    ]
    for row in rows:
        lines.append(
            f"{row['run']:<8} {row['policy']:<8} {row['final_accuracy']:>9.3f} "
            f"{row['lowest_accuracy_after_spike']:>22.3f} {row['clipped']:>7} {row['vetoed']:>6} "
            f"{row['max_r']:>10.4g} {row['max_applied_r']:>13.4g}"
        )
    return "\n".join(lines)


def run_demo(
    settings: DemoSettings,
    *,
    progress: bool = True,
    stream: TextIO | None = None,
    sinks_for: Callable[[str], Sequence[Sink]] | None = None,
) -> dict:
    """Train plain and guarded, write logs and a summary under ``settings.out``, print a table.

    ``sinks_for(run_name)`` may add sinks (TensorBoard, Prometheus) to the ``"plain"`` and
    ``"guarded"`` runs.

    Returns:
        The summary: settings, one row per run, and the per-step history of both runs.
    """
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    data = digits_split(settings.seed)
    bar = Progress(2 * settings.steps) if progress else None
    extra = sinks_for or (lambda name: ())
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)  # the plain run's numbers after the spike depend on it
    try:
        plain = train_run("plain", settings, "monitor", data, out, bar, extra("plain"))
        guarded = train_run("guarded", settings, settings.policy, data, out, bar, extra("guarded"))
    finally:
        torch.set_num_threads(threads)
    if bar is not None:
        bar.close()
    rows = [plain.summary(settings.spike_at), guarded.summary(settings.spike_at)]
    summary = {
        "settings": asdict(settings),
        "runs": rows,
        "history": {run.name: asdict(run) for run in (plain, guarded)},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(
        f"\nLR spike x{settings.spike:g} at step {settings.spike_at} (base lr {settings.lr:g}, "
        f"{settings.steps} steps, seed {settings.seed}); logs in {out}/",
        file=stream or sys.stdout,
    )
    print(format_table(rows), file=stream or sys.stdout)
    return summary
