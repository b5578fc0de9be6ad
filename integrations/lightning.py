"""Guard the optimizers a Lightning ``Trainer`` owns.

``StepGuardCallback`` wraps each optimizer of the strategy in a :class:`~stepguard.StepGuard`
when fitting starts. Lightning calls ``optimizer.step(closure)``; the guard runs the closure
(training_step, backward, and Lightning's gradient clipping, all inside the closure), then
measures the update the optimizer proposes on the batch of the module's training forward,
and clips or vetoes it. The reports go to the sinks and, aggregated per logging window, to
the Trainer's loggers as ``stepguard/<field>``.

A checkpoint holds each guard's state (steps, counters, schedule, policy state) and
``trainer.fit(..., ckpt_path=...)`` continues the report steps and counters where it left off.
Under the default strategies the state travels in the ``"stepguard"`` entry of each optimizer
state dict. Strategies that save optimizers through torch's ``get_optimizer_state_dict``
(``ModelParallelStrategy``, FSDP2) keep only ``state`` and ``param_groups`` and drop that
entry, so the callback also stores every guard's state at the top level of the checkpoint,
under ``"stepguard"`` (a list by optimizer index), and restores it from there when the
optimizer states do not hold it.

Requires ``pip install 'stepguard[lightning]'``.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from torch import Tensor, nn

from stepguard.config import GuardConfig
from stepguard.guard import StepGuard
from stepguard.integrations._callbacks import (
    DEFAULT_MAX_REPORTS,
    CollectSink,
    KeepOpen,
    check_max_reports,
)
from stepguard.policy import Policy
from stepguard.report import StepReport
from stepguard.sinks.base import Sink

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the standalone package name
    try:
        from pytorch_lightning.callbacks import Callback
    except ImportError as exc:
        raise ImportError(
            "stepguard.integrations.lightning needs Lightning: pip install 'stepguard[lightning]'"
        ) from exc

logger = logging.getLogger("stepguard")

CHECKPOINT_KEY = "stepguard"
"""The top-level checkpoint entry that holds every guard's state, by optimizer index."""

ModelFn = Callable[[nn.Module], nn.Module]
"""Picks, from the LightningModule, the module whose forward makes the logits."""

TargetsFn = Callable[[Any], Tensor | None]
"""Picks the targets (class indices) from a training batch, or None."""

_F = TypeVar("_F")


class StepGuardCallback(Callback):
    """Guard every optimizer of a Lightning run.

    Args:
        policy: a preset name or a :class:`~stepguard.policy.Policy` (one instance per optimizer
            is not shared: pass a preset name, or a factory via ``policy_factory``).
        sinks: sinks every report goes to; flushed at the end of every ``fit`` and closed by
            :meth:`close`.
        config: a :class:`~stepguard.GuardConfig`.
        model_fn: picks the module whose forward produces the logits from the
            LightningModule (default: the LightningModule itself; use e.g.
            ``lambda m: m.net`` when ``training_step`` calls ``self.net(x)``). One function
            serves every optimizer; a mapping from optimizer index to function (or a list,
            one per optimizer) gives each optimizer its own module, e.g.
            ``{0: lambda m: m.generator, 1: lambda m: m.discriminator}``.
        targets_fn: picks the targets from a training batch (default: the second element
            of a tuple/list batch, when it is an integer tensor); one function, or one per
            optimizer index like ``model_fn``. A function may return None (no targets).
        log: log each optimizer's reports to the Trainer's loggers, aggregated per logging
            window (``log_every_n_steps``): ``stepguard/<field>`` of the window's last step,
            ``stepguard/r_max`` and the counts ``stepguard/clipped``, ``stepguard/vetoed``
            over the window's steps. With several optimizers the names end in ``_<index>``.
        policy_factory: builds one policy per optimizer (overrides ``policy``).
        max_reports: how many of the most recent reports :attr:`reports` (and each entry of
            :attr:`optimizer_reports`) keeps; ``None`` keeps all of them. The sinks receive
            every report either way.

    Attributes:
        guards: the :class:`~stepguard.StepGuard` of each optimizer, by optimizer index.
        reports: the most recent reports of all optimizers, in the order the steps ran.
        optimizer_reports: the most recent reports of each optimizer, by optimizer index.
    """

    def __init__(
        self,
        policy: str | Policy = "clip",
        sinks: Iterable[Sink] = (),
        config: GuardConfig | None = None,
        *,
        model_fn: ModelFn | Mapping[int, ModelFn] | Sequence[ModelFn] | None = None,
        targets_fn: TargetsFn | Mapping[int, TargetsFn] | Sequence[TargetsFn] | None = None,
        log: bool = True,
        policy_factory: Callable[[], Policy] | None = None,
        max_reports: int | None = DEFAULT_MAX_REPORTS,
    ) -> None:
        super().__init__()
        if isinstance(model_fn, nn.Module):
            raise TypeError(
                "model_fn takes a function of the LightningModule, e.g. lambda m: m.net, not a module"
            )
        check_max_reports(max_reports)
        self.policy = policy
        self.sinks = list(sinks)
        self.config = config
        self.model_fn = model_fn
        self.targets_fn = targets_fn
        self.log = log
        self.policy_factory = policy_factory
        self.max_reports = max_reports
        self.guards: list[StepGuard] = []
        self.reports: deque[StepReport] = deque(maxlen=max_reports)
        self.optimizer_reports: list[deque[StepReport]] = []
        self._sinks = [KeepOpen(sink) for sink in self.sinks]
        self._collects: list[CollectSink] = []
        self._targets_fns: list[TargetsFn] = []
        self._resume_step: int | None = None
        self._resume_states: list[Mapping[str, Any]] | None = None

    def on_fit_start(self, trainer: Any, pl_module: nn.Module) -> None:
        optimizers = list(trainer.strategy.optimizers)
        count = len(optimizers)
        model_fns = _per_optimizer(self.model_fn, count, "model_fn", default=lambda module: module)
        self._targets_fns = _per_optimizer(self.targets_fn, count, "targets_fn", default=_default_targets)
        previous = [guard.engine.state_dict() for guard in self.guards]
        self._release_guards()
        self.optimizer_reports = [deque(maxlen=self.max_reports) for _ in optimizers]
        self._collects = [
            CollectSink("lightning-log", reports, self.reports) for reports in self.optimizer_reports
        ]
        self.guards = [
            self._guard(optimizer, index, model_fns[index], pl_module)
            for index, optimizer in enumerate(optimizers)
        ]
        if len(previous) == count:  # a later fit: the steps continue
            for guard, state in zip(self.guards, previous, strict=True):
                guard.engine.load_state_dict(state)
        trainer.strategy.optimizers = self.guards

    def _guard(self, optimizer: Any, index: int, model_fn: ModelFn, pl_module: nn.Module) -> StepGuard:
        inner = optimizer.optimizer if hasattr(optimizer, "_strategy") else optimizer  # LightningOptimizer
        collect = self._collects[index]
        if isinstance(inner, StepGuard):  # configure_optimizers returned a guard already
            inner.engine.sinks.add(collect)
            return inner
        model = model_fn(pl_module)
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model_fn for optimizer {index} returned {type(model).__name__}, not an nn.Module: "
                "it must return the module whose forward makes the logits, e.g. lambda m: m.net"
            )
        policy = self.policy_factory() if self.policy_factory else self.policy
        return StepGuard(inner, model=model, policy=policy, sinks=[collect, *self._sinks], config=self.config)

    def on_save_checkpoint(self, trainer: Any, pl_module: nn.Module, checkpoint: dict[str, Any]) -> None:
        # The optimizer states hold the same under the default strategies; under
        # ModelParallelStrategy this entry is the only copy (it lands in the metadata file).
        checkpoint[CHECKPOINT_KEY] = [guard.engine.state_dict() for guard in self.guards]

    def on_load_checkpoint(self, trainer: Any, pl_module: nn.Module, checkpoint: dict[str, Any]) -> None:
        # Runs before on_fit_start (default strategies) or after it (strategies that restore
        # after setup), so the state is applied in on_train_start, once the guards exist and
        # the strategy has loaded the optimizer states. The optimizer states win: where they
        # hold the guard's state, the optimizers' load_state_dict has restored it already.
        self._resume_states = None
        self._resume_step = None
        states = checkpoint.get("optimizer_states") or []
        if any(isinstance(state, Mapping) and "stepguard" in state for state in states):
            return
        saved = checkpoint.get(CHECKPOINT_KEY)
        if isinstance(saved, list | tuple) and all(isinstance(state, Mapping) for state in saved):
            self._resume_states = list(saved)
            return
        if saved is not None:
            logger.warning(
                "the checkpoint's %r entry is not a list of StepGuard states (one per optimizer) "
                "and is ignored",
                CHECKPOINT_KEY,
            )
        if checkpoint.get("global_step"):
            self._resume_step = int(checkpoint["global_step"])

    def on_train_start(self, trainer: Any, pl_module: nn.Module) -> None:
        states, self._resume_states = self._resume_states, None
        if states is not None:
            if len(states) == len(self.guards):
                for guard, state in zip(self.guards, states, strict=True):
                    guard.engine.load_state_dict(state)
                return
            logger.warning(
                "the checkpoint holds StepGuard state for %d optimizer(s) and the module has %d: "
                "the guards' state is not restored",
                len(states),
                len(self.guards),
            )
        step, self._resume_step = self._resume_step, None
        if step is None:
            return
        if len(self.guards) != 1:
            logger.warning(
                "the checkpoint holds no StepGuard state and the module has %d optimizers: "
                "report steps restart at 0",
                len(self.guards),
            )
            return
        logger.warning(
            "the checkpoint holds no StepGuard state: report steps continue from the Trainer's "
            "global step %d, the action counters restart at 0",
            step,
        )
        engine = self.guards[0].engine
        engine.load_state_dict(engine.state_dict() | {"step": step})

    def on_train_batch_start(self, trainer: Any, pl_module: nn.Module, batch: Any, batch_idx: int) -> None:
        for guard, targets_fn in zip(self.guards, self._targets_fns, strict=True):
            targets = targets_fn(batch)
            if targets is not None:
                guard.observe(targets=targets)

    def on_train_batch_end(
        self, trainer: Any, pl_module: nn.Module, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # The same test as Lightning's own monitors: the loggers receive this batch's logs.
        if not self.log or not trainer._logger_connector.should_update_logs:
            return
        for name, value in self._take_windows().items():
            pl_module.log(name, value, on_step=True, on_epoch=False, prog_bar=name == "stepguard/r")

    def on_train_end(self, trainer: Any, pl_module: nn.Module) -> None:
        """Log the steps after the last log point, which Lightning would not log."""
        metrics = self._take_windows() if self.log else {}
        if metrics:
            step = max(trainer.fit_loop.epoch_loop._batches_that_stepped - 1, 0)
            for each in trainer.loggers:
                each.log_metrics(metrics, step=step)

    def _take_windows(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for index, collect in enumerate(self._collects):
            window = collect.take_window()
            if window is not None:
                metrics |= window.metrics("" if len(self._collects) == 1 else f"_{index}")
        return metrics

    def on_fit_end(self, trainer: Any, pl_module: nn.Module) -> None:
        self._release_guards()

    def _release_guards(self) -> None:
        """Remove the guards' capture hooks and flush the sinks (they stay open)."""
        for guard in self.guards:
            guard.close()

    def close(self) -> None:
        """Release the guards and close the sinks. Call once the Trainer is done fitting."""
        self._release_guards()
        for sink in self.sinks:
            sink.close()


def _per_optimizer(
    value: _F | Mapping[int, _F] | Sequence[_F] | None, count: int, name: str, *, default: _F
) -> list[_F]:
    """One function per optimizer index, from one function, a mapping or a sequence."""
    if value is None:
        return [default] * count
    if isinstance(value, Mapping):
        missing = [index for index in range(count) if index not in value]
        extra = sorted(set(value) - set(range(count)), key=str)
        if missing or extra:
            raise ValueError(
                f"{name} maps optimizer indices {sorted(value, key=str)}, but the module has "
                f"{count} optimizer(s), indices 0..{count - 1}: give exactly one entry per index"
            )
        return [value[index] for index in range(count)]
    if isinstance(value, Sequence):
        if len(value) != count:
            raise ValueError(
                f"{name} has {len(value)} entries, but the module has {count} optimizer(s): "
                "give one per optimizer, in the order configure_optimizers returns them"
            )
        return list(value)
    if callable(value):
        return [value] * count  # type: ignore[list-item]
    raise TypeError(
        f"{name} must be a function, a mapping from optimizer index to function, or a list of "
        f"functions, got {type(value).__name__}"
    )


def _default_targets(batch: Any) -> Tensor | None:
    if isinstance(batch, Sequence) and len(batch) >= 2:
        candidate = batch[1]
        if isinstance(candidate, Tensor) and not candidate.is_floating_point():
            return candidate
    return None
