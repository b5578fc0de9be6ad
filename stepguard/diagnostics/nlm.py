"""Naive loss minimization (NLM): updates that mostly rescale the logits.

"Grokking at the Edge of Numerical Stability" (Prieto, Barsbey, Mediano & Birdal,
ICLR 2025, arXiv 2501.04697): once the training data are fit, the loss can still fall by
scaling the logits up, z → c·z with c > 1, which changes no prediction. Positively
homogeneous networks reach that direction by scaling the weights along themselves. Two
views of the same effect: in logit space (:func:`nlm_cosine`) and in parameter space
(:func:`update_param_cosine`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from stepguard.diagnostics._rows import flatten_rows, masked_mean

__all__ = ["nlm_cosine", "update_param_cosine"]


def _wide(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _safe_ratio(num: Tensor, den: Tensor) -> Tensor:
    return torch.where(den > 0, num / torch.where(den > 0, den, 1), 0)


@torch.no_grad()
def nlm_cosine(logits: Tensor, velocity: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean cosine between each row's logit change and its logits, both centred over classes.

    For a row n with logits z_n ∈ R^K and logit velocity a_n = J_{z_n}·v along the update
    direction v (the JVP the guard computes), let x̄ = x − (1/K)Σ_k x_k. Then

        cos_n = ⟨ā_n, z̄_n⟩ / (‖ā_n‖·‖z̄_n‖),    nlm_cosine = mean_n cos_n

    over the counted rows. Centring removes the one direction the softmax cannot see: adding
    c_n to every logit of row n changes neither predictions nor loss, yet the uncentred
    cosine would reward or penalize it (z = [5, 6] and a = [1, 1] give an uncentred cosine of
    0.996 for a step that does nothing). After centring:

    * cos_n = 1: the step only multiplies the row's (centred) logits by a factor > 1, so the
      predictions stay and the loss of a correctly classified row falls: naive loss
      minimization. −1: it only shrinks them (softens the row's predictions).
    * cos_n = 0 for steps orthogonal to rescaling, including a pure per-row shift (ā_n = 0)
      and rows whose logits are all equal (z̄_n = 0): neither has a rescaling component.

    A mean near 1 while the training loss keeps falling means the update is buying loss by
    growing the logit scale, which drives softmax collapse (see :mod:`.collapse`).
    The velocity's length does not matter, so a = J·Δθ or J·Δθ/τ give the same value.

    Reference: Prieto et al., arXiv 2501.04697 (the NLM direction; the metric's centring is
    this library's definition).

    Args:
        logits: (..., K) logits z (any leading dimensions, classes last). Counted rows must be
            finite.
        velocity: the logit change a along the update, same shape as ``logits``.
        mask: optional boolean tensor of shape ``logits.shape[:-1]``; false rows do not count.

    Returns:
        A 0-d tensor (float32, or float64 for float64 inputs); NaN when no row counts.
    """
    if velocity.shape != logits.shape:
        raise ValueError(
            f"velocity shape {tuple(velocity.shape)} must equal logits shape {tuple(logits.shape)}"
        )
    wide = _wide(logits.dtype, velocity.dtype)
    z, _, keep = flatten_rows(logits.detach().to(wide), None, mask)
    a = velocity.detach().to(wide).reshape(z.shape)
    z = z - z.mean(dim=-1, keepdim=True)
    a = a - a.mean(dim=-1, keepdim=True)
    den = torch.linalg.vector_norm(z, dim=-1) * torch.linalg.vector_norm(a, dim=-1)
    cos = _safe_ratio((z * a).sum(dim=-1), den)
    return masked_mean(cos, keep)


@torch.no_grad()
def update_param_cosine(update: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
    """Global cosine between the update Δθ and the parameters θ, all tensors together.

        cos = ⟨Δθ, θ⟩ / (‖Δθ‖₂·‖θ‖₂),  sums over every element of every tensor.

    Near +1: the step grows the weights along their own direction. For a positively
    homogeneous network (e.g. a bias-free ReLU MLP, f(cθ) = c^L f(θ)) that is exactly a
    rescaling of the logits: naive loss minimization in parameter space (arXiv 2501.04697,
    whose ⊥Grad optimizer removes this component per tensor). Near −1: the step mostly
    shrinks the weights (weight decay dominating the loss gradient). Near 0 the step is
    mostly orthogonal to θ, as a norm-preserving update is. Computed with foreach kernels and
    no host synchronization.

    Args:
        update: the update Δθ, one tensor per parameter.
        params: the parameters θ (before the update), aligned with ``update``.

    Returns:
        A 0-d tensor (float32, or float64 when any input is float64); 0 when either vector
        is zero.
    """
    update, params = list(update), list(params)
    if len(update) != len(params):
        raise ValueError(f"{len(update)} update tensors for {len(params)} parameters")
    if not update:
        raise ValueError("update_param_cosine needs at least one tensor")
    for u, p in zip(update, params, strict=True):
        if u.shape != p.shape:
            raise ValueError(f"update shape {tuple(u.shape)} does not match {tuple(p.shape)}")
    wide = _wide(*(t.dtype for t in update), *(t.dtype for t in params))
    device = params[0].device
    work = [t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32 for t in params]
    us = [u.detach().reshape(-1).to(w) for u, w in zip(update, work, strict=True)]
    ps = [p.detach().reshape(-1).to(w) for p, w in zip(params, work, strict=True)]
    dot = torch.stack(
        [torch.dot(u, p).to(device=device, dtype=wide) for u, p in zip(us, ps, strict=True)]
    ).sum()
    norm_u = torch.linalg.vector_norm(torch.stack([n.to(device, wide) for n in torch._foreach_norm(us)]))
    norm_p = torch.linalg.vector_norm(torch.stack([n.to(device, wide) for n in torch._foreach_norm(ps)]))
    return _safe_ratio(dot, norm_u * norm_p)


def gradient_weight_cosine(params: Iterable[Tensor]) -> Tensor:
    """Cosine between the negative gradient −g and the weights θ, all tensors together.

    :func:`update_param_cosine` with the plain gradient step −g as the update. Close to 1
    means a gradient step mostly rescales the weights (the NLM direction, which the ⊥Grad
    optimizer :class:`stepguard.optim.PerpGrad` removes per tensor). Parameters without a
    gradient are left out.

    Raises:
        ValueError: no parameter has a gradient.
    """
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        raise ValueError("no parameter has a gradient: call backward() first")
    return update_param_cosine([-p.grad for p in with_grad], with_grad)  # type: ignore[operator]
