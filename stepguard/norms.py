"""Where a step's norms come from: the tensors this process holds, or (FSDP2) shards summed over the ranks.

The engine asks the same four questions of either: which tensors to snapshot, what τ is,
what the gradient norm is made of, and cos(Δθ, θ₀). Unsharded, the answers are local.
Under FSDP2 each rank snapshots only its shards, and τ, the gradient norm and the cosine
come from one ``all_reduce`` of their sums (:func:`stepguard.distributed.sharded_norms`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from stepguard.distributed import sharded_norms
from stepguard.geometry.sharded import local_tensor
from stepguard.snapshot import Update


class LocalNorms:
    """Unsharded parameters: every norm is of the tensors this process holds."""

    def tensors(self, params: list[Tensor]) -> list[Tensor]:
        """The tensors to snapshot: the parameters themselves."""
        return params

    def difference(self, update: Update, params: Sequence[Tensor]) -> None:
        """Nothing to do: the snapshot's τ is already the global one."""

    def grads(self, params: Sequence[Tensor]) -> list[Tensor]:
        """The gradients whose norm the report carries."""
        return [p.grad for p in params if p.grad is not None]

    def update_param_cosine(self, update: Update) -> Tensor:
        """cos(Δθ, θ₀)."""
        return update.cosine_with_theta0()


class ShardedNorms:
    """FSDP2: each rank holds a shard of every parameter; the norms are summed over the ranks.

    :meth:`difference` reduces τ, the gradient norm and the cosine once per step (this
    rank's τ is reused, nothing is copied to float64); the other answers read that result.
    """

    def __init__(self) -> None:
        self._global: dict[str, Tensor] = {}

    def tensors(self, params: list[Tensor]) -> list[Tensor]:
        """The tensors to snapshot: this rank's shards (the same storage as the parameters)."""
        return [local_tensor(p) for p in params]

    def difference(self, update: Update, params: Sequence[Tensor]) -> None:
        """Reduce the step's norms across the ranks and make ``update.tau`` the global τ."""
        with torch.no_grad():
            grads = [local_tensor(p.grad) for p in params if p.grad is not None]
            self._global = sharded_norms(update.tau, update.flats, [g.theta0 for g in update.groups], grads)
        update.tau = self._global["tau"]

    def grads(self, params: Sequence[Tensor]) -> Tensor:
        """The global gradient norm, already reduced."""
        return self._global["grad_norm"]

    def update_param_cosine(self, update: Update) -> Tensor:
        """The global cos(Δθ, θ₀), already reduced."""
        return self._global["update_param_cosine"]


def step_norms(*, sharded: bool, every_step: bool) -> LocalNorms | ShardedNorms:
    """The norms of a guard over an FSDP2 model (``sharded``) or over plain parameters.

    Raises:
        NotImplementedError: a sharded model measured less often than every step.
    """
    if not sharded:
        return LocalNorms()
    if not every_step:
        raise NotImplementedError(
            "budget mode and measure_every > 1 are not supported on an FSDP2 model yet (the "
            "direction sketch between measurements would need a collective); measure every step"
        )
    return ShardedNorms()
