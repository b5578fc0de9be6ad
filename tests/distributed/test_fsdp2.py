"""FSDP2 (``fully_shard``) on two real gloo processes: the guard decides as an unsharded
single-process guard does on the whole global batch, clip and veto act on every shard, and
monitor is bitwise the plain FSDP2 run."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from ranks import GuardCollectives, join_gloo, spawn_ranks
from torch import nn

WORLD = 2
STEPS = 10
SPIKE_AT = 5
ROWS = 16  # global batch; each rank holds ROWS // WORLD of it


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 6))


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(ROWS, 8, generator=gen) * 2, torch.randint(0, 6, (ROWS,), generator=gen)


def lr_at(step: int) -> float:
    return 1e-2 * (1000.0 if step >= SPIKE_AT else 1.0)


def _shard(net: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in (net[0], net[2]):
        fully_shard(layer)
    fully_shard(net)
    return net


def _train(
    net: nn.Module, guard, opt, rank: int, collectives: list[int] | None = None, world: int = WORLD
) -> list[tuple]:
    reports = []
    counter = GuardCollectives() if collectives is not None else None
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        x, y = global_batch(step)
        part = slice(rank * ROWS // world, (rank + 1) * ROWS // world)
        opt.zero_grad()
        F.cross_entropy(net(x[part]), y[part]).backward()
        if guard is None:
            opt.step()
        else:
            r = guard.step()
            reports.append((r.step, r.tau, r.r, r.delta_a, r.action, r.scale, r.spread.count, r.estimator))
            if counter is not None and collectives is not None:
                collectives.append(counter.take())
    return reports


def _worker(rank: int, store: str, out: str, case: str) -> None:
    import torch.distributed as dist

    from stepguard import GuardConfig, StepGuard, VetoPolicy

    case, _, ranks = case.partition("@")  # "clip@4": the clip case on 4 ranks
    world = int(ranks or WORLD)
    join_gloo(rank, store, world)
    try:
        net = _shard(make_net())
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        result: dict = {}
        if case in ("clip", "every3", "budget"):
            config = {"every3": GuardConfig(measure_every=3), "budget": GuardConfig(budget=0.1)}.get(case)
            guard = StepGuard(opt, model=net, policy="clip", config=config)
            result["collectives"] = []
            result["reports"] = _train(net, guard, opt, rank, result["collectives"], world)
            result["params"] = [p.full_tensor() for p in net.parameters()]
        elif case == "monitor":
            plain = _shard(make_net())
            plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-2)
            guard = StepGuard(opt, model=net, policy="monitor")
            result["reports"] = _train(net, guard, opt, rank)
            _train(plain, None, plain_opt, rank)
            result["bitwise"] = all(
                torch.equal(a.to_local(), b.to_local()) for a, b in zip(net.parameters(), plain.parameters(), strict=True)
            ) and all(
                torch.equal(sa[k].to_local() if hasattr(sa[k], "to_local") else sa[k],
                            sb[k].to_local() if hasattr(sb[k], "to_local") else sb[k])
                for sa, sb in zip(opt.state.values(), plain_opt.state.values(), strict=True) for k in sa
            )
        else:  # veto: one applied step, then every step vetoed
            guard = StepGuard(opt, model=net, policy=VetoPolicy(max_r=1e9))
            x, y = global_batch(0)
            part = slice(rank * ROWS // world, (rank + 1) * ROWS // world)
            F.cross_entropy(net(x[part]), y[part]).backward()
            guard.step()
            shards = [p.to_local().clone() for p in net.parameters()]
            state = copy.deepcopy({i: {k: (v.to_local() if hasattr(v, "to_local") else v).clone()
                                       for k, v in s.items()} for i, s in enumerate(opt.state.values())})
            guard.engine.policy = VetoPolicy(max_r=1e-12)
            actions = []
            for step in range(1, 4):
                x, y = global_batch(step)
                opt.zero_grad()
                F.cross_entropy(net(x[part]), y[part]).backward()
                actions.append(guard.step().action)
            after = {i: {k: (v.to_local() if hasattr(v, "to_local") else v) for k, v in s.items()}
                     for i, s in enumerate(opt.state.values())}
            result["actions"] = actions
            result["bitwise"] = all(torch.equal(p.to_local(), s) for p, s in zip(net.parameters(), shards, strict=True)) \
                and all(torch.equal(after[i][k], state[i][k]) for i in state for k in state[i])
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    os._exit(0)


def _run(tmp_path: Path, case: str, world: int = WORLD) -> list[dict]:
    spawn_ranks(_worker, tmp_path, f"{case}@{world}", world=world, timeout=240)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def _unsharded_reference(measure_every: int = 1) -> tuple[list[tuple], list[torch.Tensor]]:
    from stepguard import GuardConfig, StepGuard

    net = make_net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    guard = StepGuard(opt, model=net, policy="clip", config=GuardConfig(measure_every=measure_every))
    reports = []
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        x, y = global_batch(step)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        r = guard.step()
        reports.append((r.step, r.tau, r.r, r.delta_a, r.action, r.scale, r.spread.count, r.estimator))
    guard.close()
    return reports, [p.detach().clone() for p in net.parameters()]


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available"),
]


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_guard_decides_as_an_unsharded_guard_on_the_global_batch(tmp_path: Path, world: int) -> None:
    rank0, *others = _run(tmp_path, "clip", world)
    assert all(other["reports"] == rank0["reports"] for other in others)  # every rank, the same decisions
    # the guard's own collectives (FSDP's gathers not counted): the first step checks that
    # the ranks agree and reduces τ before its replay; every later step, the reduction only
    assert rank0["collectives"] == [3] + [1] * (STEPS - 1)
    reference, ref_params = _unsharded_reference()
    for got, want in zip(rank0["reports"], reference, strict=True):
        step, tau, r, delta_a, action, scale, count, estimator = got
        assert (step, action, count, estimator) == (want[0], want[4], want[6], "jvp")
        assert r == pytest.approx(want[2], rel=1e-3)
        assert tau == pytest.approx(want[1], rel=1e-3)
        assert delta_a == pytest.approx(want[3], rel=1e-3)
        assert scale == pytest.approx(want[5], rel=1e-3)
    assert "clip" in [g[4] for g in rank0["reports"][SPIKE_AT:]]
    largest = max(float(p.abs().max()) for p in ref_params)
    for got, want in zip(rank0["params"], ref_params, strict=True):
        assert float((got - want).abs().max()) <= 1e-3 * largest


def test_between_measurements_the_sharded_guard_estimates_as_an_unsharded_guard(tmp_path: Path) -> None:
    """measure_every=3 (the schedule of budget mode without its timing): the same steps are
    measured and estimated as by an unsharded guard on the global batch, with the same r."""
    rank0, rank1 = _run(tmp_path, "every3")
    assert rank0["reports"] == rank1["reports"]
    reference, ref_params = _unsharded_reference(measure_every=3)
    got_estimators = [g[7] for g in rank0["reports"]]
    assert got_estimators == [w[7] for w in reference]
    assert "estimate" in got_estimators and "jvp" in got_estimators
    for got, want in zip(rank0["reports"], reference, strict=True):
        assert (got[0], got[4]) == (want[0], want[4])
        assert got[2] == pytest.approx(want[2], rel=1e-3) and got[1] == pytest.approx(want[1], rel=1e-3)
    assert "clip" in [g[4] for g in rank0["reports"][SPIKE_AT:]]
    largest = max(float(p.abs().max()) for p in ref_params)
    for got, want in zip(rank0["params"], ref_params, strict=True):
        assert float((got - want).abs().max()) <= 1e-3 * largest
    # the guard's own collectives: an estimated step reads τ and the sketch's cosine in one
    # all_reduce; a step the schedule measures adds the reduction; the first step as above
    expected = [3] + [1 if g[7] == "estimate" else 2 for g in rank0["reports"][1:]]
    assert rank0["collectives"] == expected


def test_budget_mode_takes_the_same_decisions_on_every_rank(tmp_path: Path) -> None:
    rank0, rank1 = _run(tmp_path, "budget")
    assert rank0["reports"] == rank1["reports"] and rank0["collectives"] == rank1["collectives"]
    estimators = [g[7] for g in rank0["reports"]]
    assert "estimate" in estimators and estimators[0] == "jvp"
    assert "clip" in [g[4] for g in rank0["reports"][SPIKE_AT:]]
    for a, b in zip(rank0["params"], rank1["params"], strict=True):
        assert torch.equal(a, b)


def test_monitor_is_bitwise_the_plain_fsdp2_run(tmp_path: Path) -> None:
    for result in _run(tmp_path, "monitor"):
        assert result["bitwise"]
        assert {r[4] for r in result["reports"]} == {"allow"}


def test_veto_restores_every_shard_and_the_sharded_optimizer_state(tmp_path: Path) -> None:
    for result in _run(tmp_path, "veto"):
        assert result["actions"] == ["veto"] * 3
        assert result["bitwise"]


class _CausalAttention(nn.Module):
    """One causal SDPA layer: the fused kernel has no forward-AD rule of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 24)
        self.out = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.transpose(1, 2) for t in self.inp(x).view(*x.shape[:2], 3, 2, 4).unbind(2))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
        return self.out(attended.reshape(*x.shape[:2], 8))


def _attention_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return torch.randn(4, 6, 8, generator=gen), torch.randint(0, 5, (4, 6), generator=gen)


def _attention_step(net: nn.Module, rows: slice) -> tuple[float, str]:
    from stepguard import StepGuard

    guard = StepGuard(torch.optim.SGD(net.parameters(), lr=0.5), model=net)
    x, y = _attention_batch()
    F.cross_entropy(net(x[rows]).reshape(-1, 5), y[rows].reshape(-1)).backward()
    report = guard.step()
    return report.r, report.estimator


def _attention_worker(rank: int, store: str, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    join_gloo(rank, store, WORLD)
    torch.manual_seed(0)
    net = _CausalAttention()
    for module in (net.inp, net.out, net):
        fully_shard(module)
    torch.save(_attention_step(net, slice(2 * rank, 2 * rank + 2)), f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()
    os._exit(0)


def test_the_sharded_replay_measures_fused_attention_by_the_jvp(tmp_path: Path) -> None:
    spawn_ranks(_attention_worker, tmp_path, world=WORLD, timeout=240)
    torch.manual_seed(0)
    r, estimator = _attention_step(_CausalAttention(), slice(0, 4))
    assert estimator == "jvp"
    for rank in range(WORLD):
        sharded_r, sharded_estimator = torch.load(tmp_path / f"rank{rank}.pt")
        assert sharded_estimator == "jvp"
        assert sharded_r == pytest.approx(r, rel=1e-5)
