"""torch.distributed.checkpoint.state_dict on a guard: the step it takes to fill an empty
optimizer state passes through unmeasured; every other step stays guarded."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    _init_optim_state,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from stepguard import NoBatchError, StepGuard


def fresh(lr: float = 1e-2) -> tuple[nn.Module, StepGuard]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    return net, StepGuard(torch.optim.AdamW(net.parameters(), lr=lr), model=net, policy="clip")


def weights(net: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def train(net: nn.Module, guard: StepGuard, steps: int) -> None:
    torch.manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        F.cross_entropy(net(x), y).backward()
        guard.step(targets=y)
        guard.zero_grad()


def test_get_optimizer_state_dict_fills_a_fresh_guards_state_without_a_guarded_step() -> None:
    net, guard = fresh()
    before = weights(net)
    state = get_optimizer_state_dict(net, guard)
    assert set(state["state"]) == {name for name, _ in net.named_parameters()}
    assert all(int(entry["step"]) == 1 for entry in state["state"].values())  # AdamW's own step ran
    assert all(torch.equal(a, b) for a, b in zip(before, weights(net), strict=True))
    assert guard.engine.state_dict()["step"] == 0 and guard.last_report is None
    assert guard.counters == {"allow": 0, "clip": 0, "veto": 0}
    assert [group["lr"] for group in guard.param_groups] == [1e-2]  # torch puts the lr back
    assert all(p.grad is None for p in net.parameters())

    train(net, guard, 1)  # the first real step is measured, as step 0
    assert guard.last_report is not None and guard.last_report.step == 0


def test_set_optimizer_state_dict_loads_a_trained_state_into_a_fresh_guard() -> None:
    net, guard = fresh()
    train(net, guard, 3)
    saved = get_optimizer_state_dict(net, guard)

    net2, guard2 = fresh()
    net2.load_state_dict(net.state_dict())
    set_optimizer_state_dict(net2, guard2, optim_state_dict=saved)
    assert guard2.engine.state_dict()["step"] == 0 and guard2.last_report is None
    for name, entry in get_optimizer_state_dict(net2, guard2)["state"].items():
        assert int(entry["step"]) == 3
        assert torch.equal(entry["exp_avg"], saved["state"][name]["exp_avg"])


def test_torchs_state_filling_call_on_a_guard_of_a_stateless_sgd_moves_nothing() -> None:
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    guard = StepGuard(torch.optim.SGD(net.parameters(), lr=0.1), model=net)
    before = weights(net)
    _init_optim_state(guard)
    assert all(torch.equal(a, b) for a, b in zip(before, weights(net), strict=True))
    assert guard.engine.state_dict()["step"] == 0 and guard.param_groups[0]["lr"] == 0.1


def test_a_real_step_without_a_batch_still_raises() -> None:
    net, guard = fresh()
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(NoBatchError):  # lr > 0: not torch's state-filling step
        guard.step()


def test_a_first_step_at_lr_zero_with_real_gradients_and_no_batch_raises() -> None:
    net, guard = fresh(lr=0.0)  # e.g. a warm-up that starts at 0
    net.eval()  # the guard captures training forwards only: this step has no batch
    F.cross_entropy(net(torch.randn(8, 4)), torch.randint(0, 3, (8,))).backward()
    net.train()
    with pytest.raises(NoBatchError):
        guard.step()


def test_a_zero_gradient_step_at_lr_zero_on_a_filled_state_is_guarded() -> None:
    net, guard = fresh()
    train(net, guard, 1)
    for group in guard.param_groups:
        group["lr"] = 0.0
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    report = guard.step()  # the state exists, so torch would not fill it: a guarded step
    assert report is not None and report.step == 1
    assert guard.engine.state_dict()["step"] == 2
