"""Accelerate's FSDP2 preparation on two gloo processes, with the guard built after ``prepare``.

On CPU processes Accelerate does not use its FSDP plugin: ``AcceleratorState`` switches to
``DistributedType.FSDP`` only inside the branch for multi-accelerator distributed types
(``accelerate/state.py``), so a multi-process CPU run stays ``MULTI_CPU`` and ``prepare``
wraps the model in DistributedDataParallel. The first test pins that down. The second sets
the state's distributed type to FSDP after the ``Accelerator`` is built, which is what it
would be on GPUs, so that ``prepare`` runs its FSDP2 path (``fully_shard`` and the swap of
the sharded parameters into the optimizer) on CPU, and checks the guard on the prepared
model and the prepared optimizer's inner optimizer against the guard on a model sharded by
hand.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from ranks import join_gloo, spawn_ranks
from torch import nn

pytest.importorskip("accelerate")

WORLD = 2
STEPS = 6
SPIKE_AT = 3
ROWS = 8  # per rank

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available"),
]


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 6))


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(ROWS, 8, generator=gen) * 2, torch.randint(0, 6, (ROWS,), generator=gen)


def _accelerator(rank: int, store: str, force_fsdp: bool):
    """Join the gloo group, then build an Accelerator with an FSDP2 plugin on it."""
    join_gloo(rank, store, WORLD)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(WORLD),
        OMP_NUM_THREADS="1",
    )
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
    if force_fsdp:  # the state AcceleratorState.__init__ leaves on GPUs, shared state included
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
        PartialState().distributed_type = DistributedType.FSDP
    return accelerator


def _plain_cpu_worker(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    accelerator = _accelerator(rank, store, force_fsdp=False)
    net = make_net()
    net, _ = accelerator.prepare(net, torch.optim.AdamW(net.parameters()))
    found = {"type": accelerator.distributed_type.value, "model": type(net).__name__}
    Path(out, f"rank{rank}.json").write_text(json.dumps(found))
    dist.destroy_process_group()


def _train(net: nn.Module, opt: torch.optim.Optimizer, rank: int, backward) -> list[list]:
    """Guard ``opt`` on ``net`` through an LR spike; each step's (r, τ, action, scale)."""
    from stepguard import StepGuard

    guard = StepGuard(opt, model=net, policy="clip")
    rows = []
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = 1e-2 * (1000.0 if step >= SPIKE_AT else 1.0)
        x, y = batch(step, rank)
        guard.zero_grad()
        backward(F.cross_entropy(net(x), y))
        report = guard.step()
        rows.append([report.r, report.tau, report.action, report.scale])
    guard.close()
    return rows


def _fsdp2_worker(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard

    accelerator = _accelerator(rank, store, force_fsdp=True)
    net = make_net()
    net, prepared = accelerator.prepare(net, torch.optim.AdamW(net.parameters()))
    params = [p for group in prepared.optimizer.param_groups for p in group["params"]]
    sharded = all(isinstance(p, DTensor) and p.placements == (Shard(0),) for p in params)
    same = {id(p) for p in params} == {id(p) for p in net.parameters()}
    accelerated = _train(net, prepared.optimizer, rank, accelerator.backward)

    by_hand = make_net()
    fully_shard(by_hand)
    reference = _train(by_hand, torch.optim.AdamW(by_hand.parameters()), rank, lambda loss: loss.backward())
    found = {
        "type": accelerator.distributed_type.value,
        "sharded": sharded,
        "same_params": same,
        "accelerated": accelerated,
        "reference": reference,
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(found))
    dist.destroy_process_group()


def test_on_cpu_processes_accelerate_ignores_the_fsdp_plugin(tmp_path: Path) -> None:
    spawn_ranks(_plain_cpu_worker, tmp_path, world=WORLD, timeout=120)
    for rank in range(WORLD):
        found = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert found == {"type": "MULTI_CPU", "model": "DistributedDataParallel"}


def test_the_guard_on_accelerates_fsdp2_preparation_matches_fully_shard_by_hand(tmp_path: Path) -> None:
    spawn_ranks(_fsdp2_worker, tmp_path, world=WORLD, timeout=120)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD)]
    for found in ranks:
        assert found["type"] == "FSDP" and found["sharded"] and found["same_params"]
        actions = [row[2] for row in found["accelerated"]]
        assert actions == ["allow"] * SPIKE_AT + ["clip"] * (STEPS - SPIKE_AT)
        for got, want in zip(found["accelerated"], found["reference"], strict=True):
            assert got[2] == want[2]
            assert got[0] == pytest.approx(want[0], rel=1e-5) and got[1] == pytest.approx(want[1], rel=1e-5)
    assert ranks[1]["accelerated"] == ranks[0]["accelerated"]  # bit for bit
