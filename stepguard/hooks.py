"""``attach``: the guard as optimizer step hooks, for code that owns its optimizer."""

from __future__ import annotations

import functools
import types
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from stepguard.config import GuardConfig
from stepguard.engine import GuardEngine, RowsFn
from stepguard.geometry.logits import LogitsFn
from stepguard.policy import Policy
from stepguard.report import StepReport
from stepguard.sinks.base import Sink


class GuardHandle:
    """What :func:`attach` returns: the guard's state and reports, and ``detach()``."""

    def __init__(self, optimizer: torch.optim.Optimizer, engine: GuardEngine) -> None:
        self.optimizer = optimizer
        self.engine = engine
        self._pre = optimizer.register_step_pre_hook(self._before)
        self._post = optimizer.register_step_post_hook(self._after)
        self.attached = True
        self._depth = 0
        self._wrap_step()

    def _wrap_step(self) -> None:
        """Roll the step back when the inner optimizer itself raises (no post-hook runs then).

        The wrapper is an instance attribute over the optimizer's own ``step`` (as LR
        schedulers' step counters are); ``detach`` removes it, or leaves it as a plain
        pass-through when something wrapped ``step`` again after it.
        """
        inner = self.optimizer.step
        self._had_instance_step = "step" in self.optimizer.__dict__

        @functools.wraps(inner)
        def step(optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
            try:
                return inner(*args, **kwargs)
            except BaseException:
                self._depth = 0
                if self.attached:
                    self.engine.abort()
                raise

        # a bound method, as torch's LR schedulers expect of optimizer.step when they wrap it
        self._step = types.MethodType(step, self.optimizer)
        self._inner_step = inner
        self.optimizer.step = self._step  # type: ignore[method-assign]

    # torch runs an optimizer's step hooks once per hooked ``step`` in the call chain: a
    # subclass whose step calls ``super().step()`` runs them twice, nested. Only the
    # outermost pair is the step.
    def _before(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._depth += 1
        if self._depth == 1:
            closure = args[1] if len(args) > 1 else kwargs.get("closure")  # args[0] is the optimizer
            self.engine.before_step(closure=closure is not None)

    def _after(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.engine.after_step()

    @property
    def last_report(self) -> StepReport | None:
        return self.engine.last_report

    @property
    def counters(self) -> dict[str, int]:
        return dict(self.engine.counters)

    def observe(
        self,
        *,
        inputs: Any = None,
        targets: Tensor | None = None,
        mask: Tensor | None = None,
        loss: Tensor | float | None = None,
    ) -> None:
        """Tell the guard about the coming step (see :meth:`StepGuard.observe`)."""
        self.engine.observe(inputs=inputs, targets=targets, mask=mask, loss=loss)

    def watch(self, *, lengths: dict[str, Any] | None = None, **objectives: Tensor) -> None:
        """Watch named objectives' gradient entanglement (see :meth:`StepGuard.watch`)."""
        self.engine.watch(objectives, lengths=lengths)

    def state_dict(self) -> dict[str, Any]:
        return self.engine.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.engine.load_state_dict(state)

    def detach(self) -> None:
        """Remove the step hooks and the capture hook, and close the sinks. Idempotent."""
        if not self.attached:
            return
        self._pre.remove()
        self._post.remove()
        if self.optimizer.__dict__.get("step") is self._step:
            if self._had_instance_step:
                self.optimizer.step = self._inner_step  # type: ignore[method-assign]
            else:
                del self.optimizer.step
        self.engine.close()
        self.attached = False


def attach(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    policy: str | Policy = "monitor",
    sinks: Iterable[Sink] = (),
    config: GuardConfig | None = None,
    *,
    budget: float | None = None,
    logits_fn: LogitsFn | None = None,
    loss_module: nn.Module | None = None,
    rows_fn: RowsFn | None = None,
    **unknown: Any,
) -> GuardHandle:
    """Guard an optimizer that a framework owns, through its step pre/post hooks.

    Behaves like :class:`~stepguard.StepGuard` (same measurement, policy, sinks, clip and
    veto semantics; the same arguments, ``loss_module=`` included) without replacing the
    optimizer object. Returns a handle whose ``detach()`` removes every hook.
    """
    from stepguard.guard import _reject_unknown_keywords

    _reject_unknown_keywords("attach", unknown)
    if model is None or not isinstance(model, nn.Module):
        raise TypeError(f"attach() needs the model as an nn.Module, got {type(model).__name__}")
    if budget is not None:
        config = GuardConfig.model_validate((config or GuardConfig()).model_dump() | {"budget": budget})
    return GuardHandle(
        optimizer, GuardEngine(optimizer, model, policy, sinks, config, logits_fn, loss_module, rows_fn)
    )
