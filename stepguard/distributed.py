"""Agreeing across data-parallel ranks before deciding.

Each rank measures on its own shard; the numbers are then reduced so that every rank sees
the same Δ_a, ρ_a, r and therefore takes the same decision — a rank that skips while
another steps would poison the run. Each measured tensor is reduced by the rule declared
with the report field it carries (``reduce=`` in :mod:`stepguard.report`; see
:data:`~stepguard.report.Reduction`), or beside the code that produces it when it is not a
report field (:data:`stepguard.costs.REDUCTIONS`). The rules follow the definitions:

* Δ_a = max over *all* samples → MAX; likewise the largest logit gap, spread quantiles
  (the MAX of per-rank quantiles, an upper bound on the global quantile), τ and the
  gradient norm (equal on every rank under DDP; MAX makes a disagreement conservative).
* minima (smallest spread, top-2 and binary radii) → MIN.
* counts → SUM; per-row averages (softmax-collapse fractions, log Z moments, the NLM
  cosine, the mean spread) → count-weighted means; the loss, loss components and
  entanglement entries → mean.

A tensor with no declared reduction is an error, never a silent mean. One collective per
measured step: every field packed into one float64 vector, gathered from every rank
(``all_gather``), and reduced on each rank by the same rules in the same order. A NaN on
any rank stays NaN.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from stepguard import costs, report
from stepguard.measure import global_norm
from stepguard.report import Reduction

_COUNT = report.FIELDS["spread.count"].wire
"""The row count: the weight of every ``row_mean`` reduction."""

_NOT_REPORT_FIELDS: Mapping[str, Reduction] = {**costs.REDUCTIONS}
"""Measured tensors that are no report field, by the module that declares them."""


def reduction_of(name: str) -> Reduction:
    """The declared cross-rank reduction of the measured tensor ``name``.

    Raises:
        LookupError: none is declared; the message names the tensor and where to declare it.
    """
    found = _NOT_REPORT_FIELDS.get(name)
    return found if found is not None else report.reduction_of(name)


def is_distributed(group: object | None = None) -> bool:
    """True when ``torch.distributed`` is initialized with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank_and_world(group: object | None = None) -> tuple[int, int]:
    if not is_distributed(group):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def reduce_across_ranks(values: Mapping[str, Tensor], group: object | None = None) -> dict[str, Tensor]:
    """Reduce each measured tensor across ranks by the rule of its field (see module docstring).

    Every number travels in one float64 vector and one ``all_gather``; each rank then
    applies the rules to the same ``[world, n]`` table in the same order, so every rank
    holds bitwise the same result. Every rank must call this with the same keys in the same
    order (the guard guarantees it: which fields exist depends only on the model and the
    configuration).
    """
    names = list(values)
    kinds = [reduction_of(name) for name in names]  # before any collective: every rank raises alike
    if not is_distributed(group):
        return dict(values)
    world = dist.get_world_size(group)
    device = next(iter(values.values())).device
    flat = [values[n].detach().reshape(-1).to(device=device, dtype=torch.float64) for n in names]
    packed = torch.cat(flat)
    gathered = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(gathered, packed, group=group)
    table = torch.stack(gathered)  # [world, n]: rank by rank

    columns: dict[str, Tensor] = {}
    offset = 0
    for name, v in zip(names, flat, strict=True):
        columns[name] = table[:, offset : offset + v.numel()]
        offset += v.numel()
    count = columns.get(_COUNT)
    total = count.sum(dim=0) if count is not None else None

    out: dict[str, Tensor] = {}
    for name, kind in zip(names, kinds, strict=True):
        column = columns[name]
        if kind == "max":
            v = column.amax(dim=0)  # NaN on any rank stays NaN
        elif kind == "min":
            v = column.amin(dim=0)
        elif kind == "sum":
            v = column.sum(dim=0)
        elif kind == "row_mean" and count is not None and total is not None:
            v = (column * count).sum(dim=0) / total.clamp_min(1.0)
        else:
            v = column.sum(dim=0) / world
        out[name] = v.reshape(values[name].shape)
    return out


def check_ranks_agree(facts: Mapping[str, str], group: object | None = None) -> None:
    """Every rank guards the same model with the same policy and configuration, or every rank raises.

    Ranks that disagree would send different tensors to the reduction, which hangs or
    fails inside the collective with no word of why. Called before the first step (and
    whenever the optimizer's parameters change), with a few descriptive ``facts`` (policy,
    configuration, parameter shapes); one ``all_gather_object``, no collective otherwise.

    Raises:
        RuntimeError: on every rank, naming each fact that differs and the ranks' values.
    """
    if not is_distributed(group):
        return
    gathered: list[Mapping[str, str] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, dict(facts), group=group)
    differing = []
    for key in sorted({k for facts_of in gathered for k in (facts_of or {})}):
        values = [(facts_of or {}).get(key) for facts_of in gathered]
        if len(set(values)) > 1:
            shown = "; ".join(f"rank {r}: {_short(v)}" for r, v in enumerate(values))
            differing.append(f"{key} differs ({shown})")
    if differing:
        raise RuntimeError(
            "StepGuard's ranks disagree, so they cannot take the same decision: "
            + " | ".join(differing)
            + ". Build the same model, optimizer, policy and GuardConfig on every rank."
        )


def _short(value: str | None, limit: int = 120) -> str:
    text = "missing" if value is None else value
    return text if len(text) <= limit else text[: limit - 1] + "…"


SHARD_SUMS: Mapping[str, Reduction] = {
    "shard.delta_sq": "sum",
    "shard.grad_sq": "sum",
    "shard.dot": "sum",
    "shard.theta_sq": "sum",
}
"""The per-shard sums of an FSDP2 step (:func:`shard_sums`): summed over the ranks."""

_NOT_REPORT_FIELDS = {**_NOT_REPORT_FIELDS, **SHARD_SUMS}


def shard_sums(
    local_tau: Tensor, update_flats: list[Tensor], theta0_flats: list[Tensor], grads: list[Tensor]
) -> dict[str, Tensor]:
    """This rank's parts of ‖Δθ‖², ‖g‖², ⟨Δθ, θ₀⟩ and ‖θ₀‖² when each rank holds a shard (FSDP2).

    0-d float64 tensors named as in :data:`SHARD_SUMS`; they travel with the step's other
    numbers in the one cross-rank reduction, and :func:`norms_from_sums` turns the totals
    into τ, the gradient norm and cos(Δθ, θ₀). ``local_tau`` is this rank's ‖Δθ‖,
    already computed; nothing is copied to float64 but the sums.
    """
    wide = torch.float64
    device = local_tau.device
    zero = torch.zeros((), dtype=wide, device=device)
    pairs = zip(update_flats, theta0_flats, strict=True)
    return {
        "shard.delta_sq": local_tau.to(wide).square(),
        "shard.grad_sq": global_norm(grads).to(wide, copy=False).square().to(device) if grads else zero,
        "shard.dot": sum((torch.dot(f, t).to(wide) for f, t in pairs), zero),
        "shard.theta_sq": sum((torch.linalg.vector_norm(t, dtype=wide).square() for t in theta0_flats), zero),
    }


def norms_from_sums(sums: Mapping[str, float]) -> dict[str, float]:
    """τ = √Σ‖Δθ‖², ‖g‖ = √Σ‖g‖² and cos(Δθ, θ₀) = Σ⟨Δθ, θ₀⟩/(τ·√Σ‖θ₀‖²) from the summed shard parts.

    The cosine is 0 when either vector is zero; a NaN in any part stays NaN.
    """
    delta_sq, grad_sq = float(sums["shard.delta_sq"]), float(sums["shard.grad_sq"])
    dot, theta_sq = float(sums["shard.dot"]), float(sums["shard.theta_sq"])
    denominator = math.sqrt(delta_sq * theta_sq)
    if math.isnan(denominator) or math.isnan(dot):
        cosine = math.nan
    else:
        cosine = dot / denominator if denominator > 0 else 0.0
    return {"tau": math.sqrt(delta_sq), "grad_norm": math.sqrt(grad_sq), "update_param_cosine": cosine}


def summed(values: Tensor, group: object | None = None) -> Tensor:
    """``values`` summed over the ranks in float64 (one ``all_reduce``; a copy, never in place)."""
    total = values.to(torch.float64, copy=True)
    if is_distributed(group):
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total


def summed_tau(local_tau: Tensor, group: object | None = None) -> Tensor:
    """τ of a sharded Δθ: √ of this rank's ‖Δθ‖² summed over the ranks (one ``all_reduce``), float64."""
    return summed(local_tau.to(torch.float64).square(), group).sqrt()


def guard_facts(policy: object, config: Any, optimizer: object, params: list[Tensor]) -> dict[str, str]:
    """What every rank's guard must share for the ranks to decide alike (see :func:`check_ranks_agree`)."""
    shapes = ",".join(f"{tuple(p.shape)}:{str(p.dtype).removeprefix('torch.')}" for p in params)
    return {
        "policy": repr(policy),
        "config": config.model_dump_json(),
        "optimizer": type(optimizer).__name__,
        "parameters": f"{len(params)} tensors, {hashlib.sha256(shapes.encode()).hexdigest()[:12]}",
    }
