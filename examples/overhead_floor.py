"""The least a guard can cost: hand-written minimal guarded steps against a plain step and StepGuard.

``stepguard bench`` times StepGuard itself. This script answers a different question:
how much of that is the guard's design, and how much is the price of doing the work at
all with eager PyTorch on this machine? It times, interleaved in the same process:

* ``plain``: zero_grad, forward, loss, backward, ``Adam.step()``;
* ``floor estimated``: plain, plus only what an unmeasured step cannot skip: copy θ₀ into
  one flat buffer before the step; after it, Δθ = θ₁ − θ₀ as one flat tensor, τ = ‖Δθ‖,
  a 4096-coordinate sketch of Δθ and its dot product with a fixed reference, all read
  to the host in one transfer;
* ``floor measured``: the estimated floor plus a forward-mode JVP of the logits at θ₀
  along Δθ (dual tensors swapped in for the parameters, as the guard does) and
  Δ_a = max row spread, read with τ;
* ``StepGuard budget`` and ``StepGuard every 1``: the real guard (policy monitor).

The floors have no capture hook, no replay of the RNG or of batch statistics, no
per-row statistics, report, policy or sinks: they bound from below what any guard
built on the same ops costs. Ratios are medians over rounds of block means, against
the plain step of the same round.

Examples::

    python examples/overhead_floor.py                    # the built-in MLP
    python examples/overhead_floor.py --model cnn --rounds 20 --json runs/floor.json
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD

from stepguard import GuardConfig, StepGuard
from stepguard.geometry.swap import call_with
from stepguard.tools.bench import machine_info, summarize, write_json
from stepguard.tools.bench_models import BUILTIN, builtin_workload

SKETCH = 4096


class Runner:
    """One network and optimizer, and a step function of the chosen kind."""

    def __init__(self, name: str, kind: str, lr: float, seed: int) -> None:
        torch.manual_seed(seed)
        self.workload = builtin_workload(name, seed=seed)
        self.model = self.workload.factory()
        self.model.train()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        total = sum(p.numel() for p in self.params)
        self.theta0 = torch.empty(total)
        self.sizes = [p.numel() for p in self.params]
        self.sketch_index = torch.randint(0, total, (min(total, SKETCH),)).sort().values
        self.reference = torch.randn(len(self.sketch_index))
        self.cursor = 0
        self.guard: StepGuard | None = None
        if kind.startswith("StepGuard"):
            config = GuardConfig(measure_every=1) if kind.endswith("every 1") else None
            budget = 0.1 if kind.endswith("budget") else None
            self.guard = StepGuard(self.optimizer, model=self.model, config=config, budget=budget)
        self.step: Callable[[], Any] = {
            "plain": self.plain,
            "floor estimated": self.floor_estimated,
            "floor measured": self.floor_measured,
        }.get(kind, self.guarded)

    def _backward(self) -> Any:
        batch = self.workload.batches[self.cursor % len(self.workload.batches)]
        self.cursor += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.workload.loss_fn(self.model(batch.inputs), batch.targets).backward()
        return batch

    def plain(self) -> None:
        self._backward()
        self.optimizer.step()

    def guarded(self) -> None:
        batch = self._backward()
        assert self.guard is not None
        self.guard.step(targets=batch.targets)

    def _snapshot_and_step(self) -> torch.Tensor:
        with torch.no_grad():
            torch._foreach_copy_(
                [v.view_as(p) for v, p in zip(self.theta0.split(self.sizes), self.params, strict=True)],
                self.params,
            )
        self.optimizer.step()
        with torch.no_grad():
            return torch.cat([p.reshape(-1) for p in self.params]).sub_(self.theta0)

    def floor_estimated(self) -> None:
        self._backward()
        delta = self._snapshot_and_step()
        tau = torch.linalg.vector_norm(delta)
        sketch = delta.index_select(0, self.sketch_index)
        torch.stack([tau, sketch @ self.reference, torch.linalg.vector_norm(sketch)]).tolist()

    def floor_measured(self) -> None:
        batch = self._backward()
        delta = self._snapshot_and_step()
        tau = torch.linalg.vector_norm(delta)
        tangents = delta.split(self.sizes)
        theta0 = self.theta0.split(self.sizes)
        with fwAD.dual_level():
            duals = {
                n: fwAD.make_dual(t0.view_as(p).clone(), d.view_as(p))
                for n, t0, d, p in zip(self.names, theta0, tangents, self.params, strict=True)
            }
            logits = call_with(self.model, duals, (batch.inputs,), {})
            velocity = fwAD.unpack_dual(logits).tangent
        velocity = velocity.reshape(-1, velocity.shape[-1])
        low, high = torch.aminmax(velocity, dim=-1)
        torch.stack([tau, (high - low).max()]).tolist()


KINDS = ("plain", "floor estimated", "floor measured", "StepGuard budget", "StepGuard every 1")


def run(model: str, *, rounds: int, block: int, warmup: int, lr: float, seed: int) -> dict[str, Any]:
    runners = {kind: Runner(model, kind, lr, seed) for kind in KINDS}
    for runner in runners.values():
        for _ in range(warmup):
            runner.step()
    seconds: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for r in range(rounds):
        order = KINDS if r % 2 == 0 else tuple(reversed(KINDS))
        for kind in order:
            runner = runners[kind]
            start = time.perf_counter()
            for _ in range(block):
                runner.step()
            seconds[kind].append((time.perf_counter() - start) / block)
    plain = seconds["plain"]
    rows = {}
    for kind in KINDS:
        ratios = [s / p for s, p in zip(seconds[kind], plain, strict=True)]
        rows[kind] = {"step_ms": summarize([s * 1e3 for s in seconds[kind]]), "ratio": summarize(ratios)}
    return {"machine": machine_info(torch.device("cpu")), "model": model, "rounds": rounds, "block": block,
            "variants": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="overhead_floor.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=BUILTIN, default="mlp", help="built-in workload (default mlp)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    parser.add_argument("--block", type=int, default=32, help="steps per block (default 32)")
    parser.add_argument("--warmup", type=int, default=32, help="warm-up steps per variant (default 32)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--json", type=Path, help="write the result here (strict JSON)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.block < 1 or args.warmup < 0:
        parser.error("--rounds and --block must be at least 1, --warmup at least 0")
    torch.set_num_threads(args.threads)
    result = run(args.model, rounds=args.rounds, block=args.block, warmup=args.warmup, lr=args.lr,
                 seed=args.seed)
    print(f"{args.model}: median step time and ratio to plain over {args.rounds} rounds of {args.block}")
    for kind, row in result["variants"].items():
        ratio = row["ratio"]
        print(f"  {kind:18s} {row['step_ms']['median']:8.3f} ms  {ratio['median']:5.2f}x"
              f"  [{ratio['min']:.2f}-{ratio['max']:.2f}]")
    if args.json:
        print(f"JSON written to {write_json(result, args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
