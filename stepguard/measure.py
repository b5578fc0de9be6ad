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
from stepguard.diagnostics import nlm_cosine, softmax_collapse_stats
from stepguard.geometry.formulas import PI, logit_spread, top2_radius
from stepguard.geometry.jvp import Batch, EstimatorChoice, logit_velocities
from stepguard.geometry.logits import LogitsFn, to_rows
from stepguard.report import Estimator, Source, SpreadSummary, StepReport

QUANTILES = (0.99, 0.9, 0.5)
_COLLAPSE_KEYS = ("sc_fraction", "sc_zero_loss_fraction", "max_logit_gap", "logz_mean", "logz_sq_mean")


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

    Returns:
        ``(estimator_used, scalars, vectors)`` of tensors on the device.
    """
    scale = torch.where(tau > 0, 1.0 / tau, torch.zeros_like(tau))
    tangent = {n: d * scale.to(device=d.device, dtype=d.dtype) for n, d in update.items()}
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
    scalars, vectors = step_geometry(z, velocities[0], targets=targets, mask=mask, config=config)
    return used, scalars, vectors


def step_geometry(
    logits: Tensor,
    velocity: Tensor,
    *,
    targets: Tensor | None,
    mask: Tensor | None,
    config: GuardConfig,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Δ_a, spread quantiles, top-2 and binary radii, binding rows, softmax collapse and NLM.

    Everything stays on the device as tensors; see :func:`sync_to_host`.
    """
    z, a, y, positions = to_rows(
        logits, velocity, mask=mask, targets=targets, ignore_index=config.ignore_index
    )
    assert a is not None
    if config.temperature != 1.0:
        z, a = z / config.temperature, a / config.temperature
    device = a.device
    spread = logit_spread(a).to(torch.float64)
    count = spread.numel()
    empty = torch.zeros(0, dtype=torch.float64, device=device)
    if count == 0:
        zero = torch.zeros((), dtype=torch.float64, device=device)
        return {"delta_a": zero, "count": zero}, {"binding": empty, "values": empty}
    scalars: dict[str, Tensor] = {
        "delta_a": spread.max(),
        "count": torch.tensor(float(count), dtype=torch.float64, device=device),
        "spread_mean": spread.mean(),
        "spread_min": spread.min(),
        "spread_q": _quantiles(spread),
    }
    if z.shape[-1] >= 2:
        collapse = softmax_collapse_stats(z, y)
        scalars.update({k: collapse[k] for k in _COLLAPSE_KEYS if k in collapse})
        scalars["nlm_cosine"] = nlm_cosine(z, a)
    top2 = top2_radius(z, a, y).to(torch.float64)
    scalars["rho_top2"] = top2.min()
    if z.shape[-1] <= 2:
        scalars["rho_binary"] = top2.min()
    k = min(config.binding_k, count)
    binding = torch.topk(top2, k, largest=False).indices if k else empty
    if positions is not None and k:
        binding = positions[binding]
    values = spread if count <= config.max_spread_values else empty
    return scalars, {"binding": binding.to(torch.float64), "values": values}


def _quantiles(spread: Tensor) -> Tensor:
    q = torch.tensor(QUANTILES, dtype=spread.dtype, device=spread.device)
    if spread.numel() > 1 << 24:
        spread = spread[torch.randperm(spread.numel(), device=spread.device)[: 1 << 24]]
    return torch.quantile(spread, q)


def sync_to_host(scalars: Mapping[str, Tensor], vectors: Mapping[str, Tensor]) -> dict[str, Any]:
    """Bring every measured number to the host in one transfer.

    Scalars become floats; ``vectors`` entries and ``spread_q`` become lists of floats.
    """
    names: list[tuple[str, int]] = []
    parts: list[Tensor] = []
    device = next(iter(scalars.values())).device
    for name, value in {**scalars, **vectors}.items():
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
) -> StepReport:
    """The :class:`StepReport` of synced ``values`` (before any decision: ``action="allow"``).

    r = τ·Δ_a/π (so τ = 0 gives r = 0 even when ρ_a = +inf). On an unmeasured step
    (``measured=False``) r is estimated as τ/ρ_a(``last_rho``): ρ_a depends only on the
    direction, and the direction rarely turns fast between measurements.
    """
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
