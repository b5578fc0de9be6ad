"""The machinery of one guarded step, shared by :class:`~stepguard.StepGuard` and :func:`~stepguard.attach`.

before_step():  snapshot θ₀ (and the optimizer state when the policy can veto)
<inner optimizer step>
after_step():   Δθ = θ₁ − θ₀, τ = ‖Δθ‖ → JVP at θ₀ along Δθ/τ on the captured batch
                → one host sync → policy → commit (keep θ₁ | θ₀ + s·Δθ | θ₀ + state)
                → sinks
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from stepguard.capture import ForwardCapture, unwrap_model
from stepguard.config import GuardConfig
from stepguard.costs import CostMeter
from stepguard.diagnostics import EntanglementProbe
from stepguard.distributed import is_distributed, rank_and_world, reduce_across_ranks
from stepguard.geometry.jvp import Batch
from stepguard.geometry.logits import LogitsFn
from stepguard.measure import build_report, global_norm, measure_update, sync_to_host
from stepguard.output_check import OutputCheck
from stepguard.policy import Policy, resolve_policy
from stepguard.report import ACTIONS, Decision, StepReport, evolve
from stepguard.schedule import MeasurementSchedule
from stepguard.sinks.base import Sink, SinkSet
from stepguard.snapshot import OptimizerStateBackup, ParameterSnapshot, Update

logger = logging.getLogger("stepguard")


class NoBatchError(RuntimeError):
    """The guard has no training batch to measure the step on."""


class HaltTraining(RuntimeError):
    """A policy decided that training must stop; raised after the step was committed and reported.

    Attributes:
        step: the step index the guard was at.
        reason: the policy's reason.
        report: the :class:`~stepguard.StepReport` of that step.
    """

    def __init__(self, report: StepReport) -> None:
        self.step = report.step
        self.reason = report.reason
        self.report = report
        super().__init__(
            f"StepGuard halted training at step {report.step}: {report.reason} (rule {report.rule})"
        )


RowsFn = Callable[[tuple[Any, ...], dict[str, Any]], Mapping[str, "Tensor | None"]]
"""``rows_fn(args, kwargs) -> {"targets": ..., "mask": ...}``: the rows that count, from a forward."""


class LossHead(nn.Module):
    """The model followed by a loss's ``radius_logits``: the function whose radius is measured.

    A loss such as ArcFace owns parameters (the class centres) and builds the logits its
    softmax acts on from the model output and the targets; measuring the radius on the
    model output alone would miss both. The head's parameters are the model's
    (``model.*``) and the loss's (``loss.*``).
    """

    def __init__(self, model: nn.Module, loss: nn.Module, logits_fn: LogitsFn | None = None) -> None:
        super().__init__()
        self.model = model
        self.loss = loss
        self.logits_fn = logits_fn
        self.targets: Tensor | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        output = self.model(*args, **kwargs)
        if self.logits_fn is not None:
            output = self.logits_fn(output)
        return self.loss.radius_logits(output, self.targets)


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
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module | None,
        policy: str | Policy = "monitor",
        sinks: Iterable[Sink] = (),
        config: GuardConfig | None = None,
        logits_fn: LogitsFn | None = None,
        loss: nn.Module | None = None,
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
        self.optimizer = optimizer
        self.config = config or GuardConfig()
        self.policy = resolve_policy(policy)
        self.sinks = SinkSet(sinks, max_failures=self.config.sink_max_failures)
        self.logits_fn = logits_fn
        self.model: nn.Module | None = None
        self.capture: ForwardCapture | None = None
        if model is not None:
            self.model = unwrap_model(model)
            self.capture = ForwardCapture(self.model)
        if loss is not None and not isinstance(loss, nn.Module):
            raise TypeError(
                f"loss must be an nn.Module (e.g. from stepguard.losses), got {type(loss).__name__}"
            )
        self.loss = loss
        self.rows_fn = rows_fn
        self._head: LossHead | None = None
        if loss is not None and self.model is not None and getattr(loss, "has_radius_logits", False):
            self._head = LossHead(self.model, loss, logits_fn)
        self._output_check: OutputCheck | None = None
        if self.model is not None and self._head is None and not self.config.assume_logits:
            self._output_check = OutputCheck(self.model, logits_fn)
        self.step_count = 0
        self.counters: dict[str, int] = dict.fromkeys(ACTIONS, 0)
        self.rule_counters: dict[str, int] = {}
        self.last_report: StepReport | None = None
        self._estimator = self.config.estimator
        self._last_rho: float | None = None
        self._observed: dict[str, Any] = {}
        self._snapshot = ParameterSnapshot()
        self._state_backup = OptimizerStateBackup(optimizer)
        self._consecutive_vetoes = 0
        self._t_start = 0.0
        self._t_before = 0.0
        self._snap_seconds = 0.0
        self._in_step = False
        self._probe: EntanglementProbe | None = None
        cfg = self.config
        self.schedule = MeasurementSchedule(
            every=cfg.measure_every,
            budget=cfg.budget,
            tau_jump=cfg.tau_jump,
            r_alert=cfg.r_alert,
            min_cosine=cfg.min_cosine,
        )
        self._sketch_index: list[Tensor] = []
        self._pre: dict[str, Any] | None = None
        self._layout_cache: tuple[Any, list[tuple[str, Tensor, int | None]]] | None = None
        self._checked_params: tuple[tuple[int, bool], ...] | None = None
        self._foreign: list[tuple[str, Tensor]] = []
        self._measured_costs: Mapping[str, Any] | None = None
        self._sketch_ref: tuple[Tensor, Tensor] | None = None
        self.costs = CostMeter()
        self._distributed = cfg.distributed == "auto" and is_distributed()
        self._rank, self._world = rank_and_world() if self._distributed else (0, 1)
        _claim(optimizer, self)

    # ---------------------------------------------------------------- inputs

    def watch(self, objectives: Mapping[str, Tensor], *, lengths: Mapping[str, Any] | None = None) -> None:
        """Measure the gradient entanglement of named objectives for the coming step.

        Call after the forward and before ``backward`` (or keep the graph): the Gram matrix
        G_ij = ⟨∇ℓ_i, ∇ℓ_j⟩ over the optimizer's parameters is computed now, with one batched
        VJP; after the step the report also carries the realized first-order change
        ∇ℓ_i·Δθ_applied of each objective ("A Common Pitfall of Margin-based Language Model
        Alignment: Gradient Entanglement", arXiv 2410.13828).
        """
        if not objectives:
            raise ValueError("watch() needs at least one named objective, e.g. chosen=..., rejected=...")
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self._probe is None:
            self._probe = EntanglementProbe()
        self._probe.observe(objectives, params, lengths=lengths)
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

        Everything that can be known before the inner optimizer runs is checked here, so a
        step that could not be guarded is refused before it is applied: a model to measure,
        a training batch, and the model owning every parameter the optimizer trains. The
        optimizer state is copied whenever the policy can change the step, so that a veto,
        or an error anywhere after the inner step, puts it back bit for bit.
        """
        start = self._t_start = time.perf_counter()
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self._snapshot.bind(params):
            self._sketch_index = []
            self._sketch_ref = None
        self._check_ready(params, closure=closure)
        self._snapshot.take()
        if self.policy.may_veto and self.config.restore_state_on_veto:
            self._state_backup.take(params)
        else:
            self._state_backup.drop()
        self._in_step = True
        self._snap_seconds = time.perf_counter() - start
        self._t_before = time.perf_counter()

    def abort(self) -> None:
        """The inner step failed: put θ₀ (and the optimizer state, when copied) back."""
        if self._in_step:
            self._in_step = False
            self._rollback()

    def after_step(self, loss: Any = None) -> StepReport:
        """Measure the proposed update, let the policy decide, commit, and report.

        The step is a transaction: whatever raises before the decision is committed
        (an error in the measurement, a policy, ``KeyboardInterrupt``), the parameters are
        back at θ₀ and the optimizer state as it was before the exception propagates
        (under ``monitor``, which never changes a step and keeps no copy of the state,
        the step stays as the optimizer made it). A sink that raises sees a step that is
        already committed and counted.
        """
        if not self._in_step:
            raise RuntimeError("after_step() without before_step(): the step was not snapshotted")
        self._in_step = False
        try:
            report, decision, update = self._propose_and_decide(loss)
            t = time.perf_counter()
            self._commit(decision, update)
            report.timings["commit"] = time.perf_counter() - t
        except BaseException:
            self._rollback()
            raise
        report = self._record(report, decision)
        self.sinks.write(report)
        self._account(report)
        if report.halt:
            self.sinks.flush()
            raise HaltTraining(report)
        return report

    def _propose_and_decide(self, loss: Any) -> tuple[StepReport, Decision, Update | None]:
        started = time.perf_counter()
        timings = {"snapshot": self._snap_seconds, "optimizer": started - self._t_before}
        observed, self._observed = self._observed, {}
        if loss is None:
            loss = observed.get("loss")

        update = self._snapshot.difference() if self._snapshot.params else None
        tau_t = update.tau if update is not None else torch.zeros(())
        timings["diff"] = time.perf_counter() - started

        measure, why = self._due(update, tau_t, timings, loss)
        t = time.perf_counter()
        tensors: dict[str, Tensor] = {"tau": tau_t}
        extra_values: dict[str, Tensor] = {}
        estimator = "estimate"
        if measure:
            estimator, scalars, extra_values = self._measure(update, tau_t, observed, timings)
            tensors.update(scalars)
            if update is not None:
                tensors["update_param_cosine"] = update.cosine_with_theta0()
                if self.schedule.needs_triggers:
                    self._sketch_ref = _unit(self._sketch(update))
        timings["measure"] = time.perf_counter() - t
        if measure:
            with torch.no_grad():
                grads = [p.grad for p in self._snapshot.params if p.grad is not None]
                if grads:
                    tensors["grad_norm"] = global_norm(grads)
        entangled: list[str] = []
        if observed.get("watched") and self._probe is not None and update is not None:
            self._probe.realized(update.views())
            for name, value in self._probe.scalars().items():
                entangled.append(name)
                tensors[f"entanglement.{name}"] = value
        if isinstance(loss, Tensor) and loss.numel() == 1:
            tensors["loss"] = loss.detach().reshape(())
        components = getattr(self.loss, "components", None) or {}
        for name, value in components.items():
            tensors[f"extras.loss.{name}"] = value.detach().reshape(-1)[:1].reshape(())

        t = time.perf_counter()
        if self._distributed:
            if measure:
                tensors.update(self.costs.tensors(tau_t))
                tensors = reduce_across_ranks(tensors)
            else:
                # no collective on an estimated step: keep only what every rank shares
                tensors.pop("loss", None)
                for name in [n for n in tensors if n.startswith("extras.")]:
                    tensors.pop(name)
                for name in entangled:
                    tensors.pop(f"entanglement.{name}")
                entangled = []
        pre, self._pre = self._pre, None
        if not measure and pre is not None and set(tensors) <= set(pre):
            values = {k: pre[k] for k in tensors}  # everything was read with the trigger values
        else:
            values = sync_to_host(tensors, extra_values)
        timings["reduce_sync"] = time.perf_counter() - t
        self._measured_costs = values if measure else None

        fields: dict[str, Any] = {"rank": self._rank, "world_size": self._world}
        if components:
            fields["extras"] = {n[len("extras.") :]: v for n, v in values.items() if n.startswith("extras.")}
        if entangled:
            fields["entanglement"] = {n: values[f"entanglement.{n}"] for n in entangled}
        report = self._proposal(values, estimator, measure, loss if not self._distributed else None, fields)
        if measure and not report.measured:
            why = "no row of the batch counts (every row masked or ignore_index)"
        t = time.perf_counter()
        decision = self.policy.decide(report)
        if not isinstance(decision, Decision):
            raise TypeError(
                f"{type(self.policy).__name__}.decide() returned {type(decision).__name__}; "
                "it must return a stepguard.Decision"
            )
        timings["decide"] = time.perf_counter() - t
        if not report.measured:
            kind = "r estimated" if report.estimator == "estimate" else "not measured"
            decision = dataclasses.replace(decision, reason=f"{decision.reason} [{kind}; {why}]")
        return evolve(report, timings=timings), decision, update

    def _record(self, report: StepReport, decision: Decision) -> StepReport:
        """Count the committed step and give its report the decision."""
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
        )
        report = self._escalate(report)
        self.step_count += 1
        self.last_report = report
        if self._output_check is not None and not self._output_check.done:
            self._output_check.verdict()
        return report

    def _escalate(self, report: StepReport) -> StepReport:
        """Vetoes in a row: a warning after ``veto_warning_after``, a halt after ``halt_after_vetoes``."""
        if report.action != "veto":
            self._consecutive_vetoes = 0
            return report
        self._consecutive_vetoes += 1
        streak = self._consecutive_vetoes
        cfg = self.config
        if streak == cfg.veto_warning_after:
            warnings.warn(
                f"StepGuard: {streak} steps in a row were vetoed (the last at step {report.step}: "
                f"{report.reason}); the run is not training. Lower the learning rate, check the "
                f"data, or loosen the policy; training halts after {cfg.halt_after_vetoes} "
                "(GuardConfig(veto_warning_after=..., halt_after_vetoes=...)).",
                UserWarning,
                stacklevel=4,
            )
        if cfg.halt_after_vetoes is not None and streak >= cfg.halt_after_vetoes and not report.halt:
            reason = f"{report.reason}; {streak} steps in a row were vetoed (GuardConfig.halt_after_vetoes)"
            return evolve(report, halt=True, reason=reason)
        return report

    def _check_ready(self, params: list[Tensor], *, closure: bool) -> None:
        """Refuse, before the inner step, a step that could not be measured."""
        if self.model is None:
            raise NoBatchError(
                "StepGuard has no model to measure: pass StepGuard(optimizer, model=net) "
                "(or attach(optimizer, net))"
            )
        no_batch = self.capture is None or self.capture.batch is None
        if no_batch and not closure and "inputs" not in self._observed:
            raise NoBatchError(
                "StepGuard has no training batch to measure this step on: no forward of the "
                "model ran in train mode with autograd enabled before step(). Run the forward "
                "of the model passed as model=... (in train mode), or pass guard.step(inputs=batch)."
            )
        key = tuple((id(p), p.requires_grad) for p in params)
        if key != self._checked_params:
            self._foreign = _foreign_parameters(self._head or self.model, self.optimizer)
            self._checked_params = key
        if self._foreign:
            _refuse_foreign([(label, p) for label, p in self._foreign if p.grad is not None])

    def _rollback(self) -> None:
        """Parameters back to θ₀; the optimizer state too, when the policy had it copied."""
        if self._state_backup.restore():
            self._snapshot.restore()

    # ---------------------------------------------------------------- schedule

    def _due(
        self, update: Update | None, tau: Tensor, timings: dict[str, float], loss: Any = None
    ) -> tuple[bool, str]:
        """Whether this step gets a fresh JVP (see :class:`~stepguard.schedule.MeasurementSchedule`)."""
        schedule = self.schedule
        if not schedule.needs_triggers:
            return True, "every step"
        if self._last_rho is None or self._sketch_ref is None:
            return True, "first"
        t = time.perf_counter()
        names = ["tau"]
        parts = [tau]
        if isinstance(loss, Tensor) and loss.numel() == 1:
            names.append("loss")
            parts.append(loss.detach().reshape(()).to(tau.device))
        sketch = self._sketch(update)
        if sketch is not None:
            parts += [sketch @ self._sketch_ref[0], torch.linalg.vector_norm(sketch), self._sketch_ref[1]]
        numbers = torch.stack(parts).tolist()  # the one host read of an unmeasured step
        pre = dict(zip(names, numbers, strict=False))
        cosine = None
        if sketch is not None:
            along, length, reference = numbers[-3:]
            cosine = along / length if length > 0 and reference > 0 else 1.0
        self._pre = pre
        timings["trigger"] = time.perf_counter() - t
        tau_value = pre["tau"]
        rho = self._last_rho
        estimate = 0.0 if rho == math.inf else (tau_value / rho if rho > 0 else math.nan)
        due, why = schedule.due(tau_value, estimate, cosine)
        return due, why

    def _sketch(self, update: Update | None) -> Tensor | None:
        """Δθ at a fixed uniform sample of coordinates, to tell when the direction turns."""
        if update is None:
            return None
        if not self._sketch_index:
            self._sketch_index = self._snapshot.sketch_indices(_SKETCH_SIZE)
        return update.sketch(self._sketch_index)

    def _account(self, report: StepReport) -> None:
        """Keep the running costs the budget needs, identical on every rank.

        A step's own cost is all of the guard's time in it, from ``before_step`` to the end
        of ``after_step`` (report, policy and sinks included), less the inner optimizer.
        Under ``torch.distributed`` the schedule only ever sees costs reduced across ranks
        at a measured step (this rank's running averages travel with the measurement).
        """
        now = time.perf_counter()
        measured, values = self._measured_costs is not None, self._measured_costs
        self._measured_costs = None
        self.costs.record(measured=measured, own=now - self._t_start - report.timings["optimizer"], now=now)
        if not measured:
            self.schedule.skipped()
            return
        if report.measured:
            self.schedule.measured(values["tau"])
        else:
            self.schedule.skipped()
        if self.schedule.budget is not None:
            plan = self.costs.plan(values)
            if plan is not None:
                self.schedule.set_costs(**plan)

    # ---------------------------------------------------------------- measurement

    def _batch(self, observed: Mapping[str, Any]) -> Batch:
        if "inputs" in observed:
            return Batch.from_inputs(observed["inputs"], training=self.model.training)
        if self.capture is None:
            raise NoBatchError("no model to capture a batch from")
        batch, fresh = self.capture.take()
        if batch is None:
            raise NoBatchError(
                "StepGuard has no training batch to measure this step on: no forward of the "
                "model ran in train mode with autograd enabled before step(). Run the forward "
                "of the model passed as model=..., or pass guard.step(inputs=batch)."
            )
        if not fresh and self.step_count > 0:
            logger.warning(
                "StepGuard is measuring step %d on the batch of an earlier step: the model "
                "ran no training forward since the last step",
                self.step_count,
            )
        return batch

    def _measure(
        self, update: Update | None, tau: Tensor, observed: Mapping[str, Any], timings: dict[str, float]
    ) -> tuple[str, dict[str, Tensor], dict[str, Tensor]]:
        if self.model is None:
            raise NoBatchError(
                "StepGuard has no model to measure: pass StepGuard(optimizer, model=net) "
                "(or attach(optimizer, net))"
            )
        batch = self._batch(observed)
        if self.rows_fn is not None and "targets" not in observed and "mask" not in observed:
            rows = self.rows_fn(batch.args, batch.kwargs)
            observed = {**observed, **{k: v for k, v in rows.items() if v is not None}}
        measured: nn.Module = self.model
        logits_fn = self.logits_fn
        if self._head is not None:
            self._head.targets = observed.get("targets")
            measured, logits_fn = self._head, None
        theta0 = self._snapshot.theta0
        delta = update.views() if update is not None else []
        primals: dict[str, Tensor] = {}
        tangent: dict[str, Tensor] = {}
        for name, p, i in self._layout(measured, self._snapshot.params):
            # Each primal gets its own storage: a dual tensor made from a slice of the flat θ₀
            # makes forward-mode AD give the whole buffer a tangent, once per parameter.
            primals[name] = p.detach() if i is None else theta0[i].clone()
            tangent[name] = torch.zeros_like(p) if i is None else delta[i]
        used, scalars, vectors = measure_update(
            measured,
            primals,
            tangent,
            tau,
            batch,
            config=self.config,
            targets=observed.get("targets"),
            mask=observed.get("mask"),
            logits_fn=logits_fn,
            estimator=self._estimator,
            summarize_on_host=not self._distributed,
            timings=timings,
        )
        if self._estimator == "auto" and used == "finite_difference":
            self._estimator = "finite_difference"
        return used, scalars, vectors

    def _layout(self, measured: nn.Module, params: list[Tensor]) -> list[tuple[str, Tensor, int | None]]:
        """(name, parameter, index in the optimizer's list) of each trainable parameter, cached."""
        key = (id(measured), self._checked_params)  # the parameters and their requires_grad flags
        if self._layout_cache is None or self._layout_cache[0] != key:
            index = {id(p): i for i, p in enumerate(params)}
            layout = [(n, p, index.get(id(p))) for n, p in measured.named_parameters() if p.requires_grad]
            self._layout_cache = (key, layout)
        return self._layout_cache[1]

    # ---------------------------------------------------------------- decision

    def _proposal(
        self, values: dict[str, Any], estimator: str, measured: bool, loss: Any, fields: Mapping[str, Any]
    ) -> StepReport:
        lr = self.optimizer.param_groups[0].get("lr") if self.optimizer.param_groups else None
        report = build_report(
            values,
            step=self.step_count,
            estimator=estimator,
            measured=measured,
            last_rho=self._last_rho,
            loss=loss,
            binding_k=self.config.binding_k,
            lr=float(lr) if lr is not None else None,
            **fields,
        )
        if report.measured and (math.isfinite(report.rho_a) or report.rho_a == math.inf):
            self._last_rho = report.rho_a
        return report

    def _commit(self, decision: Decision, update: Update | None) -> None:
        if decision.action == "allow" or update is None:
            return
        with torch.no_grad():
            live = self._snapshot.params
            torch._foreach_copy_(live, self._snapshot.theta0)
            if decision.action == "clip":
                torch._foreach_add_(live, update.views(), alpha=decision.scale)
        restored = decision.action == "veto" and decision.restore_state and self._state_backup.restore()
        if decision.action == "veto" and decision.restore_state and not restored and self.policy.may_veto:
            logger.warning("veto without a state backup: optimizer state keeps this step's update")

    # ---------------------------------------------------------------- persistence

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step_count,
            "counters": dict(self.counters),
            "rule_counters": dict(self.rule_counters),
            "last_rho": self._last_rho,
            "estimator": self._estimator,
            "schedule": self.schedule.state_dict(),
            "policy": self.policy.state_dict(),
            "consecutive_vetoes": self._consecutive_vetoes,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = {"step", "counters"} - set(state)
        if missing:
            raise ValueError(f"not a StepGuard state: missing {sorted(missing)}")
        self.step_count = int(state["step"])
        self.counters = {a: int(state["counters"].get(a, 0)) for a in ACTIONS}
        self.rule_counters = {str(k): int(v) for k, v in state.get("rule_counters", {}).items()}
        self._last_rho = state.get("last_rho")
        self._estimator = state.get("estimator", self.config.estimator)
        self.schedule.load_state_dict(state.get("schedule", {}))
        self.policy.load_state_dict(state.get("policy", {}))
        self._consecutive_vetoes = int(state.get("consecutive_vetoes", 0))

    def close(self) -> None:
        """Remove the capture hooks, release the optimizer and close the sinks."""
        if self.capture is not None:
            self.capture.remove()
        if self._output_check is not None:
            self._output_check.close()
        _release(self.optimizer, self)
        self.sinks.flush()
        self.sinks.close()


_SKETCH_SIZE = 4096
_GUARD_ATTRIBUTE = "_stepguard_engine"


def _claim(optimizer: torch.optim.Optimizer, engine: GuardEngine) -> None:
    """Mark ``optimizer`` as guarded by ``engine``; a second live guard is an error."""
    ref = getattr(optimizer, _GUARD_ATTRIBUTE, None)
    if ref is not None and ref() is not None:
        raise RuntimeError(
            f"this {type(optimizer).__name__} is already guarded by StepGuard: a second guard would "
            "measure (and clip or veto) every step twice. Use the first guard, or close() / "
            "detach() it before guarding the optimizer again."
        )
    setattr(optimizer, _GUARD_ATTRIBUTE, weakref.ref(engine))


def _release(optimizer: torch.optim.Optimizer, engine: GuardEngine) -> None:
    ref = getattr(optimizer, _GUARD_ATTRIBUTE, None)
    if ref is not None and ref() is engine:
        delattr(optimizer, _GUARD_ATTRIBUTE)


def _foreign_parameters(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[str, Tensor]]:
    """The optimizer's trainable parameters that ``module`` does not hold, labelled by position."""
    owned = {id(p) for p in module.parameters()}
    return [
        (f"param_groups[{g}]['params'][{i}] (shape {tuple(p.shape)})", p)
        for g, group in enumerate(optimizer.param_groups)
        for i, p in enumerate(group["params"])
        if p.requires_grad and id(p) not in owned
    ]


def _refuse_foreign(moving: list[tuple[str, Tensor]]) -> None:
    """A parameter the step moves but the measured model does not hold would be left out of r."""
    if not moving:
        return
    labels = [label for label, _ in moving]
    shown = ", ".join(labels[:5]) + (f" and {len(labels) - 5} more" if len(labels) > 5 else "")
    raise ValueError(
        f"the model given to StepGuard does not own {len(labels)} of the optimizer's parameters "
        f"that have gradients: {shown}. The JVP would leave their update out and report too small "
        "an r. Pass the module that holds every parameter the optimizer trains (for two networks "
        "with two optimizers, one guard per optimizer with its own model)."
    )


def _unit(v: Tensor | None) -> tuple[Tensor, Tensor] | None:
    """(v/‖v‖, ‖v‖); a zero v stays zero, and a cosine against it reads as 1 ("no turn")."""
    if v is None:
        return None
    norm = torch.linalg.vector_norm(v)
    return torch.where(norm > 0, v / torch.where(norm > 0, norm, 1.0), v), norm
