"""The machinery of one guarded step, shared by :class:`~stepguard.StepGuard` and :func:`~stepguard.attach`.

One step, as phases::

    before_step:  check it can be measured → snapshot θ₀ (+ optimizer state when the policy can change it)
    <inner optimizer step>
    after_step:   difference Δθ = θ₁ − θ₀, τ = ‖Δθ‖
                  → measure (a JVP at θ₀ along Δθ/τ on the captured batch, when due)
                  → reduce across ranks → one host sync → report
                  → decide (the policy) → commit (keep θ₁ | θ₀ + s·Δθ | θ₀ + state)
                  → record (counters, escalation) → emit (sinks) → account (budget costs)

Up to the commit the step is a transaction: any exception puts θ₀ and the optimizer state
back before it propagates.
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

from stepguard.claim import claim, release
from stepguard.config import GuardConfig
from stepguard.costs import PhaseTimer
from stepguard.diagnostics import EntanglementProbe
from stepguard.distributed import (
    check_ranks_agree,
    guard_facts,
    is_distributed,
    rank_and_world,
    sharded_norms,
)
from stepguard.errors import HaltTraining, NoBatchError
from stepguard.escalation import VetoStreak
from stepguard.geometry.logits import LogitsFn
from stepguard.geometry.sharded import local_tensor
from stepguard.measure import build_report
from stepguard.measured_model import LossHead, MeasuredModel, RowsFn
from stepguard.policy import MonitorPolicy, Policy, resolve_policy
from stepguard.report import ACTIONS, Decision, StepReport, evolve
from stepguard.sinks.base import Sink, SinkSet
from stepguard.snapshot import OptimizerStateBackup, ParameterSnapshot, Update
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

    Args:
        optimizer: the optimizer whose steps are guarded (its ``param_groups`` and
            ``state`` are read and, on clip or veto, written back).
        model: the module whose logits the step moves; its most recent training forward
            is captured with a forward pre-hook.
        policy: a preset name or a :class:`~stepguard.policy.Policy`.
        sinks: where reports go.
        config: a :class:`~stepguard.config.GuardConfig`.
        logits_fn: picks the logits from the model output.
        loss_module: a loss with ``radius_logits`` and ``components`` (see :class:`~stepguard.StepGuard`).
        rows_fn: the rows that count, from the captured forward's arguments.
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
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be a torch.nn.Module, got {type(model).__name__}; pass the "
                "network whose logits the optimizer moves"
            )
        if config is not None and not isinstance(config, GuardConfig):
            raise TypeError(f"config must be a GuardConfig, got {type(config).__name__}")
        if loss_module is not None and not isinstance(loss_module, nn.Module):
            raise TypeError(
                "loss_module must be an nn.Module (e.g. from stepguard.losses), "
                f"got {type(loss_module).__name__}"
            )
        self.optimizer = optimizer
        self.config = config or GuardConfig()
        self.policy = resolve_policy(policy)
        self.sinks = SinkSet(sinks, max_failures=self.config.sink_max_failures)
        self.loss = loss_module
        self.measured = MeasuredModel(model, self.config, logits_fn, loss_module, rows_fn)
        self.trigger = MeasurementTrigger(self.config)
        self.step_count = 0
        self.counters: dict[str, int] = dict.fromkeys(ACTIONS, 0)
        self.rule_counters: dict[str, int] = {}
        self.last_report: StepReport | None = None
        self._estimator = self.config.estimator
        self._observed: dict[str, Any] = {}
        self._snapshot = ParameterSnapshot()
        self._state_backup = OptimizerStateBackup(optimizer)
        self._vetoes = VetoStreak(self.config)
        self._timer = PhaseTimer()
        self._t_start = 0.0
        self._t_optimizer = 0.0
        self._closure = False
        self._in_step = False
        self._probe: EntanglementProbe | None = None
        self._distributed = self.config.distributed == "auto" and is_distributed()
        self._rank, self._world = rank_and_world() if self._distributed else (0, 1)
        self._sharded = self.measured.sharded is not None
        self._global: dict[str, Tensor] = {}
        if self._sharded and not self.trigger.every_step:
            raise NotImplementedError(
                "budget mode and measure_every > 1 are not supported on an FSDP2 model yet (the "
                "direction sketch between measurements would need a collective); measure every step"
            )
        claim(optimizer, self)

    @property
    def model(self) -> nn.Module | None:
        """The measured network (unwrapped from DDP and ``torch.compile``)."""
        return self.measured.model

    # ---------------------------------------------------------------- inputs

    def watch(self, objectives: Mapping[str, Tensor], *, lengths: Mapping[str, Any] | None = None) -> None:
        """Measure the gradient entanglement of named objectives for the coming step (see
        :meth:`stepguard.StepGuard.watch`): the Gram matrix now, the realized changes after it."""
        if not objectives:
            raise ValueError("watch() needs at least one named objective, e.g. chosen=..., rejected=...")
        if self._probe is None:
            self._probe = EntanglementProbe()
        self._probe.observe(objectives, self._params(), lengths=lengths)
        self._observed["watched"] = True

    def observe(
        self,
        *,
        inputs: Any = None,
        targets: Tensor | None = None,
        mask: Tensor | None = None,
        loss: Tensor | float | None = None,
    ) -> None:
        """Give the next step what the hook cannot see: targets, a mask, the loss, or inputs."""
        for key, value in (("inputs", inputs), ("targets", targets), ("mask", mask), ("loss", loss)):
            if value is not None:
                self._observed[key] = value

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
            if self._snapshot.bind([local_tensor(p) for p in params] if self._sharded else params):
                self.trigger.rebind()
                if self._distributed:
                    check_ranks_agree(guard_facts(self.policy, self.config, self.optimizer, params))
            self.measured.check_ready(
                self.optimizer, params, inputs_given="inputs" in self._observed, closure=closure
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
        """Measure the proposed update, let the policy decide, commit, and report.

        Until the decision is committed the step is a transaction: whatever raises (the
        measurement, the policy, ``KeyboardInterrupt``) finds the parameters back at θ₀ and
        the optimizer state as it was. Under ``monitor``, which never changes a step and
        keeps no copy of the state, the step stays as the optimizer made it. A sink that
        raises sees a step already committed and counted.
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
        report = self._record(proposal.report, decision)
        self.sinks.write(report)
        self.trigger.account(
            measured_values=proposal.measured_values,
            measured=report.measured,
            own=time.perf_counter() - self._t_start - self._timer.seconds["optimizer"],
        )
        if report.halt:
            self.sinks.flush()
            raise HaltTraining(report)
        return report

    # ---------------------------------------------------------------- phases

    def _propose(self, loss: Any) -> _Proposal:
        """Difference → measure (when due) → reduce → sync → the report before any decision."""
        timer = self._timer
        observed, self._observed = self._observed, {}
        if loss is None:
            loss = observed.get("loss")
        with timer.phase("diff"):
            update = self._snapshot.difference() if self._snapshot.params else None
            if update is not None and self._sharded:
                self._global = self._sharded_norms(update)
                update.tau = self._global["tau"]
            tau = update.tau if update is not None else torch.zeros(())
        measure, why = self.trigger.due(self._snapshot, update, tau, loss, timer.seconds)
        with timer.phase("measure"):
            estimator, tensors, vectors = self._measure(measure, update, tau, observed)
        grads = None
        if measure:
            grads = self._global["grad_norm"] if self._sharded else [
                p.grad for p in self._snapshot.params if p.grad is not None
            ]
        probe = self._probe if observed.get("watched") else None
        tensors.update(step_tensors(grads, update, loss, self.loss, probe))
        with timer.phase("reduce_sync"):
            values = reduce_and_sync(
                tensors, vectors, measured=measure, distributed=self._distributed,
                costs=self.trigger.costs, host_values=self.trigger.host_values,
            )
        report = self._report(values, estimator, measure, loss)
        if measure and not report.measured:
            why = "no row of the batch counts (every row masked or ignore_index)"
        if report.measured:
            self.trigger.measured_radius(report.rho_a)
        return _Proposal(report, update, values if measure else None, why)

    def _measure(
        self, measure: bool, update: Update | None, tau: Tensor, observed: Mapping[str, Any]
    ) -> tuple[str, dict[str, Tensor], dict[str, Tensor]]:
        tensors: dict[str, Tensor] = {"tau": tau}
        if not measure:
            return "estimate", tensors, {}
        used, scalars, vectors = self.measured.measure(
            self._snapshot, update, tau, observed, step=self.step_count, closure=self._closure,
            estimator=self._estimator,
            summarize_on_host=not self._distributed, timings=self._timer.seconds,
        )
        if self._estimator == "auto" and used == "finite_difference":
            self._estimator = "finite_difference"
        tensors.update(scalars)
        if update is not None:
            tensors["update_param_cosine"] = (
                self._global["update_param_cosine"] if self._sharded else update.cosine_with_theta0()
            )
            self.trigger.remember_direction(self._snapshot, update)
        return used, tensors, vectors

    def _report(self, values: dict[str, Any], estimator: str, measure: bool, loss: Any) -> StepReport:
        lr = self.optimizer.param_groups[0].get("lr") if self.optimizer.param_groups else None
        return build_report(
            values,
            step=self.step_count,
            estimator=estimator,
            measured=measure,
            last_rho=self.trigger.last_rho,
            loss=loss if not self._distributed else None,
            binding_k=self.config.binding_k,
            lr=float(lr) if lr is not None else None,
            rank=self._rank,
            world_size=self._world,
            **nested_fields(values),
        )

    def _decide(self, report: StepReport, why: str) -> Decision:
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
        if decision.action == "allow" or update is None:
            return
        with torch.no_grad():
            live = self._snapshot.params
            torch._foreach_copy_(live, self._snapshot.theta0)
            if decision.action == "clip":
                torch._foreach_add_(live, update.views(), alpha=decision.scale)
        vetoed = decision.action == "veto"
        if vetoed and not self._state_backup.restore() and self.policy.needs_state_backup:
            logger.warning("veto without a state backup: optimizer state keeps this step's update")

    def _rollback(self) -> None:
        """θ₀ back unless the policy never changes a step; the optimizer state too, when copied."""
        restored = self._state_backup.restore()
        if restored or not isinstance(self.policy, MonitorPolicy):
            self._snapshot.restore()

    def _record(self, report: StepReport, decision: Decision) -> StepReport:
        """Count the committed step, give its report the decision, and escalate repeated vetoes."""
        self.counters[decision.action] += 1
        if decision.rule is not None:
            self.rule_counters[decision.rule] = self.rule_counters.get(decision.rule, 0) + 1
        changes: dict[str, Any] = {}
        if report.entanglement:  # the realized changes follow the applied (scaled) update
            changes["entanglement"] = {
                n: v * decision.scale if n.startswith("realized.") else v
                for n, v in report.entanglement.items()
            }
        report = evolve(
            report,
            **changes,
            action=decision.action,
            scale=decision.scale,
            applied_tau=report.tau * decision.scale if decision.scale else 0.0,
            reason=decision.reason,
            rule=decision.rule,
            halt=decision.halt,
            timings=self._timer.seconds,
        )
        report = self._vetoes.record(report)
        self.step_count += 1
        self.last_report = report
        self.measured.after_step()
        return report

    def _sharded_norms(self, update: Update) -> dict[str, Tensor]:
        """Global τ, gradient norm and update/parameter cosine from this rank's shards (FSDP2)."""
        with torch.no_grad():
            grads = [local_tensor(p.grad) for p in self._params() if p.grad is not None]
            return sharded_norms(update.tau, update.flats, [g.theta0 for g in update.groups], grads)

    def _params(self) -> list[Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    # ---------------------------------------------------------------- persistence

    def state_dict(self) -> dict[str, Any]:
        trigger = self.trigger.state_dict()
        return {
            "step": self.step_count,
            "counters": dict(self.counters),
            "rule_counters": dict(self.rule_counters),
            "last_rho": trigger["last_rho"],
            "estimator": self._estimator,
            "schedule": trigger["schedule"],
            "policy": self.policy.state_dict(),
            "consecutive_vetoes": self._vetoes.count,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = {"step", "counters"} - set(state)
        if missing:
            raise ValueError(f"not a StepGuard state: missing {sorted(missing)}")
        self.step_count = int(state["step"])
        self.counters = {a: int(state["counters"].get(a, 0)) for a in ACTIONS}
        self.rule_counters = {str(k): int(v) for k, v in state.get("rule_counters", {}).items()}
        self.trigger.load_state_dict(state)
        self._estimator = state.get("estimator", self.config.estimator)
        self.policy.load_state_dict(state.get("policy", {}))
        self._vetoes.count = int(state.get("consecutive_vetoes", 0))

    def close(self) -> None:
        """Remove the capture hooks, release the optimizer, and flush and close the sinks."""
        self.measured.close()
        release(self.optimizer, self)
        self.sinks.flush()
        self.sinks.close()
