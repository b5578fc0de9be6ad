"""The guard's constructor arguments, checked before anything is hooked or claimed."""

from __future__ import annotations

import torch
from torch import nn

from stepguard.config import GuardConfig


def check_arguments(
    optimizer: object, model: object, config: object, loss_module: object
) -> None:
    """Raise a :class:`TypeError` naming the argument whose type the guard cannot use."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a torch.nn.Module, got {type(model).__name__}; pass the "
            "network whose logits the optimizer moves"
        )
    if config is not None and not isinstance(config, GuardConfig):
        raise TypeError(f"config must be a GuardConfig, got {type(config).__name__}")
    if loss_module is not None and not isinstance(loss_module, nn.Module):
        raise TypeError(
            "loss_module must be an nn.Module (e.g. from stepguard.losses), "
            f"got {type(loss_module).__name__}"
        )
