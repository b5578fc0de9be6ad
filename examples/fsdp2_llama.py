"""A small Hugging Face Llama trained with FSDP2 on CPU processes, guarded by StepGuard.

A ``LlamaForCausalLM`` built from a config (hidden 64, 2 decoder layers, a 256-token byte
vocabulary) learns next-byte prediction on the text of Python's ``pydoc_data.topics``.
``fully_shard`` is applied to every decoder layer and to the root, so each rank holds half
of every parameter; each rank trains on its own half of the global batch. The learning
rate is multiplied by ``--spike`` from step ``--spike-at`` on; the guard's clip policy
scales each such step back to r ≤ 1. Rank 0 prints a table of every step (step, loss,
r, action) and whether every rank took the same decisions on the same numbers.

Run on two CPU processes (gloo), spawned by the script::

    python examples/fsdp2_llama.py --steps 30

or under ``torchrun`` (one process per rank, spawning nothing)::

    torchrun --nproc-per-node 2 examples/fsdp2_llama.py --steps 30

``--no-guard`` trains the same model without the guard (for comparing memory: each rank
reports its peak resident set size); ``--json FILE`` writes rank 0's reports, every rank's
decisions and peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _tiny_llama import add_llama_arguments, corpus, tiny_llama


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_llama_arguments(parser)
    parser.add_argument("--world", type=int, default=2, help="processes to spawn (default 2)")
    parser.add_argument("--no-guard", action="store_true", help="train without the guard")
    parser.add_argument("--json", metavar="FILE", help="write the reports and peak memory here")
    args = parser.parse_args(argv)
    if args.world < 1 or args.steps < 1 or args.batch < 1 or args.seq < 2:
        parser.error("--world, --steps and --batch must be at least 1 and --seq at least 2")
    return args


def batch_for(data: torch.Tensor, step: int, rank: int, args: argparse.Namespace) -> torch.Tensor:
    """This rank's part of the global batch of ``step``: the same on every run."""
    world = dist.get_world_size()
    gen = torch.Generator().manual_seed(step)
    starts = torch.randint(0, len(data) - args.seq, (args.batch * world,), generator=gen)
    mine = starts[rank * args.batch : (rank + 1) * args.batch]
    return torch.stack([data[s : s + args.seq] for s in mine.tolist()])


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """A tiny ``LlamaForCausalLM`` with ``fully_shard`` on every decoder layer and on the root."""
    from torch.distributed.fsdp import fully_shard

    model = tiny_llama(args)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Train on this rank; returns this rank's rows (step, loss, r, action) and peak memory."""
    from stepguard import StepGuard

    rank = dist.get_rank()
    data = corpus()
    model = build_model(args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    guard = None if args.no_guard else StepGuard(opt, model=model, policy="clip")
    stepper = opt if guard is None else guard
    rows = []
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = args.lr * (args.spike if step >= args.spike_at else 1.0)
        ids = batch_for(data, step, rank, args)
        stepper.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        loss = loss.detach()
        if guard is None:
            opt.step()
            rows.append({"step": step, "loss": loss.item(), "r": None, "action": "-"})
        else:
            report = guard.step()
            rows.append({"step": step, "loss": loss.item(), "r": report.r, "action": report.action,
                         "tau": report.tau, "scale": report.scale})
    if guard is not None:
        guard.close()
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return {"rows": rows, "peak_rss_mib": peak_mib}


def _decisions(result: dict[str, Any]) -> list[tuple]:
    """What every rank must share: the reduced numbers and the action of each step (not the loss)."""
    return [(row["r"], row.get("tau"), row["action"], row.get("scale")) for row in result["rows"]]


def print_table(result: dict[str, Any], everyone: list[dict[str, Any]], spike_at: int) -> None:
    print(f"{'step':>4}  {'loss':>7}  {'r':>9}  action")
    for row in result["rows"]:
        r = "-" if row["r"] is None else f"{row['r']:9.3g}"
        mark = "   <- LR spike" if row["step"] == spike_at else ""
        print(f"{row['step']:>4}  {row['loss']:7.3f}  {r:>9}  {row['action']}{mark}")
    agree = all(_decisions(e) == _decisions(result) for e in everyone)
    print(f"ranks: {len(everyone)}; same r and decisions on every rank: {'yes' if agree else 'NO'}")
    print("peak RSS per rank (MiB): " + ", ".join(f"{e['peak_rss_mib']:.0f}" for e in everyone))


def run_rank(args: argparse.Namespace) -> None:
    """One rank's work, once the process group is up."""
    result = train(args)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, result)
    if dist.get_rank() == 0:
        print_table(result, everyone, args.spike_at)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"rows": result["rows"], "ranks": everyone}, f, indent=1)


def _spawned(rank: int, args: argparse.Namespace, store: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # every rank on this machine
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=args.world)
    try:
        run_rank(args)
    finally:
        dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun
        dist.init_process_group("gloo")
        try:
            run_rank(args)
        finally:
            dist.destroy_process_group()
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_spawned, args=(args, os.path.join(tmp, "store")), nprocs=args.world, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
