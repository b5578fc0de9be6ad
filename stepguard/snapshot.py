"""θ₀ and Δθ kept flat: a few tensor ops per step, whatever the number of parameter tensors.

The optimizer's parameters are grouped by (device, dtype). Each group's θ₀ lives in one
flat buffer, each parameter in row-major order in its slice. Per step and group:

* snapshot: one ``_foreach_copy_`` of the parameters into the slices;
* difference: the parameters concatenated into a fresh flat tensor (one ``cat``) and θ₀
  subtracted in place, so Δθ = θ₁ − θ₀ is one flat tensor, bitwise equal to the
  per-tensor ``p − θ₀``;
* τ = ‖Δθ‖₂: one reduction over the flat tensor, accumulated in float32 at least.

Per-tensor foreach kernels on CPU run one kernel launch per tensor; a flat buffer makes
the difference, the norm, the sketch of the direction and the update/parameter cosine
one op each, which is what keeps an unmeasured step cheap (see docs/performance.md).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

Layout = list[tuple[torch.Size, int]]
"""(shape, offset) of each parameter in its group's flat buffer, in row-major order."""


def _layout_of(params: Sequence[Tensor]) -> tuple[Layout, int]:
    layout: Layout = []
    total = 0
    for p in params:
        layout.append((p.shape, total))
        total += p.numel()
    return layout, total


def _views(flat: Tensor, layout: Layout) -> list[Tensor]:
    """Views into ``flat`` with the parameters' shapes (row-major, whatever their own strides)."""
    return [flat[offset : offset + shape.numel()].view(shape) for shape, offset in layout]


def alias(view: Tensor) -> Tensor:
    """A tensor over ``view``'s memory that autograd does not know as a view.

    Forward-mode AD gives a dual made from a view a tangent for the view's whole base, and
    copies a tangent whose layout (offset, strides, storage size) differs from its primal's.
    A slice of θ₀'s flat buffer paired with the same slice of Δθ's, both aliased, becomes a
    dual with no copy at all.
    """
    out = torch.empty(0, dtype=view.dtype, device=view.device)
    return out.set_(view.untyped_storage(), view.storage_offset(), view.shape, view.stride())


@dataclass
class _Group:
    """The parameters of one (device, dtype), their positions in the full list, and θ₀."""

    positions: list[int]
    params: list[Tensor]
    layout: Layout
    theta0: Tensor
    theta0_views: list[Tensor]

    @property
    def accumulate(self) -> torch.dtype:
        return torch.float64 if self.theta0.dtype == torch.float64 else torch.float32


@dataclass
class Update:
    """Δθ = θ₁ − θ₀ of one step, flat per group, and its length τ (a 0-d tensor on the device)."""

    groups: list[_Group]
    flats: list[Tensor]
    tau: Tensor
    _views: list[Tensor] | None = field(default=None, repr=False)

    def views(self) -> list[Tensor]:
        """Δθ as one tensor per parameter, in the optimizer's order (views, no copy)."""
        if self._views is None:
            per_group = [_views(flat, g.layout) for g, flat in zip(self.groups, self.flats, strict=True)]
            if len(per_group) == 1:
                self._views = per_group[0]
            else:
                out: list[Tensor] = [None] * sum(len(g.positions) for g in self.groups)  # type: ignore[list-item]
                for group, views in zip(self.groups, per_group, strict=True):
                    for i, view in zip(group.positions, views, strict=True):
                        out[i] = view
                self._views = out
        return self._views

    @contextlib.contextmanager
    def scaled_near_unit(self, length: Tensor | None = None) -> Iterator[Tensor]:
        """Δθ scaled in place by 2^e, with 1 < L·2^e ≤ 2 (e clamped to [0, 14]), and back.

        L is ``length``, τ unless given (FSDP2 gives the last step's global τ, since this
        rank's τ is only its shard's). Yields L·2^e. Multiplying by a power of two is exact,
        so the flats come back bit for bit; e ≥ 0 never pushes an element towards the
        subnormals, and 2^14 fits in float16. A tangent near unit length keeps a replay in
        half precision away from underflow, as Δθ/τ would, without a scaled copy of Δθ.
        """
        length = self.tau if length is None else length
        _, exponent = torch.frexp(torch.where(length > 0, 1.0 / length, 1.0))
        exponent = exponent.clamp(0, 14)  # 1/L = m·2^e with m in [0.5, 1)
        power = torch.ldexp(torch.ones_like(length), exponent)
        with torch.no_grad():
            for flat in self.flats:
                flat.mul_(power.to(flat.device, flat.dtype))
        try:
            yield length * power
        finally:
            with torch.no_grad():
                for flat in self.flats:
                    flat.mul_((1.0 / power).to(flat.device, flat.dtype))

    def sketch(self, indices: Sequence[Tensor]) -> Tensor:
        """Δθ at fixed coordinates (one index tensor per group), in the widest dtype present."""
        if len(self.flats) == 1:
            return self.flats[0].index_select(0, indices[0])
        device = self.tau.device
        return torch.cat([f.index_select(0, i).to(device) for f, i in zip(self.flats, indices, strict=True)])

    def cosine_with_theta0(self) -> Tensor:
        """cos(Δθ, θ₀) = ⟨Δθ, θ₀⟩/(‖Δθ‖‖θ₀‖), 0 when either is zero (0-d, float32 or wider)."""
        if len(self.groups) == 1 and self.flats[0].dtype in (torch.float32, torch.float64):
            flat, theta0 = self.flats[0], self.groups[0].theta0
            ratio = torch.dot(flat, theta0) / (self.tau * torch.linalg.vector_norm(theta0))
            return torch.nan_to_num(ratio, nan=0.0)  # 0/0: one of the two vectors is zero
        dots, norms = [], []
        for group, flat in zip(self.groups, self.flats, strict=True):
            wide = group.accumulate
            device = self.tau.device
            dots.append(torch.dot(flat.to(wide), group.theta0.to(wide)).to(device, torch.float64))
            norms.append(torch.linalg.vector_norm(group.theta0, dtype=wide).to(device, torch.float64))
        dot = dots[0] if len(dots) == 1 else torch.stack(dots).sum()
        theta_norm = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))
        denominator = self.tau.to(torch.float64) * theta_norm
        return torch.where(denominator > 0, dot / torch.where(denominator > 0, denominator, 1.0), 0.0)


class ParameterSnapshot:
    """Keeps θ₀ of a list of parameters in flat buffers and turns θ₁ into an :class:`Update`.

    Example:
        >>> snapshot = ParameterSnapshot()
        >>> snapshot.bind(params); snapshot.take()
        >>> optimizer.step()
        >>> update = snapshot.difference()   # update.tau, update.views()
    """

    def __init__(self) -> None:
        self.params: list[Tensor] = []
        self.groups: list[_Group] = []
        self._theta0_list: list[Tensor] = []
        self._kept_deltas: dict[int, Tensor] = {}

    def bind(self, params: Sequence[Tensor]) -> bool:
        """Use ``params`` (reallocating the buffers when the list changed); True when it changed.

        The same parameter objects whose data moved (``model.to(...)``, ``model.half()``
        after the optimizer was built) also count as a change; each group's first member
        stands for the group (such a move converts all of them).
        """
        if (
            len(params) == len(self.params)
            and all(a is b for a, b in zip(params, self.params, strict=True))
            and all(
                g.params[0].dtype == g.theta0.dtype and g.params[0].device == g.theta0.device
                for g in self.groups
            )
        ):
            return False
        self.params = list(params)
        self._kept_deltas = {}
        by_key: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, p in enumerate(self.params):
            by_key.setdefault((p.device, p.dtype), []).append(i)
        self.groups = []
        theta0: list[Tensor | None] = [None] * len(self.params)
        for (device, dtype), positions in by_key.items():
            members = [self.params[i] for i in positions]
            layout, total = _layout_of(members)
            flat = torch.empty(total, device=device, dtype=dtype)
            views = _views(flat, layout)
            self.groups.append(_Group(positions, members, layout, flat, views))
            for i, view in zip(positions, views, strict=True):
                theta0[i] = view
        self._theta0_list = [t for t in theta0 if t is not None]
        return True

    @property
    def theta0(self) -> list[Tensor]:
        """θ₀ as one tensor per parameter (views into the flat buffers)."""
        return self._theta0_list

    def sketch_indices(self, per_group: int, seed: int = 0) -> list[Tensor]:
        """Fixed coordinates per group for :meth:`Update.sketch`: all, or a sorted uniform draw."""
        gen = torch.Generator().manual_seed(seed)
        out = []
        for group in self.groups:
            n = group.theta0.numel()
            if n <= per_group:
                chosen = torch.arange(n)
            else:
                chosen = torch.randint(0, n, (per_group,), generator=gen).sort().values
            out.append(chosen.to(group.theta0.device))
        return out

    def restore(self) -> None:
        """Put θ₀ back into the parameters."""
        with torch.no_grad():
            for group in self.groups:
                torch._foreach_copy_(group.params, group.theta0_views)

    def take(self) -> None:
        """Copy the parameters' current values into θ₀."""
        with torch.no_grad():
            for group in self.groups:
                torch._foreach_copy_(group.theta0_views, group.params)

    def difference(self) -> Update:
        """Δθ = θ_now − θ₀ and τ = ‖Δθ‖₂ (float32 at least, float64 when the parameters are).

        On the CPU each group's Δθ is written into a buffer kept from the last step: there a
        fresh allocation of a large tensor costs page faults, three times the copy into it
        (40 ms against 13 ms for 70 MB on one core of the bench's machine). An accelerator's
        caching allocator reuses its blocks already, so there Δθ is allocated per step and
        freed with the step. The previous step's :class:`Update` is then overwritten.
        """
        flats, norms = [], []
        with torch.no_grad():
            for index, group in enumerate(self.groups):
                flat = torch.cat([p.reshape(-1) for p in group.params], out=self._kept_delta(index, group))
                flat.sub_(group.theta0)
                flats.append(flat)
                wide = group.accumulate
                norms.append(torch.linalg.vector_norm(flat, dtype=None if flat.dtype == wide else wide))
        if not norms:
            tau = torch.zeros(())
        elif len(norms) == 1:
            tau = norms[0]
        else:
            wide = torch.float64 if any(n.dtype == torch.float64 for n in norms) else torch.float32
            device = norms[0].device  # parameters may live on several devices (model parallel)
            tau = torch.linalg.vector_norm(torch.stack([n.to(device, wide) for n in norms]))
        return Update(self.groups, flats, tau)


    def _kept_delta(self, index: int, group: _Group) -> Tensor | None:
        """The CPU buffer for group ``index``'s Δθ (None on other devices: allocate per step)."""
        if group.theta0.device.type != "cpu":
            return None
        if index not in self._kept_deltas:
            self._kept_deltas[index] = torch.empty_like(group.theta0)
        return self._kept_deltas[index]


class OptimizerStateBackup:
    """A copy of the optimizer state of a list of parameters, to put back bit for bit.

    ``take`` copies every tensor of ``optimizer.state[p]`` into buffers kept from the last
    copy when shape and dtype still match (no allocation per step), and deep-copies the
    rest; a parameter without state is remembered as such, so ``restore`` removes the
    state a first step created.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.saved: dict[Tensor, dict[str, Any] | None] | None = None

    def take(self, params: Sequence[Tensor]) -> None:
        previous = self.saved or {}
        state = self.optimizer.state
        saved: dict[Tensor, dict[str, Any] | None] = {}
        for p in params:
            if p not in state:
                saved[p] = None
                continue
            old = previous.get(p) or {}
            copies: dict[str, Any] = {}
            for key, value in state[p].items():
                if isinstance(value, Tensor):
                    buf = old.get(key)
                    if isinstance(buf, Tensor) and buf.shape == value.shape and buf.dtype == value.dtype:
                        buf.copy_(value)
                    else:
                        buf = value.detach().clone()
                    copies[key] = buf
                else:
                    copies[key] = copy.deepcopy(value)
            saved[p] = copies
        self.saved = saved

    def drop(self) -> None:
        """Forget the copy (the policy can no longer change a step)."""
        self.saved = None

    def restore(self) -> bool:
        """Put the copied state back; False when there is no copy."""
        if self.saved is None:
            return False
        state = self.optimizer.state
        for p, saved in self.saved.items():
            if saved is None:
                state.pop(p, None)
                continue
            current = state[p]
            for key in [k for k in current if k not in saved]:
                del current[key]
            for key, value in saved.items():
                target = current.get(key)
                same = isinstance(target, Tensor) and target.shape == value.shape
                if isinstance(value, Tensor):
                    if same and target.dtype == value.dtype:
                        with torch.no_grad():
                            target.copy_(value)
                    else:
                        current[key] = value.clone()
                else:
                    current[key] = copy.deepcopy(value)
        return True
