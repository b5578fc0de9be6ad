"""Two real processes under DistributedDataParallel (gloo, loopback): every rank measures its
own shard, the guard reduces before deciding, and decisions and parameters stay identical."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from ranks import GuardCollectives, join_gloo, spawn_ranks

WORLD = 2
STEPS = 12
SPIKE_AT = 6


def _worker(rank: int, store: str, out: str, policy: str, budget: float | None) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn

    from stepguard import StepGuard

    join_gloo(rank, store, WORLD)
    try:
        torch.manual_seed(0)  # same initial model on both ranks
        net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
        ddp = nn.parallel.DistributedDataParallel(net)
        guard = StepGuard(
            torch.optim.Adam(ddp.parameters(), lr=1e-3), model=ddp, policy=policy, budget=budget
        )
        gen = torch.Generator().manual_seed(100 + rank)  # different data on each rank
        reports = []
        collectives = GuardCollectives()
        for step in range(STEPS):
            for g in guard.param_groups:
                g["lr"] = 1e-3 * (1000.0 if step >= SPIKE_AT else 1.0)
            x = torch.randn(16, 8, generator=gen) * (1 + rank)
            y = torch.randint(0, 4, (16,), generator=gen)
            guard.zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            r = guard.step()
            reports.append(
                (
                    r.step,
                    r.tau,
                    r.rho_a,
                    r.r,
                    r.delta_a,
                    r.action,
                    r.scale,
                    r.measured,
                    r.spread.count,
                    r.world_size,
                    collectives.take(),
                )
            )
        flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
        torch.save({"reports": reports, "params": flat}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    # gloo's threads can abort the interpreter's teardown ("terminate called without an
    # active exception") after the work is done and saved; leave without that teardown
    os._exit(0)


def _run(tmp_path: Path, policy: str, budget: float | None) -> list[dict]:
    spawn_ranks(_worker, tmp_path, policy, budget, world=WORLD, timeout=240)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize(("policy", "budget"), [("clip", None), ("clip", 0.1)])
def test_ranks_take_identical_decisions_and_keep_identical_parameters(
    tmp_path: Path, policy: str, budget
) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    rank0, rank1 = _run(tmp_path, policy, budget)
    assert rank0["reports"] == rank1["reports"]  # every measured number and decision, bit for bit
    assert torch.equal(rank0["params"], rank1["params"])
    actions = [r[5] for r in rank0["reports"]]
    assert "clip" in actions[SPIKE_AT:]
    assert all(r[9] == WORLD for r in rank0["reports"])
    counts = [r[8] for r in rank0["reports"] if r[7]]
    assert all(c == 32 for c in counts)  # Δ_a over both shards: 16 rows per rank
    # the guard's own collectives: the first step also checks that the ranks agree (one
    # all_gather_object); then one per measured step, none per estimated step
    first, *rest = rank0["reports"]
    assert first[7] and first[10] == 2
    assert [r[10] for r in rest] == [1 if r[7] else 0 for r in rest]
    if budget is not None:
        assert not all(r[7] for r in rest)  # some steps were estimated
