"""Table 1 of "Ghosts of Softmax" (arXiv 2603.13552): a 10,000× one-step LR spike on three architectures.

Protocol (the paper's ``experiments/archgrid``, Table 1 / Fig. 10):

* Data: the digits (1797 × 64, pixels / 16) in file order; the first 20 % (359 rows) is
  the test set, the rest (1438) the training set. Training is full-batch.
* Models: a one-token Transformer (dim 32: pre-LN attention and a GELU FFN of width
  128, residual), an MLP with LayerNorm (3 × [Linear 64, LayerNorm, GELU]) and a CNN
  with BatchNorm (Conv1d 1→32→32, kernel 3, each followed by BatchNorm and ReLU, global
  average pool), each with a linear head to 10 classes.
* Adam (β = 0.9, 0.999), lr 0.015, 200 steps; on step 50 only the learning rate is
  multiplied by the spike (10,000 for Table 1); seeds 0–4 (the seed sets the init).
* Methods: ``plain`` Adam; ``clip``: gradient-norm clipping ‖g‖ ≤ 1 before Adam;
  ``guard``: StepGuard's clip policy, which measures ρ_a along Adam's *actual* proposed
  step (train mode: BatchNorm uses batch statistics) and applies θ₀ + min(1, c·ρ_a/τ)·Δθ;
  optionally ``paper``: the paper's own controller, which measures ρ_a along −g/‖g‖ in
  eval mode and scales this step's learning rate by min(1, ρ_a/(lr·‖g‖)), a cap on a
  gradient-descent step length while Adam's step is applied.
* Test accuracy is taken after every step with a forward in train mode, as the paper's
  code does (for CNN+BN that uses the test set's batch statistics); running buffers are
  restored afterwards. ``final_acc_eval`` is the same in eval mode (running statistics).

Paper, Table 1 (final test accuracy; plain / clip / ρ-controller along −g):
Transformer 31.8 / 38.7 / 95.3 %, MLP+LN 44.6 / 51.5 / 93.9 %, CNN+BN 13.4 / 10.3 / 71.6 %.

Run ``python examples/architecture_grid.py --help`` for the flags.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from typing import Any

import torch
import torch.nn.functional as F
from _common import cell, parse_list, set_threads, stats, write_json
from torch import Tensor, nn

from stepguard import ClipPolicy, StepGuard, radius
from stepguard.datasets import Split
from stepguard.tools.compare_workloads import ARCHS, file_order_split

METHODS = ("plain", "clip", "guard", "paper")
DEFAULT_METHODS = ("plain", "clip", "guard")
PAPER_TABLE1 = {
    "Transformer": {"plain": 0.318, "clip": 0.387, "paper": 0.953},
    "MLP+LN": {"plain": 0.446, "clip": 0.515, "paper": 0.939},
    "CNN+BN": {"plain": 0.134, "clip": 0.103, "paper": 0.716},
}


# The models live in stepguard.tools.compare_workloads, shared with ``stepguard compare``.
# Rough relative CPU cost per run, to hand the slowest cells to the workers first.
_COST = {"Transformer": 1, "MLP+LN": 1, "CNN+BN": 20}


# --------------------------------------------------------------------------- protocol


@dataclass(frozen=True)
class GridSettings:
    """One cell's protocol (defaults: the paper's Table 1)."""

    steps: int = 200
    lr: float = 0.015
    spike: float = 10_000.0
    spike_at: int = 50
    clip_norm: float = 1.0
    target_r: float = 1.0
    test_fraction: float = 0.2
    monitor: bool = False

    def __post_init__(self) -> None:
        if self.steps < 1 or not 0 <= self.spike_at < self.steps:
            raise ValueError(f"need steps >= 1 and 0 <= spike_at < steps, got {self.steps}, {self.spike_at}")
        if self.lr <= 0 or self.spike <= 0 or self.clip_norm <= 0 or self.target_r <= 0:
            raise ValueError("lr, spike, clip_norm and target_r must be positive")

    def lr_at(self, step: int) -> float:
        """The learning rate of ``step``: spiked on ``spike_at`` only."""
        return self.lr * (self.spike if step == self.spike_at else 1.0)


@dataclass
class RunLog:
    """Per-step history of one (architecture, method, seed) run.

    ``loss`` is the full-batch training loss before each step; ``acc`` the test accuracy
    after it (train-mode forward, as the paper's code); ``acc_eval`` the same in eval mode.
    ``r`` / ``applied_r`` are the proposed and applied normalized steps along the step
    actually taken, when a guard measured them (``guard``, or any method with ``--monitor``).
    ``rho_grad`` / ``scale`` are the paper controller's radius along −g and its LR scale.
    """

    loss: list[float] = field(default_factory=list)
    acc: list[float] = field(default_factory=list)
    acc_eval: list[float] = field(default_factory=list)
    r: list[float] = field(default_factory=list)
    applied_r: list[float] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    rho_grad: list[float] = field(default_factory=list)
    scale: list[float] = field(default_factory=list)
    seconds: float = 0.0


@torch.no_grad()
def test_accuracy(model: nn.Module, x: Tensor, y: Tensor, *, train_mode: bool) -> float:
    """Accuracy of ``model`` on (x, y); ``train_mode`` uses batch statistics, buffers left as they were."""
    was = model.training
    saved = {name: b.clone() for name, b in model.named_buffers()} if train_mode else {}
    model.train(train_mode)
    try:
        correct = (model(x).argmax(dim=1) == y).float().mean()
    finally:
        model.train(was)
        for name, b in model.named_buffers():
            if name in saved:
                b.copy_(saved[name])
    return float(correct)


def _global_norm(tensors: Sequence[Tensor]) -> float:
    return float(torch.linalg.vector_norm(torch.stack([t.detach().norm() for t in tensors])))


def run_one(arch: str, method: str, seed: int, settings: GridSettings, data: Split) -> RunLog:
    """Train ``arch`` from ``seed`` with ``method`` under ``settings``; returns the history."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    device = data.x_train.device
    torch.manual_seed(seed)
    model = ARCHS[arch]().to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    adam = torch.optim.Adam(params, lr=settings.lr)
    guard: StepGuard | None = None
    if method == "guard":
        guard = StepGuard(adam, model=model, policy=ClipPolicy(settings.target_r))
    elif settings.monitor:
        guard = StepGuard(adam, model=model, policy="monitor")
    opt: torch.optim.Optimizer = guard if guard is not None else adam
    log = RunLog()
    x, y = data.x_train, data.y_train
    start = time.perf_counter()
    for step in range(settings.steps):
        lr = settings.lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if method == "clip":
            torch.nn.utils.clip_grad_norm_(params, settings.clip_norm)
        if method == "paper":
            lr = _paper_controller_lr(model, params, x, lr, log)
        for group in opt.param_groups:
            group["lr"] = lr
        if guard is not None:
            report = guard.step(loss=loss, targets=y)
            log.r.append(report.r)
            log.applied_r.append(report.applied_tau / report.rho_a if report.rho_a > 0 else math.nan)
            log.actions.append(report.action)
        else:
            adam.step()
        log.loss.append(float(loss.detach()))
        log.acc.append(test_accuracy(model, data.x_test, data.y_test, train_mode=True))
        log.acc_eval.append(test_accuracy(model, data.x_test, data.y_test, train_mode=False))
    log.seconds = time.perf_counter() - start
    if guard is not None:
        guard.close()
    return log


def _paper_controller_lr(model: nn.Module, params: list[Tensor], x: Tensor, lr: float, log: RunLog) -> float:
    """The paper's archgrid controller: ρ_a along −g/‖g‖ (eval mode, full training set).

    It scales the learning rate by min(lr·‖g‖, ρ_a)/(lr·‖g‖): it caps the length of a
    gradient-descent step, although the step then applied is Adam's.
    """
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    g_norm = _global_norm(grads)
    if g_norm < 1e-12:
        log.rho_grad.append(math.inf)
        log.scale.append(1.0)
        return lr
    rho = radius(model, x, direction=[-g for g in grads], mode="eval").rho_a
    tau_raw = lr * g_norm
    scale = min(tau_raw, rho) / tau_raw
    log.rho_grad.append(rho)
    log.scale.append(scale)
    return lr * scale


# --------------------------------------------------------------------------- the grid


def run_cell(arch: str, seed: int, methods: Sequence[str], settings: GridSettings, device: str) -> dict:
    """All ``methods`` for one (arch, seed): ``{method: RunLog as dict}`` (picklable, for workers)."""
    data = file_order_split(settings.test_fraction, device)
    return {m: asdict(run_one(arch, m, seed, settings, data)) for m in methods}


def summarize_run(log: dict[str, Any], spike_at: int) -> dict[str, Any]:
    """Scalars of one run: final and lowest-after-spike accuracy, final loss, r at the spike, clips."""
    after = log["acc"][spike_at:]
    r = [v for v in log["r"] if not math.isnan(v)]
    applied = [v for v in log["applied_r"] if not math.isnan(v)]
    return {
        "final_acc": log["acc"][-1],
        "final_acc_eval": log["acc_eval"][-1],
        "acc_before_spike": log["acc"][spike_at - 1] if spike_at > 0 else math.nan,
        "lowest_acc_after_spike": min(after),
        "final_loss": log["loss"][-1],
        "peak_loss_after_spike": max(log["loss"][spike_at:]),
        "r_at_spike": log["r"][spike_at] if log["r"] else math.nan,
        "max_r": max(r) if r else math.nan,
        "max_applied_r": max(applied) if applied else math.nan,
        "clipped": log["actions"].count("clip"),
        "clipped_before_spike": log["actions"][:spike_at].count("clip"),
        "paper_scale_at_spike": log["scale"][spike_at] if log["scale"] else math.nan,
        "seconds": log["seconds"],
    }


def run_grid(
    archs: Sequence[str],
    seeds: Sequence[int],
    methods: Sequence[str],
    settings: GridSettings,
    *,
    device: str = "cpu",
    jobs: int = 1,
    threads: int | None = None,
    progress: bool = True,
) -> dict[str, dict[str, dict[int, dict[str, Any]]]]:
    """Every (arch, seed) cell, in ``jobs`` worker processes; returns ``{arch: {method: {seed: log}}}``."""
    cells = [(a, s) for a in archs for s in seeds]
    logs: dict[str, dict[str, dict[int, dict[str, Any]]]] = {a: {m: {} for m in methods} for a in archs}

    def record(arch: str, seed: int, result: dict) -> None:
        for m, log in result.items():
            logs[arch][m][seed] = log
        if progress:
            finals = "  ".join(f"{m} {log['acc'][-1]:.3f}" for m, log in result.items())
            secs = sum(log["seconds"] for log in result.values())
            print(f"  {arch:<11} seed {seed}: final test acc  {finals}  ({secs:.0f} s)", flush=True)

    if jobs <= 1 or len(cells) == 1:
        for arch, seed in cells:
            record(arch, seed, run_cell(arch, seed, methods, settings, device))
        return logs
    cells.sort(key=lambda c: -_COST.get(c[0], 1))
    with ProcessPoolExecutor(
        max_workers=jobs, mp_context=get_context("spawn"), initializer=set_threads, initargs=(threads or 1,)
    ) as pool:
        futures = {pool.submit(run_cell, a, s, methods, settings, device): (a, s) for a, s in cells}
        for future, (arch, seed) in futures.items():
            record(arch, seed, future.result())
    return logs


def summarize(logs: dict[str, dict[str, dict[int, dict[str, Any]]]], spike_at: int) -> dict[str, Any]:
    """Per arch × method: per-seed scalars and their median [min, max]."""
    out: dict[str, Any] = {}
    for arch, by_method in logs.items():
        out[arch] = {}
        for method, by_seed in by_method.items():
            per_seed = {seed: summarize_run(log, spike_at) for seed, log in sorted(by_seed.items())}
            keys = next(iter(per_seed.values())).keys() if per_seed else ()
            out[arch][method] = {
                "per_seed": per_seed,
                **{k: stats(row[k] for row in per_seed.values()) for k in keys},
            }
    return out


def format_tables(
    summary: dict[str, Any], methods: Sequence[str], seeds: Sequence[int], *, paper: bool = True
) -> str:
    """Median final test accuracy per arch × method (with the paper's Table 1 when ``paper``), per seed."""
    title = "Median final test accuracy [min, max] over seeds"
    lines = [title + (" (paper's Table 1 in parentheses)" if paper else "")]
    width = 30
    lines.append(f"{'arch':<12}" + "".join(f"  {m:>{width}}" for m in methods))
    for arch, row in summary.items():
        cells = []
        for m in methods:
            reference = PAPER_TABLE1.get(arch, {}).get(m) if paper else None
            note = f" ({reference:.3f})" if reference is not None else ""
            cells.append(f"  {cell(row[m]['final_acc']) + note:>{width}}")
        lines.append(f"{arch:<12}" + "".join(cells))
    lines.append("")
    lines.append("Per-seed final test accuracy (seeds " + ", ".join(str(s) for s in seeds) + ")")
    for arch, row in summary.items():
        for m in methods:
            values = " ".join(f"{v:.3f}" for v in row[m]["final_acc"]["values"])
            lines.append(f"{arch:<12} {m:<6} {values}")
    lines.append("")
    lines.append("Median lowest test accuracy after the spike / final acc in eval mode / r at the spike step")
    for arch, row in summary.items():
        for m in methods:
            r_spike = row[m]["r_at_spike"]["median"]
            r_text = f"{r_spike:.3g}" if not math.isnan(r_spike) else "-"
            extra = ""
            if m == "guard":
                extra = (
                    f"  clipped {row[m]['clipped']['median']:.0f} steps "
                    f"({row[m]['clipped_before_spike']['median']:.0f} before the spike)"
                )
            lines.append(
                f"{arch:<12} {m:<6} lowest {row[m]['lowest_acc_after_spike']['median']:.3f}  "
                f"eval-mode {row[m]['final_acc_eval']['median']:.3f}  r@spike {r_text}{extra}"
            )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=(
            "Table 1 of 'Ghosts of Softmax': full-batch Adam (lr 0.015, 200 steps) on the digits with a "
            "one-step LR spike at step 50, on a Transformer, an MLP with LayerNorm and a CNN with "
            "BatchNorm; plain Adam vs gradient-norm clipping vs StepGuard's clip policy."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--archs", default=",".join(ARCHS), help=f"comma list from {list(ARCHS)}")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma list of seeds")
    parser.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help="comma list from plain, clip, guard, paper (paper: the controller of the paper's code, "
        "ρ_a along −g in eval mode)",
    )
    parser.add_argument("--spike", type=float, default=10_000.0, help="LR multiplier on the spike step")
    parser.add_argument("--spike-at", type=int, default=50, help="the (single) spiked step")
    parser.add_argument("--steps", type=int, default=200, help="training steps")
    parser.add_argument("--lr", type=float, default=0.015, help="Adam learning rate")
    parser.add_argument("--clip-norm", type=float, default=1.0, help="max gradient norm of the clip method")
    parser.add_argument("--target-r", type=float, default=1.0, help="target r of the guard's clip policy")
    parser.add_argument(
        "--monitor",
        action="store_true",
        help="also watch plain/clip/paper with a monitor guard, to record the r of the steps they take",
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes, one (arch, seed) each")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process")
    parser.add_argument("--out", default="runs/architecture_grid.json", help="JSON summary path")
    parser.add_argument("--no-history", action="store_true", help="leave per-step curves out of the JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the grid, print the tables, write the JSON summary."""
    args = build_parser().parse_args(argv)
    archs = parse_list(args.archs, str)
    methods = parse_list(args.methods, str)
    seeds = parse_list(args.seeds, int)
    unknown = [a for a in archs if a not in ARCHS] + [m for m in methods if m not in METHODS]
    if unknown:
        print(f"unknown arch or method: {unknown}", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda asked for, but torch sees no CUDA device", file=sys.stderr)
        return 2
    settings = GridSettings(
        steps=args.steps,
        lr=args.lr,
        spike=args.spike,
        spike_at=args.spike_at,
        clip_norm=args.clip_norm,
        target_r=args.target_r,
        monitor=args.monitor,
    )
    set_threads(args.threads)
    print(
        f"archs={archs} methods={methods} seeds={seeds} steps={settings.steps} lr={settings.lr} "
        f"spike=x{settings.spike:g} at step {settings.spike_at} device={args.device}",
        flush=True,
    )
    start = time.perf_counter()
    logs = run_grid(archs, seeds, methods, settings, device=args.device, jobs=args.jobs, threads=args.threads)
    wall = time.perf_counter() - start
    summary = summarize(logs, settings.spike_at)
    print()
    table1 = settings == GridSettings(monitor=settings.monitor)  # the defaults are Table 1's protocol
    print(format_tables(summary, methods, seeds, paper=table1))
    print(f"\nwall time {wall:.1f} s")
    payload: dict[str, Any] = {
        "protocol": "Ghosts of Softmax, Table 1 (archgrid): full-batch Adam, one-step LR spike",
        "settings": {**asdict(settings), "archs": archs, "methods": methods, "seeds": seeds},
        "device": args.device,
        "wall_seconds": wall,
        "paper_table1": PAPER_TABLE1,
        "summary": summary,
    }
    if not args.no_history:
        payload["history"] = logs
    path = write_json(args.out, payload)
    print(f"summary written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
