"""AUC-M (min-max AUC margin), AUC square and multi-label AUC-M (Yuan, Yan, Sonka & Yang).

Inputs are scores ``h`` in [0, 1] (after a sigmoid) of shape (B,) or (B, 1) and labels in
{0, 1}; only the values 1 (positive) and 0 (negative) count, any other label is ignored.
With ``from_logits=True`` the loss applies the sigmoid itself and ``radius_logits`` returns
the logits. The auxiliary means ``a``, ``b`` and the dual variable ``α`` are parameters of
the loss, so they are optimised with the model (descent on a, b, ascent on α, e.g. PESG)
and saved in ``state_dict()``.

The value is a saddle objective: it can be negative and is not monotone in training
(``meaningful_value = False``); monitor AUROC or :func:`aucm_primal` instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from stepguard.losses.base import GuardedLoss

Version = Literal["v1", "v2"]

__all__ = [
    "AUCMLoss",
    "AUCSquareLoss",
    "MultiLabelAUCMLoss",
    "auc_square_minmax",
    "aucm_minmax",
    "aucm_primal",
]


def _flat_scores(y_pred: Tensor, y_true: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if not isinstance(y_pred, Tensor) or not y_pred.is_floating_point():
        raise TypeError("y_pred must be a floating-point tensor of shape (B,) or (B, 1)")
    if y_pred.ndim == 2 and y_pred.shape[1] == 1:
        y_pred = y_pred[:, 0]
    if y_pred.ndim != 1:
        raise ValueError(f"y_pred must have shape (B,) or (B, 1), got {tuple(y_pred.shape)}")
    if not isinstance(y_true, Tensor):
        raise TypeError("y_true must be a tensor of 0/1 labels")
    y_true = y_true.reshape(-1)
    if y_true.shape != y_pred.shape:
        raise ValueError(
            f"y_true must have {y_pred.shape[0]} labels, got shape {tuple(y_true.shape)}"
        )
    pos = (y_true == 1).to(y_pred.dtype)
    neg = (y_true == 0).to(y_pred.dtype)
    return y_pred, pos, neg


def _class_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def _mean_nonzero(x: Tensor) -> Tensor:
    return x.sum() / torch.count_nonzero(x)


def aucm_minmax(
    y_pred: Tensor,
    y_true: Tensor,
    a: Tensor,
    b: Tensor,
    alpha: Tensor,
    margin: float = 1.0,
    p: Tensor | float | None = None,
    version: Version = "v1",
    *,
    faithful: bool = False,
    use_margin: bool = True,
) -> Tensor:
    """The AUC-M min-max objective F(w, a, b, α) on one batch.

    v1 (class prior p, batch average)::

        F = mean[(1−p)(h−a)²·1[y=1] + p(h−b)²·1[y=0]
                 + 2α(p(1−p)m + p·h·1[y=0] − (1−p)·h·1[y=1])] − p(1−p)α²

    v2 (prior-free)::

        F = E₊[(h−a)²] + E₋[(h−b)²] + 2α(m + E₋[h] − E₊[h]) − α²

    ``p=None`` uses the batch fraction of positives. ``faithful=True`` (v2 only) reproduces
    the official means ``sum/count_nonzero`` and its bracketing
    ``mean_nz(h·1[y=0] − mean_nz(h·1[y=1]))``. ``use_margin=False`` drops m from the v1
    prior term, as the official multi-label v1 does.
    """
    h, pos, neg = _flat_scores(y_pred, y_true)
    if version == "v1":
        if p is None:
            p = pos.mean()
        q = 1.0 - p
        prior_term = p * q * margin if use_margin else p * q
        return (
            (q * (h - a) ** 2 * pos).mean()
            + (p * (h - b) ** 2 * neg).mean()
            + 2 * alpha * (prior_term + (p * h * neg - q * h * pos).mean())
            - p * q * alpha**2
        )
    if version != "v2":
        raise ValueError(f"version must be 'v1' or 'v2', got {version!r}")
    return _aucm_v2(h, pos, neg, a, b, alpha, margin, nonzero=faithful, bracket_bug=faithful)


def _aucm_v2(
    h: Tensor,
    pos: Tensor,
    neg: Tensor,
    a: Tensor,
    b: Tensor,
    alpha: Tensor,
    margin: float,
    *,
    nonzero: bool,
    bracket_bug: bool,
) -> Tensor:
    if not nonzero:
        return (
            _class_mean((h - a) ** 2, pos)
            + _class_mean((h - b) ** 2, neg)
            + 2 * alpha * (margin + _class_mean(h, neg) - _class_mean(h, pos))
            - alpha**2
        )
    gap = (
        _mean_nonzero(h * neg - _mean_nonzero(h * pos))
        if bracket_bug
        else _mean_nonzero(h * neg) - _mean_nonzero(h * pos)
    )
    return (
        _mean_nonzero((h - a) ** 2 * pos)
        + _mean_nonzero((h - b) ** 2 * neg)
        + 2 * alpha * (margin + gap)
        - alpha**2
    )


def aucm_primal(y_pred: Tensor, y_true: Tensor, margin: float = 1.0) -> Tensor:
    """The primal AUC-M objective ``Var₊(h) + Var₋(h) + (m − E₊h + E₋h)₊²`` on a batch."""
    h, pos, neg = _flat_scores(y_pred, y_true)
    mean_pos = _class_mean(h, pos)
    mean_neg = _class_mean(h, neg)
    var_pos = _class_mean((h - mean_pos) ** 2, pos)
    var_neg = _class_mean((h - mean_neg) ** 2, neg)
    return var_pos + var_neg + torch.relu(margin - mean_pos + mean_neg) ** 2


def auc_square_minmax(
    y_pred: Tensor,
    y_true: Tensor,
    a: Tensor,
    b: Tensor,
    alpha: Tensor,
    margin: float = 1.0,
    p: Tensor | float | None = None,
) -> Tensor:
    """The AUC square-loss min-max objective (α unconstrained), batch average::

        F_S = mean[(1−p)(h−a)²·1[y=1] + p(h−b)²·1[y=0]
                   + 2(m+α)(p·h·1[y=0] − (1−p)·h·1[y=1])] − p(1−p)α² + p(1−p)m²

    At the saddle point it equals ``p(1−p)·E[(m − h(x) + h(x'))² | y=1, y'=0]``.
    """
    h, pos, neg = _flat_scores(y_pred, y_true)
    if p is None:
        p = pos.mean()
    q = 1.0 - p
    return (
        (q * (h - a) ** 2 * pos).mean()
        + (p * (h - b) ** 2 * neg).mean()
        + 2 * (margin + alpha) * (p * h * neg - q * h * pos).mean()
        - p * q * alpha**2
        + p * q * margin**2
    )


class _AUCBase(GuardedLoss):
    meaningful_value = False
    batch_coupled = True
    coupling_note = "class means and the class prior are batch statistics"

    def __init__(self, from_logits: bool, accumulation_steps: int) -> None:
        super().__init__(accumulation_steps=accumulation_steps)
        self.from_logits = from_logits
        self.has_radius_logits = from_logits
        self.no_radius_reason = (
            "it consumes sigmoid scores; construct it with from_logits=True and pass logits, "
            "or hand the guard the pre-sigmoid logits directly"
        )

    def _scores(self, y_pred: Tensor) -> Tensor:
        return torch.sigmoid(y_pred) if self.from_logits else y_pred


class AUCMLoss(_AUCBase):
    r"""AUC-M: the min-max margin AUC surrogate with learnable a, b and dual α ≥ 0.

    Primal: $A(w)=\mathrm{Var}_+(h)+\mathrm{Var}_-(h)+(m-\mathbb E_+h+\mathbb E_-h)_+^2$.
    Min-max (v1, class prior p):

    $$F=\mathbb E\big[(1-p)(h-a)^2 1_{y=1}+p(h-b)^2 1_{y=0}
    +2\alpha\big(p(1-p)m+p h 1_{y=0}-(1-p)h 1_{y=1}\big)\big]-p(1-p)\alpha^2$$

    v2 (prior-free): $F=\mathbb E_+(h-a)^2+\mathbb E_-(h-b)^2+2\alpha(m+\mathbb E_-h-\mathbb
    E_+h)-\alpha^2$. Minimise over w, a, b and maximise over α ≥ 0.

    Default p: ``imratio`` when given, else the batch fraction of positives.
    ``faithful=True`` reproduces LibAUC 2.0.1: with ``auto=True`` (its default) v1 takes p
    from every batch and ignores ``imratio``; v2 uses ``sum/count_nonzero`` means and the
    bracketing ``mean(h·1[y=0] − mean(h·1[y=1]))``, i.e. (n₋/N)E₋h − E₊h.

    Paper: Yuan, Yan, Sonka & Yang, "Large-scale Robust Deep AUC Maximization: A New
    Surrogate Loss and Empirical Studies on Medical Image Classification"
    (arXiv 2012.03173).

    Shapes: y_pred (B,) or (B, 1) scores in [0, 1] (logits with ``from_logits``), y_true
    (B,) or (B, 1) in {0, 1} → 0-d. Batch-coupled; not a meaningful loss curve.

    Args:
        margin: m (1.0).
        imratio: positive-class prior p for v1 (``None``: from the batch).
        version: ``"v1"`` or ``"v2"``.
        faithful: LibAUC 2.0.1 behaviour (see above).
        auto: with ``faithful``, LibAUC's ``auto`` flag (True: p from every batch).
        from_logits: apply the sigmoid inside.
        accumulation_steps: see :class:`~stepguard.losses.base.GuardedLoss`.
    """

    def __init__(
        self,
        margin: float = 1.0,
        imratio: float | None = None,
        version: Version = "v1",
        *,
        faithful: bool = False,
        auto: bool = True,
        from_logits: bool = False,
        accumulation_steps: int = 1,
    ) -> None:
        super().__init__(from_logits, accumulation_steps)
        if version not in ("v1", "v2"):
            raise ValueError(f"version must be 'v1' or 'v2', got {version!r}")
        if imratio is not None and not 0.0 < imratio < 1.0:
            raise ValueError(f"imratio must lie in (0, 1), got {imratio}")
        self.margin = float(margin)
        self.imratio = imratio
        self.version: Version = version
        self.faithful = faithful
        self.auto = auto
        self.a = nn.Parameter(torch.zeros(()))
        self.b = nn.Parameter(torch.zeros(()))
        self.alpha = nn.Parameter(torch.zeros(()))

    def _prior(self, y_true: Tensor, like: Tensor) -> Tensor | float:
        if self.imratio is None or (self.faithful and self.auto):
            return (y_true.reshape(-1) == 1).to(like.dtype).mean()
        return self.imratio

    def forward(self, y_pred: Tensor, y_true: Tensor) -> Tensor:
        h = self._scores(y_pred)
        p = self._prior(y_true, h) if self.version == "v1" else None
        loss = aucm_minmax(
            h,
            y_true,
            self.a,
            self.b,
            self.alpha,
            self.margin,
            p,
            self.version,
            faithful=self.faithful,
        )
        parts = {"objective": loss, "a": self.a, "b": self.b, "alpha": self.alpha}
        if p is not None:
            parts["p"] = torch.as_tensor(p)
        with torch.no_grad():
            parts["primal"] = aucm_primal(h, y_true, self.margin)
        self._record(**parts)
        return loss

    @torch.no_grad()
    def ascend_alpha(self, lr: float) -> None:
        """PESG's dual step ``α ← clamp(α + lr·(2(m + b − a) − 2α), 0, 999)``.

        LibAUC's PESG uses a and b as stand-ins for the class means instead of α's gradient.
        """
        step = 2 * (self.margin + self.b - self.a) - 2 * self.alpha
        self.alpha.copy_((self.alpha + lr * step).clamp(0.0, 999.0))


class AUCSquareLoss(_AUCBase):
    r"""AUC square loss (AUC-S) in min-max form, α unconstrained.

    Primal: $A_S(w)=\mathbb E[(m-h(x)+h(x'))^2\mid y=1,y'=0]$. Min-max:

    $$F_S=\mathbb E\big[(1-p)(h-a)^2 1_{y=1}+p(h-b)^2 1_{y=0}
    +2(m+\alpha)\big(p h 1_{y=0}-(1-p)h 1_{y=1}\big)\big]-p(1-p)\alpha^2+p(1-p)m^2$$

    whose saddle value is $p(1-p)A_S$. The constant $p(1-p)m^2$ makes that exact. No
    reference implementation exists (LibAUC never shipped it); the form follows Ying et al.
    2016 ("Stochastic Online AUC Maximization").

    Paper: Yuan, Yan, Sonka & Yang, "Large-scale Robust Deep AUC Maximization: A New
    Surrogate Loss and Empirical Studies on Medical Image Classification" (arXiv 2012.03173),
    where the square loss is the baseline AUC-M improves on.

    Shapes: y_pred (B,) or (B, 1), y_true (B,) or (B, 1) in {0, 1} → 0-d. Batch-coupled.

    Args:
        margin: m (1.0).
        imratio: positive-class prior p (``None``: from the batch).
        from_logits: apply the sigmoid inside.
        accumulation_steps: see :class:`~stepguard.losses.base.GuardedLoss`.
    """

    def __init__(
        self,
        margin: float = 1.0,
        imratio: float | None = None,
        *,
        from_logits: bool = False,
        accumulation_steps: int = 1,
    ) -> None:
        super().__init__(from_logits, accumulation_steps)
        if imratio is not None and not 0.0 < imratio < 1.0:
            raise ValueError(f"imratio must lie in (0, 1), got {imratio}")
        self.margin = float(margin)
        self.imratio = imratio
        self.a = nn.Parameter(torch.zeros(()))
        self.b = nn.Parameter(torch.zeros(()))
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, y_pred: Tensor, y_true: Tensor) -> Tensor:
        h = self._scores(y_pred)
        p: Tensor | float
        p = (
            self.imratio
            if self.imratio is not None
            else (y_true.reshape(-1) == 1).to(h.dtype).mean()
        )
        loss = auc_square_minmax(h, y_true, self.a, self.b, self.alpha, self.margin, p)
        self._record(objective=loss, a=self.a, b=self.b, alpha=self.alpha, p=torch.as_tensor(p))
        return loss


class MultiLabelAUCMLoss(_AUCBase):
    r"""AUC-M for L labels at once: the mean over labels of the single-label objective.

    Each label ℓ has its own $a_\ell$, $b_\ell$, $\alpha_\ell$ (parameters of shape (L,))
    and its prior $p_\ell$ from the batch. ``faithful=True`` reproduces LibAUC 2.0.1: its v1
    omits the margin (the prior term is $p(1-p)$, so every m acts like m = 1) and its v2 uses
    ``sum/count_nonzero`` means.

    Paper: Yuan, Yan, Sonka & Yang, "Large-scale Robust Deep AUC Maximization: A New
    Surrogate Loss and Empirical Studies on Medical Image Classification" (arXiv 2012.03173);
    LibAUC ``MultiLabelAUCMLoss``.

    Shapes: y_pred (B, L) scores, y_true (B, L) in {0, 1} → 0-d. Batch-coupled.

    Args:
        num_labels: L.
        margin: m (1.0).
        version: ``"v1"`` or ``"v2"``.
        imratio: optional per-label priors (length L) for v1.
        faithful: LibAUC 2.0.1 behaviour.
        from_logits: apply the sigmoid inside.
        accumulation_steps: see :class:`~stepguard.losses.base.GuardedLoss`.
    """

    def __init__(
        self,
        num_labels: int,
        margin: float = 1.0,
        version: Version = "v1",
        imratio: Sequence[float] | None = None,
        *,
        faithful: bool = False,
        from_logits: bool = False,
        accumulation_steps: int = 1,
    ) -> None:
        super().__init__(from_logits, accumulation_steps)
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        if version not in ("v1", "v2"):
            raise ValueError(f"version must be 'v1' or 'v2', got {version!r}")
        if imratio is not None and len(imratio) != num_labels:
            raise ValueError(f"imratio must have {num_labels} entries, got {len(imratio)}")
        self.num_labels = num_labels
        self.margin = float(margin)
        self.version: Version = version
        self.imratio = None if imratio is None else [float(v) for v in imratio]
        self.faithful = faithful
        self.a = nn.Parameter(torch.zeros(num_labels))
        self.b = nn.Parameter(torch.zeros(num_labels))
        self.alpha = nn.Parameter(torch.zeros(num_labels))

    def forward(self, y_pred: Tensor, y_true: Tensor) -> Tensor:
        if y_pred.ndim != 2 or y_pred.shape[1] != self.num_labels:
            raise ValueError(
                f"y_pred must have shape (B, {self.num_labels}), got {tuple(y_pred.shape)}"
            )
        if y_true.shape != y_pred.shape:
            raise ValueError(
                f"y_true must have shape {tuple(y_pred.shape)}, got {tuple(y_true.shape)}"
            )
        h = self._scores(y_pred)
        losses = []
        for label in range(self.num_labels):
            a, b, alpha = self.a[label], self.b[label], self.alpha[label]
            if self.version == "v2":
                scores, pos, neg = _flat_scores(h[:, label], y_true[:, label])
                losses.append(
                    _aucm_v2(
                        scores,
                        pos,
                        neg,
                        a,
                        b,
                        alpha,
                        self.margin,
                        nonzero=self.faithful,
                        bracket_bug=False,
                    )
                )
                continue
            prior = None if self.imratio is None else self.imratio[label]
            losses.append(
                aucm_minmax(
                    h[:, label],
                    y_true[:, label],
                    a,
                    b,
                    alpha,
                    self.margin,
                    prior,
                    "v1",
                    use_margin=not self.faithful,
                )
            )
        loss = torch.stack(losses).mean()
        self._record(objective=loss, a=self.a, b=self.b, alpha=self.alpha)
        return loss
