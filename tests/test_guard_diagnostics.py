"""Softmax collapse, NLM and entanglement as the guard reports them, against direct computations."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stepguard import ClipPolicy, StepGuard
from stepguard.diagnostics import nlm_cosine, softmax_collapse


def test_collapse_and_nlm_fields_match_the_diagnostics_on_the_step_logits() -> None:
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        net[2].weight.mul_(60.0)  # large logits: some rows absorb in float32
    guard = StepGuard(torch.optim.SGD(net.parameters(), lr=0.01), model=net)
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    theta0 = copy.deepcopy(net)
    logits = net(x)
    F.cross_entropy(logits, y).backward()
    report = guard.step(targets=y)
    expected = softmax_collapse(logits.detach(), y)
    assert report.sc_fraction == pytest.approx(expected.fraction, abs=0)
    assert report.sc_zero_loss_fraction == pytest.approx(expected.zero_loss_fraction, abs=0)
    assert 0 < report.sc_fraction < 1
    logz = torch.logsumexp(logits.detach(), dim=1)
    assert report.logz_mean == pytest.approx(float(logz.mean()), rel=1e-6)
    top = logits.detach().topk(2, dim=1).values
    assert report.max_logit_gap == pytest.approx(float((top[:, 0] - top[:, 1]).max()), rel=1e-6)
    delta = {
        n: p.detach() - q.detach()
        for (n, p), (_, q) in zip(net.named_parameters(), theta0.named_parameters(), strict=True)
    }
    _, velocity = torch.func.jvp(
        lambda params: torch.func.functional_call(theta0, params, (x,)),
        (dict(theta0.named_parameters()),),
        (delta,),
    )
    assert report.nlm_cosine == pytest.approx(float(nlm_cosine(logits.detach(), velocity)), rel=1e-5)


def test_watch_reports_the_gram_and_the_realized_change_along_the_applied_step() -> None:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5)).double()
    guard = StepGuard(torch.optim.SGD(net.parameters(), lr=20.0), model=net, policy=ClipPolicy(0.25))
    x = torch.randn(6, 4, dtype=torch.float64)
    chosen_y, rejected_y = torch.randint(0, 5, (6,)), torch.randint(0, 5, (6,))
    logp = F.log_softmax(net(x), dim=1)
    chosen = logp.gather(1, chosen_y[:, None]).sum()
    rejected = logp.gather(1, rejected_y[:, None]).sum()
    params = list(net.parameters())
    g_w = torch.autograd.grad(chosen, params, retain_graph=True)
    g_l = torch.autograd.grad(rejected, params, retain_graph=True)
    guard.watch(chosen=chosen, rejected=rejected)
    before = [p.detach().clone() for p in params]
    (-(chosen - rejected)).backward()
    report = guard.step()
    assert report.action == "clip"
    dot = sum(float((a * b).sum()) for a, b in zip(g_w, g_l, strict=True))
    ww = sum(float((a * a).sum()) for a in g_w)
    ll = sum(float((b * b).sum()) for b in g_l)
    ent = report.entanglement
    assert ent["gram.chosen.rejected"] == pytest.approx(dot, rel=1e-10)
    assert ent["gram.chosen.chosen"] == pytest.approx(ww, rel=1e-10)
    assert ent["ratio_chosen"] == pytest.approx(dot / ww, rel=1e-10)
    assert ent["ratio_rejected"] == pytest.approx(dot / ll, rel=1e-10)
    applied = [p.detach() - b for p, b in zip(params, before, strict=True)]
    realized = sum(float((g * u).sum()) for g, u in zip(g_w, applied, strict=True))
    assert ent["realized.chosen"] == pytest.approx(realized, rel=1e-9)
    guard.zero_grad()
    net(x).sum().backward()
    assert guard.step().entanglement == {}
