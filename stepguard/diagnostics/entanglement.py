"""Gradient entanglement between objectives, e.g. chosen and rejected log-likelihoods.

"A Common Pitfall of Margin-based Language Model Alignment: Gradient Entanglement"
(Yuan, Zeng, Wu, Wang, Wang & Leqi, arXiv 2410.13828). A margin loss such as DPO or SimPO
steps along Δθ = η(d_w∇ℓ_w − d_l∇ℓ_l), with ℓ_w, ℓ_l the chosen and rejected
log-likelihoods and d_w, d_l ≥ 0 the loss's sensitivities to them. To first order

    Δℓ_w = η(d_w‖∇ℓ_w‖² − d_l⟨∇ℓ_w, ∇ℓ_l⟩),    Δℓ_l = η(d_w⟨∇ℓ_w, ∇ℓ_l⟩ − d_l‖∇ℓ_l‖²),

so the chosen likelihood falls when (d_l/d_w)⟨∇ℓ_w, ∇ℓ_l⟩/‖∇ℓ_w‖² > 1 and the rejected one
rises when (d_w/d_l)⟨∇ℓ_w, ∇ℓ_l⟩/‖∇ℓ_l‖² > 1, whatever the margin does. Everything here
follows from the Gram matrix G_ij = ⟨∇ℓ_i, ∇ℓ_j⟩, computed with one batched
vector-Jacobian product.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["Entanglement", "EntanglementProbe", "entanglement", "entanglement_ratios"]

Params = nn.Module | Iterable[Tensor]
Length = float | int | Tensor


@dataclass(frozen=True)
class Entanglement:
    """Gram matrix of objective gradients and the preference-pair warning ratios.

    Attributes:
        names: the objective names, in the order of the matrix rows.
        gram: G_ij = ⟨∇ℓ_i, ∇ℓ_j⟩, shape (m, m); (B, m, m) per sample.
        cosine: G_ij / √(G_ii G_jj), same shape (0 where a gradient is zero).
        pair: the (chosen, rejected) names the ratios refer to, or ``None``.
        ratio_chosen: (d_l/d_w)·G_wl/G_ww; > 1 means a margin step lowers the chosen
            log-likelihood. 0-d, (B,) per sample, or ``None`` without a pair.
        ratio_rejected: (d_w/d_l)·G_wl/G_ll; > 1 means a margin step raises the rejected
            log-likelihood.
    """

    names: tuple[str, ...]
    gram: Tensor
    cosine: Tensor
    pair: tuple[str, str] | None = None
    ratio_chosen: Tensor | None = None
    ratio_rejected: Tensor | None = None

    def scalars(self) -> dict[str, Tensor]:
        """Flat ``name → 0-d tensor`` entries (batch-level results only).

        ``gram.<a>.<b>`` for every a ≤ b (in ``names`` order), ``cosine.<a>.<b>`` for a < b,
        and ``ratio_chosen`` / ``ratio_rejected`` when a pair is present.
        """
        if self.gram.dim() != 2:
            raise ValueError("scalars() needs batch-level results; per-sample Gram is (B, m, m)")
        out: dict[str, Tensor] = {}
        for i, a in enumerate(self.names):
            for j in range(i, len(self.names)):
                out[f"gram.{a}.{self.names[j]}"] = self.gram[i, j]
        for i, a in enumerate(self.names):
            for j in range(i + 1, len(self.names)):
                out[f"cosine.{a}.{self.names[j]}"] = self.cosine[i, j]
        if self.ratio_chosen is not None and self.ratio_rejected is not None:
            out["ratio_chosen"] = self.ratio_chosen
            out["ratio_rejected"] = self.ratio_rejected
        return out


def entanglement(
    objectives: Mapping[str, Tensor],
    params: Params,
    *,
    per_sample: bool = False,
    lengths: Mapping[str, Length] | None = None,
    pair: tuple[str, str] = ("chosen", "rejected"),
) -> Entanglement:
    """Gram matrix of the objectives' parameter gradients, from one batched VJP.

    G_ij = ⟨∇_θ ℓ_i, ∇_θ ℓ_j⟩ over all of ``params``, and cos_ij = G_ij/√(G_ii G_jj). When
    the names contain ``pair = (w, l)`` (default ``("chosen", "rejected")``):

        ratio_chosen   = (d_l/d_w)·G_wl / G_ww   (> 1: the chosen log-likelihood falls)
        ratio_rejected = (d_w/d_l)·G_wl / G_ll   (> 1: the rejected log-likelihood rises)

    under a first-order margin step Δθ ∝ d_w∇ℓ_w − d_l∇ℓ_l. DPO has d_w = d_l. When the
    objectives are summed log-likelihoods and the loss length-normalizes them (SimPO),
    d_w/d_l = |y_l|/|y_w|: pass ``lengths={w: |y_w|, l: |y_l|}``. Both conditions are
    checked separately: the analysis script of arXiv 2410.13828 compares ⟨∇ℓ_w, ∇ℓ_l⟩ with
    min(‖∇ℓ_w‖², ‖∇ℓ_w‖²), which ignores ‖∇ℓ_l‖. A zero denominator gives a ratio of 0 (the
    inner product is then 0 too).

    All gradients come from one call ``torch.autograd.grad(stack(ℓ), params,
    grad_outputs=I, is_grads_batched=True, retain_graph=True)``, so the graph survives for
    the training loss's own backward pass. Where an operation has no batching rule, the
    gradients fall back to one backward pass per row of I, with a warning.

    Reference: Yuan et al., arXiv 2410.13828.

    Args:
        objectives: name → scalar tensor (e.g. ``{"chosen": logp_w.sum(), "rejected":
            logp_l.sum()}``); with ``per_sample=True``, name → (B,) tensor, all the same B.
            Names must not contain ``"."``.
        params: the parameters θ, or an ``nn.Module`` (its parameters that require grad).
        per_sample: compute one Gram matrix per sample b from the per-sample gradients
            ∇ℓ_i[b] (B·m gradients in memory: for small models). Valid when samples do not
            interact in the forward pass (no batch normalization across them).
        lengths: optional name → length (a number, or a (B,) tensor per sample) for the
            pair's d_w/d_l = lengths[l]/lengths[w]; both names required.
        pair: the (chosen, rejected) names the ratios refer to.

    Returns:
        An :class:`Entanglement`. Float32 Gram (float64 for float64 gradients).
    """
    names, stacked = _stack(objectives, per_sample)
    plist = _param_list(params)
    grads = _batched_grads(stacked.reshape(-1), plist)
    m = len(names)
    batch = stacked.shape[1] if per_sample else None
    gram = _gram(grads, m, batch)
    return _result(names, gram, pair, lengths, batch)


def entanglement_from_gram(
    gram: Tensor,
    names: Sequence[str],
    *,
    pair: tuple[str, str] = ("chosen", "rejected"),
    lengths: Mapping[str, Length] | None = None,
) -> Entanglement:
    """The :class:`Entanglement` of a Gram matrix computed elsewhere, with the same definitions.

    Args:
        gram: (m, m) matrix of gradient inner products ⟨∇ℓ_i, ∇ℓ_j⟩.
        names: the m objective names, in the Gram's order.
        pair: the (chosen, rejected) names the ratios refer to.
        lengths: as in :func:`entanglement` (d_w/d_l = lengths[l]/lengths[w]).
    """
    names = tuple(names)
    if gram.shape != (len(names), len(names)):
        raise ValueError(
            f"gram must be ({len(names)}, {len(names)}) for names {names}, got {tuple(gram.shape)}"
        )
    return _result(names, gram, pair, lengths, None)


class EntanglementProbe:
    """Gradient entanglement of named objectives, and their realized change along a step.

    ``observe`` computes the Gram matrix now (one batched VJP, the graph is kept) and keeps
    the per-objective gradients g_i = ∇ℓ_i (m copies of the parameter gradient).
    ``realized(Δθ)`` then gives the first-order change g_i·Δθ of each objective along the
    update that was actually applied (Adam scaling, clipping and weight decay included), and
    ``scalars`` returns everything as flat names for a ``StepReport``:
    ``gram.<a>.<b>``, ``cosine.<a>.<b>``, ``ratio_chosen``, ``ratio_rejected`` and
    ``realized.<a>``.

    Example::

        probe = EntanglementProbe()
        probe.observe({"chosen": logp_w.sum(), "rejected": logp_l.sum()}, model)
        loss.backward()
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.step()
        probe.realized([p.detach() - b for p, b in zip(model.parameters(), before)])
        values = {k: float(v) for k, v in probe.scalars().items()}

    Reference: Yuan et al., arXiv 2410.13828.
    """

    def __init__(self, *, pair: tuple[str, str] = ("chosen", "rejected")) -> None:
        """Create a probe; ``pair`` names the (chosen, rejected) objectives."""
        self.pair = pair
        self._names: tuple[str, ...] = ()
        self._grads: list[Tensor | None] = []
        self._shapes: list[torch.Size] = []
        self._result: Entanglement | None = None
        self._realized: dict[str, Tensor] = {}

    @property
    def result(self) -> Entanglement | None:
        """The last observed :class:`Entanglement`, or ``None``."""
        return self._result

    def observe(
        self,
        objectives: Mapping[str, Tensor],
        params: Params,
        *,
        lengths: Mapping[str, Length] | None = None,
    ) -> Entanglement:
        """Compute the Gram matrix of the scalar ``objectives`` and keep their gradients.

        Args:
            objectives: name → scalar tensor, still attached to the graph.
            params: the parameters θ (or an ``nn.Module``); ``realized`` expects an update
                aligned with them.
            lengths: as in :func:`entanglement`.

        Returns:
            The :class:`Entanglement` (also kept for :meth:`scalars`).
        """
        names, stacked = _stack(objectives, per_sample=False)
        plist = _param_list(params)
        grads = _batched_grads(stacked, plist)
        self._names = names
        self._grads = grads
        self._shapes = [p.shape for p in plist]
        self._result = _result(names, _gram(grads, len(names), None), self.pair, lengths, None)
        self._realized = {}
        return self._result

    @torch.no_grad()
    def realized(self, update: Sequence[Tensor]) -> dict[str, Tensor]:
        """First-order change ∇ℓ_i·Δθ of each observed objective along the update Δθ.

        Args:
            update: Δθ, one tensor per parameter given to :meth:`observe`, same order.

        Returns:
            name → 0-d tensor.
        """
        if self._result is None:
            raise RuntimeError("call observe() before realized()")
        update = list(update)
        if len(update) != len(self._shapes):
            raise ValueError(f"{len(update)} update tensors for {len(self._shapes)} parameters")
        total: Tensor | None = None
        for g, u, shape in zip(self._grads, update, self._shapes, strict=True):
            if u.shape != shape:
                raise ValueError(f"update shape {tuple(u.shape)} does not match {tuple(shape)}")
            if g is None:
                continue
            part = g.reshape(g.shape[0], -1) @ u.detach().reshape(-1).to(g.dtype)
            total = part if total is None else total + part.to(total.device)
        if total is None:
            total = torch.zeros(len(self._names), dtype=self._result.gram.dtype)
        self._realized = dict(zip(self._names, total.unbind(), strict=True))
        return dict(self._realized)

    def scalars(self) -> dict[str, Tensor]:
        """Flat ``name → 0-d tensor`` entries of the last observation (and realized step)."""
        if self._result is None:
            return {}
        out = self._result.scalars()
        out.update({f"realized.{k}": v for k, v in self._realized.items()})
        return out

    def clear(self) -> None:
        """Drop the kept gradients and results."""
        self._names, self._grads, self._shapes = (), [], []
        self._result, self._realized = None, {}


def _stack(objectives: Mapping[str, Tensor], per_sample: bool) -> tuple[tuple[str, ...], Tensor]:
    if not objectives:
        raise ValueError("entanglement needs at least one objective")
    names = tuple(objectives)
    for name in names:
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"objective names must be non-empty strings without '.': {name!r}")
    values = [objectives[n] for n in names]
    shape = values[0].shape
    for n, v in zip(names, values, strict=True):
        if not v.requires_grad:
            raise ValueError(f"objective {n!r} does not require grad (is it attached to θ?)")
        if per_sample and v.dim() != 1:
            raise ValueError(f"per_sample objectives must be (B,) tensors; {n!r} is {v.shape}")
        if not per_sample and v.dim() != 0:
            raise ValueError(f"objective {n!r} must be a scalar (or use per_sample=True)")
        if v.shape != shape:
            raise ValueError(f"objective {n!r} has shape {tuple(v.shape)}, expected {shape}")
    return names, torch.stack(values)


def _param_list(params: Params) -> list[Tensor]:
    if isinstance(params, nn.Module):
        plist = [p for p in params.parameters() if p.requires_grad]
    else:
        plist = list(params)
    if not any(p.requires_grad for p in plist):
        raise ValueError("no parameter that requires grad to differentiate with respect to")
    return plist


def _batched_grads(outputs: Tensor, params: list[Tensor]) -> list[Tensor | None]:
    """Rows of the Jacobian d outputs / d params: one (n, *p.shape) tensor per parameter.

    Parameters that do not require grad, or that the outputs do not depend on, get ``None``.
    """
    n = outputs.shape[0]
    live = [i for i, p in enumerate(params) if p.requires_grad]
    targets = [params[i] for i in live]
    eye = torch.eye(n, dtype=outputs.dtype, device=outputs.device)
    try:
        grads = torch.autograd.grad(
            outputs,
            targets,
            grad_outputs=eye,
            is_grads_batched=True,
            retain_graph=True,
            allow_unused=True,
        )
    except RuntimeError as err:
        if "vmap" not in str(err) and "batch" not in str(err).lower():
            raise
        warnings.warn(
            f"batched vector-Jacobian product unavailable ({err}); falling back to {n} backward passes",
            RuntimeWarning,
            stacklevel=3,
        )
        rows = [
            torch.autograd.grad(outputs[i], targets, retain_graph=True, allow_unused=True) for i in range(n)
        ]
        grads = tuple(
            None if rows[0][k] is None else torch.stack([r[k] for r in rows]) for k in range(len(targets))
        )
    out: list[Tensor | None] = [None] * len(params)
    for i, g in zip(live, grads, strict=True):
        out[i] = g
    return out


def _gram(grads: list[Tensor | None], m: int, batch: int | None) -> Tensor:
    """Σ over parameters of the flattened gradients' inner products."""
    present = [g for g in grads if g is not None]
    wide = torch.float64 if any(g.dtype == torch.float64 for g in present) else torch.float32
    device = present[0].device if present else None
    shape = (m, m) if batch is None else (batch, m, m)
    gram = torch.zeros(shape, dtype=wide, device=device)
    for g in present:
        flat = g.to(wide).reshape(g.shape[0], -1)
        if batch is None:
            gram += (flat @ flat.T).to(gram.device)
        else:
            per = flat.reshape(m, batch, -1)
            gram += torch.einsum("ibd,jbd->bij", per, per).to(gram.device)
    return gram


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    return torch.where(den != 0, num / torch.where(den != 0, den, 1), 0)


def _result(
    names: tuple[str, ...],
    gram: Tensor,
    pair: tuple[str, str],
    lengths: Mapping[str, Length] | None,
    batch: int | None,
) -> Entanglement:
    diag = torch.diagonal(gram, dim1=-2, dim2=-1)
    cosine = _safe_div(gram, torch.sqrt(diag[..., :, None] * diag[..., None, :]))
    w, lo = pair
    if w not in names or lo not in names:
        if lengths is not None:
            raise ValueError(f"lengths given but the objectives lack the pair {pair}")
        return Entanglement(names=names, gram=gram, cosine=cosine)
    i, j = names.index(w), names.index(lo)
    g_wl, g_ww, g_ll = gram[..., i, j], gram[..., i, i], gram[..., j, j]
    weight = torch.ones((), dtype=gram.dtype, device=gram.device)  # d_w / d_l
    if lengths is not None:
        if w not in lengths or lo not in lengths:
            raise ValueError(f"lengths must give both {w!r} and {lo!r}")
        len_w = torch.as_tensor(lengths[w], dtype=gram.dtype, device=gram.device)
        len_l = torch.as_tensor(lengths[lo], dtype=gram.dtype, device=gram.device)
        expected = () if batch is None else (batch,)
        for t in (len_w, len_l):
            if t.shape not in ((), expected):
                raise ValueError(f"lengths must be numbers or shape {expected}, got {t.shape}")
        weight = len_l / len_w
    return Entanglement(
        names=names,
        gram=gram,
        cosine=cosine,
        pair=pair,
        ratio_chosen=_safe_div(g_wl, weight * g_ww),
        ratio_rejected=_safe_div(weight * g_wl, g_ll),
    )


def entanglement_ratios(
    grad_chosen: Tensor,
    grad_rejected: Tensor,
    d_chosen: Tensor | float = 1.0,
    d_rejected: Tensor | float = 1.0,
) -> dict[str, Tensor]:
    """First-order gradient-entanglement diagnostics of a margin preference loss.

    With ``d_w = −∂L/∂log π_w ≥ 0`` and ``d_l = ∂L/∂log π_l ≥ 0``, one gradient step raises
    log π_w iff ``⟨∇_w, ∇_l⟩ < (d_w/d_l)·‖∇_w‖²`` and lowers log π_l iff
    ``⟨∇_w, ∇_l⟩ < (d_l/d_w)·‖∇_l‖²`` (DPO: d_w = d_l; SimPO: d_w/d_l = |y_l|/|y_w|).

    Args:
        grad_chosen: gradient of log π(y_w) w.r.t. the trainable parameters, flattened.
        grad_rejected: gradient of log π(y_l), flattened.
        d_chosen: d_w.
        d_rejected: d_l.

    The ratios are those of :func:`entanglement_from_gram` (one definition).

    Returns:
        ``inner``, ``cosine``, ``norm_chosen_sq``, ``norm_rejected_sq``, ``chosen_ratio``
        (⟨∇_w,∇_l⟩ / ((d_w/d_l)‖∇_w‖²), < 1 means log π_w rises) and ``rejected_ratio``
        (⟨∇_w,∇_l⟩ / ((d_l/d_w)‖∇_l‖²), < 1 means log π_l falls).
    """
    g_w = grad_chosen.reshape(-1)
    g_l = grad_rejected.reshape(-1).to(g_w.dtype)
    inner = g_w @ g_l
    nw, nl = g_w @ g_w, g_l @ g_l
    gram = torch.stack([torch.stack([nw, inner]), torch.stack([inner, nl])])
    # d_w/d_l enters as lengths[rejected]/lengths[chosen], the SimPO convention
    result = entanglement_from_gram(
        gram, ("chosen", "rejected"), lengths={"chosen": d_rejected, "rejected": d_chosen}
    )
    return {
        "inner": inner,
        "cosine": result.cosine[0, 1],
        "norm_chosen_sq": nw,
        "norm_rejected_sq": nl,
        "chosen_ratio": result.ratio_chosen,
        "rejected_ratio": result.ratio_rejected,
    }
