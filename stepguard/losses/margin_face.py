"""Additive angular / cosine margin heads: ArcFace, CosFace and ElasticFace (+).

Each loss owns its class-centre matrix ``weight`` of shape (D, C), normalised per column,
and consumes unnormalised embeddings (B, D) and labels (B,). The head turns them into
logits ``s·ψ(cos θ)`` with a margin on the target column, and the loss is the mean softmax
cross-entropy over those logits. A label equal to ``ignore_index`` (default −1, "not on
this shard") gets no margin and no loss.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stepguard.losses.base import GuardedLoss

PlusAssignment = Literal["rank", "official"]
Fallback = Literal["none", "insightface"]

__all__ = [
    "ArcFaceLoss",
    "CosFaceLoss",
    "ElasticArcFaceLoss",
    "ElasticArcFacePlusLoss",
    "ElasticCosFaceLoss",
    "ElasticCosFacePlusLoss",
    "arc_margin_logits",
    "cos_margin_logits",
    "cosine_logits",
    "plus_margins",
]


def cosine_logits(embeddings: Tensor, weight: Tensor) -> Tensor:
    """cos θ between L2-normalised embeddings (B, D) and weight columns (D, C), in [−1, 1]."""
    return (F.normalize(embeddings, dim=1) @ F.normalize(weight, dim=0)).clamp(-1.0, 1.0)


def _margin_matrix(cos: Tensor, target: Tensor, margins: Tensor, ignore_index: int) -> Tensor:
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    hot = F.one_hot(safe_target, cos.shape[1]).to(torch.bool) & valid[:, None]
    return hot, margins.reshape(-1, 1).to(cos.dtype)


def arc_margin_logits(
    cos: Tensor,
    target: Tensor,
    margins: Tensor | float,
    s: float,
    *,
    faithful: bool = False,
    fallback: Fallback = "none",
    ignore_index: int = -1,
) -> Tensor:
    """ArcFace logits ``s·cos(θ_ij + m_i·1[j = y_i])`` from a cosine matrix.

    The default adds the margin on the target column only, through
    ``cos(θ+m) = cos θ·cos m − sin θ·sin m`` with ``sin θ = √max(1 − cos²θ, eps)``, so no
    entry has an infinite derivative. ``faithful=True`` applies ``acos`` then ``cos`` to the
    whole matrix as the official ElasticFace code does (NaN gradients where |cos θ| = 1).

    Args:
        cos: (B, C) cosines in [−1, 1].
        target: (B,) int64 labels; ``ignore_index`` rows get no margin.
        margins: a float or a (B,) / (B, 1) tensor of per-sample margins.
        s: scale.
        faithful: reproduce the official whole-matrix ``acos``/``cos``.
        fallback: ``"insightface"`` replaces ``cos(θ+m)`` by ``cos θ − m·sin m`` where
            ``θ + m > π`` (InsightFace's ``th``/``mm`` rule); ``"none"`` keeps the formula.
        ignore_index: label value that receives no margin.

    Returns:
        (B, C) logits.
    """
    if not isinstance(margins, Tensor):
        margins = torch.full((cos.shape[0],), float(margins), dtype=cos.dtype, device=cos.device)
    hot, m = _margin_matrix(cos, target, margins, ignore_index)
    if faithful:
        theta = torch.acos(cos)
        shifted = torch.cos(theta + hot.to(cos.dtype) * m)
        phi = shifted
    else:
        eps = torch.finfo(cos.dtype).eps
        sin = torch.sqrt((1.0 - cos * cos).clamp(min=eps))
        shifted = cos * torch.cos(m) - sin * torch.sin(m)
        phi = torch.where(hot, shifted, cos)
    if fallback == "insightface":
        threshold = torch.cos(math.pi - m)
        linear = cos - torch.sin(math.pi - m) * m
        phi = torch.where(hot & (cos <= threshold), linear, phi)
    elif fallback != "none":
        raise ValueError(f"fallback must be 'none' or 'insightface', got {fallback!r}")
    return s * phi


def cos_margin_logits(
    cos: Tensor, target: Tensor, margins: Tensor | float, s: float, *, ignore_index: int = -1
) -> Tensor:
    """CosFace logits ``s·(cos θ_ij − m_i·1[j = y_i])`` from a cosine matrix.

    Args:
        cos: (B, C) cosines.
        target: (B,) int64 labels; ``ignore_index`` rows get no margin.
        margins: a float or a (B,) / (B, 1) tensor of per-sample margins.
        s: scale.
        ignore_index: label value that receives no margin.

    Returns:
        (B, C) logits.
    """
    if not isinstance(margins, Tensor):
        margins = torch.full((cos.shape[0],), float(margins), dtype=cos.dtype, device=cos.device)
    hot, m = _margin_matrix(cos, target, margins, ignore_index)
    return s * (cos - hot.to(cos.dtype) * m)


def plus_margins(
    margins: Tensor,
    target_cos: Tensor,
    *,
    assignment: PlusAssignment = "rank",
    valid: Tensor | None = None,
) -> Tensor:
    """Assign sorted margins to samples by the ranking of their target cosines (ElasticFace+).

    ``"rank"`` gives the smallest margin to the sample with the largest target cosine, the
    next smallest to the next largest, and so on (samples far from their centre get the
    larger margins). ``"official"`` reproduces the official code, which gives sample ``i``
    ``sorted_margins[argsort_desc(cos)[i]]`` — the permutation composed instead of inverted.

    Args:
        margins: (B,) or (B, 1) drawn margins.
        target_cos: (B,) target cosines (detached inside).
        assignment: ``"rank"`` or ``"official"``.
        valid: optional (B,) bool mask; with ``"rank"``, invalid rows are ranked last and
            the valid rows share the margins drawn for them.

    Returns:
        (B,) assigned margins.
    """
    flat = margins.reshape(-1)
    cos = target_cos.detach()
    if valid is not None:
        cos = torch.where(valid, cos, torch.full_like(cos, -math.inf))
        flat = torch.where(valid, flat, torch.full_like(flat, math.inf))
    order = torch.sort(cos, descending=True, stable=True).indices
    ascending = torch.sort(flat, stable=True).values
    if assignment == "official":
        return ascending[order]
    if assignment != "rank":
        raise ValueError(f"assignment must be 'rank' or 'official', got {assignment!r}")
    assigned = torch.empty_like(ascending)
    assigned[order] = ascending
    return assigned


class _MarginHeadLoss(GuardedLoss):
    no_radius_reason = ""
    _kind: str = "arc"
    _elastic: bool = False
    _plus: bool = False

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        s: float,
        m: float,
        std: float = 0.0,
        faithful: bool = False,
        fallback: Fallback = "none",
        plus_assignment: PlusAssignment | None = None,
        generator: torch.Generator | None = None,
        ignore_index: int = -1,
        accumulation_steps: int = 1,
    ) -> None:
        super().__init__(accumulation_steps=accumulation_steps)
        if in_features < 1 or num_classes < 2:
            raise ValueError("need in_features >= 1 and num_classes >= 2")
        if s <= 0:
            raise ValueError(f"scale s must be positive, got {s}")
        if std < 0:
            raise ValueError(f"std must be >= 0, got {std}")
        if fallback not in ("none", "insightface"):
            raise ValueError(f"fallback must be 'none' or 'insightface', got {fallback!r}")
        if plus_assignment is None:
            plus_assignment = "official" if faithful else "rank"
        if plus_assignment not in ("rank", "official"):
            raise ValueError(
                f"plus_assignment must be 'rank' or 'official', got {plus_assignment!r}"
            )
        self.in_features = in_features
        self.num_classes = num_classes
        self.s = float(s)
        self.m = float(m)
        self.std = float(std)
        self.faithful = faithful
        self.fallback = fallback
        self.plus_assignment: PlusAssignment = plus_assignment
        self.generator = generator
        self.ignore_index = ignore_index
        self.weight = nn.Parameter(torch.empty(in_features, num_classes))
        nn.init.normal_(self.weight, std=0.01)
        self.last_margins: Tensor | None = None

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, s={self.s}, "
            f"m={self.m}, std={self.std}, faithful={self.faithful}"
        )

    def draw_margins(self, batch: int, like: Tensor) -> Tensor:
        """Draw per-sample margins m_i ~ N(m, std²), shape (B, 1), from ``generator``."""
        return torch.normal(
            self.m,
            self.std,
            size=(batch, 1),
            generator=self.generator,
            dtype=like.dtype,
            device=like.device,
        )

    def _logits(self, cos: Tensor, target: Tensor, margins: Tensor | float) -> Tensor:
        if self._kind == "arc":
            return arc_margin_logits(
                cos,
                target,
                margins,
                self.s,
                faithful=self.faithful,
                fallback=self.fallback,
                ignore_index=self.ignore_index,
            )
        return cos_margin_logits(cos, target, margins, self.s, ignore_index=self.ignore_index)

    def logits(self, embeddings: Tensor, target: Tensor, margins: Tensor | None = None) -> Tensor:
        """The margin logits (B, C); Elastic heads draw fresh margins unless given."""
        _check_embeddings(embeddings, target, self.in_features)
        cos = cosine_logits(embeddings, self.weight)
        if margins is None:
            if self._elastic:
                margins = self.draw_margins(cos.shape[0], cos)
            else:
                margins = torch.full((cos.shape[0], 1), self.m, dtype=cos.dtype, device=cos.device)
        if self._plus:
            valid = target != self.ignore_index
            if self.plus_assignment == "official" and bool((~valid).any()):
                raise ValueError(
                    "the official ElasticFace+ assignment is undefined with ignored labels "
                    "(the official code fails with a shape mismatch); use "
                    "plus_assignment='rank'"
                )
            safe = torch.where(valid, target, torch.zeros_like(target))
            target_cos = cos.gather(1, safe[:, None]).squeeze(1)
            margins = plus_margins(
                margins,
                target_cos,
                assignment=self.plus_assignment,
                valid=None if self.plus_assignment == "official" else valid,
            )
            margins = torch.where(valid, margins, torch.zeros_like(margins))
        self.last_margins = margins.detach().reshape(-1)
        return self._logits(cos, target, margins)

    def forward(self, embeddings: Tensor, target: Tensor) -> Tensor:
        """Mean cross-entropy of the margin logits over the rows whose label is not ignored.

        Args:
            embeddings: (B, D) unnormalised embeddings.
            target: (B,) int64 labels in [0, C) or ``ignore_index``.

        Returns:
            0-d loss.
        """
        logits = self.logits(embeddings, target)
        loss = F.cross_entropy(logits, target, ignore_index=self.ignore_index)
        valid = target != self.ignore_index
        safe = torch.where(valid, target, torch.zeros_like(target))
        with torch.no_grad():
            weight = valid.to(logits.dtype)
            picked = logits.gather(1, safe[:, None]).squeeze(1)
            target_logit = (picked * weight).sum() / weight.sum().clamp(min=1.0)
        self._record(
            cross_entropy=loss,
            target_logit=target_logit,
            margin=self.last_margins if self.last_margins is not None else torch.tensor(self.m),
        )
        return loss

    def radius_logits(self, output: Tensor, target: Tensor | None = None) -> Tensor:
        """The scaled margin logits ``s·ψ(cos θ)`` built from embeddings and ``weight``.

        With ``target`` the margin is on the target column (the mean margin ``m`` for
        Elastic heads, so no random numbers are drawn); without it, ``s·cos θ``.
        """
        cos = cosine_logits(output, self.weight)
        if target is None:
            return self.s * cos
        margins = torch.full((cos.shape[0], 1), self.m, dtype=cos.dtype, device=cos.device)
        return self._logits(cos, target, margins)


def _check_embeddings(embeddings: Tensor, target: Tensor, in_features: int) -> None:
    if not isinstance(embeddings, Tensor) or not embeddings.is_floating_point():
        raise TypeError("embeddings must be a floating-point tensor of shape (B, D)")
    if embeddings.ndim != 2 or embeddings.shape[1] != in_features:
        raise ValueError(
            f"embeddings must have shape (B, {in_features}), got {tuple(embeddings.shape)}"
        )
    if not isinstance(target, Tensor) or target.dtype != torch.long:
        raise TypeError("target must be an int64 tensor of labels")
    if target.shape != embeddings.shape[:1]:
        raise ValueError(
            f"target must have shape ({embeddings.shape[0]},), got {tuple(target.shape)}"
        )


class ArcFaceLoss(_MarginHeadLoss):
    r"""ArcFace: additive angular margin softmax.

    $$\ell_i = -\log\frac{e^{s\cos(\theta_{i y_i}+m)}}{e^{s\cos(\theta_{i y_i}+m)}
    + \sum_{j\ne y_i} e^{s\cos\theta_{ij}}},\qquad
    \cos\theta_{ij} = \hat e_i\cdot\hat w_j$$

    Paper: Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face Recognition"
    (arXiv 1801.07698); defaults and reference code from Boutros et al., "ElasticFace:
    Elastic Margin Loss for Deep Face Recognition" (arXiv 2109.09416).

    Shapes: embeddings (B, D), target (B,) int64 → 0-d loss; ``weight`` is (D, C).

    Args:
        in_features: embedding size D.
        num_classes: number of classes C.
        s: logit scale (64).
        m: angular margin in radians (0.5).
        faithful: apply ``acos``/``cos`` to the whole cosine matrix as the official code
            does (its gradient is NaN wherever |cos θ| = 1).
        fallback: ``"insightface"`` uses ``cos θ − m·sin m`` where ``θ + m > π``.
        ignore_index: label that gets no margin and no loss (−1).
        accumulation_steps: see :class:`~stepguard.losses.base.GuardedLoss`.
    """

    _kind = "arc"

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        s: float = 64.0,
        m: float = 0.5,
        faithful: bool = False,
        fallback: Fallback = "none",
        ignore_index: int = -1,
        accumulation_steps: int = 1,
    ) -> None:
        super().__init__(
            in_features,
            num_classes,
            s=s,
            m=m,
            faithful=faithful,
            fallback=fallback,
            ignore_index=ignore_index,
            accumulation_steps=accumulation_steps,
        )


class CosFaceLoss(_MarginHeadLoss):
    r"""CosFace: additive cosine margin softmax (large-margin cosine loss).

    $$\ell_i = -\log\frac{e^{s(\cos\theta_{i y_i}-m)}}{e^{s(\cos\theta_{i y_i}-m)}
    + \sum_{j\ne y_i} e^{s\cos\theta_{ij}}}$$

    Paper: Wang et al., "CosFace: Large Margin Cosine Loss for Deep Face Recognition"
    (arXiv 1801.09414); defaults from ElasticFace (arXiv 2109.09416).

    Shapes: embeddings (B, D), target (B,) int64 → 0-d loss; ``weight`` is (D, C).

    Args:
        in_features: embedding size D.
        num_classes: number of classes C.
        s: logit scale (64).
        m: cosine margin (0.35).
        ignore_index: label that gets no margin and no loss (−1).
        accumulation_steps: see :class:`~stepguard.losses.base.GuardedLoss`.
    """

    _kind = "cos"

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        s: float = 64.0,
        m: float = 0.35,
        ignore_index: int = -1,
        accumulation_steps: int = 1,
    ) -> None:
        super().__init__(
            in_features,
            num_classes,
            s=s,
            m=m,
            ignore_index=ignore_index,
            accumulation_steps=accumulation_steps,
        )


class ElasticArcFaceLoss(_MarginHeadLoss):
    r"""ElasticFace-Arc: ArcFace with a per-sample margin $m_i\sim\mathcal N(m,\sigma^2)$.

    $$\ell_i = \mathrm{CE}\big(s\cos(\theta_{ij} + m_i\,1[j=y_i]),\ y_i\big),\qquad
    m_i\sim\mathcal N(m, \sigma^2)\ \text{drawn at every forward}$$

    The margins are not clamped (the official code has the clamp only as a comment). With
    σ = 0 this is exactly ArcFace. Pass ``generator`` for reproducible draws; the draw is one
    ``torch.normal`` of shape (B, 1), as in the official code.

    Paper: Boutros, Damer, Kirchbuchner & Kuijper, "ElasticFace: Elastic Margin Loss for
    Deep Face Recognition" (arXiv 2109.09416).

    Shapes: embeddings (B, D), target (B,) int64 → 0-d loss; ``weight`` is (D, C).

    Args:
        in_features: embedding size D.
        num_classes: number of classes C.
        s: logit scale (64).
        m: mean margin (0.5).
        std: margin standard deviation σ (0.05; the "+" variant uses 0.0175).
        faithful: whole-matrix ``acos``/``cos`` as in the official code.
        fallback: ``"insightface"`` uses ``cos θ − m·sin m`` where ``θ + m > π``.
        generator: random generator for the margin draws (global RNG when ``None``).
        ignore_index: label that gets no margin and no loss (−1).
        accumulation_steps: see :class:`~stepguard.losses.base.GuardedLoss`.
    """

    _kind = "arc"
    _elastic = True

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        s: float = 64.0,
        m: float = 0.5,
        std: float = 0.05,
        faithful: bool = False,
        fallback: Fallback = "none",
        generator: torch.Generator | None = None,
        ignore_index: int = -1,
        accumulation_steps: int = 1,
    ) -> None:
        super().__init__(
            in_features,
            num_classes,
            s=s,
            m=m,
            std=std,
            faithful=faithful,
            fallback=fallback,
            generator=generator,
            ignore_index=ignore_index,
            accumulation_steps=accumulation_steps,
        )


class ElasticCosFaceLoss(_MarginHeadLoss):
    r"""ElasticFace-Cos: CosFace with a per-sample margin $m_i\sim\mathcal N(m,\sigma^2)$.

    $$\ell_i = \mathrm{CE}\big(s(\cos\theta_{ij} - m_i\,1[j=y_i]),\ y_i\big)$$

    Paper: Boutros et al., "ElasticFace: Elastic Margin Loss for Deep Face Recognition"
    (arXiv 2109.09416).

    Shapes: embeddings (B, D), target (B,) int64 → 0-d loss; ``weight`` is (D, C).

    Args:
        in_features: embedding size D.
        num_classes: number of classes C.
        s: logit scale (64).
        m: mean margin (0.35).
        std: margin standard deviation σ (0.05; the "+" variant uses 0.02).
        generator: random generator for the margin draws.
        ignore_index: label that gets no margin and no loss (−1).
        accumulation_steps: see :class:`~stepguard.losses.base.GuardedLoss`.
    """

    _kind = "cos"
    _elastic = True

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        s: float = 64.0,
        m: float = 0.35,
        std: float = 0.05,
        generator: torch.Generator | None = None,
        ignore_index: int = -1,
        accumulation_steps: int = 1,
    ) -> None:
        super().__init__(
            in_features,
            num_classes,
            s=s,
            m=m,
            std=std,
            generator=generator,
            ignore_index=ignore_index,
            accumulation_steps=accumulation_steps,
        )


class ElasticArcFacePlusLoss(_MarginHeadLoss):
    r"""ElasticFace-Arc+: the drawn margins are assigned by the ranking of cos θ_{i,y_i}.

    $$\ell_i=\mathrm{CE}\big(s\cos(\theta_{ij}+m_{(r_i)}1[j=y_i]),\ y_i\big),\qquad
    m_{(1)}\le\dots\le m_{(B)}\ \text{sorted draws from }\mathcal N(m,\sigma^2)$$

    where $r_i$ is the rank of $\cos\theta_{i y_i}$ in descending order.
    The B margins are sorted ascending; the sample with the largest target cosine gets the
    smallest margin (``plus_assignment="rank"``, default). ``faithful=True`` selects
    ``plus_assignment="official"``, the official code's composed permutation
    ``m_i = sorted(m)[argsort_desc(cos)[i]]``, and the whole-matrix ``acos``/``cos``.

    Paper: Boutros et al., "ElasticFace: Elastic Margin Loss for Deep Face Recognition"
    (arXiv 2109.09416).

    Shapes: embeddings (B, D), target (B,) int64 → 0-d loss; ``weight`` is (D, C).
    Batch-coupled: a sample's margin depends on the other samples' cosines.

    Args:
        in_features: embedding size D.
        num_classes: number of classes C.
        s: logit scale (64).
        m: mean margin (0.5).
        std: margin standard deviation σ (0.0175).
        faithful: official composed assignment and whole-matrix ``acos``/``cos``.
        plus_assignment: override the assignment rule (``"rank"`` or ``"official"``).
        fallback: ``"insightface"`` uses ``cos θ − m·sin m`` where ``θ + m > π``.
        generator: random generator for the margin draws.
        ignore_index: label that gets no margin and no loss (−1).
        accumulation_steps: see :class:`~stepguard.losses.base.GuardedLoss`.
    """

    _kind = "arc"
    _elastic = True
    _plus = True
    batch_coupled = True
    coupling_note = "margins are assigned by ranking the batch's target cosines"

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        s: float = 64.0,
        m: float = 0.5,
        std: float = 0.0175,
        faithful: bool = False,
        plus_assignment: PlusAssignment | None = None,
        fallback: Fallback = "none",
        generator: torch.Generator | None = None,
        ignore_index: int = -1,
        accumulation_steps: int = 1,
    ) -> None:
        super().__init__(
            in_features,
            num_classes,
            s=s,
            m=m,
            std=std,
            faithful=faithful,
            fallback=fallback,
            plus_assignment=plus_assignment,
            generator=generator,
            ignore_index=ignore_index,
            accumulation_steps=accumulation_steps,
        )


class ElasticCosFacePlusLoss(_MarginHeadLoss):
    r"""ElasticFace-Cos+: CosFace margins drawn from N(m, σ²) and assigned by cosine rank.

    $$\ell_i=\mathrm{CE}\big(s(\cos\theta_{ij}-m_{(r_i)}1[j=y_i]),\ y_i\big)$$

    with $m_{(r)}$ the r-th smallest draw and $r_i$ the descending rank of
    $\cos\theta_{i y_i}$.
    See :class:`ElasticArcFacePlusLoss` for the assignment rule and ``faithful``.

    Paper: Boutros et al., "ElasticFace: Elastic Margin Loss for Deep Face Recognition"
    (arXiv 2109.09416).

    Shapes: embeddings (B, D), target (B,) int64 → 0-d loss; ``weight`` is (D, C).
    Batch-coupled.

    Args:
        in_features: embedding size D.
        num_classes: number of classes C.
        s: logit scale (64).
        m: mean margin (0.35).
        std: margin standard deviation σ (0.02).
        faithful: use the official composed assignment.
        plus_assignment: override the assignment rule.
        generator: random generator for the margin draws.
        ignore_index: label that gets no margin and no loss (−1).
        accumulation_steps: see :class:`~stepguard.losses.base.GuardedLoss`.
    """

    _kind = "cos"
    _elastic = True
    _plus = True
    batch_coupled = True
    coupling_note = "margins are assigned by ranking the batch's target cosines"

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        s: float = 64.0,
        m: float = 0.35,
        std: float = 0.02,
        faithful: bool = False,
        plus_assignment: PlusAssignment | None = None,
        generator: torch.Generator | None = None,
        ignore_index: int = -1,
        accumulation_steps: int = 1,
    ) -> None:
        super().__init__(
            in_features,
            num_classes,
            s=s,
            m=m,
            std=std,
            faithful=faithful,
            plus_assignment=plus_assignment,
            generator=generator,
            ignore_index=ignore_index,
            accumulation_steps=accumulation_steps,
        )
