"""Capturing the batch of the most recent training forward, for the guard's replay."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from stepguard.geometry.jvp import Batch, is_replaying
from stepguard.geometry.sharded import is_dtensor, unsupported_fsdp2_layout


def _sharding(model: nn.Module) -> str | None:
    """The name of an unsupported sharding of ``model``'s parameters, or None."""
    fsdp2 = False
    for module in model.modules():
        names = {cls.__name__ for cls in type(module).__mro__}
        if "FullyShardedDataParallel" in names:
            return "FSDP1 (FullyShardedDataParallel)"
        fsdp2 = fsdp2 or "FSDPModule" in names
    if fsdp2:
        reason = unsupported_fsdp2_layout(model)
        return None if reason is None else f"FSDP2 in this layout ({reason})"
    if any(is_dtensor(p) for p in model.parameters()):
        return "DTensor parameters (tensor or sequence parallel)"
    return None


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module that holds the parameters: strips DDP/DataParallel and ``torch.compile`` wrappers.

    FSDP2 models (``fully_shard`` on a 1-D mesh) are supported and returned as they are.

    Raises:
        NotImplementedError: for parameters sharded in a way the replay cannot follow
            (FSDP1, HSDP or 2-D meshes, tensor-parallel DTensors); the message names what is
            supported.
    """
    sharding = _sharding(model)
    if sharding is not None:
        raise NotImplementedError(
            f"StepGuard does not guard models sharded with {sharding} yet: its JVP replays the "
            "forward with each module's parameters gathered as FSDP2 gathers them. Supported: a "
            "single process, DataParallel, DistributedDataParallel and FSDP2 (fully_shard on a "
            "1-D mesh); to measure another sharded model, gather a copy and call "
            "stepguard.radius() on it. See docs/distributed.md."
        )
    seen = 0
    while seen < 8:
        seen += 1
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            break
    return model


class ForwardCapture:
    """Keeps the inputs and RNG state of the model's training forwards since the last step.

    A forward counts as training when the model is in train mode and autograd is on, so
    evaluation passes under ``torch.no_grad()`` or ``model.eval()`` are ignored, and so
    are StepGuard's own replays. With gradient accumulation every micro-batch's forward
    is kept (its inputs by reference, not copied: no activation is kept alive), so the
    step is measured on all the rows its update came from.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.batches: list[Batch] = []
        self.fresh = False
        self.forwards = 0
        self._handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    @property
    def batch(self) -> Batch | None:
        """The most recent training forward (None before the first)."""
        return self.batches[-1] if self.batches else None

    def _hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if is_replaying() or not torch.is_grad_enabled() or not module.training:
            return
        batch = Batch.capture(module, args, kwargs)
        if self.fresh:
            self.batches.append(batch)
        else:  # the first forward after a step starts that step's list
            self.batches = [batch]
        self.fresh = True
        self.forwards += 1

    def take(self) -> tuple[list[Batch], bool]:
        """The forwards since the last step ended (else the last step's), and whether they are new."""
        return list(self.batches), self.fresh

    def step_ended(self) -> None:
        """The optimizer stepped: the next training forward starts the next step's list."""
        self.fresh = False

    def clear(self) -> None:
        """Forget every captured forward."""
        self.batches = []
        self.fresh = False

    def remove(self) -> None:
        self._handle.remove()
        self.clear()
