"""``StepGuard``: an optimizer wrapper that measures, and if asked clips or vetoes, every step."""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch
from torch import Tensor, nn

from stepguard.config import GuardConfig
from stepguard.engine import GuardEngine, RowsFn
from stepguard.geometry.logits import LogitsFn
from stepguard.policy import Policy
from stepguard.report import StepReport
from stepguard.sinks.base import Sink

try:  # the registries behind torch.optim.optimizer.register_optimizer_step_{pre,post}_hook
    from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks
except ImportError:  # pragma: no cover - older or newer torch without them
    _global_optimizer_pre_hooks = _global_optimizer_post_hooks = OrderedDict()


def _with_step_hooks(step: Callable[..., Any]) -> Callable[..., Any]:
    """What ``torch.optim.Optimizer.profile_hook_step`` does, without its cost when nothing listens.

    Runs the global and the guard's own step pre/post hooks (a pre-hook may return new
    ``(args, kwargs)``) and opens a ``record_function`` range only while the profiler is on:
    the unconditional range costs about 8 µs a step, a fifth of an unmeasured step's budget
    on a small model.
    """

    @functools.wraps(step)
    def wrapper(self: StepGuard, *args: Any, **kwargs: Any) -> Any:
        if torch.autograd._profiler_enabled():
            with torch.autograd.profiler.record_function(f"Optimizer.step#{type(self).__name__}.step"):
                return _run_hooked(step, self, args, kwargs)
        return _run_hooked(step, self, args, kwargs)

    return wrapper


def _run_hooked(step: Callable[..., Any], self: StepGuard, args: tuple, kwargs: dict) -> Any:
    if _global_optimizer_pre_hooks or self._optimizer_step_pre_hooks:
        for pre_hook in chain(_global_optimizer_pre_hooks.values(), self._optimizer_step_pre_hooks.values()):
            result = pre_hook(self, args, kwargs)
            if result is not None:
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise RuntimeError(
                        f"an optimizer step pre-hook must return None or (new_args, new_kwargs), got {result}"
                    )
                args, kwargs = result
    out = step(self, *args, **kwargs)
    self._optimizer_step_code()
    if _global_optimizer_post_hooks or self._optimizer_step_post_hooks:
        post_hooks = chain(self._optimizer_step_post_hooks.values(), _global_optimizer_post_hooks.values())
        for post_hook in post_hooks:
            post_hook(self, args, kwargs)
    return out


class StepGuard(torch.optim.Optimizer):
    """Wraps any optimizer; each ``step()`` is measured against the softmax's safe-step radius.

    Before the update is committed the guard computes, along the optimizer's actual
    proposed update Δθ (momentum, Adam scaling and weight decay included), the logit
    velocities a = J_z·Δθ/τ with one forward-mode JVP on the batch of the model's most
    recent training forward, and from them Δ_a, ρ_a = π/Δ_a and r = τ/ρ_a ("Ghosts of
    Softmax", arXiv 2603.13552). The policy then allows, clips (θ₀ + (c·ρ_a/τ)·Δθ) or
    vetoes (θ₀, optimizer state restored) the step.

    The guard shares the inner optimizer's ``param_groups`` and ``state``, so LR schedulers,
    ``GradScaler.step(guard)``, closures, ``zero_grad()`` and checkpoints work unchanged;
    ``state_dict()`` adds the guard's own counters under the key ``"stepguard"``.

    Args:
        optimizer: the optimizer to guard.
        model: the network whose logits the optimizer moves.
        policy: ``"monitor"`` (never changes a step), ``"clip"``, ``"veto"`` or a
            :class:`~stepguard.policy.Policy`.
        sinks: where each :class:`~stepguard.StepReport` goes (JSON lines, console,
            TensorBoard, Prometheus …). A failing sink never stops training.
        config: a :class:`~stepguard.GuardConfig`.
        budget: keep the guard's own time near this fraction of the step time (e.g. 0.10):
            measure on a schedule, estimate r = τ_t/ρ_a(last) in between, and measure
            afresh whenever τ jumps, the estimate nears the boundary or the direction turns
            (shorthand for ``GuardConfig(budget=...)``).
        logits_fn: picks the logits from the model output when it is not a tensor,
            ``.logits`` or ``{"logits": …}``.
        loss: a loss from :mod:`stepguard.losses` (any module with ``radius_logits`` and
            ``components``): the radius is measured on the logits its softmax acts on
            (e.g. ArcFace's scaled cosines, its class centres included in the JVP), and its
            named components go into ``report.extras`` as ``loss.<name>``. Pass targets
            with ``step(targets=...)`` when the loss's logits depend on them.
        rows_fn: ``rows_fn(args, kwargs) -> {"targets": ..., "mask": ...}`` derives the
            rows that count from the captured forward's arguments when nothing was passed
            to ``step``/``observe`` (e.g. :func:`stepguard.rows.causal_lm_rows` for
            Hugging Face causal LMs called with ``labels=``).

    Example:
        >>> guard = StepGuard(torch.optim.Adam(net.parameters()), model=net, policy="clip")
        >>> loss = F.cross_entropy(net(x), y); loss.backward()
        >>> report = guard.step(); guard.zero_grad()
        >>> report.r, report.action
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module | None = None,
        policy: str | Policy = "monitor",
        sinks: Iterable[Sink] = (),
        config: GuardConfig | None = None,
        *,
        budget: float | None = None,
        logits_fn: LogitsFn | None = None,
        loss: nn.Module | None = None,
        rows_fn: RowsFn | None = None,
    ) -> None:
        if isinstance(optimizer, StepGuard):
            raise TypeError("this optimizer is already a StepGuard; wrap the inner optimizer once")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"StepGuard wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.defaults = optimizer.defaults
        self._optimizer_step_pre_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._zero_grad_profile_name = "Optimizer.zero_grad#StepGuard.zero_grad"
        if budget is not None:
            config = GuardConfig.model_validate((config or GuardConfig()).model_dump() | {"budget": budget})
        self.engine = GuardEngine(optimizer, model, policy, sinks, config, logits_fn, loss, rows_fn)

    # The inner optimizer owns the parameters and their state; the guard only points at them.
    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property  # type: ignore[override]
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def policy(self) -> Policy:
        return self.engine.policy

    @property
    def config(self) -> GuardConfig:
        return self.engine.config

    @property
    def last_report(self) -> StepReport | None:
        """The report of the most recent step (None before the first)."""
        return self.engine.last_report

    @property
    def counters(self) -> dict[str, int]:
        """How many steps were allowed, clipped and vetoed."""
        return dict(self.engine.counters)

    def observe(
        self,
        *,
        inputs: Any = None,
        targets: Tensor | None = None,
        mask: Tensor | None = None,
        loss: Tensor | float | None = None,
    ) -> None:
        """Tell the guard about the coming step: targets, padding mask, loss, or explicit inputs."""
        self.engine.observe(inputs=inputs, targets=targets, mask=mask, loss=loss)

    def watch(self, *, lengths: dict[str, Any] | None = None, **objectives: Tensor) -> None:
        """Watch named objectives' gradient entanglement for the coming step.

        Call between the forward and ``backward`` (the graph is kept for the backward), e.g.
        ``guard.watch(chosen=logp_w.sum(), rejected=logp_l.sum())``. The report then carries
        ``entanglement["gram.chosen.rejected"]``, ``["cosine.chosen.rejected"]``,
        ``["ratio_chosen"]``, ``["ratio_rejected"]`` and the realized first-order change of
        each objective along the applied update, ``["realized.chosen"]``.
        """
        self.engine.watch(objectives, lengths=lengths)

    def step(  # type: ignore[override]
        self,
        closure: Callable[[], Any] | None = None,
        *,
        inputs: Any = None,
        targets: Tensor | None = None,
        mask: Tensor | None = None,
        loss: Tensor | float | None = None,
    ) -> StepReport:
        """Run the inner optimizer's step under the guard and return its :class:`StepReport`.

        Args:
            closure: passed to the inner optimizer (always called when given, as
                frameworks require); the loss it returns lands in ``report.loss``.
            inputs: measure on these inputs instead of the captured training batch.
            targets: class indices per sample/position (top-2 radii, ignore_index masking).
            mask: boolean per sample/position; False rows do not count.
            loss: the step's loss, for the report.
        """
        self.engine.observe(inputs=inputs, targets=targets, mask=mask, loss=loss)
        self.engine.before_step(closure=closure is not None)
        try:
            result = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        except BaseException:
            self.engine.abort()
            raise
        return self.engine.after_step(loss=result)

    step = _with_step_hooks(step)  # type: ignore[assignment]
    step.hooked = True  # type: ignore[attr-defined]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus the guard's own state under ``"stepguard"``."""
        state = self.optimizer.state_dict()
        state["stepguard"] = self.engine.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved from a guard, or a plain one saved from the inner optimizer."""
        state = dict(state_dict)
        guard_state = state.pop("stepguard", None)
        self.optimizer.load_state_dict(state)
        if guard_state is not None:
            self.engine.load_state_dict(guard_state)

    def close(self) -> None:
        """Remove the capture hook, flush and close the sinks."""
        self.engine.close()

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("a StepGuard holds hooks and sinks and is not picklable; save guard.state_dict()")

    def __repr__(self) -> str:
        return f"StepGuard({self.optimizer!r}, policy={self.engine.policy!r})"
