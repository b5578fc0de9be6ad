"""Logit velocities a = J_z·v: forward-mode AD through ``torch.func``, or a finite difference.

The function differentiated is the *training* function: the same inputs, the same random
numbers (dropout masks) and, in train mode, batch statistics for normalization layers,
whose running buffers are left untouched by the replay. The forward-mode replay runs under
:func:`~stepguard.geometry.forward_rules.forward_rules`, which gives fused attention kernels
and grouped matmuls a forward-mode rule; the finite difference is the last resort, for an op
nothing covers.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.func import jvp, vmap

from stepguard.geometry.attention import DEFAULT_CHUNK_SIZE
from stepguard.geometry.forward_rules import (
    ForwardADUnsupportedError,
    describe_gap,
    forward_rules,
    warn_fallback,
)
from stepguard.geometry.logits import LogitsFn, extract_logits
from stepguard.geometry.swap import call_with

Mode = Literal["train", "eval"]
EstimatorChoice = Literal["auto", "jvp", "finite_difference"]

_FORWARD_AD_HINTS = (
    "forward ad",
    "forward-mode",
    "forward mode",
    "jvp",
    "functorch",
    "setup_context",
    "not implemented",
    "does not support it",
)


_replaying: contextvars.ContextVar[bool] = contextvars.ContextVar("stepguard_replaying", default=False)


def is_replaying() -> bool:
    """True inside StepGuard's own evaluations of a model (forward hooks use it to stay out)."""
    return _replaying.get()


@dataclass
class Batch:
    """One forward call of a model, replayable: its inputs and the random state before it.

    Attributes:
        args, kwargs: the forward's arguments (references, not copies).
        rng_state: the CPU generator state before the forward (``None``: don't restore).
        device_rng_states: accelerator generator states by device index.
        training: whether the model was in train mode.
        autocast: autocast dtypes by device type that were active during the forward
            (the replay runs under the same autocast, so logits keep their training dtype).
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    rng_state: Tensor | None = None
    device_rng_states: dict[int, Tensor] = field(default_factory=dict)
    training: bool = True
    autocast: dict[str, torch.dtype] = field(default_factory=dict)

    @classmethod
    def from_inputs(cls, inputs: Any, *, training: bool = True) -> Batch:
        """A batch from explicit inputs: a tensor, a tuple of args or a dict of kwargs.

        The current RNG state is recorded, so every evaluation of the batch draws the same
        random numbers and the caller's generator is left where it was.
        """
        if isinstance(inputs, Batch):
            return inputs
        rng = torch.get_rng_state()
        if isinstance(inputs, Mapping):
            return cls(args=(), kwargs=dict(inputs), rng_state=rng, training=training)
        if isinstance(inputs, (tuple, list)):
            return cls(args=tuple(inputs), rng_state=rng, training=training)
        return cls(args=(inputs,), rng_state=rng, training=training)

    @classmethod
    def capture(cls, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Batch:
        """Record a forward call from a forward pre-hook, with the RNG state before it."""
        states: dict[int, Tensor] = {}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            for index in {t.device.index for t in _tensors(args, kwargs) if t.is_cuda}:
                states[index if index is not None else torch.cuda.current_device()] = (
                    torch.cuda.get_rng_state(index)
                )
        return cls(
            args=tuple(args),
            kwargs=dict(kwargs),
            rng_state=torch.get_rng_state(),
            device_rng_states=states,
            training=module.training,
            autocast=_autocast_state(),
        )


def _tensors(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Iterator[Tensor]:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            yield value


def _autocast_state() -> dict[str, torch.dtype]:
    """The autocast dtypes in force, by device type."""
    state: dict[str, torch.dtype] = {}
    for device in ("cpu", "cuda"):
        try:
            if torch.is_autocast_enabled(device):
                state[device] = torch.get_autocast_dtype(device)
        except (TypeError, AttributeError):  # torch < 2.4 has per-device functions
            if device == "cpu" and torch.is_autocast_cpu_enabled():
                state[device] = torch.get_autocast_cpu_dtype()
            elif device == "cuda" and torch.is_autocast_enabled():
                state[device] = torch.get_autocast_gpu_dtype()
    return state


@contextlib.contextmanager
def replay_context(model: nn.Module, batch: Batch, mode: Mode) -> Iterator[None]:
    """Run the model as it ran in ``batch``'s forward, leaving no trace on it or the RNG.

    Train mode keeps each submodule's training flag but stops normalization layers from
    updating their running statistics (they normalize with batch statistics, as in the
    training forward). Eval mode switches the whole model to eval. The CPU and device
    random generators are set to their state before the captured forward (so dropout draws
    the same mask) and restored afterwards. Any other buffer the forward changes in place (a
    step counter, a cache) is put back as it was.
    """
    devices = list(batch.device_rng_states)
    if mode == "eval":
        changed = [m for m in model.modules() if m.training]
    else:
        changed = [
            m
            for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats
        ]
    kept = _BufferKeeper(model)
    token = _replaying.set(True)
    try:
        with contextlib.ExitStack() as stack:
            for device, dtype in batch.autocast.items():
                stack.enter_context(torch.autocast(device, dtype=dtype))
            stack.enter_context(torch.random.fork_rng(devices=devices, enabled=batch.rng_state is not None))
            if batch.rng_state is not None:
                torch.set_rng_state(batch.rng_state)
                for index, state in batch.device_rng_states.items():
                    torch.cuda.set_rng_state(state, index)
            for m in changed:
                if mode == "eval":
                    m.training = False
                else:
                    m.track_running_stats = False
            yield
    finally:
        _replaying.reset(token)
        kept.restore()
        for m in changed:
            if mode == "eval":
                m.training = True
            else:
                m.track_running_stats = True


class _BufferKeeper:
    """Copies of a module's buffers, put back after a replay into those the replay changed.

    Normalization layers' running statistics are left out: the replay stops them from
    updating (``track_running_stats`` off in train mode; eval mode only reads them).
    """

    def __init__(self, model: nn.Module) -> None:
        norms = {id(b) for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)
                 for b in m.buffers(recurse=False)}
        self.saved = [(b, b._version, b.detach().clone()) for b in model.buffers() if id(b) not in norms]

    def restore(self) -> None:
        with torch.no_grad():
            for buffer, version, copy in self.saved:
                if buffer._version != version:
                    buffer.copy_(copy)


def looks_like_forward_ad_gap(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, NotImplementedError) or any(h in text for h in _FORWARD_AD_HINTS)


def logit_velocities(
    model: nn.Module,
    params: Mapping[str, Tensor],
    tangents: Sequence[Mapping[str, Tensor]],
    batch: Batch,
    *,
    logits_fn: LogitsFn | None = None,
    mode: Mode = "train",
    estimator: EstimatorChoice = "auto",
    fd_epsilon: float | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    tangent_scale: Tensor | float = 1.0,
) -> tuple[Tensor, Tensor, str]:
    """Logits z(θ) and their derivatives along each tangent times ``tangent_scale``, on the replayed batch.

    Args:
        model: the module (unwrapped: no DDP / compile wrapper).
        params: trainable parameters at which to differentiate, by name; the module's
            other parameters and buffers are used as they are.
        tangents: one or more unit directions, each a mapping with the keys of ``params``.
        batch: the forward call to replay.
        logits_fn: picks the logits from the model output (see :func:`extract_logits`).
        mode: ``"train"`` replays the training function, ``"eval"`` the inference one.
        estimator: ``"jvp"`` (forward-mode AD), ``"finite_difference"`` (central
            difference), or ``"auto"`` (JVP, falling back to the difference when an op has
            no forward-mode rule).
        fd_epsilon: step of the central difference (default: cube root of the dtype's eps).
        chunk_size: keys per block of the attention tangent (memory O(T·chunk) per head).
        tangent_scale: s, a scalar: the velocities are J·(s·t), computed as s·(J·t) (the
            JVP is linear in t) so that no scaled copy of a tangent is made; the finite
            difference steps by ε·s·t.

    Returns:
        ``(logits, velocities, estimator_used)``; velocities have shape (D, *logits.shape)
        for D tangents.

    Raises:
        ForwardADUnsupportedError: ``estimator="jvp"`` and an op of the model has no
            forward-mode rule (the error names the op and the module that called it).
    """
    if not tangents:
        raise ValueError("logit_velocities needs at least one tangent")
    names = list(params)
    primals = {n: params[n].detach() for n in names}
    stacked = [{n: t[n] for n in names} for t in tangents]

    def logits_at(theta: Mapping[str, Tensor]) -> Tensor:
        out = call_with(model, theta, batch.args, batch.kwargs)
        return extract_logits(out, logits_fn)

    if estimator in ("auto", "jvp"):
        try:
            replay = functools.partial(_forward_mode, logits_at, primals, stacked, batch)
            z, velocities = _under_rules(model, replay, batch, mode, chunk_size)
            return z, _scaled(velocities, tangent_scale), "jvp"
        except Exception as exc:
            if not looks_like_forward_ad_gap(exc):
                raise
            gap = describe_gap(exc, model)
            if estimator == "jvp":
                raise ForwardADUnsupportedError(gap) from exc
            warn_fallback(gap)
    with replay_context(model, batch, mode):
        z, a = _finite_difference(logits_at, primals, stacked, batch, fd_epsilon, tangent_scale)
    return z, a, "finite_difference"


def _scaled(velocities: Tensor, scale: Tensor | float) -> Tensor:
    if isinstance(scale, Tensor):
        return velocities.mul_(scale.to(velocities.dtype))
    return velocities if scale == 1.0 else velocities.mul_(scale)


_rules_needed: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def _under_rules(
    model: nn.Module, replay: Callable[[], tuple[Tensor, Tensor]], batch: Batch, mode: Mode, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """The forward-mode replay, routed through the forward rules when the model needs them.

    A model's first replay runs under the rules and learns whether any fired (a fused fast
    path that the routing turned off sends its call to a rule too); models that need none
    skip the per-op cost of the routing afterwards, and go back to it for good if a later
    replay meets an op without a forward-mode rule.
    """
    if _rules_needed.get(model) is False:
        try:
            with replay_context(model, batch, mode), forward_rules(chunk_size, route=False):
                return replay()
        except Exception as exc:
            if not looks_like_forward_ad_gap(exc):
                raise
            _rules_needed[model] = True
    with replay_context(model, batch, mode), forward_rules(chunk_size) as rules:
        result = replay()
    _rules_needed[model] = bool(rules is not None and rules.fired)
    return result


def _forward_mode(
    logits_at: Callable[[Mapping[str, Tensor]], Tensor],
    primals: dict[str, Tensor],
    tangents: list[dict[str, Tensor]],
    batch: Batch,
) -> tuple[Tensor, Tensor]:
    if len(tangents) == 1:
        # dual tensors cost less per call than torch.func.jvp and give the same numbers
        with fwAD.dual_level():
            duals = {n: fwAD.make_dual(p, tangents[0][n]) for n, p in primals.items()}
            z, a = fwAD.unpack_dual(logits_at(duals))
        if a is None:  # the logits do not depend on the parameters
            a = torch.zeros_like(z)
        return z.detach(), a.detach().unsqueeze(0)
    stacked = {n: torch.stack([t[n] for t in tangents]) for n in primals}
    rng = batch.rng_state

    def one(tangent: dict[str, Tensor]) -> Tensor:
        if rng is not None:
            torch.set_rng_state(rng)
        return jvp(logits_at, (primals,), (tangent,))[1]

    velocities = vmap(one, randomness="same")(stacked)
    if rng is not None:
        torch.set_rng_state(rng)
    with torch.no_grad():
        z = logits_at(primals)
    return z.detach(), velocities.detach()


def _finite_difference(
    logits_at: Callable[[Mapping[str, Tensor]], Tensor],
    primals: dict[str, Tensor],
    tangents: list[dict[str, Tensor]],
    batch: Batch,
    epsilon: float | None,
    scale: Tensor | float = 1.0,
) -> tuple[Tensor, Tensor]:
    """(z(θ+ε·s·t) − z(θ−ε·s·t)) / 2ε for each tangent t: the derivative along s·t."""
    dtype = next(iter(primals.values())).dtype
    eps = epsilon if epsilon is not None else float(torch.finfo(dtype).eps) ** (1.0 / 3.0)
    step = eps * scale
    rng = batch.rng_state

    def at(theta: Mapping[str, Tensor]) -> Tensor:
        if rng is not None:
            torch.set_rng_state(rng)
        return logits_at(theta)

    with torch.no_grad():
        z = at(primals)
        rows = []
        for tangent in tangents:
            plus = at({n: p + step * tangent[n] for n, p in primals.items()})
            minus = at({n: p - step * tangent[n] for n, p in primals.items()})
            rows.append((plus - minus) / (2 * eps))
    return z.detach(), torch.stack(rows)
