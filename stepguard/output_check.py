"""Are the model's outputs softmax logits? A check of the loss's gradient, once.

Any loss that is a function of softmax(z) — cross-entropy, label smoothing, focal loss,
distillation on the softmax — is unchanged by z ↦ z + c·1, so its gradient with respect
to each row of logits sums to zero over the classes: Σ_k ∂L/∂z_{n,k} = 0. A regression
loss on raw outputs (MSE), or independent sigmoids over several labels, has no such
invariance, and the guard's reading of the outputs as softmax logits (Δ_a = max_k a_k −
min_k a_k) measures nothing about that loss's singularities.

The check runs on the first training backward after the guard is built: the gradient
reaching the logits is reduced to the mean over rows of |Σ_k g_{n,k}| / Σ_k |g_{n,k}|
(0 for a softmax loss up to rounding; a small z-loss term adds about 2λ·log Z). Above
:data:`NOT_SOFTMAX` the guard warns once. One-logit heads (sigmoid / BCE) are not
checked: the guard reads them as the binary pair [s, 0].
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from stepguard.geometry.jvp import is_replaying
from stepguard.geometry.logits import LogitsFn, extract_logits

NOT_SOFTMAX = 0.1
"""Mean relative row sum of the logits' gradient above which the outputs are not softmax logits."""


class OutputCheck:
    """Hooks the model's first training output and measures its gradient's row sums."""

    def __init__(self, model: nn.Module, logits_fn: LogitsFn | None = None) -> None:
        self.logits_fn = logits_fn
        self.imbalance: Tensor | None = None
        self.done = False
        self._handle = model.register_forward_hook(self._on_output)

    def _on_output(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.done or is_replaying() or not torch.is_grad_enabled() or not module.training:
            return
        try:
            logits = extract_logits(output, self.logits_fn)
        except (TypeError, ValueError):
            return  # the measurement will say what is wrong with the output
        if logits.requires_grad and logits.ndim >= 2 and logits.shape[-1] >= 2:
            logits.register_hook(self._on_gradient)

    def _on_gradient(self, grad: Tensor) -> None:
        with torch.no_grad():
            g = grad.detach().reshape(-1, grad.shape[-1]).float()
            total = g.abs().sum(-1)
            counted = total > 0
            ratio = torch.where(counted, g.sum(-1).abs() / total.clamp_min(torch.finfo(g.dtype).tiny), 0.0)
            self.imbalance = ratio.sum() / counted.sum().clamp_min(1)

    def verdict(self) -> None:
        """After a step: warn once if the gradient seen says the outputs are not softmax logits."""
        if self.done or self.imbalance is None:
            return
        imbalance = float(self.imbalance)
        self.close()
        if imbalance > NOT_SOFTMAX:
            warnings.warn(
                "StepGuard reads the model's outputs as softmax logits, but the loss's gradient "
                f"with respect to them does not sum to zero over classes (mean relative row sum "
                f"{imbalance:.2f}; any loss of softmax(z) gives 0): r and ρ_a describe a softmax "
                "loss that is not the one being trained (regression, independent sigmoids). "
                "If the outputs are softmax logits all the same, say so with "
                "GuardConfig(assume_logits=True); if another tensor holds them, pass "
                "logits_fn=... to pick it.",
                UserWarning,
                stacklevel=4,
            )

    def close(self) -> None:
        self.done = True
        self.imbalance = None
        self._handle.remove()
