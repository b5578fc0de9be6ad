"""The learning-rate spike of "Ghosts of Softmax" (arXiv 2603.13552, Fig. 6), across seeds and base LRs.

Protocol (the paper's ``experiments/lrspike``): an MLP 64-128-10 with ReLU on the digits
(stratified 80/20 split per seed: 1438 train, 359 test), Adam (β = 0.9, 0.999), batch
64, 200 steps; from step 50 on the learning rate is multiplied by 1000 and stays there;
seeds 0–4; base learning rates 1e-4, 1e-3 and 1e-2. Each (seed, LR) is trained twice
from the same init and the same batches: ``plain`` Adam (watched by a guard in
``monitor`` mode, which never changes a step, so r is known) and ``guarded`` Adam, whose
guard clips every step to r ≤ 1 (``--policy clip --target-r 1``).

The training loop is :func:`stepguard.demo.train_run`. The guard measures ρ_a along
Adam's actual proposed step on the 64-sample training batch of that step; the paper's
code measured it along the same direction on all 1438 training samples (eval mode).

Reference (the paper's code, measured on CPU, median final test accuracy over seeds
0–4 at base LR 1e-4 / 1e-3 / 1e-2): ρ-controller 0.969 / 0.961 / 0.975, plain Adam
0.947 / 0.164 / 0.100.

Run ``python examples/lr_spike.py --help`` for the flags.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from _common import cell, parse_list, set_threads, stats, write_json

from stepguard.datasets import digits_split
from stepguard.demo import DemoSettings, RunResult, train_run
from stepguard.policy import ClipPolicy, MonitorPolicy, Policy, VetoPolicy

PAPER_REFERENCE = {
    "guarded": {"0.0001": 0.969, "0.001": 0.961, "0.01": 0.975},
    "plain": {"0.0001": 0.947, "0.001": 0.164, "0.01": 0.100},
}
_METRICS = (
    "final_accuracy",
    "lowest_accuracy_after_spike",
    "max_r",
    "max_applied_r",
    "clipped",
    "vetoed",
    "final_loss",
)


def make_policy(name: str, target_r: float) -> Policy:
    """The guarded run's policy: ``clip`` to r = target_r, ``veto`` above it, or ``monitor``."""
    if name == "clip":
        return ClipPolicy(target_r=target_r)
    if name == "veto":
        return VetoPolicy(max_r=target_r)
    if name == "monitor":
        return MonitorPolicy()
    raise ValueError(f"unknown policy {name!r}; use clip, veto or monitor")


def lr_key(lr: float) -> str:
    """A stable JSON key for a learning rate (``1e-3`` → ``"0.001"``)."""
    return repr(float(lr))


def run_pair(settings: DemoSettings, policy: Policy) -> tuple[RunResult, RunResult]:
    """Plain (monitor) and guarded runs of one (seed, base LR), on the same split and batches."""
    data = digits_split(settings.seed)
    plain = train_run("plain", settings, "monitor", data)
    guarded = train_run("guarded", settings, policy, data)
    return plain, guarded


def run_sweep(
    seeds: Sequence[int],
    lrs: Sequence[float],
    *,
    spike: float,
    spike_at: int,
    steps: int,
    batch_size: int,
    policy: str,
    target_r: float,
    history: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Every (base LR, seed) pair; returns per-seed rows, their statistics and optionally histories."""
    results: dict[str, Any] = {}
    for lr in lrs:
        rows: dict[str, dict[int, dict[str, Any]]] = {"plain": {}, "guarded": {}}
        curves: dict[str, dict[int, dict[str, Any]]] = {"plain": {}, "guarded": {}}
        for seed in seeds:
            settings = DemoSettings(
                lr=lr,
                spike=spike,
                spike_at=spike_at,
                steps=steps,
                seed=seed,
                policy=policy,
                batch_size=batch_size,
            )
            for run in run_pair(settings, make_policy(policy, target_r)):
                rows[run.name][seed] = run.summary(spike_at)
                if history:
                    curves[run.name][seed] = {
                        k: v for k, v in asdict(run).items() if k not in ("name", "policy", "seconds")
                    }
            if progress:
                finals = {name: rows[name][seed]["final_accuracy"] for name in rows}
                print(
                    f"  lr {lr:g} seed {seed}: final test acc plain {finals['plain']:.3f}"
                    f"  guarded {finals['guarded']:.3f}",
                    flush=True,
                )
        entry: dict[str, Any] = {}
        for name, by_seed in rows.items():
            entry[name] = {
                "per_seed": by_seed,
                **{m: stats(row[m] for row in by_seed.values()) for m in _METRICS},
            }
        if history:
            entry["history"] = curves
        results[lr_key(lr)] = entry
    return results


def format_table(results: dict[str, Any], policy: str) -> str:
    """One row per (base LR, run): median [min, max] over seeds; ``ref``: the paper's code on CPU."""
    head = (
        f"{'base lr':>8} {'run':<8} {'final test acc':>22} {'lowest acc after spike':>24} "
        f"{'max r (proposed)':>28} {'max applied r':>14} {'steps clipped':>18} {'ref':>6}"
    )
    lines = [head]
    for key, entry in results.items():
        for name in ("plain", "guarded"):
            row = entry[name]
            paper = PAPER_REFERENCE.get(name, {}).get(key)
            acted = row["vetoed"] if policy == "veto" else row["clipped"]
            lines.append(
                f"{float(key):>8g} {name:<8} {cell(row['final_accuracy']):>22} "
                f"{cell(row['lowest_accuracy_after_spike']):>24} {cell(row['max_r'], '.3g'):>28} "
                f"{row['max_applied_r']['median']:>14.3g} {cell(acted, '.0f'):>18} "
                f"{paper if paper is not None else math.nan:>6.3f}"
            )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=(
            "The LR-spike experiment of 'Ghosts of Softmax' (Fig. 6): MLP 64-128-10 on the digits, Adam, "
            "batch 64, LR multiplied by SPIKE from SPIKE_AT on; plain Adam vs Adam under a StepGuard policy, "
            "over seeds and base learning rates."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma list of seeds")
    parser.add_argument("--lrs", default="1e-4,1e-3,1e-2", help="comma list of base learning rates")
    parser.add_argument("--spike", type=float, default=1000.0, help="LR multiplier, held from SPIKE_AT on")
    parser.add_argument("--spike-at", type=int, default=50, help="first spiked step")
    parser.add_argument("--steps", type=int, default=200, help="training steps")
    parser.add_argument("--batch-size", type=int, default=64, help="minibatch size")
    parser.add_argument(
        "--policy", choices=("clip", "veto", "monitor"), default="clip", help="policy of the guarded run"
    )
    parser.add_argument(
        "--target-r", type=float, default=1.0, help="r the clip policy clips to (veto: max r)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--out", default="runs/lr_spike.json", help="JSON summary path")
    parser.add_argument("--history", action="store_true", help="also store per-step curves in the JSON")
    parser.add_argument("--quiet", action="store_true", help="no per-seed progress lines")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sweep, print the table, write the JSON summary."""
    args = build_parser().parse_args(argv)
    seeds = parse_list(args.seeds, int)
    lrs = parse_list(args.lrs, float)
    set_threads(args.threads)
    print(
        f"seeds={seeds} base lrs={lrs} spike=x{args.spike:g} from step {args.spike_at} steps={args.steps} "
        f"batch={args.batch_size} policy={args.policy} target r={args.target_r:g}",
        flush=True,
    )
    start = time.perf_counter()
    results = run_sweep(
        seeds,
        lrs,
        spike=args.spike,
        spike_at=args.spike_at,
        steps=args.steps,
        batch_size=args.batch_size,
        policy=args.policy,
        target_r=args.target_r,
        history=args.history,
        progress=not args.quiet,
    )
    wall = time.perf_counter() - start
    print()
    print(format_table(results, args.policy))
    print(f"\nwall time {wall:.1f} s")
    payload = {
        "protocol": "Ghosts of Softmax, Fig. 6 (lrspike): MLP 64-128-10, Adam, batch 64, held LR spike",
        "settings": {
            "seeds": seeds,
            "lrs": lrs,
            "spike": args.spike,
            "spike_at": args.spike_at,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "policy": args.policy,
            "target_r": args.target_r,
        },
        "wall_seconds": wall,
        "paper_reference_final_accuracy": PAPER_REFERENCE,
        "results": results,
    }
    path = write_json(args.out, payload)
    print(f"summary written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
