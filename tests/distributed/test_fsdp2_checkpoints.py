"""FSDP2 checkpoints with ``torch.distributed.checkpoint`` (DCP) on two gloo processes: a run
saved mid-way and resumed into a fresh model, optimizer and guard continues exactly as the
uninterrupted run, and ``stepguard analyze`` reads the DCP checkpoints of a sharded run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from ranks import join_gloo, spawn_ranks
from torch import nn

WORLD = 2
STEPS = 8
SPIKE_AT = 3
SAVE_AFTER = 4  # the checkpoint is taken after the spike: the guard's own state matters
ROWS = 16


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 6))


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(ROWS, 8, generator=gen) * 2, torch.randint(0, 6, (ROWS,), generator=gen)


def _setup(policy: str = "clip"):
    from torch.distributed.fsdp import fully_shard

    from stepguard import StepGuard

    net = make_net()
    for layer in (net[0], net[2]):
        fully_shard(layer)
    fully_shard(net)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    return net, opt, StepGuard(opt, model=net, policy=policy)


def _steps(net, guard, rank: int, start: int, stop: int) -> list[tuple]:
    reports = []
    part = slice(rank * ROWS // WORLD, (rank + 1) * ROWS // WORLD)
    for step in range(start, stop):
        for group in guard.param_groups:
            group["lr"] = 1e-2 * (1000.0 if step >= SPIKE_AT else 1.0)
        x, y = global_batch(step)
        guard.zero_grad()
        F.cross_entropy(net(x[part]), y[part]).backward()
        r = guard.step()
        reports.append((r.step, r.tau, r.r, r.action, r.scale, guard.counters["clip"]))
    return reports


def save(directory: str, net, guard) -> None:
    """The recipe of docs/distributed.md: model and optimizer shards plus the guard's own state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {
        "model": get_model_state_dict(net),
        "optim": get_optimizer_state_dict(net, guard.optimizer),
        "stepguard": guard.engine.state_dict(),
    }
    dcp.save(state, checkpoint_id=directory)


def load(directory: str, net, guard) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = {
        "model": get_model_state_dict(net),
        "optim": get_optimizer_state_dict(net, guard.optimizer),
        "stepguard": guard.engine.state_dict(),
    }
    dcp.load(state, checkpoint_id=directory)
    set_model_state_dict(net, state["model"])
    set_optimizer_state_dict(net, guard.optimizer, state["optim"])
    guard.engine.load_state_dict(state["stepguard"])


def _worker(rank: int, store: str, out: str, case: str) -> None:
    import torch.distributed as dist

    join_gloo(rank, store, WORLD)
    try:
        result: dict = {}
        if case == "resume":
            net, _, guard = _setup()
            result["straight"] = _steps(net, guard, rank, 0, STEPS)
            result["straight_shards"] = [p.to_local().clone() for p in net.parameters()]
            guard.close()

            net, _, guard = _setup()
            _steps(net, guard, rank, 0, SAVE_AFTER)
            save(f"{out}/ckpt", net, guard)
            guard.close()
            del net, guard
            net, _, guard = _setup()  # fresh model, optimizer and guard, as after a restart
            load(f"{out}/ckpt", net, guard)
            result["resumed"] = _steps(net, guard, rank, SAVE_AFTER, STEPS)
            result["resumed_shards"] = [p.to_local().clone() for p in net.parameters()]
        else:  # "run": a DCP checkpoint of the model at every step, for the analyzer
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            net, _, guard = _setup("monitor")
            full = []
            for step in range(STEPS + 1):
                dcp.save({"model": get_model_state_dict(net)}, checkpoint_id=f"{out}/ckpts/step_{step}")
                full.append([p.detach().full_tensor() for p in net.parameters()])
                if step < STEPS:
                    _steps(net, guard, rank, step, step + 1)
            result["full"] = full
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    os._exit(0)


def _run(tmp_path: Path, case: str) -> list[dict]:
    spawn_ranks(_worker, tmp_path, case, world=WORLD, timeout=240)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available"),
]


def test_a_run_resumed_from_dcp_continues_bitwise_as_the_uninterrupted_run(tmp_path: Path) -> None:
    for result in _run(tmp_path, "resume"):
        straight = result["straight"]
        assert "clip" in [r[3] for r in straight[SPIKE_AT:SAVE_AFTER]]  # the saved guard state has counts
        assert result["resumed"] == straight[SAVE_AFTER:]  # step numbers, τ, r, actions, clip counts
        assert all(torch.equal(a, b) for a, b in zip(result["resumed_shards"], result["straight_shards"], strict=True))


def test_analyze_reads_the_dcp_checkpoints_of_a_sharded_run(tmp_path: Path) -> None:
    from stepguard.analysis import Probe, analyze

    full = _run(tmp_path, "run")[0]["full"]
    x, y = global_batch(0)
    result = analyze(tmp_path / "ckpts", make_net, Probe(inputs=x, targets=y), strict=True)
    assert [(t.step_from, t.step_to) for t in result.transitions] == [(k, k + 1) for k in range(STEPS)]
    for t in result.transitions:
        moved = torch.cat([(b - a).flatten() for a, b in zip(full[t.step_from], full[t.step_to], strict=True)])
        assert t.report.tau == pytest.approx(float(moved.norm()), rel=1e-5)
        assert t.report.r > 0 and t.report.estimator == "jvp"
    assert max(t.report.r for t in result.transitions[SPIKE_AT:]) > 10 * result.transitions[0].report.r
