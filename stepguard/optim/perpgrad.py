"""⊥Grad (OrthoGrad): drop the gradient component along the weights before each step.

For positively homogeneous networks, scaling the weights along their own direction only
scales the logits: a "naïve loss minimisation" (NLM) direction that lowers the loss without
changing predictions. ⊥Grad removes it per parameter tensor w with gradient g:

    g⊥ = g − (w·g)/(w·w + 1e−30)·w,   then   g⊥ ← g⊥·‖g‖/(‖g⊥‖ + 1e−30)

and hands g⊥ to the base optimiser (Prieto, Barsbey, Mediano & Birdal, arXiv 2501.04697).
:func:`stepguard.diagnostics.gradient_weight_cosine` measures the component it removes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = [
    "OrthoGrad",
    "PerpGrad",
    "orthogonalize_gradients_",
    "perp_gradient",
]

_TINY = 1e-30


def perp_gradient(
    weight: Tensor, grad: Tensor, *, eps: float = _TINY, rescale: bool = True
) -> Tensor:
    """The gradient of one tensor with its component along the (flattened) weight removed.

    Args:
        weight: parameter values.
        grad: its gradient.
        eps: guard in both denominators (1e−30).
        rescale: rescale g⊥ to the norm of g (as the reference code does).
    """
    w = weight.reshape(-1).to(grad.dtype)
    g = grad.reshape(-1)
    perp = g - (w @ g) / (w @ w + eps) * w
    if rescale:
        perp = perp * (torch.linalg.vector_norm(g) / (torch.linalg.vector_norm(perp) + eps))
    return perp.reshape(grad.shape)


@torch.no_grad()
def orthogonalize_gradients_(
    params: Iterable[Tensor], *, eps: float = _TINY, rescale: bool = True
) -> None:
    """Replace every ``p.grad`` by :func:`perp_gradient` in place (per tensor)."""
    for p in params:
        if p.grad is not None:
            p.grad.copy_(perp_gradient(p, p.grad, eps=eps, rescale=rescale))


class PerpGrad(Optimizer):
    """⊥Grad optimiser wrapper: project each parameter's gradient, then step the base.

    The base optimiser shares this optimiser's parameter groups, so learning-rate
    schedulers attached to either see the same ``lr``; ``state_dict()`` is the base's.

    Args:
        params: parameters or parameter groups.
        base_optimizer: the optimiser class to wrap (``torch.optim.SGD`` by default).
        eps: guard in the projection (1e−30).
        rescale: rescale g⊥ to ‖g‖ (True, as the reference code).
        **base_kwargs: arguments of the base optimiser (``lr``, ``betas``, …).
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[Optimizer] = torch.optim.SGD,
        *,
        eps: float = _TINY,
        rescale: bool = True,
        **base_kwargs: Any,
    ) -> None:
        super().__init__(params, {"perp_eps": eps, "perp_rescale": rescale})
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Project the gradients of every group, then run the base optimiser's step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            orthogonalize_gradients_(
                group["params"], eps=group["perp_eps"], rescale=group["perp_rescale"]
            )
        self.base_optimizer.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state


OrthoGrad = PerpGrad
