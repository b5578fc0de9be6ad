"""Where a step's norms come from: the tensors this process holds, or (FSDP2) shards summed over the ranks.

The engine asks the same questions of either: which tensors to snapshot, what length the
replay measures the velocities per, which numbers of a measured step travel to the
cross-rank reduction beside the measurement's, and how the reduced numbers become the
report's. Unsharded, every answer
is local. Under FSDP2 each rank snapshots only its shards; τ, the gradient norm and the
cosine are sums of the ranks' parts (:func:`stepguard.distributed.shard_sums`) that travel
in the step's one reduction. The replay cannot wait for that global τ, so it runs along Δθ
scaled by the last measured global τ (agreed on every rank), and the direction-dependent
statistics are corrected afterwards by their declared power of the ratio.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from stepguard.distributed import norms_from_sums, shard_sums, summed_tau
from stepguard.geometry.sharded import local_tensor
from stepguard.measure import global_norm
from stepguard.report import direction_powers
from stepguard.snapshot import Update


class LocalNorms:
    """Unsharded parameters: every norm is of the tensors this process holds."""

    reference_tau: float | None = None  # no reference: the replay runs along Δθ/τ itself

    def tensors(self, params: list[Tensor]) -> list[Tensor]:
        """The tensors to snapshot: the parameters themselves."""
        return params

    def replay_length(self, update: Update) -> Tensor:
        """The length the replay measures velocities per: τ itself."""
        return update.tau

    def step_tensors(self, update: Update | None, params: Sequence[Tensor]) -> dict[str, Tensor]:
        """The gradient norm and cos(Δθ, θ₀) of a measured step, as 0-d tensors."""
        grads = [p.grad for p in params if p.grad is not None]
        out: dict[str, Tensor] = {}
        if grads:
            with torch.no_grad():
                out["grad_norm"] = global_norm(grads)
        if update is not None:
            out["update_param_cosine"] = update.cosine_with_theta0()
        return out

    def finish(self, values: dict[str, Any]) -> dict[str, Any]:
        """Nothing to do: the numbers are already the report's."""
        return values


class ShardedNorms:
    """FSDP2: each rank holds a shard of every parameter; the norms are sums over the ranks.

    ``update.tau`` is this rank's shard's ‖Δθ‖. The replay runs along Δθ/L with L the
    *reference* length ``reference_tau``: the global τ of the last measured step, which
    every rank holds alike (a checkpoint keeps it). Only a step without a reference (the
    first, or one after a non-finite τ) reduces τ before its replay; every other measured
    step uses one collective, the step's reduction, which carries this rank's parts of
    τ², ‖g‖², ⟨Δθ, θ₀⟩ and ‖θ₀‖² (computed on measured steps only). :meth:`finish` then
    computes τ, ‖g‖ and the cosine, and multiplies each statistic of declared
    ``direction_power`` p by (L/τ)^p: along Δθ/L the velocities are τ/L times those along
    Δθ/τ.
    """

    def __init__(self) -> None:
        self.reference_tau: float | None = None
        self._length: Tensor | float | None = None  # L of this step's replay
        self._powers = direction_powers()

    def tensors(self, params: list[Tensor]) -> list[Tensor]:
        """The tensors to snapshot: this rank's shards (the same storage as the parameters)."""
        return [local_tensor(p) for p in params]

    def replay_length(self, update: Update) -> Tensor:
        """The reference length L, the same on every rank (reduced here when there is none yet).

        A known reference is written on the device with a fill, not copied from the host, so
        that it never waits for the device.
        """
        if self.reference_tau is None:
            self._length = summed_tau(update.tau)
            return self._length
        self._length = self.reference_tau
        return torch.full((), self.reference_tau, dtype=torch.float64, device=update.tau.device)

    def step_tensors(self, update: Update | None, params: Sequence[Tensor]) -> dict[str, Tensor]:
        """This rank's parts of τ², ‖g‖², ⟨Δθ, θ₀⟩ and ‖θ₀‖², for the step's one reduction."""
        if update is None:
            return {}
        with torch.no_grad():
            grads = [local_tensor(p.grad) for p in params if p.grad is not None]
            return shard_sums(update.tau, update.flats, [g.theta0 for g in update.groups], grads)

    def finish(self, values: dict[str, Any]) -> dict[str, Any]:
        """τ, ‖g‖ and the cosine from the reduced sums; the statistics rescaled from the reference to τ."""
        if "shard.delta_sq" not in values:
            return values
        out = {k: v for k, v in values.items() if not k.startswith("shard.")}
        out.update(norms_from_sums(values))
        tau = out["tau"]
        length = float(self._length) if self._length is not None else math.nan
        ratio = length / tau if tau > 0 else math.nan
        for name, power in self._powers.items():
            if name in out and math.isfinite(ratio):
                out[name] = _times(out[name], ratio**power)
        if math.isfinite(tau) and tau > 0:
            self.reference_tau = tau
        elif not math.isfinite(tau):
            self.reference_tau = None  # the next step reduces τ before its replay again
        return out


def _times(value: Any, factor: float) -> Any:
    if isinstance(value, (list, tuple)):
        return type(value)(v * factor for v in value)
    return value * factor


def step_norms(*, sharded: bool) -> LocalNorms | ShardedNorms:
    """The norms of a guard over an FSDP2 model (``sharded``) or over plain parameters."""
    return ShardedNorms() if sharded else LocalNorms()
