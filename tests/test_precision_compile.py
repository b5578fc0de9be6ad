"""Autocast and torch.compile: the replay differentiates the function that actually trained."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import stepguard
from stepguard.diagnostics import softmax_collapse


def gap_net() -> nn.Module:
    """Logits with a gap of 10 between the top class and the rest: bf16 absorbs it, fp32 does not."""
    net = nn.Linear(4, 3)
    with torch.no_grad():
        net.weight.zero_()
        net.bias.copy_(torch.tensor([10.0, 0.0, 0.0]))
    return net


def test_replay_runs_under_the_captured_autocast() -> None:
    net = gap_net()
    guard = stepguard.StepGuard(torch.optim.SGD(net.parameters(), lr=1e-3), model=net)
    x, y = torch.randn(8, 4), torch.zeros(8, dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = net(x)
        loss = F.cross_entropy(logits, y)
    loss.backward()
    report = guard.step(targets=y)
    assert logits.dtype == torch.bfloat16
    assert softmax_collapse(logits.detach()).fraction == 1.0
    assert softmax_collapse(logits.detach().float()).fraction == 0.0
    assert report.sc_fraction == 1.0  # measured in the training dtype, not in float32


def test_compiled_model_is_unwrapped_and_its_forward_captured() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    compiled = torch.compile(net, backend="eager")
    guard = stepguard.StepGuard(torch.optim.Adam(net.parameters(), lr=1e-2), model=compiled)
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    theta0 = [p.detach().clone() for p in net.parameters()]
    F.cross_entropy(compiled(x), y).backward()
    report = guard.step()
    reference = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        for p, p0 in zip(reference.parameters(), theta0, strict=True):
            p.copy_(p0)
    delta = [p.detach() - p0 for p, p0 in zip(net.parameters(), theta0, strict=True)]
    assert guard.engine.model is net
    assert report.rho_a == stepguard.radius(reference, x, delta).rho_a
