"""The guard's contracts: it measures the real update, clips and vetoes exactly, never
changes a monitored step, and works with everything an optimizer must work with."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stepguard
from stepguard import ClipPolicy, GuardConfig, StepGuard, VetoPolicy
from stepguard.engine import NoBatchError


def make_net(dropout: float = 0.0, dtype: torch.dtype = torch.float32) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(6, 16), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(16, 4))
    return nn.Sequential(*layers).to(dtype)


def batch(n: int = 12, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 6, dtype=dtype), torch.randint(0, 4, (n,))


def backward(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    return loss


def params_of(net: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def state_of(opt: torch.optim.Optimizer) -> dict:
    return copy.deepcopy(opt.state_dict()["state"])


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].keys() == b[k].keys()
        for key in a[k]:
            assert torch.equal(torch.as_tensor(a[k][key]), torch.as_tensor(b[k][key])), (k, key)


def twin(net: nn.Module, lr: float = 1e-2) -> tuple[nn.Module, torch.optim.Optimizer]:
    other = copy.deepcopy(net)
    return other, torch.optim.Adam(other.parameters(), lr=lr)


def test_report_measures_the_optimizers_actual_update() -> None:
    net = make_net(dtype=torch.float64)
    x, y = batch(dtype=torch.float64)
    ref_net, ref_opt = twin(net)
    guard = StepGuard(torch.optim.Adam(net.parameters(), lr=1e-2), model=net)
    theta0 = params_of(net)
    backward(net, x, y)
    report = guard.step()
    backward(ref_net, x, y)
    ref_opt.step()
    delta = [p1.detach() - p0 for p1, p0 in zip(ref_net.parameters(), theta0, strict=True)]
    tau = math.sqrt(sum(float((d * d).sum()) for d in delta))
    assert report.tau == pytest.approx(tau, rel=1e-12)
    ref_model = copy.deepcopy(net)
    with torch.no_grad():
        for p, p0 in zip(ref_model.parameters(), theta0, strict=True):
            p.copy_(p0)
    expected = stepguard.radius(ref_model, x, delta)
    assert report.rho_a == pytest.approx(expected.rho_a, rel=1e-10)
    assert report.delta_a == pytest.approx(expected.delta_a, rel=1e-10)
    assert report.r == pytest.approx(tau / expected.rho_a, rel=1e-10)
    assert report.spread.max == pytest.approx(expected.delta_a, rel=1e-10)
    assert report.spread.count == x.shape[0]
    assert report.estimator == "jvp" and report.measured
    assert report.action == "allow" and report.scale == 1.0 and report.applied_tau == report.tau
    assert len(report.binding) == 5
    assert report.step == 0


def test_monitor_never_changes_a_step_even_with_dropout() -> None:
    net = make_net(dropout=0.3)
    ref_net, ref_opt = twin(net)
    guard = StepGuard(torch.optim.Adam(net.parameters(), lr=1e-2), model=net, policy="monitor")
    torch.manual_seed(5)
    for _ in range(4):
        x, y = batch()
        guard.zero_grad()
        backward(net, x, y)
        guard.step()
    torch.manual_seed(5)
    for _ in range(4):
        x, y = batch()
        ref_opt.zero_grad()
        backward(ref_net, x, y)
        ref_opt.step()
    for p, q in zip(net.parameters(), ref_net.parameters(), strict=True):
        assert torch.equal(p, q)
    assert_same_state(state_of(guard.optimizer), state_of(ref_opt))


def test_clip_applies_theta0_plus_scaled_update_and_keeps_optimizer_state() -> None:
    net = make_net(dtype=torch.float64)
    x, y = batch(dtype=torch.float64)
    ref_net, ref_opt = twin(net, lr=5.0)
    guard = StepGuard(torch.optim.Adam(net.parameters(), lr=5.0), model=net, policy=ClipPolicy(0.5))
    theta0 = params_of(net)
    backward(net, x, y)
    report = guard.step()
    backward(ref_net, x, y)
    ref_opt.step()
    assert report.action == "clip" and report.r > 0.5
    scale = 0.5 * report.rho_a / report.tau
    assert report.scale == pytest.approx(scale, rel=1e-12)
    for p, p0, p1 in zip(net.parameters(), theta0, ref_net.parameters(), strict=True):
        expected = torch.add(p0, p1.detach() - p0, alpha=report.scale)
        assert torch.equal(p.detach(), expected)
    assert report.applied_tau == pytest.approx(0.5 * report.rho_a, rel=1e-12)
    assert_same_state(state_of(guard.optimizer), state_of(ref_opt))


def test_clip_leaves_small_steps_alone() -> None:
    net = make_net()
    x, y = batch()
    ref_net, ref_opt = twin(net, lr=1e-5)
    guard = StepGuard(torch.optim.Adam(net.parameters(), lr=1e-5), model=net, policy="clip")
    backward(net, x, y)
    report = guard.step()
    backward(ref_net, x, y)
    ref_opt.step()
    assert report.action == "allow" and report.r < 1
    for p, q in zip(net.parameters(), ref_net.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("warm_steps", [0, 2])
def test_veto_restores_parameters_and_optimizer_state_bit_for_bit(warm_steps: int) -> None:
    net = make_net()
    policy = VetoPolicy(max_r=1.0)
    guard = StepGuard(torch.optim.Adam(net.parameters(), lr=1e-4), model=net, policy=policy)
    for _ in range(warm_steps):
        guard.zero_grad()
        backward(net, *batch())
        assert guard.step().action == "allow"
    before_params, before_state = params_of(net), state_of(guard.optimizer)
    for group in guard.param_groups:
        group["lr"] = 100.0
    guard.zero_grad()
    backward(net, *batch())
    report = guard.step()
    assert report.action == "veto" and report.scale == 0.0 and report.applied_tau == 0.0
    for p, p0 in zip(net.parameters(), before_params, strict=True):
        assert torch.equal(p.detach(), p0)
    assert_same_state(state_of(guard.optimizer), before_state)
    assert guard.counters["veto"] == 1


@pytest.mark.parametrize("policy", ["clip", "veto"])
def test_presets_veto_a_non_finite_update(policy: str) -> None:
    net = make_net()
    guard = StepGuard(torch.optim.SGD(net.parameters(), lr=0.1), model=net, policy=policy)
    before = params_of(net)
    backward(net, *batch())
    net[0].weight.grad[0, 0] = float("nan")
    report = guard.step()
    assert report.action == "veto" and report.rule == "nonfinite"
    assert math.isnan(report.tau)
    for p, p0 in zip(net.parameters(), before, strict=True):
        assert torch.equal(p.detach(), p0)


def test_monitor_reports_but_allows_a_non_finite_update() -> None:
    net = make_net()
    guard = StepGuard(torch.optim.SGD(net.parameters(), lr=0.1), model=net)
    backward(net, *batch())
    net[0].weight.grad[0, 0] = float("inf")
    assert guard.step().action == "allow"


def test_lr_scheduler_and_several_param_groups_and_frozen_params() -> None:
    net = make_net()
    net[0].bias.requires_grad_(False)
    opt = torch.optim.SGD(
        [{"params": [net[0].weight], "lr": 0.1}, {"params": [net[2].weight, net[2].bias], "lr": 0.01}],
        momentum=0.9,
    )
    guard = StepGuard(opt, model=net, policy="clip")
    sched = torch.optim.lr_scheduler.StepLR(guard, step_size=1, gamma=0.5)
    for _ in range(3):
        guard.zero_grad()
        backward(net, *batch())
        report = guard.step()
        sched.step()
        assert math.isfinite(report.r)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.01 * 0.5**3)


def test_parameters_without_grads_do_not_move_and_do_not_break_the_measurement() -> None:
    net = make_net()
    unused = nn.Parameter(torch.randn(3))
    guard = StepGuard(torch.optim.Adam([*net.parameters(), unused], lr=1e-2), model=net)
    before = unused.detach().clone()
    backward(net, *batch())
    report = guard.step()
    assert torch.equal(unused.detach(), before)
    assert math.isfinite(report.rho_a)


def test_closure_optimizer_lbfgs() -> None:
    net = make_net(dtype=torch.float64)
    x, y = batch(dtype=torch.float64)
    guard = StepGuard(torch.optim.LBFGS(net.parameters(), lr=0.5, max_iter=4), model=net, policy="clip")
    calls = 0

    def closure() -> torch.Tensor:
        nonlocal calls
        calls += 1
        guard.zero_grad()
        return backward(net, x, y)

    report = guard.step(closure)
    assert calls >= 1
    assert report.loss is not None and math.isfinite(report.loss)
    assert math.isfinite(report.r)


def test_grad_scaler_steps_through_the_guard() -> None:
    net = make_net()
    guard = StepGuard(torch.optim.SGD(net.parameters(), lr=0.1), model=net, policy="clip")
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = batch()
    before = params_of(net)
    scaler.scale(F.cross_entropy(net(x), y)).backward()
    scaler.step(guard)
    scaler.update()
    assert guard.last_report is not None and guard.last_report.step == 0
    assert any(not torch.equal(p.detach(), p0) for p, p0 in zip(net.parameters(), before, strict=True))
    # an overflowing step is skipped by the scaler before the guard sees it
    guard.zero_grad()
    scaler.scale(F.cross_entropy(net(x), y) * float("inf")).backward()
    scaler.step(guard)
    assert guard.last_report.step == 0


def test_state_dict_round_trip_keeps_the_guards_counters() -> None:
    net = make_net()
    guard = StepGuard(torch.optim.Adam(net.parameters(), lr=50.0), model=net, policy="clip")
    for _ in range(2):
        guard.zero_grad()
        backward(net, *batch())
        guard.step()
    saved = guard.state_dict()
    assert saved["stepguard"]["step"] == 2 and saved["stepguard"]["counters"]["clip"] == 2
    fresh_net = copy.deepcopy(net)
    fresh = StepGuard(torch.optim.Adam(fresh_net.parameters(), lr=50.0), model=fresh_net, policy="clip")
    fresh.load_state_dict(saved)
    assert fresh.counters == guard.counters
    assert_same_state(state_of(fresh.optimizer), state_of(guard.optimizer))
    backward(fresh_net, *batch())
    assert fresh.step().step == 2
    # a plain optimizer checkpoint loads too, and leaves the guard's counters alone
    fresh.load_state_dict(guard.optimizer.state_dict())
    assert_same_state(state_of(fresh.optimizer), state_of(guard.optimizer))
    assert fresh.engine.step_count == 3


def test_attach_gives_the_same_reports_and_detaches() -> None:
    net = make_net(dtype=torch.float64)
    ref_net = copy.deepcopy(net)
    opt = torch.optim.Adam(net.parameters(), lr=3.0)
    handle = stepguard.attach(opt, net, policy="clip")
    guard = StepGuard(torch.optim.Adam(ref_net.parameters(), lr=3.0), model=ref_net, policy="clip")
    x, y = batch(dtype=torch.float64)
    backward(net, x, y)
    opt.step()
    backward(ref_net, x, y)
    expected = guard.step()
    got = handle.last_report
    assert got is not None and got.action == expected.action == "clip"
    assert got.r == pytest.approx(expected.r, rel=1e-12)
    for p, q in zip(net.parameters(), ref_net.parameters(), strict=True):
        assert torch.equal(p, q)
    handle.detach()
    opt.zero_grad()
    backward(net, x, y)
    opt.step()
    assert handle.last_report is got
    handle.detach()


def test_explicit_inputs_and_targets() -> None:
    net = make_net()
    guard = StepGuard(torch.optim.SGD(net.parameters(), lr=0.1), model=net, config=GuardConfig(binding_k=2))
    x, y = batch()
    with torch.no_grad():
        loss = F.cross_entropy(net(x), y)
    net.zero_grad()
    out = net(x)
    F.cross_entropy(out, y).backward()
    report = guard.step(inputs=x, targets=y, loss=loss)
    assert report.loss == pytest.approx(float(loss))
    assert len(report.binding) == 2


def test_sequence_mask_and_ignore_index_in_the_guard() -> None:
    emb, head = nn.Embedding(9, 5), nn.Linear(5, 9)
    net = nn.Sequential(emb, nn.Tanh(), head)
    guard = StepGuard(torch.optim.SGD(net.parameters(), lr=0.5), model=net)
    tokens = torch.randint(0, 9, (2, 6))
    targets = torch.randint(0, 9, (2, 6))
    targets[1, 2:] = -100
    F.cross_entropy(net(tokens).reshape(-1, 9), targets.reshape(-1), ignore_index=-100).backward()
    report = guard.step(targets=targets)
    assert report.spread.count == int((targets != -100).sum())
    assert all(0 <= i < 12 and targets.reshape(-1)[i] != -100 for i in report.binding)


def test_sink_failures_never_stop_training(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        name = "broken"

        def write(self, report):
            raise OSError("disk full")

        def flush(self):
            pass

        def close(self):
            pass

    net = make_net()
    guard = StepGuard(torch.optim.SGD(net.parameters(), lr=0.1), model=net, sinks=[Broken()])
    for _ in range(3):
        guard.zero_grad()
        backward(net, *batch())
        guard.step()
    assert guard.engine.sinks.failures["broken"] == 3
    assert sum("disk full" in r.message for r in caplog.records) == 1


def test_no_captured_batch_is_a_clear_error() -> None:
    net = make_net()
    guard = StepGuard(torch.optim.SGD(net.parameters(), lr=0.1), model=net)
    with torch.no_grad():
        net(torch.randn(2, 6))
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(NoBatchError, match="no training batch"):
        guard.step()


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda net: StepGuard("adam", model=net), "torch.optim.Optimizer"),
        (lambda net: StepGuard(torch.optim.SGD(net.parameters(), lr=1), model=lambda x: x), "nn.Module"),
        (
            lambda net: StepGuard(torch.optim.SGD(net.parameters(), lr=1), model=net, policy="yolo"),
            "unknown policy",
        ),
        (lambda net: StepGuard(StepGuard(torch.optim.SGD(net.parameters(), lr=1), model=net)), "already"),
    ],
)
def test_bad_construction_is_a_clear_error(make, match) -> None:
    with pytest.raises((TypeError, ValueError), match=match):
        make(make_net())


def test_config_rejects_misspelt_keys() -> None:
    with pytest.raises(Exception, match="measure_evry"):
        GuardConfig(measure_evry=2)


def test_batchnorm_buffers_are_not_touched_by_the_measurement() -> None:
    net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))
    guard = StepGuard(torch.optim.SGD(net.parameters(), lr=0.1), model=net)
    x, y = batch()
    backward(net, x, y)  # the training forward updates the running stats once
    after_forward = {n: b.clone() for n, b in net.named_buffers()}
    guard.step()
    for n, b in net.named_buffers():
        assert torch.equal(b, after_forward[n]), n


def test_a_halting_decision_commits_reports_then_raises() -> None:
    from stepguard import Decision, HaltTraining, Policy

    class HaltOnSecond(Policy):
        name = "halt_on_second"

        def __init__(self) -> None:
            self.seen = 0

        def decide(self, report):
            self.seen += 1
            if self.seen == 2:
                return Decision("veto", 0.0, "second step", "halt_rule", halt=True)
            return Decision()

    written = []

    class Collect:
        def write(self, report):
            written.append(report)

        def flush(self):
            pass

        def close(self):
            pass

    net = make_net()
    guard = StepGuard(torch.optim.SGD(net.parameters(), lr=0.1), model=net, policy=HaltOnSecond(), sinks=[Collect()])
    backward(net, *batch())
    guard.step()
    before = params_of(net)
    guard.zero_grad()
    backward(net, *batch())
    with pytest.raises(HaltTraining, match="step 1: second step") as info:
        guard.step()
    assert info.value.step == 1 and written[-1].action == "veto"
    for p, p0 in zip(net.parameters(), before, strict=True):
        assert torch.equal(p.detach(), p0)
    assert guard.engine.rule_counters == {"halt_rule": 1}
    assert json.loads(guard.state_dict()["stepguard"]["rule_counters"]) == {"halt_rule": 1}


def test_fsdp_models_are_refused_with_a_clear_message() -> None:
    class FSDPModule(nn.Module):  # stands in for torch's sharded wrapper (same class name)
        def __init__(self) -> None:
            super().__init__()
            self.inner = make_net()

    model = FSDPModule()
    with pytest.raises(NotImplementedError, match="FSDP"):
        StepGuard(torch.optim.SGD(model.parameters(), lr=0.1), model=model)


def test_a_veto_can_keep_the_optimizer_state_update() -> None:
    from stepguard import Decision, Policy

    class SkipKeepState(Policy):
        name = "skip_keep_state"
        needs_state_backup = False  # a veto puts the parameters back, not the optimizer state

        def decide(self, report):
            return Decision("veto", 0.0, "skip", "skip")

    net = make_net()
    ref_net, ref_opt = twin(net, lr=1e-2)
    guard = StepGuard(torch.optim.Adam(net.parameters(), lr=1e-2), model=net, policy=SkipKeepState())
    x, y = batch()
    before = params_of(net)
    backward(net, x, y)
    report = guard.step()
    backward(ref_net, x, y)
    ref_opt.step()
    assert report.action == "veto"
    for p, p0 in zip(net.parameters(), before, strict=True):
        assert torch.equal(p.detach(), p0)
    assert_same_state(state_of(guard.optimizer), state_of(ref_opt))  # moments moved as in plain Adam


def test_the_guard_config_restore_knob_names_its_replacement() -> None:
    with pytest.raises(ValueError, match="restore_optimizer_state=False"):
        GuardConfig(restore_state_on_veto=False)


def test_a_preset_veto_without_restore_keeps_the_optimizer_state_update() -> None:
    net = make_net()
    ref_net, ref_opt = twin(net, lr=1e-2)
    policy = VetoPolicy(1e-9, restore_optimizer_state=False)
    guard = StepGuard(torch.optim.Adam(net.parameters(), lr=1e-2), model=net, policy=policy)
    x, y = batch()
    before = params_of(net)
    backward(net, x, y)
    report = guard.step()
    backward(ref_net, x, y)
    ref_opt.step()
    assert report.action == "veto"
    for p, p0 in zip(net.parameters(), before, strict=True):
        assert torch.equal(p.detach(), p0)
    assert_same_state(state_of(guard.optimizer), state_of(ref_opt))


def test_optimizer_step_hooks_run_around_the_guarded_step() -> None:
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    torch.manual_seed(0)
    net = make_net()
    guard = StepGuard(torch.optim.SGD(net.parameters(), lr=0.1), model=net)
    calls: list[tuple[str, object, dict]] = []

    def pre(opt, args, kwargs):
        calls.append(("pre", opt, dict(kwargs)))
        return args, {**kwargs, "loss": 3.0}  # a pre-hook may replace the arguments

    handles = [
        guard.register_step_pre_hook(pre),
        guard.register_step_post_hook(lambda opt, args, kwargs: calls.append(("post", opt, dict(kwargs)))),
        register_optimizer_step_pre_hook(lambda opt, args, kwargs: calls.append(("global pre", opt, {}))),
        register_optimizer_step_post_hook(lambda opt, args, kwargs: calls.append(("global post", opt, {}))),
    ]
    try:
        x, y = batch()
        backward(net, x, y)
        report = guard.step(targets=y)
    finally:
        for handle in handles:
            handle.remove()
    # the inner SGD's own wrapper runs the global hooks once more, for itself
    assert [(name, opt is guard) for name, opt, _ in calls] == [
        ("global pre", True), ("pre", True), ("global pre", False), ("global post", False),
        ("post", True), ("global post", True),
    ]
    assert calls[1][2] == {"targets": y} and calls[4][2]["loss"] == 3.0
    assert report.loss == 3.0


def test_the_guarded_step_shows_in_the_profiler() -> None:
    from torch.profiler import profile

    torch.manual_seed(0)
    net = make_net()
    guard = StepGuard(torch.optim.SGD(net.parameters(), lr=0.1), model=net)
    x, y = batch()
    backward(net, x, y)
    with profile() as prof:
        guard.step()
    assert "Optimizer.step#StepGuard.step" in {event.name for event in prof.events()}


def test_timings_split_the_measurement_into_jvp_and_statistics() -> None:
    torch.manual_seed(0)
    net = make_net()
    guard = StepGuard(torch.optim.Adam(net.parameters(), lr=1e-3), model=net, config=GuardConfig(measure_every=2))
    phases = []
    for _ in range(4):
        x, y = batch()
        backward(net, x, y)
        report = guard.step(targets=y)
        guard.zero_grad()
        phases.append((report.measured, set(report.timings)))
    for measured, keys in phases:
        assert {"snapshot", "optimizer", "diff", "measure", "decide", "commit"} <= keys
        assert ({"jvp", "statistics"} <= keys) == measured
    assert [m for m, _ in phases] == [True, False, True, False]
