"""``StepGuard``: an optimizer wrapper that measures, and if asked clips or vetoes, every step."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from stepguard.config import GuardConfig
from stepguard.engine import GuardEngine, RowsFn
from stepguard.geometry.logits import LogitsFn
from stepguard.geometry.sharded import local_tensor
from stepguard.policy import Policy
from stepguard.report import StepReport
from stepguard.sinks.base import Sink


def _reject_unknown_keywords(owner: str, unknown: dict[str, Any]) -> None:
    """The removed ``loss=`` keyword names its replacement; anything else is a plain TypeError."""
    if "loss" in unknown:
        raise TypeError(
            f"{owner}() takes the loss module as loss_module=, not loss= (loss= is the step's "
            "loss value, given to step() or observe())"
        )
    if unknown:
        raise TypeError(f"{owner}() got unexpected keyword arguments {sorted(unknown)}")


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
        loss_module: a loss from :mod:`stepguard.losses` (any module with ``radius_logits`` and
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
        loss_module: nn.Module | None = None,
        rows_fn: RowsFn | None = None,
        **unknown: Any,
    ) -> None:
        _reject_unknown_keywords("StepGuard", unknown)
        if isinstance(optimizer, StepGuard):
            raise TypeError("this optimizer is already a StepGuard; wrap the inner optimizer once")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"StepGuard wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self._init_optimizer(optimizer)
        if budget is not None:
            config = GuardConfig.model_validate((config or GuardConfig()).model_dump() | {"budget": budget})
        self.engine = GuardEngine(optimizer, model, policy, sinks, config, logits_fn, loss_module, rows_fn)

    def _init_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Run ``torch.optim.Optimizer.__init__`` (hook dicts, ``defaults``, profiler names).

        It builds its own ``state`` and ``param_groups`` from copies of the inner optimizer's
        groups; the guard drops them and from then on points at the inner optimizer's, so
        both share one set of parameter groups and one state.
        """
        copies = [dict(group) for group in optimizer.param_groups]
        torch.optim.Optimizer.__init__(self, copies, optimizer.defaults)
        del self.__dict__["_own_param_groups"], self.__dict__["_own_state"]
        self.optimizer = optimizer

    # The inner optimizer owns the parameters and their state; the guard only points at them
    # (until ``self.optimizer`` exists, i.e. inside Optimizer.__init__, at copies of its own).
    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        inner = self.__dict__.get("optimizer")
        return self.__dict__["_own_param_groups"] if inner is None else inner.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        inner = self.__dict__.get("optimizer")
        if inner is None:
            self.__dict__["_own_param_groups"] = value
        else:
            inner.param_groups = value

    @property  # type: ignore[override]
    def state(self) -> Any:
        inner = self.__dict__.get("optimizer")
        return self.__dict__["_own_state"] if inner is None else inner.state

    @state.setter
    def state(self, value: Any) -> None:
        inner = self.__dict__.get("optimizer")
        if inner is None:
            self.__dict__["_own_state"] = value
        else:
            inner.state = value

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
    ) -> StepReport | None:
        """Run the inner optimizer's step under the guard and return its :class:`StepReport`.

        One call is passed straight to the inner optimizer, unmeasured and uncounted, and
        returns None: the step ``torch.distributed.checkpoint.state_dict`` takes to fill an
        empty optimizer state before it saves or loads one (see :meth:`_is_state_filling_step`).

        Args:
            closure: passed to the inner optimizer (always called when given, as
                frameworks require); the loss it returns lands in ``report.loss``.
            inputs: measure on these inputs instead of the captured training batch.
            targets: class indices per sample/position (top-2 radii, ignore_index masking).
            mask: boolean per sample/position; False rows do not count.
            loss: the step's loss, for the report.
        """
        bare = closure is None and inputs is None and targets is None and mask is None and loss is None
        if bare and self._is_state_filling_step():
            return self.optimizer.step()
        self.engine.observe(inputs=inputs, targets=targets, mask=mask, loss=loss)
        self.engine.before_step(closure=closure is not None)
        try:
            result = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        except BaseException:
            self.engine.abort()
            raise
        return self.engine.after_step(loss=result)

    def _is_state_filling_step(self) -> bool:
        """Whether this is the step ``get_optimizer_state_dict`` takes to create the state.

        Before it saves or loads an optimizer state, torch's ``_init_optim_state``
        (``torch/distributed/checkpoint/state_dict.py``) gives an optimizer with an empty state
        and no gradients zero gradients on every parameter that requires one, sets every
        group's learning rate to 0 and calls ``step(closure=None)``. Lightning's
        ``ModelParallelStrategy`` makes that call on the guard, which on a fresh guard has no
        training forward to measure. Recognised are exactly those conditions: the state is
        empty, every group has a learning rate of 0, and every parameter that requires a
        gradient has one that is all zeros. With every update scaled by a learning rate of 0,
        such a step moves no parameter; any other step, including a first step at learning
        rate 0 with real gradients, is guarded (and without a captured batch raises). Under
        FSDP2 each rank tests only its own gradient shards, without a collective: the ranks
        could disagree only on a real step whose gradient is exactly zero on one rank's
        shards of every parameter and not on another's.
        """
        if self.optimizer.state:
            return False
        grads = []
        for group in self.param_groups:
            lr = group.get("lr")
            if lr is None or float(lr) != 0.0:
                return False
            for param in group["params"]:
                if param.requires_grad:
                    if param.grad is None:
                        return False
                    grads.append(param.grad)
        if not grads:
            return False
        return not any(local_tensor(grad).count_nonzero().item() for grad in grads)

    # torch.optim.Optimizer.__init__ wraps ``step`` in its profile_hook_step, which runs the
    # global and the guard's own step pre/post hooks and opens a record_function range. A
    # hand-rolled wrapper that skipped the range saved about 8 µs a step, about 1 % of a
    # guarded step on the bench's MLP, so the guard keeps torch's (see the architecture page).

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "optimizer" not in self.__dict__:  # Optimizer.__init__ filling the guard's copies
            super().add_param_group(param_group)
        else:
            self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus the guard's own state under ``"stepguard"``.

        The hooks registered on the guard with ``register_state_dict_pre_hook`` and
        ``register_state_dict_post_hook`` run around it, as torch runs them.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state = self.optimizer.state_dict()
        state["stepguard"] = self.engine.state_dict()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state)
            if result is not None:
                state = result
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved from a guard, or a plain one saved from the inner optimizer.

        The guard's ``register_load_state_dict_pre_hook``/``_post_hook`` hooks run around it.
        """
        state = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state)
            if result is not None:
                state = dict(result)
        guard_state = state.pop("stepguard", None)
        self.optimizer.load_state_dict(state)
        if guard_state is not None:
            self.engine.load_state_dict(guard_state)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def close(self) -> None:
        """Remove the capture hook, flush and close the sinks."""
        self.engine.close()

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("a StepGuard holds hooks and sinks and is not picklable; save guard.state_dict()")

    def __repr__(self) -> str:
        return f"StepGuard({self.optimizer!r}, policy={self.engine.policy!r})"
