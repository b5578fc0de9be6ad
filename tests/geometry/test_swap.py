"""Calling a module with swapped-in parameters: the same as torch.func.functional_call."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from stepguard.geometry.jvp import Batch, logit_velocities
from stepguard.geometry.swap import ParameterSwap


class TiedLM(nn.Module):
    """Embedding and output head share one weight."""

    def __init__(self, vocab: int = 11, width: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(tokens))))


def test_swap_equals_functional_call_with_tied_weights_and_restores_the_parameters() -> None:
    torch.manual_seed(0)
    model = TiedLM()
    tokens = torch.randint(0, 11, (3, 5))
    names = [n for n, _ in model.named_parameters()]  # the tied weight appears once
    assert "head.weight" not in names
    other = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    before = {n: p for n, p in model.named_parameters()}
    swap = ParameterSwap(model)
    for _ in range(2):  # the second call uses the cached plan
        got = swap(other, (tokens,), {})
        assert torch.equal(got, functional_call(model, other, (tokens,), strict=False))
    assert all(p is before[n] for n, p in model.named_parameters())
    assert model.head.weight is model.embed.weight

    model.mix.weight = nn.Parameter(torch.randn(6, 6))  # a replaced parameter rebuilds the plan
    other["mix.weight"] = torch.randn(6, 6)
    assert torch.equal(swap(other, (tokens,), {}), functional_call(model, other, (tokens,), strict=False))


def test_swap_restores_the_parameters_when_the_forward_raises() -> None:
    model = nn.Linear(3, 2)
    weight = model.weight
    with pytest.raises(RuntimeError):
        ParameterSwap(model)({"weight": torch.zeros(2, 3)}, (torch.zeros(4, 5),), {})
    assert model.weight is weight


def test_velocities_of_a_tied_model_match_forward_mode_through_functional_call() -> None:
    torch.manual_seed(1)
    model = TiedLM()
    tokens = torch.randint(0, 11, (2, 4))
    theta = {n: p.detach() for n, p in model.named_parameters()}
    tangents = [{n: torch.randn_like(p) for n, p in theta.items()} for _ in range(2)]
    _, one, _ = logit_velocities(model, theta, tangents[:1], Batch.from_inputs(tokens), estimator="jvp")
    _, both, _ = logit_velocities(model, theta, tangents, Batch.from_inputs(tokens), estimator="jvp")
    for i, tangent in enumerate(tangents):
        expected = torch.func.jvp(
            lambda th: functional_call(model, th, (tokens,), strict=False), (theta,), (tangent,)
        )[1]
        assert torch.allclose(both[i], expected, atol=1e-6)
    assert torch.allclose(one[0], both[0], atol=1e-6)
