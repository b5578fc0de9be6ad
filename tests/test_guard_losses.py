"""A loss alongside the guard: the radius is measured on the logits its softmax acts on,
and its components reach the report."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from stepguard import StepGuard, radius

losses = pytest.importorskip("stepguard.losses")


class Head(nn.Module):
    """Embedder followed by the loss's own logits, for the reference radius."""

    def __init__(self, embed: nn.Module, loss: nn.Module, targets: torch.Tensor) -> None:
        super().__init__()
        self.embed, self.loss, self.targets = embed, loss, targets

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.loss.radius_logits(self.embed(x), self.targets)


def test_radius_is_measured_on_the_margin_logits_with_the_class_centres_moving() -> None:
    torch.manual_seed(0)
    embed = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8)).double()
    arcface = losses.get("arcface", in_features=8, num_classes=5).double()
    guard = StepGuard(
        torch.optim.SGD([*embed.parameters(), *arcface.parameters()], lr=0.05),
        model=embed,
        loss_module=arcface,
    )
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 5, (10,))
    before_embed, before_loss = copy.deepcopy(embed), copy.deepcopy(arcface)
    value = arcface(embed(x), y)
    value.backward()
    report = guard.step(targets=y, loss=value)

    reference = Head(before_embed, before_loss, y)
    moved = dict(Head(embed, arcface, y).named_parameters())
    direction = {n: moved[n].detach() - p.detach() for n, p in reference.named_parameters()}
    expected = radius(reference, x, direction, targets=y)
    assert report.rho_a == pytest.approx(expected.rho_a, rel=1e-10)
    on_embeddings_only = radius(
        before_embed, x, {n: direction[f"embed.{n}"] for n, _ in before_embed.named_parameters()}
    )
    assert not math.isclose(report.rho_a, on_embeddings_only.rho_a, rel_tol=1e-3)
    assert set(report.extras) == {f"loss.{k}" for k in arcface.components}
    for name, component in arcface.components.items():
        assert report.extras[f"loss.{name}"] == pytest.approx(float(component), rel=1e-12)


def test_the_loss_module_keyword_is_loss_module_and_loss_is_refused() -> None:
    from stepguard import attach

    embed = nn.Linear(6, 5)
    arcface = losses.get("arcface", in_features=5, num_classes=3)
    for build in (StepGuard, attach):
        with pytest.raises(TypeError, match="loss_module="):
            build(torch.optim.SGD(embed.parameters(), lr=0.1), model=embed, loss=arcface)
        with pytest.raises(TypeError, match="unexpected keyword arguments \\['los'\\]"):
            build(torch.optim.SGD(embed.parameters(), lr=0.1), model=embed, los=arcface)
