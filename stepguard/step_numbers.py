"""The numbers of one step beside the JVP's: gathered as tensors, reduced across ranks, synced.

Everything a report carries besides the measurement itself and the norms
(:mod:`stepguard.norms`) — the loss, a loss module's components, the realized changes of
watched objectives — is collected as 0-d tensors, so that a measured step under
``torch.distributed`` reduces all of them in one collective and every step reads them in
one host transfer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from stepguard.costs import CostMeter
from stepguard.diagnostics import EntanglementProbe
from stepguard.distributed import reduce_across_ranks
from stepguard.measure import sync_to_host
from stepguard.snapshot import Update

RANK_LOCAL = ("loss", "extras.", "entanglement.")
"""Numbers only this rank knows: left out of an estimated step's report under torch.distributed."""


def step_tensors(
    update: Update | None, loss: Any, loss_module: nn.Module | None, probe: EntanglementProbe | None
) -> dict[str, Tensor]:
    """The loss, loss components and the realized changes of watched objectives, as 0-d tensors
    (the gradient norm and cos(Δθ, θ₀) come from :mod:`stepguard.norms`)."""
    out: dict[str, Tensor] = {}
    if probe is not None and update is not None:
        probe.realized(update.views())
        out.update({f"entanglement.{n}": v for n, v in probe.scalars().items()})
    if isinstance(loss, Tensor) and loss.numel() == 1:
        out["loss"] = loss.detach().reshape(())
    for name, value in (getattr(loss_module, "components", None) or {}).items():
        out[f"extras.loss.{name}"] = value.detach().reshape(-1)[:1].reshape(())
    return out


def reduce_and_sync(
    tensors: dict[str, Tensor],
    vectors: dict[str, Any],
    *,
    measured: bool,
    distributed: bool,
    costs: CostMeter,
    host_values: Mapping[str, float] | None,
) -> dict[str, Any]:
    """One collective on a measured step under ``torch.distributed``, then one host transfer.

    An estimated step uses no collective: it keeps only what every rank shares, and when
    the trigger already read every number to the host (``host_values``), nothing more moves.
    """
    if distributed:
        if measured:
            tensors.update(costs.tensors(tensors["tau"]))
            tensors = reduce_across_ranks(tensors)
        else:
            tensors = {n: v for n, v in tensors.items() if not n.startswith(RANK_LOCAL)}
    if not measured and host_values is not None and set(tensors) <= set(host_values):
        return {k: host_values[k] for k in tensors}
    return sync_to_host(tensors, vectors)


def nested_fields(values: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``extras.*`` and ``entanglement.*`` values as the report's nested mappings."""
    fields: dict[str, dict[str, Any]] = {}
    for prefix in ("extras", "entanglement"):
        named = {n[len(prefix) + 1 :]: v for n, v in values.items() if n.startswith(prefix + ".")}
        if named:
            fields[prefix] = named
    return fields
