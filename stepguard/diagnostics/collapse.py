"""Softmax collapse: rows whose softmax is exactly one-hot in the training dtype.

"Grokking at the Edge of Numerical Stability" (Prieto, Barsbey, Mediano & Birdal,
ICLR 2025, arXiv 2501.04697): once a row's logit gap is large enough, every non-maximal
term of Σ_j exp(z_j − max z) is absorbed by floating-point rounding, the softmax becomes
exactly one-hot and the row's cross-entropy becomes exactly 0, so it stops contributing to
learning. Both tests are exact equalities evaluated in the logits' own dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from stepguard.diagnostics._rows import flatten_rows, masked_mean

__all__ = ["SoftmaxCollapse", "absorption_gap", "softmax_collapse", "softmax_collapse_stats"]


@dataclass(frozen=True)
class SoftmaxCollapse:
    """Softmax-collapse measurements over the counted rows of one batch.

    Attributes:
        fraction: fraction of counted rows whose Σ_j exp(z_j − max z) is exactly 1 in the
            logits' dtype (NaN when no row counts).
        zero_loss_fraction: fraction of counted rows whose cross-entropy, computed in the
            logits' dtype, is exactly 0; ``None`` when no targets were given.
        count: number of counted rows (mask true and target ≠ ``ignore_index``).
        max_logit_gap: max over counted rows of (largest logit − second largest logit).
        absorption_gap: ln(2/ε) of the logits' dtype, the gap beyond which one
            non-maximal term is absorbed (see :func:`absorption_gap`).
        dtype: the dtype the test was evaluated in, e.g. ``"float32"``.
    """

    fraction: float
    zero_loss_fraction: float | None
    count: int
    max_logit_gap: float
    absorption_gap: float
    dtype: str


def absorption_gap(dtype: torch.dtype) -> float:
    """The logit gap beyond which one non-maximal softmax term is absorbed.

    With p mantissa bits, the spacing of floats just above 1 is ε = 2^−p, and 1 + t rounds
    to 1 when t ≤ ε/2. A row [Δ, 0] therefore collapses once e^−Δ ≤ ε/2, i.e.
    Δ ≥ ln(2/ε) = ln 2·(p + 1): about 7.62 (float16), 5.55 (bfloat16), 16.64 (float32) and
    36.74 (float64). With K − 1 terms at the same gap, an accurate sum needs
    Δ ≥ ln(2/ε) + ln(K − 1); a sum that adds the terms to 1 one at a time absorbs each one
    at ln(2/ε) already, so in practice the threshold lies between the two.

    Args:
        dtype: a floating-point dtype.

    Returns:
        ln(2/ε) for ``dtype``.
    """
    if not dtype.is_floating_point:
        raise TypeError(f"absorption_gap needs a floating-point dtype, got {dtype}")
    return math.log(2.0 / torch.finfo(dtype).eps)


def _collapse_flags(rows: Tensor, targets: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Per-row [Σ_j exp(z_j − max z) = 1] and [CE = 0], both evaluated in the rows' dtype."""
    total = torch.exp(rows - rows.amax(dim=-1, keepdim=True)).sum(dim=-1)
    if targets is None:
        return total == 1, None
    nll = -F.log_softmax(rows, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    return total == 1, nll == 0


def _metric_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _max_gap(rows: Tensor, keep: Tensor | None) -> Tensor:
    """max over kept rows of (largest − second-largest logit); NaN when no row is kept."""
    wide = _metric_dtype(rows.dtype)
    if rows.shape[0] == 0:
        return torch.full((), math.nan, dtype=wide, device=rows.device)
    top2 = rows.topk(2, dim=-1).values.to(wide)
    gap = top2[:, 0] - top2[:, 1]
    if keep is not None:
        gap = torch.where(keep, gap, -math.inf)
    top = gap.amax()
    return torch.where(top == -math.inf, math.nan, top)


@torch.no_grad()
def softmax_collapse_stats(
    logits2d: Tensor,
    targets1d: Tensor | None = None,
    mask1d: Tensor | None = None,
    *,
    ignore_index: int = -100,
) -> dict[str, Tensor]:
    """Softmax-collapse statistics as 0-d tensors, without synchronizing with the host.

    For rows z_n ∈ R^K (counted rows only; NaN when none counts):

    * ``sc_fraction``: mean of [Σ_j exp(z_nj − max_k z_nk) = 1], evaluated in the logits'
      dtype exactly as PyTorch evaluates it (no upcast; PyTorch's float16 and bfloat16 sums
      accumulate in float32 and round the result once).
    * ``sc_zero_loss_fraction`` (only with targets): mean of [−log_softmax(z_n)_{y_n} = 0] in
      the logits' dtype, the per-row value of ``F.cross_entropy(..., reduction="none")``.
    * ``max_logit_gap``: max_n (z_n(1) − z_n(2)), the largest gap between a row's largest and
      second-largest logit (the quantity that absorption thresholds, see
      :func:`absorption_gap`); +inf when a row's runner-up is −inf.
    * ``logz_mean`` and ``logz_sq_mean``: mean of log Z_n and of (log Z_n)², with
      log Z_n = logsumexp_k z_nk (PaLM's z-loss quantity), computed with ``torch.logsumexp``
      in float32 (float64 for float64 logits).
    * ``count``: the number of counted rows.

    Args:
        logits2d: (N, K) logits, K ≥ 2.
        targets1d: optional (N,) class indices; rows with ``ignore_index`` do not count.
        mask1d: optional (N,) boolean mask; rows where it is false do not count.
        ignore_index: the target value that marks an unlabelled row.

    Returns:
        A dict of 0-d tensors on the logits' device.
    """
    if logits2d.dim() != 2:
        raise ValueError(f"logits2d must be (N, K), got shape {tuple(logits2d.shape)}")
    if logits2d.shape[-1] < 2:
        raise ValueError("softmax collapse needs at least two classes (K >= 2)")
    rows, targets, keep = flatten_rows(logits2d.detach(), targets1d, mask1d, ignore_index)
    wide = _metric_dtype(rows.dtype)

    collapsed, zero_loss = _collapse_flags(rows, targets)
    out: dict[str, Tensor] = {"sc_fraction": masked_mean(collapsed.to(wide), keep)}
    if zero_loss is not None:
        out["sc_zero_loss_fraction"] = masked_mean(zero_loss.to(wide), keep)

    out["max_logit_gap"] = _max_gap(rows, keep)

    logz = torch.logsumexp(rows.to(wide), dim=-1)
    out["logz_mean"] = masked_mean(logz, keep)
    out["logz_sq_mean"] = masked_mean(logz.square(), keep)
    if keep is None:
        out["count"] = torch.tensor(rows.shape[0], device=rows.device)
    else:
        out["count"] = keep.sum()
    return out


def softmax_collapse(
    logits: Tensor,
    targets: Tensor | None = None,
    *,
    mask: Tensor | None = None,
    ignore_index: int = -100,
) -> SoftmaxCollapse:
    """Measure softmax collapse (SC) in the logits' own dtype.

    A row z ∈ R^K (classes last; leading dimensions are samples or sequence positions) is
    *collapsed* when Σ_j exp(z_j − max_k z_k) = 1 exactly in the logits' dtype: every
    non-maximal term was absorbed and the softmax is exactly one-hot. With targets, a row has
    *zero loss* when −log softmax(z)_y = 0 exactly. Its target-logit gradient p_y − 1 is then
    exactly 0; the other components p_j ≤ e^−Δ (Δ the row's top gap) can only widen the gap
    further and vanish once they underflow.

    The measurement never changes the dtype. Counting zeros of a float64 loss after casting
    it to float32 (the reference ``cross_entropy_float64`` of arXiv 2501.04697 returns its
    loss in float32) counts every loss below 2^−150 ≈ 7e−46 as zero although float64 held a
    nonzero value.

    Reference: Prieto et al., "Grokking at the Edge of Numerical Stability", arXiv 2501.04697.

    Args:
        logits: (..., K) logits, K ≥ 2, in the training dtype (float16, bfloat16, float32 or
            float64).
        targets: optional class indices of shape ``logits.shape[:-1]``.
        mask: optional boolean tensor of shape ``logits.shape[:-1]``; false rows do not count.
        ignore_index: rows whose target equals it do not count.

    Returns:
        A :class:`SoftmaxCollapse`; fractions are NaN when no row counts.
    """
    if logits.dim() < 1:
        raise ValueError("logits must have a class dimension")
    if logits.shape[-1] < 2:
        raise ValueError("softmax collapse needs at least two classes (K >= 2)")
    rows, flat_targets, keep = flatten_rows(logits.detach(), targets, mask, ignore_index)
    if keep is None:
        keep = torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device)
    with torch.no_grad():
        collapsed, zero_loss = _collapse_flags(rows, flat_targets)
        counts = [keep.sum(), (collapsed & keep).sum()]
        if zero_loss is not None:
            counts.append((zero_loss & keep).sum())
        max_gap = _max_gap(rows, keep)
    count, n_collapsed, *n_zero = torch.stack(counts).tolist()
    return SoftmaxCollapse(
        fraction=n_collapsed / count if count else math.nan,
        zero_loss_fraction=(n_zero[0] / count if count else math.nan) if n_zero else None,
        count=count,
        max_logit_gap=float(max_gap),
        absorption_gap=absorption_gap(logits.dtype),
        dtype=str(logits.dtype).removeprefix("torch."),
    )
