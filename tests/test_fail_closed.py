"""The guard fails closed: no error leaves an unguarded step applied, and no r is silently wrong.

Each test is a case where the guard used to let an unguarded update through, report a
wrong r, or lose count of its own state.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import stepguard
from stepguard import ClipPolicy, GuardConfig, StepGuard, VetoPolicy
from stepguard.engine import HaltTraining, NoBatchError
from stepguard.geometry.jvp import is_replaying


def make_net() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).double()


def data(n: int = 12) -> tuple[Tensor, Tensor]:
    return torch.randn(n, 6, dtype=torch.float64), torch.randint(0, 4, (n,))


def params_of(net: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def optimizer_state(opt: torch.optim.Optimizer) -> dict:
    return copy.deepcopy(opt.state_dict()["state"])


def assert_params(net: nn.Module, expected: list[Tensor]) -> None:
    for p, e in zip(net.parameters(), expected, strict=True):
        assert torch.equal(p.detach(), e)


def assert_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].keys() == b[k].keys()
        for key in a[k]:
            assert torch.equal(torch.as_tensor(a[k][key]), torch.as_tensor(b[k][key])), (k, key)


def guarded_step(guard: StepGuard, net: nn.Module, x: Tensor, y: Tensor):
    guard.zero_grad()
    F.cross_entropy(net(x), y).backward()
    return guard.step()


# ---------------------------------------------------------------- the step is a transaction


@pytest.mark.parametrize("policy", ["monitor", "clip", "veto"])
def test_no_batch_is_refused_before_the_inner_step(policy: str) -> None:
    net = make_net()
    guard = StepGuard(torch.optim.Adam(net.parameters(), lr=0.1), model=net, policy=policy)
    x, y = data()
    guarded_step(guard, net, x, y)
    theta, state = params_of(net), optimizer_state(guard)
    net.eval()  # the forward is not a training forward: nothing to measure on
    guard.zero_grad()
    F.cross_entropy(net(x), y).backward()
    net.train()
    guard.engine.measured.capture.clear()
    with pytest.raises(NoBatchError, match="no training batch"):
        guard.step()
    assert_params(net, theta)
    assert_state(optimizer_state(guard), state)
    assert guard.engine.step_count == 1


def test_no_model_is_refused_before_the_inner_step() -> None:
    net = make_net()
    guard = StepGuard(torch.optim.SGD(net.parameters(), lr=0.1), policy="clip")
    x, y = data()
    F.cross_entropy(net(x), y).backward()
    theta = params_of(net)
    with pytest.raises(NoBatchError, match="model="):
        guard.step()
    assert_params(net, theta)


class TupleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = make_net()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.body(x)
        return z, z.sum()


@pytest.mark.parametrize("policy", ["clip", "veto"])
def test_an_error_in_the_measurement_rolls_the_step_back(policy: str) -> None:
    net = TupleNet()
    guard = StepGuard(torch.optim.Adam(net.parameters(), lr=0.5), model=net, policy=policy,
                      logits_fn=lambda out: out[0])
    x, y = data()
    guard.zero_grad()
    F.cross_entropy(net(x)[0], y).backward()
    guard.step()
    theta, state = params_of(net), optimizer_state(guard)
    guard.engine.measured.logits_fn = None  # now the tuple output cannot be read: a TypeError after the step
    guard.zero_grad()
    F.cross_entropy(net(x)[0], y).backward()
    with pytest.raises(TypeError, match="cannot find logits"):
        guard.step()
    assert_params(net, theta)
    assert_state(optimizer_state(guard), state)
    assert guard.engine.step_count == 1
    assert sum(guard.counters.values()) == 1


@pytest.mark.parametrize("changes_steps", [False, True])
def test_an_error_after_the_step_keeps_it_only_under_a_policy_that_never_changes_steps(
    changes_steps: bool,
) -> None:
    net = TupleNet()
    warn = stepguard.Rule(name="w", condition="r > 1", action="warn")
    clip = stepguard.Rule(name="c", condition="r > 1", action="clip")
    policy = stepguard.RulePolicy([warn, clip] if changes_steps else [warn], restore_optimizer_state=False)
    assert policy.changes_steps == changes_steps and not policy.needs_state_backup
    guard = StepGuard(torch.optim.SGD(net.parameters(), lr=0.5), model=net, policy=policy,
                      logits_fn=lambda out: out[0])
    x, y = data()
    F.cross_entropy(net(x)[0], y).backward()
    theta = params_of(net)
    guard.engine.measured.logits_fn = None  # the measurement raises after the inner step
    with pytest.raises(TypeError, match="cannot find logits"):
        guard.step()
    moved = any(not torch.equal(a, b) for a, b in zip(params_of(net), theta, strict=True))
    assert moved != changes_steps  # the optimizer's step stays, as without the guard, or θ₀ is back


class InterruptedNet(nn.Module):
    """Raises KeyboardInterrupt inside the guard's replay when armed."""

    def __init__(self) -> None:
        super().__init__()
        self.body = make_net()
        self.armed = False

    def forward(self, x: Tensor) -> Tensor:
        if self.armed and is_replaying():
            raise KeyboardInterrupt
        return self.body(x)


def test_ctrl_c_during_the_replay_rolls_the_step_back() -> None:
    net = InterruptedNet()
    guard = StepGuard(torch.optim.Adam(net.parameters(), lr=0.5), model=net, policy="clip")
    x, y = data()
    guarded_step(guard, net, x, y)
    theta, state = params_of(net), optimizer_state(guard)
    net.armed = True
    with pytest.raises(KeyboardInterrupt):
        guarded_step(guard, net, x, y)
    assert_params(net, theta)
    assert_state(optimizer_state(guard), state)
    net.armed = False
    report = guarded_step(guard, net, x, y)  # the guard is usable again
    assert report.step == 1


class FailingSGD(torch.optim.SGD):
    """Updates the first parameter, then fails: a partial inner step."""

    def step(self, closure: Callable | None = None):  # type: ignore[override]
        with torch.no_grad():
            first = self.param_groups[0]["params"][0]
            first.add_(first.grad, alpha=-1.0)
        raise RuntimeError("inner optimizer failed half-way")


def test_a_failing_inner_step_is_rolled_back() -> None:
    net = make_net()
    guard = StepGuard(FailingSGD(net.parameters(), lr=0.1), model=net, policy="clip")
    x, y = data()
    theta = params_of(net)
    with pytest.raises(RuntimeError, match="half-way"):
        guarded_step(guard, net, x, y)
    assert_params(net, theta)


def test_an_error_through_attach_rolls_the_step_back() -> None:
    net = InterruptedNet()
    opt = torch.optim.Adam(net.parameters(), lr=0.5)
    handle = stepguard.attach(opt, net, policy="veto")
    x, y = data()
    opt.zero_grad()
    F.cross_entropy(net(x), y).backward()
    opt.step()
    theta, state = params_of(net), optimizer_state(opt)
    net.armed = True
    opt.zero_grad()
    F.cross_entropy(net(x), y).backward()
    with pytest.raises(KeyboardInterrupt):
        opt.step()
    assert_params(net, theta)
    assert_state(optimizer_state(opt), state)
    handle.detach()


def test_a_sink_that_exits_leaves_the_guard_counted() -> None:
    class ExitingSink:
        def write(self, report) -> None:
            raise SystemExit(3)

        def flush(self) -> None:
            pass

        def close(self) -> None:
            pass

    net = make_net()
    guard = StepGuard(torch.optim.SGD(net.parameters(), lr=0.1), model=net, sinks=[ExitingSink()])
    x, y = data()
    with pytest.raises(SystemExit):
        guarded_step(guard, net, x, y)
    assert guard.engine.step_count == 1
    assert sum(guard.counters.values()) == 1
    assert guard.last_report is not None and guard.last_report.step == 0


# ---------------------------------------------------------------- no silent wrong r


def test_a_model_that_does_not_own_the_parameters_is_refused() -> None:
    net, other = make_net(), make_net()
    extra = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    guard = StepGuard(torch.optim.SGD([*net.parameters(), extra], lr=0.1), model=other, policy="clip")
    x, y = data()
    F.cross_entropy(net(x), y).backward()
    F.cross_entropy(other(x), y).backward()
    extra.grad = torch.ones_like(extra)
    theta = params_of(net)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\].*shape \(16, 6\)") as info:
        guard.step()
    assert "5 of the optimizer's" in str(info.value)
    assert_params(net, theta)


def test_a_parameter_unfrozen_later_is_measured() -> None:
    net = make_net()
    first = net[0]
    for p in first.parameters():
        p.requires_grad_(False)
    guard = StepGuard(torch.optim.SGD(net.parameters(), lr=0.5), model=net)
    x, y = data()
    guarded_step(guard, net, x, y)  # the layout is cached without the frozen layer
    for p in first.parameters():
        p.requires_grad_(True)
    theta = params_of(net)
    report = guarded_step(guard, net, x, y)
    delta = [p.detach() - t for p, t in zip(net.parameters(), theta, strict=True)]
    assert float(delta[0].abs().max()) > 0
    reference = copy.deepcopy(net)
    with torch.no_grad():
        for p, t in zip(reference.parameters(), theta, strict=True):
            p.copy_(t)
    expected = stepguard.radius(reference, x, delta)
    assert report.rho_a == pytest.approx(expected.rho_a, rel=1e-10)


def test_a_batch_with_no_counted_row_is_not_measured() -> None:
    net = make_net()
    guard = StepGuard(torch.optim.SGD(net.parameters(), lr=0.5), model=net, policy="monitor")
    x, y = data()
    nothing = torch.zeros(len(y), dtype=torch.bool)
    guard.zero_grad()
    F.cross_entropy(net(x), y).backward()
    first = guard.step(mask=nothing)
    assert not first.measured and math.isnan(first.r) and first.tau > 0
    assert "no row" in first.reason
    measured = guarded_step(guard, net, x, y)
    assert measured.measured and measured.r > 0
    guard.zero_grad()
    F.cross_entropy(net(x), y).backward()
    later = guard.step(mask=nothing)
    assert not later.measured and later.estimator == "estimate"
    assert later.r == pytest.approx(later.tau / measured.rho_a, rel=1e-12)
    assert "no row" in later.reason


def test_a_batch_with_no_counted_row_is_vetoed_under_clip_when_nothing_can_be_estimated() -> None:
    net = make_net()
    guard = StepGuard(torch.optim.SGD(net.parameters(), lr=0.5), model=net, policy="clip")
    x, y = data()
    theta = params_of(net)
    F.cross_entropy(net(x), y).backward()
    report = guard.step(mask=torch.zeros(len(y), dtype=torch.bool))
    assert report.action == "veto"
    assert_params(net, theta)


def test_outputs_that_are_not_softmax_logits_are_warned_about_once() -> None:
    net = make_net()
    guard = StepGuard(torch.optim.SGD(net.parameters(), lr=0.01), model=net)
    x = torch.randn(12, 6, dtype=torch.float64)
    target = torch.randn(12, 4, dtype=torch.float64)
    with pytest.warns(UserWarning, match="assume_logits=True") as caught:
        for _ in range(3):
            guard.zero_grad()
            F.mse_loss(net(x), target).backward()
            guard.step()
    assert sum("softmax logits" in str(w.message) for w in caught) == 1


@pytest.mark.parametrize(
    "loss_fn",
    [
        lambda z, y: F.cross_entropy(z, y),
        lambda z, y: F.cross_entropy(z, y, label_smoothing=0.1, reduction="sum"),
        lambda z, y: F.nll_loss(F.log_softmax(z, -1), y) + 1e-4 * torch.logsumexp(z, -1).square().mean(),
    ],
    ids=["ce", "label-smoothing", "z-loss"],
)
def test_softmax_losses_are_not_warned_about(loss_fn: Callable) -> None:
    net = make_net()
    guard = StepGuard(torch.optim.SGD(net.parameters(), lr=0.01), model=net)
    x, y = data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            guard.zero_grad()
            loss_fn(net(x), y).backward()
            guard.step()


def test_declared_logits_are_not_checked() -> None:
    net = make_net()
    guard = StepGuard(torch.optim.SGD(net.parameters(), lr=0.01), model=net,
                      config=GuardConfig(assume_logits=True))
    x = torch.randn(12, 6, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        F.mse_loss(net(x), torch.randn(12, 4, dtype=torch.float64)).backward()
        guard.step()


def test_double_guarding_is_an_error() -> None:
    net = make_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    guard = StepGuard(opt, model=net)
    with pytest.raises(RuntimeError, match="already guarded"):
        stepguard.attach(opt, net)
    with pytest.raises(RuntimeError, match="already guarded"):
        StepGuard(opt, model=net)
    guard.close()
    handle = stepguard.attach(opt, net)  # free again once the first guard is closed
    with pytest.raises(RuntimeError, match="already guarded"):
        stepguard.attach(opt, net)
    handle.detach()


class CountingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = make_net()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.body(x)


@pytest.mark.parametrize("estimator", ["jvp", "finite_difference"])
def test_the_replay_leaves_mutated_buffers_as_they_were(estimator: str) -> None:
    net = CountingNet()
    guard = StepGuard(torch.optim.SGD(net.parameters(), lr=0.1), model=net,
                      config=GuardConfig(estimator=estimator))
    x, y = data()
    for _ in range(3):
        guarded_step(guard, net, x, y)
    assert int(net.calls) == 3


# ---------------------------------------------------------------- sparse gradients


class SparseNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8, sparse=True).double()
        self.head = nn.Linear(8, 5).double()

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.embed(tokens))


@pytest.mark.parametrize("policy", ["monitor", "clip", "veto"])
@pytest.mark.parametrize("make_opt", [
    lambda net: torch.optim.SGD(net.parameters(), lr=0.5),
    lambda net: torch.optim.Adagrad(net.parameters(), lr=0.5),
], ids=["sgd", "adagrad"])
def test_sparse_gradients_work_under_every_policy(policy: str, make_opt: Callable) -> None:
    net = SparseNet()
    plain = copy.deepcopy(net)
    opt, plain_opt = make_opt(net), make_opt(plain)
    guard = StepGuard(opt, model=net, policy=VetoPolicy(max_r=1e-9) if policy == "veto" else policy)
    tokens, y = torch.randint(0, 20, (10,)), torch.randint(0, 5, (10,))
    theta = params_of(net)
    F.cross_entropy(net(tokens), y).backward()
    F.cross_entropy(plain(tokens), y).backward()
    dense = [p.grad.to_dense() for p in plain.parameters()]
    assert net.embed.weight.grad.is_sparse
    report = guard.step()
    plain_opt.step()
    assert report.grad_norm == pytest.approx(math.sqrt(sum(float(g.square().sum()) for g in dense)), rel=1e-12)
    delta = [p.detach() - t for p, t in zip(plain.parameters(), theta, strict=True)]
    reference = copy.deepcopy(net)
    with torch.no_grad():
        for p, t in zip(reference.parameters(), theta, strict=True):
            p.copy_(t)
    assert report.rho_a == pytest.approx(stepguard.radius(reference, tokens, delta).rho_a, rel=1e-10)
    if report.action == "veto":
        assert_params(net, theta)
    else:
        expected = [t + report.scale * d for t, d in zip(theta, delta, strict=True)]
        for p, e in zip(net.parameters(), expected, strict=True):
            torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-12)
    assert report.action == {"monitor": "allow", "clip": report.action, "veto": "veto"}[policy]


def test_sparse_adam_is_guarded() -> None:
    embed = nn.Embedding(30, 6, sparse=True).double()
    guard = StepGuard(torch.optim.SparseAdam(embed.parameters(), lr=0.1), model=embed, policy="veto")
    tokens = torch.randint(0, 30, (16,))
    for _ in range(2):
        guard.zero_grad()
        F.cross_entropy(embed(tokens), torch.randint(0, 6, (16,))).backward()
        report = guard.step()
    assert math.isfinite(report.r) and report.grad_norm is not None


# ---------------------------------------------------------------- repeated vetoes escalate


def test_repeated_vetoes_warn_then_halt() -> None:
    net = make_net()
    config = GuardConfig(veto_warning_after=3, halt_after_vetoes=5)
    guard = StepGuard(torch.optim.SGD(net.parameters(), lr=0.1), model=net,
                      policy=VetoPolicy(max_r=1e-12), config=config)
    x, y = data()
    theta = params_of(net)
    with pytest.warns(UserWarning, match="3 steps in a row were vetoed"):
        for _ in range(4):
            assert guarded_step(guard, net, x, y).action == "veto"
    with pytest.raises(HaltTraining, match="5 steps in a row"):
        for _ in range(2):
            guarded_step(guard, net, x, y)
    assert guard.engine.step_count == 5
    assert_params(net, theta)


def test_an_applied_step_resets_the_veto_count() -> None:
    net = make_net()
    policy = VetoPolicy(max_r=1e-12)
    guard = StepGuard(torch.optim.SGD(net.parameters(), lr=0.1), model=net, policy=policy,
                      config=GuardConfig(halt_after_vetoes=2, veto_warning_after=None))
    x, y = data()
    guarded_step(guard, net, x, y)
    guard.engine.policy = VetoPolicy(max_r=1e9)
    guarded_step(guard, net, x, y)
    guard.engine.policy = policy
    guarded_step(guard, net, x, y)  # one veto after an applied step: no halt
    assert guard.counters["veto"] == 2


class FailsOnceSGD(torch.optim.SGD):
    """Updates the first parameter, then fails, on its first step only."""

    failed = False

    def step(self, closure: Callable | None = None):  # type: ignore[override]
        if not self.failed:
            self.failed = True
            with torch.no_grad():
                first = self.param_groups[0]["params"][0]
                first.add_(first.grad, alpha=-1.0)
            raise RuntimeError("inner optimizer failed half-way")
        return super().step(closure)


def test_a_failing_inner_step_is_rolled_back_through_attach() -> None:
    net = make_net()
    opt = FailsOnceSGD(net.parameters(), lr=0.1)
    scheduler_before = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    handle = stepguard.attach(opt, net, policy="clip")
    scheduler_after = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # wraps step again
    x, y = data()
    theta = params_of(net)
    F.cross_entropy(net(x), y).backward()
    with pytest.raises(RuntimeError, match="half-way"):
        opt.step()
    assert_params(net, theta)
    report = (opt.step(), handle.last_report)[1]  # the same gradients, now a whole step
    assert report.step == 0 and report.tau > 0
    scheduler_before.step()
    scheduler_after.step()
    handle.detach()
    F.cross_entropy(net(x), y).backward()
    opt.step()  # detached: the wrapper the second scheduler wrapped is a pass-through now
    assert handle.last_report is report


def test_clip_without_a_state_copy_still_puts_the_parameters_back() -> None:
    net = TupleNet()
    guard = StepGuard(torch.optim.Adam(net.parameters(), lr=0.5), model=net,
                      policy=ClipPolicy(restore_optimizer_state=False))
    x, y = data()
    theta = params_of(net)
    F.cross_entropy(net(x)[0], y).backward()
    with pytest.raises(TypeError, match="cannot find logits"):
        guard.step()
    assert_params(net, theta)
