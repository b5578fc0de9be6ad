"""Sharded layouts the replay cannot follow (FSDP2 on part of the model, tensor parallel) are
refused with an error naming what is supported (two real gloo processes)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from ranks import join_gloo, spawn_ranks

WORLD = 2


def _worker(rank: int, store: str, out: str, case: str) -> None:
    import torch.distributed as dist
    from torch import nn

    from stepguard import StepGuard

    join_gloo(rank, store, WORLD)
    try:
        net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
        if case == "fsdp2_partial":
            from torch.distributed.fsdp import fully_shard

            fully_shard(net[0])  # the rest of the model is left unsharded
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

            mesh = init_device_mesh("cpu", (WORLD,))
            parallelize_module(net, mesh, {"0": ColwiseParallel()})
        try:
            StepGuard(torch.optim.Adam(net.parameters()), model=net, policy="clip")
            outcome = "accepted"
        except NotImplementedError as exc:
            outcome = str(exc)
        Path(f"{out}/rank{rank}.txt").write_text(outcome)
    finally:
        dist.destroy_process_group()
    os._exit(0)


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize(("case", "named"), [
    ("fsdp2_partial", "parameter 2.weight is not sharded by FSDP2"),
    ("tensor_parallel", "DTensor parameters (tensor or sequence parallel)"),
])
def test_sharded_models_are_refused_naming_what_is_supported(tmp_path: Path, case: str, named: str) -> None:
    spawn_ranks(_worker, tmp_path, case, world=WORLD, timeout=120)
    for rank in range(WORLD):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert named in message and "FSDP2 (fully_shard on a 1-D mesh)" in message
