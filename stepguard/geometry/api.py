"""The functional core: :func:`radius` of a model along any direction."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from stepguard.geometry.directions import Direction, align_direction, normalize
from stepguard.geometry.formulas import binary_radius, logit_spread, top2_radius
from stepguard.geometry.jvp import Batch, EstimatorChoice, Mode, logit_velocities
from stepguard.geometry.logits import LogitsFn, to_rows


@dataclass(frozen=True)
class RadiusResult:
    """The radius of the softmax cross-entropy along one unit direction.

    Attributes:
        rho_a: ρ_a = π·T/Δ_a (+inf when Δ_a = 0).
        delta_a: Δ_a = max_n Δ_n over the rows that count.
        spread: (M,) per-row spreads Δ_n (rows: samples, or labelled positions).
        rho_binary: exact ρ* = min_n √(s_n² + π²)/|a_n| for one- and two-logit heads, else None.
        top2: (M,) per-row top-2 radii √(δ_n² + π²)/|s_n|.
        positions: flat index of each counted row in the (N·T) grid (None: all rows count).
        estimator: ``"jvp"`` or ``"finite_difference"``.
        logits: (M, K) logits of the counted rows.
        velocity: (M, K) their velocities a = J_z·v.
    """

    rho_a: float
    delta_a: float
    spread: Tensor
    rho_binary: float | None
    top2: Tensor
    positions: Tensor | None
    estimator: str
    logits: Tensor
    velocity: Tensor


def radius(
    model: nn.Module,
    inputs: Any,
    direction: Direction | None = None,
    *,
    directions: Sequence[Direction] | None = None,
    logits_fn: LogitsFn | None = None,
    targets: Tensor | None = None,
    mask: Tensor | None = None,
    ignore_index: int | None = -100,
    temperature: float = 1.0,
    mode: Mode = "train",
    estimator: EstimatorChoice = "auto",
) -> RadiusResult | list[RadiusResult]:
    """ρ_a = π/Δ_a of ``model`` on ``inputs`` along ``direction`` ("Ghosts of Softmax", arXiv 2603.13552).

    The direction is normalized to unit global L2 norm over the trainable parameters; one
    forward-mode JVP gives the logit velocities a = J_z·v, and Δ_a = max_n (max_k a_{n,k} −
    min_k a_{n,k}). Several ``directions`` are computed in one vmapped JVP.

    Args:
        model: an ``nn.Module`` returning logits (tensor, ``.logits`` or ``{"logits": …}``).
        inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs.
        direction: a dict ``name → tensor`` or a sequence aligned with ``model.parameters()``.
        directions: several directions at once (then a list of results is returned).
        logits_fn: picks the logits from the output when it is something else.
        targets: class indices per row (top-2 radii use them; ``ignore_index`` rows drop out).
        mask: boolean, one entry per row; False rows (padding) do not count.
        ignore_index: target value that marks a row as not counted.
        temperature: logits divided by T give ρ_a(T) = π·T/Δ_a(raw logits).
        mode: ``"train"`` differentiates the module as it is (normalization layers use
            batch statistics when training, running buffers untouched); ``"eval"``
            switches it to eval mode for the call.
        estimator: ``"auto"``, ``"jvp"`` or ``"finite_difference"``.

    Returns:
        A :class:`RadiusResult`, or a list of them for ``directions``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or the output has no real logits.
        ValueError: the direction's names or shapes do not match, or it is zero.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a torch.nn.Module, got {type(model).__name__}; wrap a plain "
            "function in an nn.Module whose forward returns the logits"
        )
    if (direction is None) == (directions is None):
        raise ValueError("pass exactly one of direction= or directions=")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    many = directions is not None
    given = list(directions) if many else [direction]
    if not given:
        raise ValueError("directions is empty")
    units = [normalize(align_direction(d, model))[0] for d in given]
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    batch = Batch.from_inputs(inputs, training=model.training)
    z, velocities, used = logit_velocities(
        model, params, units, batch, logits_fn=logits_fn, mode=mode, estimator=estimator
    )
    results = [_result(z, a, targets, mask, ignore_index, temperature, used) for a in velocities]
    return results if many else results[0]


def _result(
    logits: Tensor,
    velocity: Tensor,
    targets: Tensor | None,
    mask: Tensor | None,
    ignore_index: int | None,
    temperature: float,
    estimator: str,
) -> RadiusResult:
    z, a, y, positions = to_rows(logits, velocity, mask=mask, targets=targets, ignore_index=ignore_index)
    assert a is not None
    if temperature != 1.0:
        z, a = z / temperature, a / temperature
    spread = logit_spread(a)
    delta = float(spread.max()) if spread.numel() else 0.0
    rho_binary = None
    if z.shape[-1] <= 2 and z.shape[0] > 0:
        rho_binary = float(binary_radius(z, a).min())
    return RadiusResult(
        rho_a=math.pi / delta if delta > 0 else (math.inf if delta == 0 else math.nan),
        delta_a=delta,
        spread=spread,
        rho_binary=rho_binary,
        top2=top2_radius(z, a, y) if z.shape[0] else spread,
        positions=positions,
        estimator=estimator,
        logits=z,
        velocity=a,
    )
