"""Calling a module with swapped-in parameters: tied weights, and the parameters put back."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from stepguard.geometry.jvp import Batch, logit_velocities
from stepguard.geometry.swap import call_with


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


def test_call_with_swaps_a_tied_weight_everywhere_and_restores_the_parameters() -> None:
    torch.manual_seed(0)
    model = TiedLM()
    tokens = torch.randint(0, 11, (3, 5))
    names = [n for n, _ in model.named_parameters()]  # the tied weight appears once
    assert "head.weight" not in names
    other = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    before = {n: p for n, p in model.named_parameters()}
    got = call_with(model, other, (tokens,), {})
    h = torch.tanh(nn.functional.linear(other["embed.weight"][tokens], other["mix.weight"], other["mix.bias"]))
    assert torch.allclose(got, h @ other["embed.weight"].T)  # the head used the swapped embedding too
    assert all(p is before[n] for n, p in model.named_parameters())
    assert model.head.weight is model.embed.weight


def test_call_with_restores_the_parameters_when_the_forward_raises() -> None:
    model = nn.Linear(3, 2)
    weight = model.weight
    with pytest.raises(RuntimeError):
        call_with(model, {"weight": torch.zeros(2, 3)}, (torch.zeros(4, 5),), {})
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
