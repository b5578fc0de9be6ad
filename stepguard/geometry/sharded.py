"""The replay of a model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Under FSDP2 each rank holds a shard (dim 0) of every parameter as a ``DTensor``; before a
module's forward FSDP all-gathers its parameters and registers the whole tensors on the
module, and after it drops them again. The guard's replay rides on that: a forward
pre-hook that runs after FSDP's gathers the module's θ₀ and tangent shards the same way
(one all-gather each per parameter, for that module only) and puts dual tensors
(θ₀, Δθ/τ) in place of FSDP's whole parameters; a forward hook that runs before FSDP's
puts FSDP's tensors back, so FSDP reshards as usual. The whole model is therefore never
gathered at once beyond FSDP's own per-module unshard, and the replay differentiates the
model at θ₀, not at the parameters the inner step left.

Supported: FSDP2 on a one-dimensional device mesh with ``Shard(0)`` placements (what
``fully_shard`` makes). HSDP and 2-D meshes (FSDP with tensor parallelism) are refused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from stepguard.geometry.attention import DEFAULT_CHUNK_SIZE
from stepguard.geometry.forward_rules import ForwardADUnsupportedError, describe_gap, forward_rules
from stepguard.geometry.jvp import Batch, Mode, looks_like_forward_ad_gap, replay_context
from stepguard.geometry.logits import LogitsFn, extract_logits


def fsdp2_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that ``fully_shard`` was applied to (empty when none)."""
    return [m for m in model.modules() if any(c.__name__ == "FSDPModule" for c in type(m).__mro__)]


def is_dtensor(t: Any) -> bool:
    return type(t).__name__ == "DTensor"


def local_tensor(p: Tensor) -> Tensor:
    """This rank's shard of a ``DTensor`` parameter (the same storage), or ``p`` itself."""
    return p._local_tensor if is_dtensor(p) else p  # type: ignore[attr-defined]


def unsupported_fsdp2_layout(model: nn.Module) -> str | None:
    """Why the FSDP2 layout of ``model`` is not supported, or None when it is."""
    for name, p in model.named_parameters():
        if not is_dtensor(p):
            return f"parameter {name} is not sharded by FSDP2 (apply fully_shard to the root module too)"
        mesh, placements = p.device_mesh, p.placements
        shard0 = len(placements) == 1 and type(placements[0]).__name__ == "Shard" and placements[0].dim == 0
        if mesh.ndim != 1 or not shard0:
            return (
                f"parameter {name} is laid out as {placements} on a {mesh.ndim}-D mesh; only FSDP2's "
                "Shard(0) on a 1-D mesh is supported (not HSDP or FSDP with tensor parallelism)"
            )
    return None


def gather(shard: Tensor, like: Tensor) -> Tensor:
    """The whole tensor from every rank's ``shard``, laid out as the ``DTensor`` ``like``."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        shard, like.device_mesh, like.placements, shape=like.shape, stride=like.stride()
    ).full_tensor()


class ShardedReplay:
    """Replays an FSDP2 model at θ₀ along a tangent given as this rank's shards.

    Args:
        model: the root module (``fully_shard`` applied to it and to its blocks).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules = fsdp2_modules(model)
        names = {id(p): n for n, p in model.named_parameters()}
        self._plan: dict[int, list[tuple[nn.Module, str, str, Tensor]]] = {}
        for module in self.modules:
            nested = {id(p) for c in module.modules() if c is not module and c in self.modules
                      for p in c.parameters()}
            entries = []
            for qualified, p in module.named_parameters():
                if id(p) in nested:
                    continue
                prefix, _, leaf = qualified.rpartition(".")
                owner = module.get_submodule(prefix) if prefix else module
                entries.append((owner, leaf, names[id(p)], p))
            self._plan[id(module)] = entries

    def logit_velocity(
        self,
        batch: Batch,
        theta0: Mapping[str, Tensor],
        tangent: Mapping[str, Tensor],
        *,
        logits_fn: LogitsFn | None = None,
        mode: Mode = "train",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> tuple[Tensor, Tensor]:
        """Logits and their derivative along the tangent, at θ₀, on this rank's ``batch``.

        ``theta0`` and ``tangent`` hold this rank's shards by parameter name; every rank
        must call this together (the gathers are collectives).
        """
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(replay_context(self.model, batch, mode))
                stack.enter_context(forward_rules(chunk_size))  # fused attention and other ops' rules
                stack.enter_context(torch.no_grad())
                stack.enter_context(fwAD.dual_level())
                stack.enter_context(self._duals(theta0, tangent))
                out = self.model(*batch.args, **batch.kwargs)
                z, a = fwAD.unpack_dual(extract_logits(out, logits_fn))
        except Exception as exc:
            if looks_like_forward_ad_gap(exc):  # no finite-difference fallback across shards
                raise ForwardADUnsupportedError(describe_gap(exc, self.model)) from exc
            raise
        finally:
            for module in self.modules:
                module.reshard()  # type: ignore[attr-defined]
        if a is None:
            a = torch.zeros_like(z)
        return z.detach(), a.detach()

    @contextlib.contextmanager
    def _duals(self, theta0: Mapping[str, Tensor], tangent: Mapping[str, Tensor]) -> Iterator[None]:
        swapped: dict[tuple[nn.Module, str], Tensor] = {}

        def install(module: nn.Module, args: Any) -> None:
            for owner, leaf, name, sharded in self._plan[id(module)]:
                swapped[(owner, leaf)] = owner._parameters[leaf]
                whole = gather(theta0[name], sharded)
                owner._parameters[leaf] = fwAD.make_dual(whole, gather(tangent[name], sharded))

        def restore(module: nn.Module, args: Any, output: Any) -> None:
            for owner, leaf, _, _ in self._plan[id(module)]:
                owner._parameters[leaf] = swapped.pop((owner, leaf))

        handles = [m.register_forward_pre_hook(install) for m in self.modules]
        handles += [m.register_forward_hook(restore, prepend=True) for m in self.modules]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for (owner, leaf), original in swapped.items():  # a forward that raised mid-way
                owner._parameters[leaf] = original
