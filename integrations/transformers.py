"""Guard the optimizer of a Hugging Face ``Trainer``.

``StepGuardCallback`` attaches a guard (:func:`stepguard.attach`, optimizer step hooks) to
the optimizer the Trainer creates, when training begins; every optimizer step is then
measured on the batch of the model's training forward and clipped or vetoed by the policy,
and the Trainer's own logging (``log_history``, TensorBoard, …) carries ``stepguard/r``,
``stepguard/rho_a``, ``stepguard/tau`` and the action counts.

Causal LMs called with ``labels=`` are measured on the positions that have a next-token
label (:func:`stepguard.rows.causal_lm_rows`); classifiers on every sample.

Notes:
    The Trainer clips gradients (``max_grad_norm``) before the optimizer step, so the
    guard measures the update of the clipped gradients. On a vetoed step the Trainer's LR
    scheduler and ``global_step`` still advance.

Requires ``pip install 'stepguard[transformers]'``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from stepguard.config import GuardConfig
from stepguard.hooks import GuardHandle, attach
from stepguard.policy import Policy
from stepguard.report import StepReport
from stepguard.rows import causal_lm_rows
from stepguard.sinks.base import Sink

try:
    from transformers import TrainerCallback
except ImportError as exc:
    raise ImportError(
        "stepguard.integrations.transformers needs transformers: pip install 'stepguard[transformers]'"
    ) from exc


class _Collect:
    """The sink through which the callback sees every report."""

    name = "transformers-log"

    def __init__(self) -> None:
        self.pending: list[StepReport] = []

    def write(self, report: StepReport) -> None:
        self.pending.append(report)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class StepGuardCallback(TrainerCallback):
    """A ``TrainerCallback`` that guards the Trainer's optimizer and logs what it measured.

    Args:
        policy: a preset name or a :class:`~stepguard.policy.Policy`.
        sinks: further sinks (JSON lines, TensorBoard, Prometheus) for every report.
        config: a :class:`~stepguard.GuardConfig`.
        causal_lm: derive the counted rows from ``labels=`` shifted by one (default);
            False measures every row of the logits.

    Attributes:
        handle: the :class:`~stepguard.GuardHandle` once training has begun.
        reports: every report, in order.

    Example:
        >>> trainer = Trainer(model=model, args=args, train_dataset=data,
        ...                   callbacks=[StepGuardCallback(policy="clip")])
    """

    def __init__(
        self,
        policy: str | Policy = "clip",
        sinks: Iterable[Sink] = (),
        config: GuardConfig | None = None,
        *,
        causal_lm: bool = True,
    ) -> None:
        self.policy = policy
        self.sinks = list(sinks)
        self.config = config
        self.causal_lm = causal_lm
        self.handle: GuardHandle | None = None
        self.reports: list[StepReport] = []
        self._collect = _Collect()

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kwargs: Any
    ) -> None:
        if self.handle is not None:
            return
        if model is None or optimizer is None:
            raise RuntimeError("StepGuardCallback needs the Trainer's model and optimizer at train begin")
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
        self.handle = attach(
            inner,
            model,
            policy=self.policy,
            sinks=[self._collect, *self.sinks],
            config=self.config,
            rows_fn=causal_lm_rows if self.causal_lm else None,
        )

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any
    ) -> None:
        if logs is None or not self._collect.pending:
            return
        window, self._collect.pending = self._collect.pending, []
        self.reports.extend(window)
        last = window[-1]
        finite_r = [r.r for r in window if not math.isnan(r.r)]
        metrics = {
            "stepguard/r": last.r,
            "stepguard/r_max": max(finite_r) if finite_r else math.nan,
            "stepguard/rho_a": last.rho_a,
            "stepguard/tau": last.tau,
            "stepguard/applied_tau": last.applied_tau,
            "stepguard/clipped": float(sum(r.action == "clip" for r in window)),
            "stepguard/vetoed": float(sum(r.action == "veto" for r in window)),
        }
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.reports.extend(self._collect.pending)
        self._collect.pending = []
        if self.handle is not None:
            self.handle.detach()
