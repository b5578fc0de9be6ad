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

A tensor with no declared reduction is an error, never a silent mean. Two collectives per
measured step (one SUM, one MAX that carries the MINs negated), all fields packed into one
tensor each. A non-finite value on any rank stays non-finite.
"""

from __future__ import annotations

import hashlib
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

    Every rank must call this with the same keys in the same order (the guard guarantees
    it: which fields exist depends only on the model and the configuration).
    """
    names = list(values)
    kinds = [reduction_of(name) for name in names]  # before any collective: every rank raises alike
    if not is_distributed(group):
        return dict(values)
    world = dist.get_world_size(group)
    device = next(iter(values.values())).device
    flat = {n: values[n].detach().reshape(-1).to(device=device, dtype=torch.float64) for n in names}
    count = flat.get(_COUNT)

    max_parts: list[Tensor] = []
    sum_parts: list[Tensor] = []
    layout: list[tuple[str, str, int]] = []
    for name, kind in zip(names, kinds, strict=True):
        v = flat[name]
        if kind in ("max", "min"):
            signed = v if kind == "max" else -v
            max_parts.append(torch.where(torch.isnan(signed), torch.full_like(signed, -torch.inf), signed))
            sum_parts.append(torch.isnan(v).to(torch.float64))
            layout.append((name, kind, v.numel()))
        elif kind == "sum":
            sum_parts.append(v)
            layout.append((name, "sum", v.numel()))
        elif kind == "row_mean" and count is not None:
            sum_parts.append(v * count)
            layout.append((name, "weighted", v.numel()))
        else:
            sum_parts.append(v)
            layout.append((name, "mean", v.numel()))

    max_buf = torch.cat(max_parts) if max_parts else torch.zeros(0, dtype=torch.float64, device=device)
    sum_buf = torch.cat(sum_parts) if sum_parts else torch.zeros(0, dtype=torch.float64, device=device)
    if max_buf.numel():
        dist.all_reduce(max_buf, op=dist.ReduceOp.MAX, group=group)
    if sum_buf.numel():
        dist.all_reduce(sum_buf, op=dist.ReduceOp.SUM, group=group)

    total = None
    if count is not None:
        offset = 0
        for name, kind, n in layout:
            if kind in ("max", "min"):
                offset += n  # its NaN flags
            elif name == _COUNT:
                total = sum_buf[offset : offset + n]
                break
            else:
                offset += n

    out: dict[str, Tensor] = {}
    mo = so = 0
    for name, kind, n in layout:
        shape = values[name].shape
        if kind in ("max", "min"):
            v = max_buf[mo : mo + n]
            nan_flags = sum_buf[so : so + n]
            mo += n
            so += n
            v = v if kind == "max" else -v
            v = torch.where(nan_flags > 0, torch.full_like(v, torch.nan), v)
        elif kind == "sum":
            v = sum_buf[so : so + n]
            so += n
        elif kind == "weighted":
            assert total is not None
            v = sum_buf[so : so + n] / total.clamp_min(1.0)
            so += n
        else:
            v = sum_buf[so : so + n] / world
            so += n
        out[name] = v.reshape(shape)
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


def sharded_norms(
    local_tau: Tensor, update_flats: list[Tensor], theta0_flats: list[Tensor], grads: list[Tensor]
) -> dict[str, Tensor]:
    """τ, the gradient norm and cos(Δθ, θ₀) of parameters sharded across ranks (FSDP2).

    Each rank holds a shard of Δθ, θ₀ and the gradient; the global numbers come from the
    sums Σ‖Δθ‖² (from this rank's τ, already computed), Σ‖g‖², Σ⟨Δθ, θ₀⟩ and Σ‖θ₀‖² over
    the ranks, with one ``all_reduce`` in float64. Returns 0-d tensors ``tau``,
    ``grad_norm`` and ``update_param_cosine`` (0 when either vector is zero), equal on
    every rank.
    """
    wide = torch.float64
    zero = torch.zeros((), dtype=wide, device=local_tau.device)
    sums = torch.stack([
        local_tau.to(wide).square(),
        global_norm(grads).to(wide, copy=False).square().to(local_tau.device) if grads else zero,
        sum((torch.dot(f, t).to(wide) for f, t in zip(update_flats, theta0_flats, strict=True)), zero),
        sum((torch.linalg.vector_norm(t, dtype=wide).square() for t in theta0_flats), zero),
    ])
    if is_distributed():
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    delta_sq, grad_sq, dot, theta_sq = sums.unbind()
    denominator = (delta_sq * theta_sq).sqrt()
    cosine = torch.where(denominator > 0, dot / torch.where(denominator > 0, denominator, 1.0), 0.0)
    return {"tau": delta_sq.sqrt(), "grad_norm": grad_sq.sqrt(), "update_param_cosine": cosine}


def guard_facts(policy: object, config: Any, optimizer: object, params: list[Tensor]) -> dict[str, str]:
    """What every rank's guard must share for the ranks to decide alike (see :func:`check_ranks_agree`)."""
    shapes = ",".join(f"{tuple(p.shape)}:{str(p.dtype).removeprefix('torch.')}" for p in params)
    return {
        "policy": repr(policy),
        "config": config.model_dump_json(),
        "optimizer": type(optimizer).__name__,
        "parameters": f"{len(params)} tensors, {hashlib.sha256(shapes.encode()).hexdigest()[:12]}",
    }
