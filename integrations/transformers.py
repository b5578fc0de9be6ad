"""Guard the optimizer of a Hugging Face ``Trainer``.

``StepGuardCallback`` attaches a guard (:func:`stepguard.attach`, optimizer step hooks) to
the optimizer the Trainer uses, at the start of every ``trainer.train()``; every optimizer
step is then measured on the batch of the model's training forward and clipped or vetoed
by the policy, and the Trainer's own logging (``log_history``, TensorBoard, …) carries, per
logging window, ``stepguard/r``, ``stepguard/r_max``, ``stepguard/rho_a``, ``stepguard/tau``
and the action counts.

Causal LMs called with ``labels=`` are measured on the positions that have a next-token
label (:func:`stepguard.rows.causal_lm_rows`); classifiers on every sample.

The guard's state (step counter, action counters, schedule and policy state) is written
into every checkpoint the Trainer saves (``stepguard_state.json``) and read back by
``trainer.train(resume_from_checkpoint=...)``, so report steps continue where the
checkpoint left off. A second ``train()`` on the same Trainer is guarded too, and its steps
continue the first run's.

Notes:
    The Trainer clips gradients (``max_grad_norm``) before the optimizer step, so the
    guard measures the update of the clipped gradients. On a vetoed step the Trainer's LR
    scheduler and ``global_step`` still advance.

Requires ``pip install 'stepguard[transformers]'``.
"""

from __future__ import annotations

import json
import logging
import os
from collections import deque
from collections.abc import Iterable
from typing import Any

from stepguard.config import GuardConfig
from stepguard.guard import StepGuard
from stepguard.hooks import GuardHandle, attach
from stepguard.integrations._callbacks import DEFAULT_MAX_REPORTS, CollectSink, KeepOpen, check_max_reports
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

logger = logging.getLogger("stepguard")

STATE_FILE = "stepguard_state.json"
"""The file, inside each Trainer checkpoint folder, that holds the guard's state."""


class StepGuardCallback(TrainerCallback):
    """A ``TrainerCallback`` that guards the Trainer's optimizer and logs what it measured.

    Args:
        policy: a preset name or a :class:`~stepguard.policy.Policy`.
        sinks: further sinks (JSON lines, TensorBoard, Prometheus) for every report. They
            are flushed at the end of every ``train()`` and closed by :meth:`close`.
        config: a :class:`~stepguard.GuardConfig`.
        causal_lm: derive the counted rows from ``labels=`` shifted by one (default);
            False measures every row of the logits.
        max_reports: how many of the most recent reports :attr:`reports` keeps (``None``
            keeps all of them; the sinks receive every report either way).

    Attributes:
        handle: the :class:`~stepguard.GuardHandle` once training has begun.
        reports: the most recent reports (at most ``max_reports``), oldest first.

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
        max_reports: int | None = DEFAULT_MAX_REPORTS,
    ) -> None:
        self.policy = policy
        self.sinks = list(sinks)
        self.config = config
        self.causal_lm = causal_lm
        self.handle: GuardHandle | None = None
        self._collect = CollectSink("transformers-log", deque(maxlen=check_max_reports(max_reports)))
        self._sinks = [KeepOpen(sink) for sink in self.sinks]

    @property
    def reports(self) -> deque[StepReport]:
        return self._collect.stores[0]

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kwargs: Any
    ) -> None:
        if model is None or optimizer is None:
            raise RuntimeError("StepGuardCallback needs the Trainer's model and optimizer at train begin")
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
        if isinstance(optimizer, StepGuard) or isinstance(inner, StepGuard):
            raise TypeError(
                "the Trainer's optimizer is already a StepGuard: guard it once, either with "
                "optimizers=(StepGuard(...), None) or with StepGuardCallback, not both"
            )
        previous = self.handle
        if previous is None or not previous.attached or previous.optimizer is not inner:
            if previous is not None:
                previous.detach()
            self.handle = attach(
                inner,
                model,
                policy=self.policy,
                sinks=[self._collect, *self._sinks],
                config=self.config,
                rows_fn=causal_lm_rows if self.causal_lm else None,
            )
            if previous is not None:  # a later train(): the steps continue
                self.handle.load_state_dict(previous.state_dict())
        if state.global_step > 0:  # only a resumed run starts past step 0
            self._resume(args, state.global_step)

    def _resume(self, args: Any, global_step: int) -> None:
        """Load the guard's state saved with the checkpoint the Trainer resumed from."""
        assert self.handle is not None
        path = os.path.join(args.output_dir, f"checkpoint-{global_step}", STATE_FILE)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as file:
                self.handle.load_state_dict(json.load(file))
            return
        logger.warning(
            "resuming at global step %d without %s next to the checkpoint: report steps continue "
            "from the Trainer's global step, the action counters restart at 0",
            global_step,
            path,
        )
        fresh = self.handle.state_dict()
        self.handle.load_state_dict(fresh | {"step": global_step})

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if self.handle is None or not args.should_save or not os.path.isdir(folder):
            return
        with open(os.path.join(folder, STATE_FILE), "w", encoding="utf-8") as file:
            json.dump(self.handle.state_dict(), file)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any
    ) -> None:
        if logs is None:
            return
        window = self._collect.take_window()
        if window is None:
            return
        metrics = window.metrics()
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.handle is not None:
            self.handle.detach()  # removes the hooks and flushes the sinks; they stay open

    def close(self) -> None:
        """Detach the guard and close the sinks. Call once the Trainer is done training."""
        if self.handle is not None:
            self.handle.detach()
        for sink in self.sinks:
            sink.close()
