"""Turning a user's direction into unit tangents aligned with a model's trainable parameters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

Direction = Mapping[str, Tensor] | Sequence[Tensor | None]


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The model's parameters that require grad, by name (shared parameters once)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def align_direction(direction: Direction, model: nn.Module) -> dict[str, Tensor]:
    """Map a direction onto the model's trainable parameters (not yet normalized).

    Args:
        direction: a mapping ``name → tensor`` (names from ``model.named_parameters()``;
            missing trainable names count as zero) or a sequence aligned with
            ``model.parameters()`` (every parameter, or only the trainable ones; ``None``
            entries count as zero).
        model: the module whose parameters the direction moves.

    Raises:
        ValueError: unknown names, a wrong length, or a shape that does not match.
    """
    trainable = trainable_parameters(model)
    if isinstance(direction, Tensor):
        raise TypeError(
            "direction is a single tensor; pass a dict name → tensor or a list aligned "
            "with model.parameters()"
        )
    if isinstance(direction, Mapping):
        all_names = {name for name, _ in model.named_parameters()}
        unknown = [n for n in direction if n not in all_names]
        if unknown:
            raise ValueError(
                f"direction names {unknown[:5]} are not parameters of the model; valid "
                f"names include {sorted(trainable)[:5]} (see model.named_parameters())"
            )
        pairs = {n: direction.get(n) for n in trainable}
    else:
        seq = list(direction)
        everything = list(model.named_parameters())
        if len(seq) == len(everything):
            pairs = {n: t for (n, p), t in zip(everything, seq, strict=True) if p.requires_grad}
        elif len(seq) == len(trainable):
            pairs = dict(zip(trainable, seq, strict=True))
        else:
            raise ValueError(
                f"direction has {len(seq)} tensors but the model has {len(everything)} "
                f"parameters ({len(trainable)} trainable); align it with model.parameters()"
            )
    out: dict[str, Tensor] = {}
    for name, param in trainable.items():
        t = pairs.get(name)
        if t is None:
            out[name] = torch.zeros_like(param)
            continue
        if tuple(t.shape) != tuple(param.shape):
            raise ValueError(
                f"direction for {name!r} has shape {tuple(t.shape)} but the parameter "
                f"has shape {tuple(param.shape)}"
            )
        out[name] = t.detach().to(device=param.device, dtype=param.dtype)
    return out


def global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """‖(t₁, …, t_n)‖₂ over all tensors together, with foreach kernels (no host sync)."""
    if not tensors:
        return torch.zeros(())
    norms = torch._foreach_norm(list(tensors), 2)
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    return torch.linalg.vector_norm(torch.stack([n.to(dtype) for n in norms]), 2)


def normalize(direction: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
    """Scale a direction to unit global L2 norm; returns ``(unit, norm)``.

    Raises:
        ValueError: when the direction is zero or not finite.
    """
    norm = global_norm(list(direction.values()))
    value = float(norm)
    if not value > 0 or value == float("inf"):
        raise ValueError(f"the direction has norm {value}; a radius needs a non-zero, finite direction")
    return {n: t / norm.to(t.dtype) for n, t in direction.items()}, norm
