"""The machinery of one guarded step, shared by :class:`~stepguard.StepGuard` and :func:`~stepguard.attach`.

One step, as phases (each a method below, in this order)::

    before_step:  snapshot     check the step can be measured; θ₀ (+ the optimizer state
                               when the policy can change the step)
    <inner optimizer step>
    after_step:   propose      difference Δθ = θ₁ − θ₀, τ = ‖Δθ‖ → measure (a JVP at θ₀
                               along Δθ/τ on the captured batch, when due) → reduce across
                               ranks → one host sync → the report
                  decide       the policy: allow | clip (scale s) | veto
                  commit       keep θ₁ | θ₀ + s·Δθ | θ₀ and the optimizer state
                  record       counters, the decision in the report, veto escalation
                  emit         the sinks; then the budget's costs; halt if asked

Up to the commit the step is a transaction: any exception puts θ₀ and the optimizer state
back before it propagates. Beside it: :mod:`stepguard.arguments`, :mod:`stepguard.step_inputs`,
:mod:`stepguard.norms` (FSDP2), :mod:`stepguard.ledger` and :mod:`stepguard.persistence`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from stepguard.arguments import check_arguments
from stepguard.claim import claim, release
from stepguard.config import GuardConfig
from stepguard.costs import PhaseTimer
from stepguard.distributed import check_ranks_agree, guard_facts, is_distributed, rank_and_world
from stepguard.errors import HaltTraining, NoBatchError
from stepguard.geometry.logits import LogitsFn
from stepguard.ledger import StepLedger
from stepguard.measure import build_report
from stepguard.measured_model import LossHead, MeasuredModel, RowsFn
from stepguard.norms import step_norms
from stepguard.persistence import guard_state, load_guard_state
from stepguard.policy import Policy, resolve_policy
from stepguard.report import Decision, StepReport
from stepguard.sinks.base import Sink, SinkSet
from stepguard.snapshot import OptimizerStateBackup, ParameterSnapshot, Update
from stepguard.step_inputs import StepInputs
from stepguard.step_numbers import nested_fields, reduce_and_sync, step_tensors
from stepguard.trigger import MeasurementTrigger

__all__ = ["GuardEngine", "HaltTraining", "LossHead", "NoBatchError", "RowsFn"]

logger = logging.getLogger("stepguard")


@dataclass
class _Proposal:
    """The inner optimizer's step, measured: its report before any decision, and Δθ."""

    report: StepReport
    update: Update | None
    measured_values: Mapping[str, Any] | None  # the synced numbers of a step that ran the JVP
    why: str  # why the step was (or was not) measured


class GuardEngine:
    """Snapshot, measure, decide and commit one optimizer step.

    The arguments are :class:`~stepguard.StepGuard`'s: the optimizer (its ``param_groups``
    and ``state`` are read and, on clip or veto, written back), the model whose training
    forwards are captured, the policy, the sinks, the config, and how to find the logits
    (``logits_fn``, ``loss_module``) and the rows that count (``rows_fn``).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module | None,
        policy: str | Policy = "monitor",
        sinks: Iterable[Sink] = (),
        config: GuardConfig | None = None,
        logits_fn: LogitsFn | None = None,
        loss_module: nn.Module | None = None,
        rows_fn: RowsFn | None = None,
    ) -> None:
        check_arguments(optimizer, model, config, loss_module)
        self.optimizer = optimizer
        self.config = config or GuardConfig()
        self.policy = resolve_policy(policy)
        self.sinks = SinkSet(sinks, max_failures=self.config.sink_max_failures)
        self.loss = loss_module
        self.measured = MeasuredModel(model, self.config, logits_fn, loss_module, rows_fn)
        sharded = self.measured.sharded is not None
        self.trigger = MeasurementTrigger(self.config, sharded=sharded)
        self.ledger = StepLedger(self.config)
        self._estimator = self.config.estimator
        self._inputs = StepInputs()
        self._snapshot = ParameterSnapshot()
        self._state_backup = OptimizerStateBackup(optimizer)
        self._timer = PhaseTimer()
        self._t_start = self._t_optimizer = 0.0
        self._closure = self._in_step = False
        self._distributed = self.config.distributed == "auto" and is_distributed()
        self._rank, self._world = rank_and_world() if self._distributed else (0, 1)
        self._norms = step_norms(sharded=sharded)
        claim(optimizer, self)

    @property
    def model(self) -> nn.Module | None:
        """The measured network (unwrapped from DDP and ``torch.compile``)."""
        return self.measured.model

    # What the ledger keeps of the committed steps, under the engine's own names.
    step_count = property(lambda self: self.ledger.step_count, doc="Committed steps so far.")
    counters = property(lambda self: self.ledger.counters, doc="Committed steps per action.")
    rule_counters = property(lambda self: self.ledger.rule_counters, doc="Committed steps per deciding rule.")
    last_report = property(lambda self: self.ledger.last_report, doc="The last committed step's report.")

    # ---------------------------------------------------------------- inputs

    def watch(self, objectives: Mapping[str, Tensor], *, lengths: Mapping[str, Any] | None = None) -> None:
        """Measure the gradient entanglement of named objectives for the coming step (see
        :meth:`stepguard.StepGuard.watch`): the Gram matrix now, the realized changes after it."""
        self._inputs.watch(objectives, self._params(), lengths=lengths)

    def observe(
        self, *, inputs: Any = None, targets: Tensor | None = None, mask: Tensor | None = None,
        loss: Tensor | float | None = None,
    ) -> None:
        """Give the next step what the hook cannot see: targets, a mask, the loss, or inputs."""
        self._inputs.observe(inputs=inputs, targets=targets, mask=mask, loss=loss)

    # ---------------------------------------------------------------- the step

    def before_step(self, *, closure: bool = False) -> None:
        """Check that the step can be measured, then snapshot θ₀ (and the optimizer state).

        A step that could not be guarded is refused here, before it is applied: no model,
        no training batch (unless a ``closure`` will run the forward), or a model that does
        not hold a parameter the step moves. The optimizer state is copied whenever the
        policy can change the step, so that a veto, or an error anywhere after the inner
        step, puts it back bit for bit.
        """
        self._t_start = time.perf_counter()
        self._timer = PhaseTimer()
        with self._timer.phase("snapshot"):
            params = self._params()
            if self._snapshot.bind(self._norms.tensors(params)):
                self.trigger.rebind()
                if self._distributed:
                    check_ranks_agree(guard_facts(self.policy, self.config, self.optimizer, params))
            self.measured.check_ready(
                self.optimizer, params, inputs_given=self._inputs.inputs_given, closure=closure
            )
            self._snapshot.take()
            if self.policy.needs_state_backup:
                self._state_backup.take(params)
            else:
                self._state_backup.drop()
        self._closure = closure
        self._in_step = True
        self._t_optimizer = time.perf_counter()

    def abort(self) -> None:
        """The inner step raised: put θ₀ (and the optimizer state, when copied) back."""
        if self._in_step:
            self._in_step = False
            self._rollback()
            self.measured.step_ended()

    def after_step(self, loss: Any = None) -> StepReport:
        """Propose, decide, commit, record and emit the step; return its report.

        Until the decision is committed the step is a transaction: whatever raises (the
        measurement, the policy, ``KeyboardInterrupt``) finds the parameters back at θ₀ and
        the optimizer state as it was, unless the policy never changes a step
        (``Policy.changes_steps`` false, as ``monitor``): then the step stays as the
        optimizer made it. A sink that raises sees a step already committed and counted.
        """
        if not self._in_step:
            raise RuntimeError("after_step() without before_step(): the step was not snapshotted")
        self._in_step = False
        self._timer.seconds["optimizer"] = time.perf_counter() - self._t_optimizer
        try:
            proposal = self._propose(loss)
            decision = self._decide(proposal.report, proposal.why)
            with self._timer.phase("commit"):
                self._commit(decision, proposal.update)
        except BaseException:
            self._rollback()
            raise
        finally:
            self.measured.step_ended()
        report = self.ledger.record(proposal.report, decision, self._timer.seconds)
        self.measured.after_step()
        self._emit(report, proposal.measured_values)
        return report

    # ---------------------------------------------------------------- phases

    def _propose(self, loss: Any) -> _Proposal:
        """Difference → measure (when due) → reduce → sync → the report before any decision."""
        timer = self._timer
        observed, probe = self._inputs.take()
        if loss is None:
            loss = observed.get("loss")
        with timer.phase("diff"):
            update = self._snapshot.difference() if self._snapshot.params else None
            tau = update.tau if update is not None else torch.zeros(())
        measure, why = self.trigger.due(self._snapshot, update, tau, loss, timer.seconds)
        with timer.phase("measure"):
            estimator, tensors, vectors = self._measure(measure, update, tau, observed)
        if measure:
            tensors.update(self._norms.step_tensors(update, self._params()))
        tensors.update(step_tensors(update, loss, self.loss, probe))
        with timer.phase("reduce_sync"):
            values = reduce_and_sync(
                tensors, vectors, measured=measure, distributed=self._distributed,
                costs=self.trigger.costs, host_values=self.trigger.host_values,
            )
            if measure:
                values = self._norms.finish(values)
        report = self._report(values, estimator, measure, loss)
        if measure and not report.measured:
            why = "no row of the batch counts (every row masked or ignore_index)"
        if report.measured:
            self.trigger.measured_radius(report.rho_a)
        return _Proposal(report, update, values if measure else None, why)

    def _measure(
        self, measure: bool, update: Update | None, tau: Tensor, observed: Mapping[str, Any]
    ) -> tuple[str, dict[str, Tensor], dict[str, Tensor]]:
        """The JVP's numbers when the step is due for one (with the estimator it used), else τ alone."""
        tensors: dict[str, Tensor] = {"tau": tau}
        if not measure:
            return "estimate", tensors, {}
        length = self._norms.replay_length(update) if update is not None else tau
        used, scalars, vectors = self.measured.measure(
            self._snapshot, update, length, observed, step=self.step_count, closure=self._closure,
            estimator=self._estimator, summarize_on_host=not self._distributed, timings=self._timer.seconds,
        )
        if self._estimator == "auto" and used == "finite_difference":
            self._estimator = "finite_difference"  # an op without forward-mode AD: keep to the fallback
        tensors.update(scalars)
        if update is not None:
            self.trigger.remember_direction(self._snapshot, update)
        return used, tensors, vectors

    def _report(self, values: dict[str, Any], estimator: str, measure: bool, loss: Any) -> StepReport:
        lr = self.optimizer.param_groups[0].get("lr") if self.optimizer.param_groups else None
        return build_report(
            values, step=self.step_count, estimator=estimator, measured=measure,
            last_rho=self.trigger.last_rho, loss=loss if not self._distributed else None,
            binding_k=self.config.binding_k, lr=float(lr) if lr is not None else None,
            rank=self._rank, world_size=self._world, **nested_fields(values),
        )

    def _decide(self, report: StepReport, why: str) -> Decision:
        """The policy's decision; on a step not freshly measured its reason says so, and why."""
        with self._timer.phase("decide"):
            decision = self.policy.decide(report)
        if not isinstance(decision, Decision):
            raise TypeError(
                f"{type(self.policy).__name__}.decide() returned {type(decision).__name__}; "
                "it must return a stepguard.Decision"
            )
        if not report.measured:
            kind = "r estimated" if report.estimator == "estimate" else "not measured"
            decision = dataclasses.replace(decision, reason=f"{decision.reason} [{kind}; {why}]")
        return decision

    def _commit(self, decision: Decision, update: Update | None) -> None:
        """Keep θ₁ (allow), apply θ₀ + s·Δθ (clip), or put θ₀ and the optimizer state back (veto)."""
        if decision.action == "allow" or update is None:
            return
        with torch.no_grad():
            live = self._snapshot.params
            torch._foreach_copy_(live, self._snapshot.theta0)
            if decision.action == "clip":
                torch._foreach_add_(live, update.views(), alpha=decision.scale)
        if decision.action == "veto" and not self._state_backup.restore() and self.policy.needs_state_backup:
            logger.warning("veto without a state backup: optimizer state keeps this step's update")

    def _rollback(self) -> None:
        """θ₀ back unless the policy never changes a step; the optimizer state too, when copied."""
        restored = self._state_backup.restore()
        if restored or self.policy.changes_steps:
            self._snapshot.restore()

    def _emit(self, report: StepReport, measured_values: Mapping[str, Any] | None) -> None:
        """The committed step's report to the sinks, its costs to the budget; halt when it says so."""
        self.sinks.write(report)
        own = time.perf_counter() - self._t_start - self._timer.seconds["optimizer"]
        self.trigger.account(measured_values=measured_values, measured=report.measured, own=own)
        if report.halt:
            self.sinks.flush()
            raise HaltTraining(report)

    def _params(self) -> list[Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    # ---------------------------------------------------------------- persistence

    def state_dict(self) -> dict[str, Any]:
        """The guard's state for a checkpoint (see :mod:`stepguard.persistence`)."""
        return guard_state(self.ledger, self.trigger, self._estimator, self.policy, self._norms)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`."""
        self._estimator = load_guard_state(
            state, self.ledger, self.trigger, self.policy, self._norms, self.config.estimator
        )

    def close(self) -> None:
        """Remove the capture hooks, release the optimizer, and flush and close the sinks."""
        self.measured.close()
        release(self.optimizer, self)
        self.sinks.flush()
        self.sinks.close()
