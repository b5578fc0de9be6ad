"""Ranks that disagree are told so before the first step, on every rank, instead of hanging
inside the reduction (two real gloo processes)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from ranks import join_gloo, spawn_ranks

WORLD = 2


def _worker(rank: int, store: str, out: str, case: str) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn

    from stepguard import GuardConfig, StepGuard

    join_gloo(rank, store, WORLD)
    try:
        torch.manual_seed(0)
        hidden = 16 if case != "model" or rank == 0 else 24
        net = nn.Sequential(nn.Linear(8, hidden), nn.Tanh(), nn.Linear(hidden, 4))
        ddp = nn.parallel.DistributedDataParallel(net) if case != "model" else net
        policy = "veto" if case == "policy" and rank == 1 else "clip"
        config = GuardConfig(tau_jump=3.0) if case == "config" and rank == 1 else GuardConfig()
        guard = StepGuard(torch.optim.SGD(ddp.parameters(), lr=0.1), model=ddp, policy=policy, config=config)
        before = [p.detach().clone() for p in net.parameters()]
        F.cross_entropy(ddp(torch.randn(4, 8)), torch.randint(0, 4, (4,))).backward()
        try:
            guard.step()
            outcome = "stepped"
        except RuntimeError as exc:
            outcome = str(exc)
        untouched = all(torch.equal(p, b) for p, b in zip(net.parameters(), before, strict=True))
        Path(f"{out}/rank{rank}.txt").write_text(f"{untouched}\n{outcome}")
    finally:
        dist.destroy_process_group()
    os._exit(0)


def _run(tmp_path: Path, case: str) -> list[tuple[str, str]]:
    spawn_ranks(_worker, tmp_path, case, world=WORLD, timeout=120)
    return [tuple((tmp_path / f"rank{r}.txt").read_text().split("\n", 1)) for r in range(WORLD)]


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize(("case", "named"), [
    ("policy", "policy differs (rank 0: RelativeClipPolicy(target_r=1.0, hard_r=10.0, sustained_r=2.0); "
               "rank 1: VetoPolicy(max_r=1.0))"),
    ("config", "config differs"),
    ("model", "parameters differs"),
])
def test_ranks_that_disagree_are_refused_on_every_rank(tmp_path: Path, case: str, named: str) -> None:
    results = _run(tmp_path, case)
    for untouched, message in results:
        assert untouched == "True"  # refused before the inner step
        assert "ranks disagree" in message and named in message
