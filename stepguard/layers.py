"""Layers that come with the papers behind the loss suite (none of them is a loss)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["HadamardLinear"]


class HadamardLinear(nn.Module):
    """A linear map with weight ``w = u ⊙ v`` (Hadamard product), no bias by default.

    Gradient descent on (u, v) from a small equal initialisation ``u = v = init_scale·1``
    has an implicit sparsity bias, which the soft-label analysis uses to reach
    O(s·log d / n). The initialisation scale is not taken from the paper; keep it small.

    Shapes: x (N, in_features) → (N, out_features).

    Args:
        in_features: d.
        out_features: outputs (1 for binary logistic regression).
        init_scale: initial value of every entry of u and v (0.01).
        bias: add a learnable bias.
    """

    def __init__(
        self, in_features: int, out_features: int = 1, init_scale: float = 0.01, bias: bool = False
    ) -> None:
        super().__init__()
        self.u = nn.Parameter(torch.full((out_features, in_features), float(init_scale)))
        self.v = nn.Parameter(torch.full((out_features, in_features), float(init_scale)))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @property
    def weight(self) -> Tensor:
        """The effective weight ``u ⊙ v``."""
        return self.u * self.v

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)
