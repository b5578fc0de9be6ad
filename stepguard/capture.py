"""Capturing the batch of the most recent training forward, for the guard's replay."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from stepguard.geometry.jvp import Batch, is_replaying


def _is_sharded(model: nn.Module) -> bool:
    names = {cls.__name__ for cls in type(model).__mro__}
    return bool(names & {"FullyShardedDataParallel", "FSDPModule"}) or any(
        type(m).__name__.startswith("FSDP") for m in model.modules()
    )


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module that holds the parameters: strips DDP/DataParallel and ``torch.compile`` wrappers.

    Raises:
        NotImplementedError: for FSDP-sharded models, whose ranks hold only shards of the
            parameters while the replay needs them whole.
    """
    if _is_sharded(model):
        raise NotImplementedError(
            "StepGuard does not guard FSDP-sharded models: its JVP replays the forward with "
            "whole parameters on each rank. Use DistributedDataParallel (supported: every rank "
            "measures its shard of the batch and the guard reduces before deciding), or "
            "measure a gathered copy with stepguard.radius()."
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
