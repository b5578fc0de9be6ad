"""The protocol every StepGuard loss follows: :class:`GuardedLoss`.

A guarded loss is an ordinary :class:`torch.nn.Module` whose ``forward`` returns the loss,
plus a few things the guard reads alongside it:

* ``components`` — after each forward, the named parts of the loss as detached 0-d
  tensors (``{"base": ..., "regularizer": ...}``). They are never converted to Python
  numbers inside ``forward``, so recording them costs no host synchronisation.
* ``radius_logits(output, target)`` — the tensor the loss's softmax or sigmoid acts on,
  computed differentiably from what the model outputs, so that the guard measures the
  safe-step radius on the right logits. Losses without a softmax or sigmoid set
  ``has_radius_logits = False`` and raise :class:`NotImplementedError` with the reason.
* ``meaningful_value`` — ``False`` for min-max or derivative-only objectives whose value
  is not a training curve (a monitor should watch gradients or an auxiliary metric).
* ``batch_coupled`` — ``True`` when the loss of one sample depends on the other samples of
  the batch. Such a loss changes meaning under gradient accumulation; tell it with
  ``accumulation_steps=n`` or :meth:`GuardedLoss.note_accumulation` and it warns once.

State that must survive a checkpoint (AUC-M's ``a``, ``b``, ``α``; ALDR-KL's per-sample
``λ``) lives in parameters or buffers, so it is part of ``state_dict()``.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

Reduction = Literal["mean", "sum", "none"]
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")


class BatchCouplingWarning(UserWarning):
    """A batch-coupled loss is used with gradient accumulation."""


class GuardedLoss(nn.Module):
    """Base class of every loss in :mod:`stepguard.losses`.

    Subclasses implement ``forward`` and call :meth:`_record` with their named parts.

    Args:
        accumulation_steps: number of micro-batches accumulated into one optimizer step.
            A batch-coupled loss warns once (:class:`BatchCouplingWarning`, a
            ``UserWarning``) at its first forward when this is greater than 1.

    Attributes:
        components: the named parts of the last forward, detached 0-d tensors.
    """

    meaningful_value: ClassVar[bool] = True
    batch_coupled: ClassVar[bool] = False
    coupling_note: ClassVar[str] = ""
    has_radius_logits: bool = True
    no_radius_reason: str = ""

    def __init__(self, *, accumulation_steps: int = 1) -> None:
        super().__init__()
        self.components: dict[str, Tensor] = {}
        self._coupling_warned = False
        self.accumulation_steps = 1
        self.note_accumulation(accumulation_steps)
        self.register_forward_pre_hook(_warn_if_accumulating)

    def note_accumulation(self, steps: int) -> None:
        """Tell the loss how many micro-batches make one optimizer step.

        The guard calls this when it sees gradient accumulation. For a batch-coupled loss
        and ``steps > 1`` the next forward emits one :class:`BatchCouplingWarning`.

        Raises:
            ValueError: if ``steps`` is not a positive integer.
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"accumulation_steps must be a positive int, got {steps!r}")
        self.accumulation_steps = steps

    def radius_logits(self, output: Any, target: Tensor | None = None) -> Tensor:
        """The tensor this loss's softmax or sigmoid acts on, built from the model output.

        The default is for losses that consume logits directly: it returns ``output``.

        Args:
            output: what the model returns and the loss consumes first.
            target: the labels, for losses whose logits depend on them (margins).

        Raises:
            NotImplementedError: when the loss has no softmax or sigmoid.
        """
        if not self.has_radius_logits:
            raise NotImplementedError(
                f"{type(self).__name__} has no softmax or sigmoid to measure a radius on: "
                f"{self.no_radius_reason}"
            )
        if not isinstance(output, Tensor) or not output.is_floating_point():
            raise TypeError(
                f"{type(self).__name__}.radius_logits expects the floating-point logits "
                f"tensor, got {type(output).__name__}"
            )
        return output

    def _record(self, **parts: Tensor) -> None:
        self.components = {name: _scalar(value) for name, value in parts.items()}


def _scalar(value: Tensor) -> Tensor:
    value = value.detach()
    if value.ndim == 0:
        return value
    return value.float().mean() if not value.is_floating_point() else value.mean()


def _warn_if_accumulating(module: nn.Module, args: tuple[Any, ...]) -> None:
    assert isinstance(module, GuardedLoss)
    if module.batch_coupled and module.accumulation_steps > 1 and not module._coupling_warned:
        module._coupling_warned = True
        note = f" ({module.coupling_note})" if module.coupling_note else ""
        warnings.warn(
            f"{type(module).__name__} couples the samples of a batch{note}; with "
            f"{module.accumulation_steps} accumulated micro-batches each micro-batch is a "
            "separate batch, so the loss and its gradient differ from those of one large "
            "batch. Use larger micro-batches or keep accumulation_steps=1.",
            BatchCouplingWarning,
            stacklevel=3,
        )


def reduce(values: Tensor, reduction: str) -> Tensor:
    """Reduce per-sample values with ``"mean"``, ``"sum"`` or ``"none"``."""
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    if reduction == "none":
        return values
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_reduction(reduction: str, *, allow_none: bool = True) -> str:
    """Validate a reduction name at construction time."""
    allowed = REDUCTIONS if allow_none else ("mean", "sum")
    if reduction not in allowed:
        raise ValueError(f"reduction must be one of {allowed}, got {reduction!r}")
    return reduction


def check_logits_target(logits: Tensor, target: Tensor, *, name: str = "logits") -> None:
    """Check a (B, C) float logits tensor against (B,) int64 class indices.

    Only shapes and dtypes are checked, so the check never synchronises with the device.

    Raises:
        TypeError: wrong dtypes.
        ValueError: wrong shapes.
    """
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor of shape (B, C)")
    if logits.ndim != 2:
        raise ValueError(f"{name} must have shape (B, C), got {tuple(logits.shape)}")
    if not isinstance(target, Tensor) or target.dtype != torch.long:
        got = target.dtype if isinstance(target, Tensor) else type(target).__name__
        raise TypeError(f"target must be an int64 tensor of class indices, got {got}")
    if target.shape != logits.shape[:1]:
        raise ValueError(
            f"target must have shape ({logits.shape[0]},) to match {name} "
            f"{tuple(logits.shape)}, got {tuple(target.shape)}"
        )


def check_same_shape(**tensors: Tensor) -> None:
    """Check that every given tensor is floating point and that all shapes agree."""
    shapes = {}
    for key, value in tensors.items():
        if not isinstance(value, Tensor) or not value.is_floating_point():
            raise TypeError(f"{key} must be a floating-point tensor")
        shapes[key] = tuple(value.shape)
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shapes must agree, got {shapes}")
