"""A forward-mode rule for ``scaled_dot_product_attention``, computed a block of keys at a time.

PyTorch's fused attention kernels (flash attention on CPU and GPU, memory-efficient and
cuDNN attention) have no forward-mode derivative. :func:`attention` gives the same
primal output (it calls the fused kernel itself) and a tangent computed from the
derivative of softmax attention. With S = scale·q·kᵀ + M, P = softmax(S) and O = P·V:

    dS = scale·(dq·kᵀ + q·dkᵀ) + dM
    dO_i = Σ_j P_ij·(dS_ij·V_j + dV_j) − (Σ_j P_ij·dS_ij)·O_i

Both sums run over blocks of at most ``chunk_size`` keys with an online softmax (a running
row maximum rescales what was accumulated), so no T×T matrix is ever built: the largest
intermediate is (…, T_q, chunk_size) per head. Everything is accumulated in float32 and
cast back to the query's dtype.

Dropout (``dropout_p > 0``) goes to PyTorch's math attention, whose forward-mode
derivative is exact: it draws its mask from the generator, so a replay that restores the
generator draws the training mask whenever the training forward also ran the math kernel
(as CPU training with dropout does). Fused GPU kernels draw their masks inside the kernel;
no replay reproduces those, and the math kernel materializes the T×T weights.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_CHUNK_SIZE = 256
"""Keys per block of the tangent's online softmax: memory O(T·chunk) per head."""

_SDPA = F.scaled_dot_product_attention


def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """``F.scaled_dot_product_attention`` with a forward-mode derivative, memory O(T·chunk).

    Takes the arguments of :func:`torch.nn.functional.scaled_dot_product_attention`.
    Works with dual tensors (``torch.autograd.forward_ad``) and ``torch.func.jvp`` /
    ``vmap``; the reverse-mode derivative is not defined (the replay never needs it).

    Raises:
        ValueError: ``chunk_size`` is not a positive integer.
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if dropout_p > 0.0:
        return torch.ops.aten._scaled_dot_product_attention_math(
            query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
        )[0]
    return _AttentionJvp.apply(query, key, value, attn_mask, is_causal, scale, enable_gqa, chunk_size)


class _AttentionJvp(torch.autograd.Function):
    """The fused kernel's output, and the chunked tangent of :func:`attention_tangent`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attn_mask: Tensor | None,
        is_causal: bool,
        scale: float | None,
        enable_gqa: bool,
        chunk_size: int,
    ) -> Tensor:
        kwargs: dict[str, Any] = {"enable_gqa": True} if enable_gqa else {}
        return _SDPA(query, key, value, attn_mask, 0.0, is_causal, scale=scale, **kwargs)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        query, key, value, attn_mask, is_causal, scale, enable_gqa, chunk_size = inputs
        ctx.save_for_forward(query, key, value, attn_mask)
        ctx.options = (is_causal, scale, enable_gqa, chunk_size)

    @staticmethod
    def jvp(
        ctx: Any,
        d_query: Tensor | None,
        d_key: Tensor | None,
        d_value: Tensor | None,
        d_mask: Tensor | None,
        *_: Any,
    ) -> Tensor:
        query, key, value, attn_mask = ctx.saved_tensors
        is_causal, scale, enable_gqa, chunk_size = ctx.options
        return attention_tangent(
            (query, key, value, attn_mask),
            (d_query, d_key, d_value, d_mask),
            is_causal=is_causal,
            scale=scale,
            enable_gqa=enable_gqa,
            chunk_size=chunk_size,
        )

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        raise RuntimeError(
            "stepguard's attention rule has a forward-mode derivative only; it is used inside "
            "StepGuard's measurement, never by training"
        )


Primals = tuple[Tensor, Tensor, Tensor, Tensor | None]
Tangents = tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]


def attention_tangent(
    primals: Primals,
    tangents: Tangents,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """dO of softmax attention along the tangents of (query, key, value, mask), by key blocks.

    ``None`` tangents are zero. Rows whose keys are all masked out get a zero tangent (their
    output is constant). The result has the query's dtype and the output's shape.
    """
    query, key, value, mask = primals
    d_query, d_key, d_value, d_mask = tangents
    work = torch.promote_types(query.dtype, torch.float32)
    heads = query.size(-3) if enable_gqa else None
    q = query.to(work) * _scale_of(query, scale)
    dq = None if d_query is None else d_query.to(work) * _scale_of(query, scale)
    n_queries, n_keys = query.size(-2), key.size(-2)
    mask = _expand_keys(mask, n_keys)
    d_mask = _expand_keys(d_mask, n_keys)
    state = _Online(q.shape[:-1], value.size(-1), work, q.device)
    for start in range(0, n_keys, chunk_size):
        if is_causal and start >= n_queries:
            break
        keys = slice(start, min(start + chunk_size, n_keys))
        k_c, v_c, dk_c, dv_c = (_block(t, keys, heads, work) for t in (key, value, d_key, d_value))
        assert k_c is not None and v_c is not None
        scores = _masked(q @ k_c.transpose(-2, -1), mask, keys, is_causal, n_queries, work)
        state.add(scores, _score_tangent(q, k_c, dq, dk_c, d_mask, keys, work), v_c, dv_c)
    return state.tangent().to(query.dtype)


def _block(t: Tensor | None, keys: slice, heads: int | None, work: torch.dtype) -> Tensor | None:
    """Rows ``keys`` of a key or value tensor, its heads repeated for grouped-query attention."""
    if t is None:
        return None
    block = t[..., keys, :].to(work)
    if heads is not None and block.size(-3) != heads:
        block = block.repeat_interleave(heads // block.size(-3), dim=-3)
    return block


def _scale_of(query: Tensor, scale: float | None) -> float:
    return scale if scale is not None else 1.0 / math.sqrt(query.size(-1))


def _expand_keys(mask: Tensor | None, n_keys: int) -> Tensor | None:
    """A mask broadcast along the key axis, so key blocks can be sliced out of it."""
    if mask is None or mask.size(-1) == n_keys:
        return mask
    return mask.expand(*mask.shape[:-1], n_keys)


def _masked(
    scores: Tensor, mask: Tensor | None, keys: slice, is_causal: bool, n_queries: int, work: torch.dtype
) -> Tensor:
    if mask is not None:
        block = mask[..., keys]
        if block.dtype == torch.bool:
            scores = scores.masked_fill(~block, -math.inf)
        else:
            scores = scores + block.to(work)
    if is_causal:
        rows = torch.arange(n_queries, device=scores.device).unsqueeze(-1)
        cols = torch.arange(keys.start, keys.stop, device=scores.device)
        scores = scores.masked_fill(cols > rows, -math.inf)
    return scores


def _score_tangent(
    q: Tensor,
    k_c: Tensor,
    dq: Tensor | None,
    dk_c: Tensor | None,
    d_mask: Tensor | None,
    keys: slice,
    work: torch.dtype,
) -> Tensor | None:
    """dS for one key block: dq·kᵀ·scale + q·dkᵀ·scale + dM (``q``, ``dq`` carry the scale)."""
    terms = []
    if dq is not None:
        terms.append(dq @ k_c.transpose(-2, -1))
    if dk_c is not None:
        terms.append(q @ dk_c.transpose(-2, -1))
    if d_mask is not None and d_mask.dtype != torch.bool:
        terms.append(d_mask[..., keys].to(work))
    if not terms:
        return None
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


class _Online:
    """Running sums of the online softmax, rescaled to the running row maximum.

    Σ P and Σ P·V give the output; Σ P·(dS·V + dV) and Σ P·dS give its tangent.
    """

    def __init__(self, rows: torch.Size, width: int, dtype: torch.dtype, device: torch.device) -> None:
        self.peak = torch.full(rows, -math.inf, dtype=dtype, device=device)
        self.total = torch.zeros(rows, dtype=dtype, device=device)
        self.out = torch.zeros((*rows, width), dtype=dtype, device=device)
        self.d_out: Tensor | None = None
        self.d_total: Tensor | None = None

    def add(self, scores: Tensor, d_scores: Tensor | None, v_c: Tensor, d_v: Tensor | None) -> None:
        """One block of keys: its scores, their tangent, its values and their tangent."""
        peak = torch.maximum(self.peak, scores.amax(-1))
        safe = peak.masked_fill(torch.isinf(peak), 0.0)  # rows that have met no key yet
        decay = torch.exp(self.peak - safe)
        p = torch.exp(scores - safe.unsqueeze(-1))
        self.peak = peak
        self.total = _accumulate(self.total, decay, p.sum(-1))
        self.out = _accumulate(self.out, decay, p @ v_c)
        step = None if d_v is None else p @ d_v
        if d_scores is not None:
            weighted = p * d_scores
            self.d_total = _accumulate(self.d_total, decay, weighted.sum(-1))
            step = weighted @ v_c if step is None else step + weighted @ v_c
        if step is not None:
            self.d_out = _accumulate(self.d_out, decay, step)

    def tangent(self) -> Tensor:
        """dO = Σ P·(dS·V + dV)/ΣP − (Σ P·dS/ΣP)·O, zero for rows with no key."""
        if self.d_out is None:
            return torch.zeros_like(self.out)
        empty = self.total == 0
        total = self.total.masked_fill(empty, 1.0).unsqueeze(-1)
        d_out = self.d_out / total
        if self.d_total is not None:
            d_out = d_out - (self.d_total.unsqueeze(-1) / total) * (self.out / total)
        return d_out.masked_fill(empty.unsqueeze(-1), 0.0)


def _accumulate(running: Tensor | None, decay: Tensor, block: Tensor) -> Tensor:
    """running·decay + block, the decay (one per row) broadcast over a trailing width."""
    if running is None:
        return block
    return running * (decay if running.dim() == decay.dim() else decay.unsqueeze(-1)) + block
