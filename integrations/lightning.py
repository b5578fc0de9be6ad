"""Guard the optimizers a Lightning ``Trainer`` owns.

``StepGuardCallback`` wraps each optimizer of the strategy in a :class:`~stepguard.StepGuard`
when fitting starts. Lightning calls ``optimizer.step(closure)``; the guard always runs the
closure (training_step + backward, as Lightning requires), measures the proposed update on
the batch of the module's training forward, and clips or vetoes it. The reports go to the
sinks and, as ``stepguard/<field>``, to ``pl_module.log``.

Requires ``pip install 'stepguard[lightning]'``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import Tensor, nn

from stepguard.config import GuardConfig
from stepguard.guard import StepGuard
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

LOGGED_FIELDS: tuple[str, ...] = ("r", "rho_a", "tau", "applied_tau", "delta_a", "scale")


class StepGuardCallback(Callback):
    """Guard every optimizer of a Lightning run.

    Args:
        policy: a preset name or a :class:`~stepguard.policy.Policy` (one instance per optimizer
            is not shared: pass a preset name, or a factory via ``policy_factory``).
        sinks: sinks every report goes to.
        config: a :class:`~stepguard.GuardConfig`.
        model_fn: picks the module whose forward produces the logits from the
            LightningModule (default: the LightningModule itself; use e.g.
            ``lambda m: m.net`` when ``training_step`` calls ``self.net(x)``).
        targets_fn: picks the targets from a training batch (default: the second element
            of a tuple/list batch, when it is an integer tensor).
        log: also log the report's main fields through ``pl_module.log``.
        policy_factory: builds one policy per optimizer (overrides ``policy``).

    Attributes:
        guards: the :class:`~stepguard.StepGuard` of each optimizer.
        reports: every report, in order.
    """

    def __init__(
        self,
        policy: str | Policy = "clip",
        sinks: Iterable[Sink] = (),
        config: GuardConfig | None = None,
        *,
        model_fn: Callable[[nn.Module], nn.Module] | None = None,
        targets_fn: Callable[[Any], Tensor | None] | None = None,
        log: bool = True,
        policy_factory: Callable[[], Policy] | None = None,
    ) -> None:
        super().__init__()
        self.policy = policy
        self.sinks = list(sinks)
        self.config = config
        self.model_fn = model_fn
        self.targets_fn = targets_fn or _default_targets
        self.log = log
        self.policy_factory = policy_factory
        self.guards: list[StepGuard] = []
        self.reports: list[StepReport] = []

    def on_fit_start(self, trainer: Any, pl_module: nn.Module) -> None:
        model = self.model_fn(pl_module) if self.model_fn else pl_module
        guarded = []
        for optimizer in trainer.strategy.optimizers:
            inner = optimizer.optimizer if hasattr(optimizer, "_strategy") else optimizer
            if isinstance(inner, StepGuard):
                guarded.append(inner)
                continue
            policy = self.policy_factory() if self.policy_factory else self.policy
            guard = StepGuard(inner, model=model, policy=policy, sinks=self.sinks, config=self.config)
            guarded.append(guard)
        self.guards = guarded
        trainer.strategy.optimizers = guarded

    def on_train_batch_start(self, trainer: Any, pl_module: nn.Module, batch: Any, batch_idx: int) -> None:
        targets = self.targets_fn(batch)
        if targets is not None:
            for guard in self.guards:
                guard.observe(targets=targets)

    def on_train_batch_end(
        self, trainer: Any, pl_module: nn.Module, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        for index, guard in enumerate(self.guards):
            report = guard.last_report
            if report is None or (self.reports and self.reports[-1] is report):
                continue
            self.reports.append(report)
            if self.log:
                suffix = "" if len(self.guards) == 1 else f"_{index}"
                for name in LOGGED_FIELDS:
                    value = getattr(report, name)
                    pl_module.log(
                        f"stepguard/{name}{suffix}", float(value), on_step=True, prog_bar=name == "r"
                    )

    def on_fit_end(self, trainer: Any, pl_module: nn.Module) -> None:
        for guard in self.guards:
            guard.engine.sinks.flush()


def _default_targets(batch: Any) -> Tensor | None:
    if isinstance(batch, Sequence) and len(batch) >= 2:
        candidate = batch[1]
        if isinstance(candidate, Tensor) and not candidate.is_floating_point():
            return candidate
    return None
