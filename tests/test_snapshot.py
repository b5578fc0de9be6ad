"""θ₀ and Δθ in flat buffers: bitwise the per-tensor values, whatever the dtypes and layouts."""

from __future__ import annotations

import math

import pytest
import torch

from stepguard.diagnostics import update_param_cosine
from stepguard.snapshot import ParameterSnapshot


def _params() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    conv = torch.randn(4, 3, 3, 3, generator=gen).to(memory_format=torch.channels_last)
    return [
        torch.nn.Parameter(torch.randn(5, 7, generator=gen)),
        torch.nn.Parameter(conv),
        torch.nn.Parameter(torch.randn(7, generator=gen, dtype=torch.float64)),
        torch.nn.Parameter(torch.randn(5, 7, generator=gen).t()),  # not contiguous
        torch.nn.Parameter(torch.tensor(0.5)),
    ]


def _move(params: list[torch.Tensor]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 1e-3)
    return params


def test_difference_is_bitwise_the_per_tensor_difference_in_the_optimizer_order() -> None:
    params = _params()
    snapshot = ParameterSnapshot()
    assert snapshot.bind(params) and not snapshot.bind(list(params))
    snapshot.take()
    before = [p.detach().clone() for p in params]
    _move(params)
    update = snapshot.difference()
    assert len(snapshot.groups) == 2  # float32 and float64
    for view, p, p0, theta0 in zip(update.views(), params, before, snapshot.theta0, strict=True):
        assert view.shape == p.shape and view.dtype == p.dtype
        assert torch.equal(view, p.detach() - p0)
        assert torch.equal(theta0, p0)
    squares = [float(torch.sum((p.detach().double() - p0.double()) ** 2)) for p, p0 in zip(params, before, strict=True)]
    assert update.tau.item() == pytest.approx(math.sqrt(math.fsum(squares)), rel=1e-6)
    assert update.tau.dtype == torch.float64  # a float64 group widens τ


def test_sketch_and_cosine_with_theta0() -> None:
    params = _params()
    snapshot = ParameterSnapshot()
    snapshot.bind(params)
    snapshot.take()
    before = [p.detach().clone() for p in params]
    _move(params)
    update = snapshot.difference()
    expected = update_param_cosine(update.views(), before).item()
    assert update.cosine_with_theta0().item() == pytest.approx(expected, rel=1e-6)
    indices = snapshot.sketch_indices(16)
    flats = [torch.cat([p.detach().reshape(-1) - p0.reshape(-1) for p, p0 in group]) for group in (
        [(params[i], before[i]) for i in g.positions] for g in snapshot.groups
    )]
    sketch = update.sketch(indices)
    assert torch.equal(sketch, torch.cat([f.double()[i] for f, i in zip(flats, indices, strict=True)]))
    small = snapshot.sketch_indices(10_000)  # a group smaller than the sample keeps every coordinate
    assert [len(i) for i in small] == [g.theta0.numel() for g in snapshot.groups]


def test_a_new_parameter_list_rebinds() -> None:
    params = _params()
    snapshot = ParameterSnapshot()
    snapshot.bind(params)
    assert snapshot.bind(params[:2])
    snapshot.take()
    assert [t.shape for t in snapshot.theta0] == [p.shape for p in params[:2]]


def test_the_jvp_does_not_give_the_flat_snapshot_a_tangent_per_parameter() -> None:
    from stepguard import GuardConfig, StepGuard
    from stepguard.tools.bench import _cpu_allocations

    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(24)])  # 48 tensors
    guard = StepGuard(torch.optim.SGD(net.parameters(), lr=0.1), model=net, config=GuardConfig())
    x = torch.randn(8, 32)
    param_bytes = sum(p.numel() * p.element_size() for p in net.parameters())

    def step() -> None:
        guard.zero_grad()
        net(x).square().mean().backward()
        guard.step()

    step()
    peak, _, _ = _cpu_allocations(step)
    # θ₀ is resident already and the gradients are the plain step's. The measurement's one
    # copy is Δθ: the tangent is Δθ scaled in place and the primals alias θ₀ (a unit tangent
    # and primal copies made this about 4 copies; a primal that is a view of the flat buffer
    # would add one whole copy per parameter tensor, 48).
    assert peak < 3 * param_bytes, peak / param_bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("size", [1e-9, 3e-3, 0.7, 5.0])
def test_scaling_the_update_near_unit_length_comes_back_bit_for_bit(dtype: torch.dtype, size: float) -> None:
    params = [p.detach().to(dtype).requires_grad_() for p in _params()[:2]]
    snapshot = ParameterSnapshot()
    snapshot.bind(params)
    snapshot.take()
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * size)
    update = snapshot.difference()
    before = [f.clone() for f in update.flats]
    tau = float(update.tau)
    with update.scaled_near_unit() as scaled_tau:
        if tau == 0:  # a half-precision step too small to change the parameters
            assert float(scaled_tau) == 0 and all(torch.equal(f, b) for f, b in zip(update.flats, before, strict=True))
            return
        power = float(scaled_tau) / tau
        assert power == 2.0 ** round(math.log2(power))  # a power of two
        assert power == 1.0 if tau >= 1 else 1 < float(scaled_tau) <= 2 or power == 2.0**14
        assert all(torch.equal(f, b * power) for f, b in zip(update.flats, before, strict=True))
    assert all(torch.equal(f, b) for f, b in zip(update.flats, before, strict=True))


def test_cosine_with_theta0_of_one_group_and_of_a_still_step() -> None:
    params = [p for p in _params() if p.dtype == torch.float32]
    snapshot = ParameterSnapshot()
    snapshot.bind(params)
    snapshot.take()
    assert len(snapshot.groups) == 1
    assert snapshot.difference().cosine_with_theta0().item() == 0.0  # Δθ = 0
    before = [p.detach().clone() for p in params]
    _move(params)
    update = snapshot.difference()
    expected = update_param_cosine(update.views(), before).item()
    assert update.cosine_with_theta0().item() == pytest.approx(expected, rel=1e-5)


def test_a_model_converted_after_the_guard_was_built_is_measured_in_its_new_dtype() -> None:
    from stepguard import StepGuard

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    guard = StepGuard(torch.optim.SGD(net.parameters(), lr=0.1), model=net)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    torch.nn.functional.cross_entropy(net(x), y).backward()
    guard.step()
    guard.zero_grad()
    net.double()  # the optimizer keeps the same parameter objects, now float64
    before = [p.detach().clone() for p in net.parameters()]
    torch.nn.functional.cross_entropy(net(x.double()), y).backward()
    report = guard.step()
    moved = [p.detach() - b for p, b in zip(net.parameters(), before, strict=True)]
    assert report.measured and report.estimator == "jvp"
    assert report.tau == pytest.approx(math.sqrt(sum(float(m.square().sum()) for m in moved)), rel=1e-12)


def test_on_the_cpu_the_difference_reuses_its_buffer_and_stays_bitwise() -> None:
    params = _params()
    snapshot = ParameterSnapshot()
    snapshot.bind(params)
    snapshot.take()
    first = snapshot.difference()
    pointers = [f.data_ptr() for f in first.flats]
    _move(params)
    second = snapshot.difference()
    assert [f.data_ptr() for f in second.flats] == pointers  # no allocation per step
    per_tensor = [(p - t).reshape(-1) for p, t in zip(params, snapshot.theta0, strict=True)]
    got = [v.reshape(-1) for v in second.views()]
    assert all(torch.equal(g, d) for g, d in zip(got, per_tensor, strict=True))
    snapshot.bind(_params())  # another parameter list: new buffers
    snapshot.take()
    assert all(f.data_ptr() not in pointers for f in snapshot.difference().flats)
