"""Measuring one update, shared by the live guard and the post-hoc analyzer.

``measure_update`` turns (θ₀, Δθ, batch) into 0-d tensors on the device (no host sync);
``sync_to_host`` brings them over in one transfer; ``build_report`` makes the
:class:`~stepguard.StepReport`. The guard and the analyzer call the same three functions,
so a replayed transition and the live step it came from report the same numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from stepguard.config import GuardConfig
from stepguard.diagnostics._rows import masked_mean, sorted_quantiles
from stepguard.errors import ReplayOutOfMemoryError
from stepguard.geometry.formulas import PI
from stepguard.geometry.jvp import Batch, EstimatorChoice, logit_velocities
from stepguard.geometry.logits import LogitsFn, mask_rows
from stepguard.report import FIELDS, Estimator, Source, SpreadSummary, StepReport, row_summaries

QUANTILES = (0.99, 0.9, 0.5)


def global_norm(tensors: list[Tensor]) -> Tensor:
    """‖(t₁, …, t_n)‖₂ with foreach kernels, in float64 when any tensor is float64, else float32.

    Sparse COO tensors (``nn.Embedding(sparse=True)`` gradients) count by their coalesced
    values: duplicate indices are summed first, as the dense tensor would hold them.
    """
    if not tensors:
        return torch.zeros(())
    tensors = [t.coalesce().values() if t.is_sparse else t for t in tensors]
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) == 1 and dtypes <= {torch.float32, torch.float64}:
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors, 2)), 2)
    wide = torch.float64 if torch.float64 in dtypes else torch.float32
    norms = [torch.linalg.vector_norm(t, dtype=None if t.dtype == torch.float64 else wide) for t in tensors]
    return torch.linalg.vector_norm(torch.stack([n.to(wide) for n in norms]), 2)


VelocityFn = Callable[[Batch, Mapping[str, Tensor], Mapping[str, Tensor]], tuple[Tensor, Tensor]]
"""``velocity_fn(batch, theta0, tangent) -> (logits, velocity)``: a replay of one batch."""


@dataclass(frozen=True)
class Part:
    """One forward whose rows count in a step: its batch, and its targets and mask (or None)."""

    batch: Batch
    targets: Tensor | None = None
    mask: Tensor | None = None


def measure_update(
    model: nn.Module,
    theta0: Mapping[str, Tensor],
    update: Mapping[str, Tensor],
    tau: Tensor,
    batch: Batch | Sequence[Part],
    *,
    config: GuardConfig,
    targets: Tensor | None = None,
    mask: Tensor | None = None,
    logits_fn: LogitsFn | None = None,
    estimator: EstimatorChoice | None = None,
    summarize_on_host: bool = True,
    timings: dict[str, float] | None = None,
    before_part: Callable[[Part], None] | None = None,
    velocity_fn: VelocityFn | None = None,
) -> tuple[str, dict[str, Tensor], dict[str, Tensor]]:
    """Logit velocities at θ₀ along Δθ/τ on the step's batches, and every number derived from them.

    With gradient accumulation a step's update comes from several forwards (micro-batches);
    its loss is their sum, so Δ_a is the max over the rows of all of them, and every other
    statistic runs over their union. Each micro-batch is replayed in turn and reduced to
    its per-row columns (a few numbers per row) before the next: the logits and their
    tangent of one micro-batch at a time are alive, never all of them.

    Args:
        model: the (unwrapped) module.
        theta0: the trainable parameters at the start of the step, by name.
        update: Δθ by the same names (zeros for parameters the step does not move).
        tau: τ = ‖Δθ‖ over every parameter the optimizer moves (0-d tensor).
        batch: the forward to replay, or several :class:`Part` (each with its own targets
            and mask; ``targets``/``mask`` are then ignored).
        config: mode, estimator, temperature, ignore_index, binding_k, max_spread_values.
        targets, mask: rows that count (and top-2 targets) of a single batch.
        logits_fn: picks the logits from the output.
        estimator: overrides ``config.estimator``.
        summarize_on_host: see :func:`step_geometry`.
        timings: when given, receives the seconds spent in the ``"jvp"`` (logit
            velocities) and in the ``"statistics"`` (the per-row columns and their
            summaries), host time.
        before_part: called with each part before it is replayed (e.g. to hand a loss
            head that part's targets).
        velocity_fn: ``velocity_fn(batch, theta0, tangent) -> (z, a)`` replaces the JVP
            of :func:`~stepguard.geometry.jvp.logit_velocities` (the sharded replay under
            FSDP2 passes its own); it is called with Δθ as the tangent, and its velocity
            is scaled by 1/τ in place.

    Returns:
        ``(estimator_used, scalars, vectors)`` of tensors on the device; the estimator is
        ``"finite_difference"`` when any micro-batch needed it.
    """
    parts = [Part(batch, targets, mask)] if isinstance(batch, Batch) else list(batch)
    if not parts:
        raise ValueError("measure_update needs at least one batch")
    # J·(Δθ/τ) = (J·Δθ)/τ: the replay runs along Δθ itself and its velocities are scaled,
    # so no scaled copy of the update is ever made
    scale = torch.where(tau > 0, 1.0 / tau, torch.zeros_like(tau))
    jvp_seconds = statistics_seconds = 0.0
    columns: list[RowColumns | None] = []
    used = "jvp"
    for part in parts:
        if before_part is not None:
            before_part(part)
        started = time.perf_counter()
        with _naming_out_of_memory(part, config):
            if velocity_fn is not None:
                z, velocity = velocity_fn(part.batch, theta0, update)
                velocity.mul_(scale.to(velocity.dtype))
            else:
                z, velocities, part_used = logit_velocities(
                    model,
                    dict(theta0),
                    [update],
                    part.batch,
                    logits_fn=logits_fn,
                    mode=config.mode,
                    estimator=estimator or config.estimator,
                    fd_epsilon=config.fd_epsilon,
                    chunk_size=config.attention_chunk,
                    tangent_scale=scale,
                )
                velocity = velocities[0]
                if part_used != "jvp":
                    used = part_used
        jvp_done = time.perf_counter()
        columns.append(batch_columns(z, velocity, targets=part.targets, mask=part.mask, config=config))
        del z, velocity
        jvp_seconds += jvp_done - started
        statistics_seconds += time.perf_counter() - jvp_done
    started = time.perf_counter()
    scalars, vectors = summarize_columns(columns, config=config, summarize_on_host=summarize_on_host)
    if timings is not None:
        timings["jvp"] = jvp_seconds
        timings["statistics"] = statistics_seconds + time.perf_counter() - started
    return used, scalars, vectors


_REQUESTED = re.compile(r"(?:tried|Tried) to allocate ([\d.]+) ?(bytes|[KMGT]iB)")
_UNITS = {"bytes": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def _is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA out-of-memory error, or the CPU allocator's refusal."""
    kind = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if kind is not None and isinstance(exc, kind):
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


@contextlib.contextmanager
def _naming_out_of_memory(part: Part, config: GuardConfig) -> Iterator[None]:
    """Turn an out-of-memory error of a replay into a :class:`ReplayOutOfMemoryError` that says why."""
    try:
        yield
    except (RuntimeError, MemoryError) as exc:
        if isinstance(exc, ReplayOutOfMemoryError) or not _is_out_of_memory(exc):
            raise
        text = str(exc)
        found = _REQUESTED.search(text)
        requested = int(float(found.group(1)) * _UNITS[found.group(2)]) if found else None
        rows = int(part.targets.numel()) if part.targets is not None else None
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        raise ReplayOutOfMemoryError(
            first, rows=rows, requested=requested, attention_chunk=config.attention_chunk
        ) from exc


ROW_CHUNK_ELEMENTS = 1 << 18
"""Per-row statistics run over chunks of rows of at most this many logits (1 MiB in float32).

Small chunks stay in cache between the statistics' passes over them, and their buffers
stay small beside the logits: on one CPU thread the statistics of [1024, 32000] logits took
0.25 s in chunks of 256K logits, 0.30 s in chunks of 1M and 0.39 s in chunks of 4M. A row
longer than a chunk (a vocabulary over 256K) is a chunk of its own.
"""


@dataclass(frozen=True)
class RowColumns:
    """The per-row columns of one batch (:func:`row_columns`), which rows count, and whether K ≤ 2."""

    columns: dict[str, Tensor]
    keep: Tensor | None
    binary: bool

    @property
    def rows(self) -> int:
        return next(iter(self.columns.values())).shape[0]


@torch.inference_mode()
def batch_columns(
    logits: Tensor,
    velocity: Tensor,
    *,
    targets: Tensor | None,
    mask: Tensor | None,
    config: GuardConfig,
    chunk_elements: int = ROW_CHUNK_ELEMENTS,
) -> RowColumns | None:
    """The per-row columns of one batch, computed over chunks of rows (``None`` without rows).

    :func:`row_columns` makes a few temporaries the size of its input; over chunks of at
    most ``chunk_elements`` logits each, the largest temporary stays at that size whatever
    the vocabulary and the number of tokens, beside the logits and their tangent.
    """
    z, a, y, keep = mask_rows(logits, velocity, mask=mask, targets=targets, ignore_index=config.ignore_index)
    if config.temperature != 1.0:
        z, a = z / config.temperature, a / config.temperature
    rows, k = z.shape
    if rows == 0:
        return None
    per = max(1, chunk_elements // k)
    if rows <= per:
        columns = row_columns(z, a, y, diagnostics=config.diagnostics)
    else:
        scratch = Scratch()
        chunks = [
            row_columns(z[i : i + per], a[i : i + per], None if y is None else y[i : i + per],
                        diagnostics=config.diagnostics, scratch=scratch)
            for i in range(0, rows, per)
        ]
        columns = {name: torch.cat([c[name] for c in chunks]) for name in chunks[0]}
    return RowColumns(columns, keep, binary=k <= 2)


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

    :func:`batch_columns` then :func:`summarize_columns` on one batch.
    """
    columns = batch_columns(logits, velocity, targets=targets, mask=mask, config=config)
    return summarize_columns([columns], config=config, summarize_on_host=summarize_on_host)


@torch.inference_mode()
def summarize_columns(
    parts: Sequence[RowColumns | None], *, config: GuardConfig, summarize_on_host: bool = True
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The batch summaries of the per-row columns of one or more batches, as device tensors.

    Everything stays on the device as tensors; see :func:`sync_to_host`. When there are at
    most ``config.max_spread_values`` rows and ``summarize_on_host`` is set, the per-row
    columns travel to the host whole (one ``(F, M)`` tensor ``rows``, its column names in
    ``row_names`` and ``binary`` as plain Python values) and :func:`build_report` reduces
    them there: on small batches the dozen reductions cost more as device ops than the
    transfer. The numbers agree with the device path to rounding (tested). Cross-rank
    reduction needs the summaries as tensors, so the guard turns this off under
    ``torch.distributed``.

    Rows that do not count (mask, ``ignore_index``) are masked, not dropped, so nothing
    here waits for the device. Several batches (micro-batches of one step) are summarized
    as the union of their rows; ``binding`` then indexes their concatenation. The per-row
    quantities are checked in the tests against the reference definitions
    (:func:`~stepguard.geometry.formulas.top2_radius`,
    :func:`~stepguard.diagnostics.softmax_collapse_stats`,
    :func:`~stepguard.diagnostics.nlm_cosine`). It runs in inference mode (no autograd
    bookkeeping per op, about 15 % less dispatch); its outputs are only ever read.
    """
    present = [p for p in parts if p is not None]
    if not present:
        zero = torch.zeros((), dtype=torch.float64)
        return {"delta_a": zero, "count": zero}, {}
    if len(present) == 1:
        columns, keep = present[0].columns, present[0].keep
    else:
        columns = {name: torch.cat([p.columns[name] for p in present]) for name in present[0].columns}
        if all(p.keep is None for p in present):
            keep = None
        else:
            keep = torch.cat([
                p.keep if p.keep is not None
                else torch.ones(p.rows, dtype=torch.bool, device=p.columns["spread"].device)
                for p in present
            ])
    binary = present[0].binary
    rows = columns["spread"].shape[0]
    if summarize_on_host and rows <= config.max_spread_values:
        names = tuple(columns)
        stacked = [columns[n] for n in names]
        if keep is not None:
            names, stacked = (*names, "keep"), [*stacked, keep]
        return {}, {"rows": torch.stack(stacked), "row_names": names, "binary": binary}
    scalars, vectors = _device_summary(columns, keep, config.binding_k)
    if binary:
        scalars["rho_binary"] = scalars["rho_top2"]
    if rows <= config.max_spread_values:  # spreads are ≥ 0: −1 marks a dropped row
        spread = columns["spread"].to(torch.float64)
        vectors["values"] = spread if keep is None else torch.where(keep, spread, -1.0)
    return scalars, vectors


def _device_summary(
    columns: Mapping[str, Tensor], keep: Tensor | None, binding_k: int
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The batch summaries as device tensors, over the rows ``keep`` marks (no host sync).

    With no row kept the maxima read 0 (−inf for the logit gap), the minima +inf and the
    means 0: neutral under the cross-rank MAX, MIN and count-weighted means, and dropped
    from the report by :func:`build_report` when the total count is 0.
    """
    spread = columns["spread"].to(torch.float64)
    top2 = columns["top2"].to(torch.float64)
    rows = spread.shape[0]
    if keep is None:
        count = torch.full((), float(rows), dtype=torch.float64, device=spread.device)
        kept_spread, kept_top2 = spread, top2
    else:
        count = keep.sum().to(torch.float64)
        kept_spread, kept_top2 = torch.where(keep, spread, math.inf), torch.where(keep, top2, math.inf)
    ordered = kept_spread.sort().values  # dropped rows sort last
    has = count > 0
    last = (count - 1).clamp(min=0)
    scalars: dict[str, Tensor] = {
        "delta_a": spread.max() if keep is None else torch.where(keep, spread, 0.0).max(),
        "count": count,
        "spread_mean": _neutral_mean(spread, keep, count),
        "spread_min": ordered[0],
        "spread_q": sorted_quantiles(ordered, QUANTILES, last).where(has, 0.0),
        "rho_top2": kept_top2.min(),
        **_reduce_columns(columns, keep, count),
    }
    k = min(binding_k, rows)
    binding = (
        torch.topk(kept_top2, k, largest=False).indices
        if k
        else torch.zeros(0, dtype=torch.long, device=spread.device)
    )
    if keep is not None and k:  # −1 marks a dropped row
        binding = torch.where(keep[binding], binding, -1)
    return scalars, {"binding": binding.to(torch.float64)}


def _neutral_mean(x: Tensor, keep: Tensor | None, count: Tensor) -> Tensor:
    """The mean over the kept rows, 0 (not NaN) without rows: neutral in a count-weighted mean."""
    if keep is None:
        return x.mean()
    return masked_mean(x, keep, count).where(count > 0, 0.0)


class Scratch:
    """Work buffers that every chunk of rows reuses, instead of allocating its temporaries anew."""

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def like(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A buffer of this shape (its contents undefined), kept under ``name`` for the next chunk."""
        numel = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype or buffer.device != device:
            buffer = self._buffers[name] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel].view(shape)


def row_columns(
    z: Tensor, a: Tensor, targets: Tensor | None, *, diagnostics: bool = True, scratch: Scratch | None = None
) -> dict[str, Tensor]:
    """Every per-row quantity of one step, one (M,) column each, in as few tensor ops as it takes.

    * ``spread``: Δ_n = max_k a − min_k a (|a| for a one-logit head).
    * ``top2``: √(δ_n² + π²)/|s_n| with y the target (the top class without targets), c the
      strongest other class, δ = z_y − z_c, s = a_c − a_y (the binary radius for K ≤ 2);
      +inf where s = 0.
    * for K ≥ 2: ``collapsed`` (Σ_j exp(z_j − max z) = 1 in the logits' dtype: softmax
      collapse), ``zero_loss`` (with targets: collapsed and the target on top, i.e. CE = 0
      exactly), ``log_z`` = log Σ_j exp z_j, ``gap`` = top-1 − top-2 logit, and ``nlm``,
      the centred cosine between a_n and z_n (0 where either is constant).

    The cross-entropy-free identities used: log Z = max z + log Σ exp(z − max z), sharing
    the sum that decides collapse (float32 or wider; half-precision logits get their own
    float32 sum for log Z, their collapse is decided in their own dtype). With
    ``diagnostics=False`` only ``spread`` and ``top2`` are computed. With a ``scratch``, the
    logits-sized temporaries are written into its buffers (the same numbers as without).
    """
    if z.shape[-1] == 1:
        s, slope = z[:, 0], a[:, 0]
        return {"spread": slope.abs(), "top2": _modulus(s, slope)}
    best = z.topk(2, dim=-1)
    first, second = best.values[:, 0], best.values[:, 1]
    top_index = best.indices[:, 0]
    y = targets.to(z.device, torch.long) if targets is not None else None
    if z.shape[-1] == 2:
        slope = a[:, 1] - a[:, 0]
        top2 = _modulus(z[:, 1] - z[:, 0], slope)
        spread = slope.abs()
    else:
        spread = a.amax(dim=-1) - a.amin(dim=-1)  # on CPU several times faster than aminmax
        if y is None:
            pair_index, margin = best.indices, first - second
        else:  # c: the strongest class other than y
            c = torch.where(top_index == y, best.indices[:, 1], top_index)
            pair_index = torch.stack([y, c], dim=1)
            pair_z = z.gather(1, pair_index)
            margin = pair_z[:, 0] - pair_z[:, 1]
        pair = a.gather(1, pair_index)
        top2 = _modulus(margin, pair[:, 1] - pair[:, 0])
    if not diagnostics:
        return {"spread": spread, "top2": top2}
    wide = torch.float64 if z.dtype == torch.float64 else torch.float32
    scratch = scratch or Scratch()
    shifted = torch.sub(z, best.values[:, :1], out=scratch.like("shifted", tuple(z.shape), z.dtype, z.device))
    total = shifted.exp_().sum(dim=-1)
    collapsed = total == 1
    if z.dtype == wide:
        log_z = first + total.log()
    else:
        zw = z.to(wide)
        log_z = zw.amax(dim=-1) + (zw - zw.amax(dim=-1, keepdim=True)).exp().sum(dim=-1).log()
    both = scratch.like("both", (2, *z.shape), wide, z.device)
    torch.stack([z, a] if z.dtype == a.dtype == wide else [z.to(wide), a.to(wide)], out=both)
    both.sub_(both.mean(dim=-1, keepdim=True))
    den = torch.linalg.vector_norm(both, dim=-1).prod(dim=0)
    dot = torch.mul(both[0], both[1], out=scratch.like("product", tuple(z.shape), wide, z.device)).sum(dim=-1)
    out = {
        "spread": spread,
        "top2": top2,
        "collapsed": collapsed,
        "log_z": log_z,
        "gap": first - second if z.dtype == wide else first.to(wide) - second.to(wide),
        "nlm": torch.nan_to_num(dot / den, nan=0.0),
    }
    if y is not None:
        out["zero_loss"] = collapsed & (top_index == y)
    return out


def _reduce_columns(
    columns: Mapping[str, Tensor], keep: Tensor | None = None, count: Tensor | None = None
) -> dict[str, Tensor]:
    """The batch means and maxima of the diagnostic columns over the kept rows (device tensors)."""
    if "collapsed" not in columns:
        return {}
    log_z = columns["log_z"]
    wide = log_z.dtype
    if keep is None:
        out = {
            "sc_fraction": columns["collapsed"].to(wide).mean(),
            "max_logit_gap": columns["gap"].max(),
            "logz_mean": log_z.mean(),
            "logz_sq_mean": log_z.square().mean(),
            "nlm_cosine": columns["nlm"].mean(),
        }
        if "zero_loss" in columns:
            out["sc_zero_loss_fraction"] = columns["zero_loss"].to(wide).mean()
        return out
    assert count is not None
    out = {
        "sc_fraction": _neutral_mean(columns["collapsed"].to(wide), keep, count),
        "max_logit_gap": torch.where(keep, columns["gap"], -math.inf).max(),
        "logz_mean": _neutral_mean(log_z, keep, count),
        "logz_sq_mean": _neutral_mean(log_z.square(), keep, count),
        "nlm_cosine": _neutral_mean(columns["nlm"], keep, count),
    }
    if "zero_loss" in columns:
        out["sc_zero_loss_fraction"] = _neutral_mean(columns["zero_loss"].to(wide), keep, count)
    return out


def row_statistics(z: Tensor, a: Tensor, targets: Tensor | None) -> dict[str, Tensor]:
    """Per-row ``spread`` and ``top2`` of :func:`row_columns` and the batch reductions of the rest.

    Keys: ``spread``, ``top2`` and, for K ≥ 2, ``sc_fraction``, ``sc_zero_loss_fraction``
    (with targets), ``max_logit_gap``, ``logz_mean``, ``logz_sq_mean`` and ``nlm_cosine``:
    the set of :func:`~stepguard.diagnostics.softmax_collapse_stats` and
    :func:`~stepguard.diagnostics.nlm_cosine`, against which the tests check it.
    """
    columns = row_columns(z, a, targets)
    return {"spread": columns["spread"], "top2": columns["top2"], **_reduce_columns(columns)}


def _modulus(margin: Tensor, slope: Tensor) -> Tensor:
    """√(margin² + π²)/|slope|: +inf where the slope is 0 (the numerator is at least π)."""
    return (margin * margin + PI * PI).sqrt() / slope.abs()


def _quantiles(spread: Tensor, *, is_sorted: bool = False) -> Tensor:
    """The QUANTILES of ``spread`` with linear interpolation (as ``torch.quantile``), from one sort."""
    return sorted_quantiles(spread if is_sorted else spread.sort().values, QUANTILES)


def sync_to_host(scalars: Mapping[str, Tensor], vectors: Mapping[str, Any]) -> dict[str, Any]:
    """Bring every measured number to the host in one transfer (one ``cat``, one ``tolist``).

    Scalars become floats; ``vectors`` entries and ``spread_q`` become lists of floats.
    Entries of ``vectors`` that are not tensors (host-side facts such as ``binary``) pass
    through unchanged. Values keep their precision: the concatenation takes the widest
    floating dtype present, and integer tensors (row positions) are widened to float64
    first, so no index loses digits.
    """
    out: dict[str, Any] = {}
    layout: list[tuple[str, int, bool]] = []
    parts: list[Tensor] = []
    device: torch.device | None = None
    for is_vector, items in ((False, scalars.items()), (True, vectors.items())):
        for name, value in items:
            if not isinstance(value, Tensor):
                out[name] = value
                continue
            flat = value.detach().reshape(-1)
            if device is None:
                device = flat.device
            elif flat.device != device:
                flat = flat.to(device)
            if not flat.is_floating_point():
                flat = flat.to(torch.float64)
            layout.append((name, flat.numel(), is_vector or name == "spread_q"))
            parts.append(flat)
    if not parts:
        return out
    numbers = (torch.cat(parts) if len(parts) > 1 else parts[0]).tolist()
    offset = 0
    for name, n, as_list in layout:
        out[name] = numbers[offset : offset + n] if as_list else numbers[offset]
        offset += n
    return out


def _summarize_rows(values: Mapping[str, Any], binding_k: int) -> dict[str, Any]:
    """Finish on the host what :func:`step_geometry` left undone.

    Whole per-row columns (``rows``, named by ``row_names``, with a ``keep`` column when
    rows were masked) are reduced here; from the device path, the −1 markers of dropped
    rows leave ``binding`` and ``values``. With no row counted, only ``count`` = 0 and
    Δ_a = 0 remain.
    """
    out = {k: v for k, v in values.items() if k not in ("rows", "row_names")}
    names = values.get("row_names")
    if names is None:
        for key in ("binding", "values"):
            if key in out:
                out[key] = [v for v in out[key] if v >= 0 or math.isnan(v)]
        if out.get("count", 1) == 0:
            return {k: v for k, v in out.items() if k not in _ROW_SUMMARIES}
        return out
    flat = values["rows"]
    rows = len(flat) // len(names)
    column = {name: flat[i * rows : (i + 1) * rows] for i, name in enumerate(names)}
    kept = [i for i, k in enumerate(column["keep"]) if k] if "keep" in column else range(rows)
    if len(kept) < rows:
        column = {name: [col[i] for i in kept] for name, col in column.items()}
    count = len(kept)
    if count == 0:
        out.update(count=0.0, delta_a=0.0)
        return out
    spread, top2 = column["spread"], column["top2"]
    ordered = sorted(spread)
    quantiles = sorted_quantiles(torch.tensor(ordered, dtype=torch.float64), QUANTILES).tolist()
    order = heapq.nsmallest(binding_k, range(count), key=top2.__getitem__)  # stable: ties by row
    out.update(
        count=float(count),
        values=spread,
        delta_a=ordered[-1],
        spread_min=ordered[0],
        spread_mean=math.fsum(spread) / count,
        spread_q=quantiles,
        rho_top2=min(top2),
        binding=[kept[i] for i in order],
    )
    if values.get("binary"):
        out["rho_binary"] = out["rho_top2"]
    if "collapsed" in column:
        log_z = column["log_z"]
        out.update(
            sc_fraction=sum(column["collapsed"]) / count,
            max_logit_gap=max(column["gap"]),
            logz_mean=math.fsum(log_z) / count,
            logz_sq_mean=math.fsum(x * x for x in log_z) / count,
            nlm_cosine=math.fsum(column["nlm"]) / count,
        )
        if "zero_loss" in column:
            out["sc_zero_loss_fraction"] = sum(column["zero_loss"]) / count
    return out


#: What a step with no counted row does not report (it keeps ``count`` = 0 and Δ_a = 0).
#: Declared with the report fields (``row_summary=True`` in :mod:`stepguard.report`).
_ROW_SUMMARIES = row_summaries()


def _estimated_report(
    values: Mapping[str, Any],
    *,
    step: int,
    last_rho: float | None,
    loss: Any,
    lr: float | None,
    source: Source,
    **fields: Any,
) -> StepReport:
    """The report of an unmeasured step: r = τ/ρ_a(last), nothing else measured."""
    tau = values["tau"]
    rho = last_rho if last_rho is not None else math.nan
    estimator: Estimator = "estimate" if last_rho is not None else "none"
    if rho == math.inf:
        delta, r = 0.0, 0.0
    elif rho and math.isfinite(rho):
        delta, r = PI / rho, tau / rho
    else:
        delta, r = 0.0, math.nan
    return StepReport(
        step=step,
        tau=tau,
        rho_a=rho,
        r=r,
        delta_a=delta,
        spread=_NO_SPREAD,
        applied_tau=tau,
        estimator=estimator,
        measured=False,
        loss=_loss_value(values, loss),
        lr=lr,
        source=source,
        **fields,
    )


_NO_SPREAD = SpreadSummary()

#: The optional numbers of a measured step, as ``(field, measured name)``: every report field
#: that defaults to None and is reduced across ranks (``rho_binary``, ``grad_norm``,
#: ``sc_fraction`` …), read from the declarations in :mod:`stepguard.report`, so a new metric
#: declared there reaches the report with no edit here. The loss has its own rule (:func:`_loss_value`).
_MEASURED_OPTIONAL = tuple(
    (f.name, FIELDS[f.name].wire)
    for f in dataclasses.fields(StepReport)
    if f.default is None and FIELDS[f.name].reduce != "none" and f.name != "loss"
)


def _loss_value(values: Mapping[str, Any], loss: Any) -> float | None:
    """The synced loss, else a plain number the caller passed."""
    value = values.get("loss")
    if value is None and isinstance(loss, (int, float)):
        return float(loss)
    return value


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
    **fields: Any,
) -> StepReport:
    """The :class:`StepReport` of synced ``values`` (before any decision: ``action="allow"``).

    ``fields`` are further :class:`StepReport` fields (``rank``, ``extras`` …).

    r = τ·Δ_a/π (so τ = 0 gives r = 0 even when ρ_a = +inf). On an unmeasured step
    (``measured=False``) r is estimated as τ/ρ_a(``last_rho``): ρ_a depends only on the
    direction, and the direction rarely turns fast between measurements. A measurement in
    which no row counts (every row masked or ``ignore_index``) measured nothing: its report
    is that of an unmeasured step (r estimated, or NaN with ``estimator="none"`` when no
    radius was ever measured), never the r = 0 of Δ_a = 0.
    """
    if not measured:
        return _estimated_report(
            values, step=step, last_rho=last_rho, loss=loss, lr=lr, source=source, **fields
        )
    values = _summarize_rows(values, binding_k)
    tau = values["tau"]
    if values.get("count", 1) == 0 and tau != 0:  # no row counts: the update was not measured
        return _estimated_report(
            values, step=step, last_rho=last_rho, loss=loss, lr=lr, source=source, **fields
        )
    est: Estimator = estimator  # type: ignore[assignment]
    delta = values.get("delta_a", 0.0)
    rho = math.inf if delta == 0 else PI / delta
    r = tau * delta / PI if math.isfinite(tau) else math.nan
    if math.isnan(delta):
        rho = r = math.nan
    if tau == 0:
        est = "none"
    q = values.get("spread_q", [0.0, 0.0, 0.0])
    spread = SpreadSummary(
        count=int(values.get("count", 0)),
        max=float(delta),
        q99=q[0],
        q90=q[1],
        median=q[2],
        mean=values.get("spread_mean", 0.0),
        min=values.get("spread_min", 0.0),
        values=tuple(values.get("values", ())),
    )
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
        binding=tuple(int(i) for i in values.get("binding", ())),
        loss=_loss_value(values, loss),
        lr=lr,
        source=source,
        **{name: values.get(wire) for name, wire in _MEASURED_OPTIONAL},
        **fields,
    )
