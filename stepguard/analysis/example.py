"""A run to analyze: the demo's digits MLP trained through a learning-rate spike, with a
checkpoint after every step.

    python -m stepguard.analysis.example runs/lrspike/ckpt
    stepguard analyze runs/lrspike/ckpt --model stepguard.demo:digits_mlp --data digits \\
        --validation digits:test --flips --cld --out runs/lrspike/analysis

The run is the demo's plain run (Adam, batch 64, seed 0), watched by a guard in ``monitor``
mode whose reports go to ``<dir>/../live.jsonl`` for comparison with the replay.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from stepguard.datasets import digits_split, minibatches
from stepguard.demo import digits_mlp
from stepguard.guard import StepGuard
from stepguard.sinks.jsonl import JsonlSink


def save_demo_checkpoints(
    out_dir: str | os.PathLike[str],
    *,
    steps: int = 120,
    spike_at: int = 60,
    spike: float = 1000.0,
    lr: float = 1e-3,
    batch_size: int = 64,
    hidden: int = 128,
    seed: int = 0,
    policy: str = "monitor",
    live_log: str | os.PathLike[str] | None = None,
) -> list[Path]:
    """Train the digits MLP and save ``step_{k:05d}.pt`` (its state dict) before step 0 and after
    every step; returns the files in order.

    Args:
        out_dir: where the checkpoints go (created).
        steps, spike_at, spike, lr, batch_size, seed: as in ``stepguard demo``.
        hidden: width of the hidden layer.
        policy: the guard's policy (``monitor`` leaves every step as Adam proposed it).
        live_log: also write the guard's live reports to this JSON-lines file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = digits_split(seed)
    torch.manual_seed(seed)
    model = digits_mlp(hidden)
    sinks = [JsonlSink(live_log)] if live_log is not None else []
    guard = StepGuard(torch.optim.Adam(model.parameters(), lr=lr), model=model, policy=policy, sinks=sinks)
    batches = minibatches(len(data.x_train), batch_size, seed + 11)
    files = [out / f"step_{0:05d}.pt"]
    torch.save(model.state_dict(), files[0])
    for step in range(steps):
        for group in guard.param_groups:
            group["lr"] = lr * (spike if step >= spike_at else 1.0)
        idx = next(batches)
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        guard.zero_grad()
        loss.backward()
        guard.step(loss=loss, targets=data.y_train[idx])
        files.append(out / f"step_{step + 1:05d}.pt")
        torch.save(model.state_dict(), files[-1])
    guard.close()
    return files


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="checkpoint directory")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--spike-at", type=int, default=60)
    parser.add_argument("--spike", type=float, default=1000.0)
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    files = save_demo_checkpoints(
        out, steps=args.steps, spike_at=args.spike_at, spike=args.spike, live_log=out.parent / "live.jsonl"
    )
    print(f"{len(files)} checkpoints in {out}/; live reports in {out.parent / 'live.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
