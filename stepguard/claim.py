"""One guard per optimizer: a second would measure, and clip or veto, every step twice."""

from __future__ import annotations

import weakref

import torch

_ATTRIBUTE = "_stepguard_engine"


def claim(optimizer: torch.optim.Optimizer, owner: object) -> None:
    """Mark ``optimizer`` as guarded by ``owner``; a second live guard is an error."""
    ref = getattr(optimizer, _ATTRIBUTE, None)
    if ref is not None and ref() is not None:
        raise RuntimeError(
            f"this {type(optimizer).__name__} is already guarded by StepGuard: a second guard would "
            "measure (and clip or veto) every step twice. Use the first guard, or close() / "
            "detach() it before guarding the optimizer again."
        )
    setattr(optimizer, _ATTRIBUTE, weakref.ref(owner))


def release(optimizer: torch.optim.Optimizer, owner: object) -> None:
    """Free ``optimizer`` for another guard, if ``owner`` holds it."""
    ref = getattr(optimizer, _ATTRIBUTE, None)
    if ref is not None and ref() is owner:
        delattr(optimizer, _ATTRIBUTE)
