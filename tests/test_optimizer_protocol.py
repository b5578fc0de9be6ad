"""StepGuard is a torch.optim.Optimizer: hooks, state dicts, schedulers and parameter groups
behave as they do on the optimizer it wraps."""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from stepguard import StepGuard

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def setup() -> tuple[nn.Module, StepGuard, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    guard = StepGuard(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), model=net)
    return net, guard, torch.randn(8, 4), torch.randint(0, 3, (8,))


def backward(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    return loss


def test_optimizer_init_ran_and_the_groups_state_and_defaults_are_the_inner_ones() -> None:
    net, guard, x, y = setup()
    inner = guard.optimizer
    assert guard._warned_capturable_if_run_uncaptured  # set by torch.optim.Optimizer.__init__
    assert guard.param_groups is inner.param_groups and guard.defaults is inner.defaults
    assert "_own_param_groups" not in vars(guard) and "_own_state" not in vars(guard)
    backward(net, x, y)
    guard.step()
    assert guard.state is inner.state and len(inner.state) == 2  # momentum buffers, once


def test_instance_and_global_step_hooks_get_torchs_arguments_and_a_pre_hook_can_replace_them() -> None:
    net, guard, x, y = setup()
    seen: list[tuple[str, object]] = []

    def replace_closure(opt, args, kwargs):
        assert args[0] is opt is guard  # as torch passes them: the optimizer first
        seen.append(("pre", args[1:]))
        return (opt, lambda: torch.tensor(7.0)), kwargs

    handles = [
        guard.register_step_pre_hook(replace_closure),
        guard.register_step_post_hook(lambda opt, args, kwargs: seen.append(("post", args[1]()))),
        register_optimizer_step_pre_hook(lambda opt, a, k: seen.append(("global pre", opt is guard))),
        register_optimizer_step_post_hook(lambda opt, a, k: seen.append(("global post", opt is guard))),
    ]
    try:
        backward(net, x, y)
        report = guard.step(None)
    finally:
        for handle in handles:
            handle.remove()
    assert report.loss == 7.0  # the replaced closure ran
    mine = [entry for entry in seen if entry[0] in ("pre", "post") or entry[1] is True]
    assert mine == [("global pre", True), ("pre", (None,)), ("post", torch.tensor(7.0)), ("global post", True)]


def test_state_dict_hooks_run_around_the_guards_state_dict() -> None:
    net, guard, x, y = setup()
    calls: list[str] = []
    guard.register_state_dict_pre_hook(lambda opt: calls.append("pre"))
    guard.register_state_dict_post_hook(lambda opt, sd: {**sd, "extra": 1})
    guard.register_load_state_dict_pre_hook(lambda opt, sd: {k: v for k, v in sd.items() if k != "extra"})
    guard.register_load_state_dict_post_hook(lambda opt: calls.append("loaded"))
    backward(net, x, y)
    guard.step()
    state = guard.state_dict()
    assert calls == ["pre"] and state["extra"] == 1 and "stepguard" in state
    guard.load_state_dict(state)  # the pre-hook drops "extra", which SGD would not know
    assert calls == ["pre", "loaded"]


def test_an_lr_scheduler_drives_the_inner_optimizer_without_warnings() -> None:
    net, guard, x, y = setup()
    scheduler = torch.optim.lr_scheduler.StepLR(guard, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for _ in range(2):
            backward(net, x, y)
            guard.step()
            guard.zero_grad()
            scheduler.step()
    assert guard.optimizer.param_groups[0]["lr"] == pytest.approx(0.025)
    assert scheduler.get_last_lr() == [pytest.approx(0.025)]


def test_zero_grad_and_add_param_group_act_on_the_inner_optimizer() -> None:
    net, guard, x, y = setup()
    backward(net, x, y)
    guard.zero_grad()
    assert all(p.grad is None for p in net.parameters())
    extra = nn.Parameter(torch.zeros(2))
    guard.add_param_group({"params": [extra], "lr": 0.5})
    assert guard.optimizer.param_groups[-1]["params"] == [extra]
    assert guard.param_groups[-1]["lr"] == 0.5 and guard.param_groups[-1]["momentum"] == 0.9


def _torch_requirement() -> str:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        tomllib = pytest.importorskip("tomli")
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    return next(d for d in dependencies if re.match(r"torch\b", d))


def test_the_running_torch_is_one_the_project_supports() -> None:
    from packaging.requirements import Requirement
    from packaging.version import Version

    requirement = Requirement(_torch_requirement())
    running = Version(torch.__version__.split("+")[0])
    assert requirement.specifier.contains(running, prereleases=True), (requirement, running)
