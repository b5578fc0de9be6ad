"""Measuring one update, shared by the live guard and the post-hoc analyzer.

``measure_update`` turns (θ₀, Δθ, batch) into 0-d tensors on the device (no host sync);
``sync_to_host`` brings them over in one transfer; ``build_report`` makes the
:class:`~stepguard.StepReport`. The guard and the analyzer call the same three functions,
so a replayed transition and the live step it came from report the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from stepguard.config import GuardConfig
from stepguard.geometry.formulas import PI
from stepguard.geometry.jvp import Batch, EstimatorChoice, logit_velocities
from stepguard.geometry.logits import LogitsFn, to_rows
from stepguard.report import Estimator, Source, SpreadSummary, StepReport

QUANTILES = (0.99, 0.9, 0.5)


def global_norm(tensors: list[Tensor]) -> Tensor:
    """‖(t₁, …, t_n)‖₂ with foreach kernels, in float64 when any tensor is float64."""
    if not tensors:
        return torch.zeros(())
    norms = torch._foreach_norm(tensors, 2)
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    return torch.linalg.vector_norm(torch.stack([n.to(dtype) for n in norms]), 2)


def measure_update(
    model: nn.Module,
    theta0: Mapping[str, Tensor],
    update: Mapping[str, Tensor],
    tau: Tensor,
    batch: Batch,
    *,
    config: GuardConfig,
    targets: Tensor | None = None,
    mask: Tensor | None = None,
    logits_fn: LogitsFn | None = None,
    estimator: EstimatorChoice | None = None,
    summarize_on_host: bool = True,
) -> tuple[str, dict[str, Tensor], dict[str, Tensor]]:
    """Logit velocities at θ₀ along Δθ/τ on ``batch``, and every number derived from them.

    Args:
        model: the (unwrapped) module.
        theta0: the trainable parameters at the start of the step, by name.
        update: Δθ by the same names (zeros for parameters the step does not move).
        tau: τ = ‖Δθ‖ over every parameter the optimizer moves (0-d tensor).
        batch: the forward to replay.
        config: mode, estimator, temperature, ignore_index, binding_k, max_spread_values.
        targets, mask: rows that count (and top-2 targets).
        logits_fn: picks the logits from the output.
        estimator: overrides ``config.estimator``.
        summarize_on_host: see :func:`step_geometry`.

    Returns:
        ``(estimator_used, scalars, vectors)`` of tensors on the device.
    """
    scale = torch.where(tau > 0, 1.0 / tau, torch.zeros_like(tau))
    names = list(update)
    scaled = torch._foreach_mul([update[n] for n in names], scale.to(update[names[0]].dtype))
    tangent = dict(zip(names, scaled, strict=True))
    z, velocities, used = logit_velocities(
        model,
        dict(theta0),
        [tangent],
        batch,
        logits_fn=logits_fn,
        mode=config.mode,
        estimator=estimator or config.estimator,
        fd_epsilon=config.fd_epsilon,
    )
    scalars, vectors = step_geometry(
        z, velocities[0], targets=targets, mask=mask, config=config, summarize_on_host=summarize_on_host
    )
    return used, scalars, vectors


def step_geometry(
    logits: Tensor,
    velocity: Tensor,
    *,
    targets: Tensor | None,
    mask: Tensor | None,
    config: GuardConfig,
    summarize_on_host: bool = True,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Δ_a, spread quantiles, top-2 and binary radii, binding rows, softmax collapse and NLM.

    Everything stays on the device as tensors; see :func:`sync_to_host`. When there are at
    most ``config.max_spread_values`` rows and ``summarize_on_host`` is set, the per-row
    spreads and top-2 radii travel to the host whole (they are small) and
    :func:`build_report` summarizes them there, which saves a dozen tiny device ops; the
    numbers are the same either way (tested). Cross-rank reduction needs the summaries as
    tensors, so the guard turns this off under ``torch.distributed``. The per-row
    quantities come from :func:`row_statistics`, one fused pass that the tests check
    against the reference definitions (:func:`~stepguard.geometry.formulas.top2_radius`,
    :func:`~stepguard.diagnostics.softmax_collapse_stats`, :func:`~stepguard.diagnostics.nlm_cosine`).
    """
    z, a, y, positions = to_rows(
        logits, velocity, mask=mask, targets=targets, ignore_index=config.ignore_index
    )
    assert a is not None
    if config.temperature != 1.0:
        z, a = z / config.temperature, a / config.temperature
    device = a.device
    count = z.shape[0]
    empty = torch.zeros(0, dtype=torch.float64, device=device)
    if count == 0:
        zero = torch.zeros((), dtype=torch.float64, device=device)
        return {"delta_a": zero, "count": zero}, {"binding": empty, "values": empty}
    rows = row_statistics(z, a, y)
    spread = rows.pop("spread").to(torch.float64)
    top2 = rows.pop("top2").to(torch.float64)
    if summarize_on_host and count <= config.max_spread_values:
        scalars = {"count": torch.tensor(float(count), dtype=torch.float64, device=device), **rows}
        if z.shape[-1] <= 2:
            scalars["binary"] = torch.ones((), dtype=torch.float64, device=device)
        where = positions.to(torch.float64) if positions is not None else empty
        return scalars, {"values": spread, "top2": top2, "positions": where}
    ordered = spread.sort().values
    scalars: dict[str, Tensor] = {
        "delta_a": ordered[-1],
        "count": torch.tensor(float(count), dtype=torch.float64, device=device),
        "spread_mean": spread.mean(),
        "spread_min": ordered[0],
        "spread_q": _quantiles(ordered, is_sorted=True),
        "rho_top2": top2.min(),
        **rows,
    }
    if z.shape[-1] <= 2:
        scalars["rho_binary"] = scalars["rho_top2"]
    k = min(config.binding_k, count)
    binding = torch.topk(top2, k, largest=False).indices if k else empty
    if positions is not None and k:
        binding = positions[binding]
    values = spread if count <= config.max_spread_values else empty
    return scalars, {"binding": binding.to(torch.float64), "values": values}


def row_statistics(z: Tensor, a: Tensor, targets: Tensor | None) -> dict[str, Tensor]:
    """Every per-row quantity of one step in a single pass over (M, K) logits and velocities.

    * ``spread``: Δ_n = max_k a − min_k a (|a| for a one-logit head).
    * ``top2``: √(δ_n² + π²)/|s_n| with y the target (the top class without targets), c the
      strongest other class, δ = z_y − z_c, s = a_c − a_y (the binary radius for K ≤ 2).
    * for K ≥ 2, the softmax-collapse set of ``softmax_collapse_stats``: ``sc_fraction``
      (Σ_j exp(z_j − max z) = 1 in the logits' dtype), ``sc_zero_loss_fraction`` (with
      targets: collapsed and the target is the top class, i.e. CE = 0 exactly),
      ``max_logit_gap``, ``logz_mean``, ``logz_sq_mean``; and ``nlm_cosine``, the mean
      centred cosine between a_n and z_n.
    """
    if z.shape[-1] == 1:
        s, slope = z[:, 0], a[:, 0]
        return {"spread": slope.abs(), "top2": _modulus(s, slope)}
    if z.shape[-1] == 2:
        s, slope = z[:, 1] - z[:, 0], a[:, 1] - a[:, 0]
        top2 = _modulus(s, slope)
        spread = slope.abs()
    else:
        low, high = torch.aminmax(a, dim=-1)
        spread = high - low
        top2 = None
    best = z.topk(2, dim=-1)
    first, second = best.values[:, 0], best.values[:, 1]
    if top2 is None:
        if targets is None:
            y, c, margin = best.indices[:, 0], best.indices[:, 1], first - second
        else:
            y = targets.to(z.device, torch.long)
            on_top = best.indices[:, 0] == y
            c = torch.where(on_top, best.indices[:, 1], best.indices[:, 0])
            z_y = z.gather(1, y[:, None]).squeeze(1)
            margin = z_y - torch.where(on_top, second, first)
        pair = a.gather(1, torch.stack([y, c], dim=1))
        top2 = _modulus(margin, pair[:, 1] - pair[:, 0])
    wide = torch.float64 if z.dtype == torch.float64 else torch.float32
    total = torch.exp(z - first[:, None]).sum(dim=-1)
    collapsed = total == 1
    log_z = torch.logsumexp(z.to(wide), dim=-1)
    out = {
        "spread": spread,
        "top2": top2,
        "sc_fraction": collapsed.to(wide).mean(),
        "max_logit_gap": (first.to(wide) - second.to(wide)).max(),
        "logz_mean": log_z.mean(),
        "logz_sq_mean": log_z.square().mean(),
    }
    if targets is not None:
        y = targets.to(z.device, torch.long)
        out["sc_zero_loss_fraction"] = (collapsed & (best.indices[:, 0] == y)).to(wide).mean()
    zc = z.to(wide)
    ac = a.to(wide)
    zc = zc - zc.mean(dim=-1, keepdim=True)
    ac = ac - ac.mean(dim=-1, keepdim=True)
    den = torch.linalg.vector_norm(zc, dim=-1) * torch.linalg.vector_norm(ac, dim=-1)
    cos = torch.where(den > 0, (zc * ac).sum(dim=-1) / torch.where(den > 0, den, 1), 0)
    out["nlm_cosine"] = cos.mean()
    return out


def _modulus(margin: Tensor, slope: Tensor) -> Tensor:
    modulus = torch.sqrt(margin * margin + PI * PI)
    return torch.where(slope != 0, modulus / slope.abs(), torch.full_like(modulus, math.inf))


def _quantiles(spread: Tensor, *, is_sorted: bool = False) -> Tensor:
    """The QUANTILES of ``spread`` with linear interpolation (as ``torch.quantile``), from one sort."""
    ordered = spread if is_sorted else spread.sort().values
    last = ordered.numel() - 1
    out = []
    for q in QUANTILES:
        position = q * last
        low = int(position)
        high = min(low + 1, last)
        out.append(torch.lerp(ordered[low], ordered[high], position - low))
    return torch.stack(out)


def sync_to_host(scalars: Mapping[str, Tensor], vectors: Mapping[str, Tensor]) -> dict[str, Any]:
    """Bring every measured number to the host in one transfer.

    Scalars become floats; ``vectors`` entries and ``spread_q`` become lists of floats.
    """
    names: list[tuple[str, int]] = []
    parts: list[Tensor] = []
    device = next(iter(scalars.values())).device
    zero_d: dict[torch.dtype, list[Tensor]] = {}
    for value in scalars.values():
        if value.ndim == 0 and value.device == device:
            zero_d.setdefault(value.dtype, []).append(value)
    stacked = {dtype: torch.stack(group).to(torch.float64) for dtype, group in zero_d.items()}
    taken = dict.fromkeys(stacked, 0)
    for name, value in {**scalars, **vectors}.items():
        if name in scalars and value.ndim == 0 and value.device == device:
            i = taken[value.dtype]
            taken[value.dtype] = i + 1
            flat = stacked[value.dtype][i : i + 1]
        else:
            flat = value.detach().reshape(-1).to(device=device, dtype=torch.float64)
        names.append((name, flat.numel()))
        parts.append(flat)
    numbers = torch.cat(parts).tolist() if parts else []
    out: dict[str, Any] = {}
    offset = 0
    for name, n in names:
        chunk = numbers[offset : offset + n]
        offset += n
        out[name] = chunk if (name in vectors or name == "spread_q") else chunk[0]
    return out


def _summarize_rows(values: Mapping[str, Any], binding_k: int) -> Mapping[str, Any]:
    """Finish on the host what :func:`step_geometry` left as whole per-row vectors."""
    if "top2" not in values:
        return values
    spread, top2 = values["values"], values["top2"]
    out = dict(values)
    if not spread:
        return out
    ordered = sorted(spread)
    last = len(ordered) - 1
    quantiles = []
    for q in QUANTILES:
        position = q * last
        low = int(position)
        high = min(low + 1, last)
        quantiles.append(ordered[low] + (ordered[high] - ordered[low]) * (position - low))
    positions = values.get("positions") or range(len(top2))
    order = sorted(range(len(top2)), key=lambda i: (top2[i], i))[: min(binding_k, len(top2))]
    out.update(
        delta_a=ordered[-1],
        spread_min=ordered[0],
        spread_mean=math.fsum(spread) / len(spread),
        spread_q=quantiles,
        rho_top2=min(top2),
        binding=[positions[i] for i in order],
    )
    if values.get("binary"):
        out["rho_binary"] = out["rho_top2"]
    return out


def build_report(
    values: Mapping[str, Any],
    *,
    step: int,
    estimator: str,
    measured: bool,
    last_rho: float | None = None,
    loss: Any = None,
    lr: float | None = None,
    source: Source = "live",
    binding_k: int = 5,
) -> StepReport:
    """The :class:`StepReport` of synced ``values`` (before any decision: ``action="allow"``).

    r = τ·Δ_a/π (so τ = 0 gives r = 0 even when ρ_a = +inf). On an unmeasured step
    (``measured=False``) r is estimated as τ/ρ_a(``last_rho``): ρ_a depends only on the
    direction, and the direction rarely turns fast between measurements.
    """
    values = _summarize_rows(values, binding_k)
    tau = values["tau"]
    est: Estimator = estimator  # type: ignore[assignment]
    if measured:
        delta = values.get("delta_a", 0.0)
        rho = math.inf if delta == 0 else PI / delta
        r = tau * delta / PI if math.isfinite(tau) else math.nan
        if math.isnan(delta):
            rho = r = math.nan
        if tau == 0:
            est = "none"
    else:
        rho = last_rho if last_rho is not None else math.nan
        delta = PI / rho if rho and math.isfinite(rho) else 0.0
        r = tau / rho if rho and rho != math.inf else (0.0 if rho == math.inf else math.nan)
    q = values.get("spread_q", [0.0, 0.0, 0.0])
    spread = SpreadSummary(
        count=int(values.get("count", 0)),
        max=float(values.get("delta_a", 0.0)) if measured else 0.0,
        q99=q[0],
        q90=q[1],
        median=q[2],
        mean=values.get("spread_mean", 0.0),
        min=values.get("spread_min", 0.0),
        values=tuple(values.get("values", ())),
    )
    loss_value = values.get("loss")
    if loss_value is None and isinstance(loss, (int, float)):
        loss_value = float(loss)
    return StepReport(
        step=step,
        tau=tau,
        rho_a=rho,
        r=r,
        delta_a=delta,
        spread=spread,
        applied_tau=tau,
        estimator=est,
        measured=measured,
        rho_binary=values.get("rho_binary"),
        rho_top2=values.get("rho_top2"),
        binding=tuple(int(i) for i in values.get("binding", ())),
        loss=loss_value,
        lr=lr,
        grad_norm=values.get("grad_norm"),
        update_param_cosine=values.get("update_param_cosine"),
        sc_fraction=values.get("sc_fraction"),
        sc_zero_loss_fraction=values.get("sc_zero_loss_fraction"),
        max_logit_gap=values.get("max_logit_gap"),
        logz_mean=values.get("logz_mean"),
        logz_sq_mean=values.get("logz_sq_mean"),
        nlm_cosine=values.get("nlm_cosine"),
        source=source,
    )
