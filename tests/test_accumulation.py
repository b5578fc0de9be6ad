"""Gradient accumulation: a step is measured on every micro-batch its update came from.

And the per-row statistics run over chunks of rows, so no temporary grows with the
vocabulary times the number of tokens.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import stepguard
from stepguard import GuardConfig, StepGuard
from stepguard.measure import batch_columns, summarize_columns


def make_net() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 5)).double()


def micro_batches(k: int = 4, n: int = 6) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 6, generator=gen, dtype=torch.float64), torch.randint(0, 5, (n,), generator=gen))
            for _ in range(k)]


def reference_spreads(net: nn.Module, theta0: list[Tensor], parts, delta: list[Tensor]) -> list[float]:
    """Δ_a of each micro-batch alone, by stepguard.radius on a copy of the model at θ₀."""
    reference = copy.deepcopy(net)
    with torch.no_grad():
        for p, t in zip(reference.parameters(), theta0, strict=True):
            p.copy_(t)
    return [stepguard.radius(reference, x, delta).delta_a for x, _ in parts]


@pytest.mark.parametrize("how", ["wrapper", "attach"])
def test_every_micro_batch_counts(how: str) -> None:
    net = make_net()
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    guard = StepGuard(opt, model=net) if how == "wrapper" else stepguard.attach(opt, net)
    parts = micro_batches()
    theta0 = [p.detach().clone() for p in net.parameters()]
    opt.zero_grad()
    for x, y in parts:
        (F.cross_entropy(net(x), y) / len(parts)).backward()
    report = guard.step() if how == "wrapper" else (opt.step(), guard.last_report)[1]
    delta = [p.detach() - t for p, t in zip(net.parameters(), theta0, strict=True)]
    spreads = reference_spreads(net, theta0, parts, delta)
    assert report.delta_a == pytest.approx(max(spreads), rel=1e-10)
    assert report.delta_a > min(spreads)  # the last micro-batch alone would not do
    assert report.spread.count == sum(len(y) for _, y in parts)
    tau = math.sqrt(sum(float(d.square().sum()) for d in delta))
    assert report.r == pytest.approx(tau * max(spreads) / math.pi, rel=1e-10)


def test_targets_per_micro_batch_mask_each_ones_ignored_rows() -> None:
    net = make_net()
    guard = StepGuard(torch.optim.SGD(net.parameters(), lr=0.1), model=net)
    parts = micro_batches(k=2)
    targets = [y.clone() for _, y in parts]
    targets[0][:4] = -100
    targets[1][1] = -100
    for (x, _), y in zip(parts, targets, strict=True):
        F.cross_entropy(net(x), y).backward()
    report = guard.step(targets=targets)
    assert report.spread.count == sum(int((y != -100).sum()) for y in targets)


def test_one_targets_tensor_for_several_micro_batches_is_warned_about() -> None:
    net = make_net()
    guard = StepGuard(torch.optim.SGD(net.parameters(), lr=0.1), model=net)
    parts = micro_batches(k=2)
    for x, y in parts:
        F.cross_entropy(net(x), y).backward()
    with pytest.warns(UserWarning, match="one targets tensor for a step with 2 training forwards"):
        guard.step(targets=parts[-1][1])
    with pytest.raises(ValueError, match="targets has 3 entries but the step had 2"):
        for x, y in parts:
            F.cross_entropy(net(x), y).backward()
        guard.step(targets=[parts[0][1]] * 3)


def test_a_closure_is_measured_on_its_batch_once() -> None:
    net = make_net()
    x, y = micro_batches(k=1)[0]
    guard = StepGuard(torch.optim.LBFGS(net.parameters(), lr=0.5, max_iter=4), model=net)

    def closure() -> Tensor:
        guard.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss

    report = guard.step(closure)
    assert guard.engine.measured.capture.forwards > 1
    assert report.spread.count == len(y)


def test_the_next_step_starts_a_new_list_of_micro_batches() -> None:
    net = make_net()
    guard = StepGuard(torch.optim.SGD(net.parameters(), lr=0.1), model=net)
    parts = micro_batches(k=3)
    for x, y in parts:
        F.cross_entropy(net(x), y).backward()
    assert guard.step().spread.count == 18
    guard.zero_grad()
    x, y = parts[0]
    F.cross_entropy(net(x), y).backward()
    assert guard.step().spread.count == 6


# ---------------------------------------------------------------- row chunks


def columns_equal(a, b) -> None:
    assert a.columns.keys() == b.columns.keys()
    for name in a.columns:
        assert torch.equal(a.columns[name], b.columns[name]), name


def test_chunked_columns_equal_the_whole_batch() -> None:
    gen = torch.Generator().manual_seed(0)
    z, a = torch.randn(3, 7, 50, generator=gen), torch.randn(3, 7, 50, generator=gen)
    y = torch.randint(0, 50, (3, 7), generator=gen)
    y[0, :2] = -100
    config = GuardConfig()
    whole = batch_columns(z, a, targets=y, mask=None, config=config)
    for chunk in (50, 150, 333):
        chunked = batch_columns(z, a, targets=y, mask=None, config=config, chunk_elements=chunk)
        columns_equal(whole, chunked)
        assert torch.equal(whole.keep, chunked.keep)
    assert summarize_columns([whole], config=config)[1]["rows"].shape[1] == 21


class LargestAllocation(TorchDispatchMode):
    """Records the largest new tensor any op returns while active (views of the inputs excluded)."""

    def __init__(self, *inputs: Tensor) -> None:
        super().__init__()
        self.inputs = {t.untyped_storage().data_ptr() for t in inputs}
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, Tensor) and t.untyped_storage().data_ptr() not in self.inputs:
                self.largest = max(self.largest, t.numel())
        return out


def test_per_row_statistics_never_hold_a_rows_by_vocab_temporary() -> None:
    rows, vocab, chunk = 64, 1000, 8 * 1000
    z, a = torch.randn(rows, vocab), torch.randn(rows, vocab)
    y = torch.randint(0, vocab, (rows,))
    with LargestAllocation(z, a) as whole_mode:
        batch_columns(z, a, targets=y, mask=None, config=GuardConfig())
    with LargestAllocation(z, a) as chunked_mode:
        batch_columns(z, a, targets=y, mask=None, config=GuardConfig(), chunk_elements=chunk)
    assert whole_mode.largest >= rows * vocab  # the check sees the temporaries
    assert chunked_mode.largest <= 2 * chunk  # the stacked (z, a) of one chunk at most
