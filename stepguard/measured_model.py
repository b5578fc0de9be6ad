"""The model a guard measures: what it replays, on which batch, along which parameters.

:class:`MeasuredModel` holds the user's module (unwrapped from DDP / ``torch.compile``), the
hook that captures its training forwards, the loss head when a loss builds the logits, and
the map from the optimizer's parameters to the module's names. Before the inner step it
checks that a step could be measured at all; after it, it replays the captured batch at θ₀
along Δθ/τ (:func:`~stepguard.measure.measure_update`).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from stepguard.capture import ForwardCapture, unwrap_model
from stepguard.config import GuardConfig
from stepguard.errors import NoBatchError
from stepguard.geometry.jvp import Batch
from stepguard.geometry.logits import LogitsFn
from stepguard.geometry.sharded import ShardedReplay, fsdp2_modules, local_tensor
from stepguard.measure import Part, measure_update
from stepguard.output_check import OutputCheck
from stepguard.snapshot import ParameterSnapshot, Update, alias

logger = logging.getLogger("stepguard")

RowsFn = Callable[[tuple[Any, ...], dict[str, Any]], Mapping[str, "Tensor | None"]]
"""``rows_fn(args, kwargs) -> {"targets": ..., "mask": ...}``: the rows that count, from a forward."""

Layout = list[tuple[str, Tensor, "int | None"]]


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


class MeasuredModel:
    """The module, its captured batch and its parameter layout, for one guard.

    Args:
        model: the network whose logits the optimizer moves (``None``: every step is
            refused with :class:`~stepguard.errors.NoBatchError`).
        config: the guard's configuration.
        logits_fn: picks the logits from the model output.
        loss: a loss with ``radius_logits`` (measured through a :class:`LossHead`).
        rows_fn: derives targets and a mask from the captured forward's arguments.
    """

    def __init__(
        self,
        model: nn.Module | None,
        config: GuardConfig,
        logits_fn: LogitsFn | None = None,
        loss: nn.Module | None = None,
        rows_fn: RowsFn | None = None,
    ) -> None:
        self.config = config
        self.logits_fn = logits_fn
        self.rows_fn = rows_fn
        self.model: nn.Module | None = None
        self.capture: ForwardCapture | None = None
        self.head: LossHead | None = None
        self.output_check: OutputCheck | None = None
        self.sharded: ShardedReplay | None = None
        if model is not None:
            self.model = unwrap_model(model)
            self.capture = ForwardCapture(self.model)
            if fsdp2_modules(self.model):
                if loss is not None and getattr(loss, "has_radius_logits", False):
                    raise NotImplementedError(
                        "a loss with radius_logits is not supported on an FSDP2 model yet: "
                        "pass the loss's logits through logits_fn instead"
                    )
                self.sharded = ShardedReplay(self.model)
            if loss is not None and getattr(loss, "has_radius_logits", False):
                self.head = LossHead(self.model, loss, logits_fn)
            elif not config.assume_logits:
                self.output_check = OutputCheck(self.model, logits_fn)
        self._params_key: tuple[tuple[int, bool], ...] | None = None
        self._foreign: list[tuple[str, Tensor]] = []
        self._layout: Layout = []
        self._warned_single_rows = False

    @property
    def module(self) -> nn.Module | None:
        """What the JVP differentiates: the loss head when there is one, else the model."""
        return self.head or self.model

    # ---------------------------------------------------------------- before the inner step

    def check_ready(
        self, optimizer: torch.optim.Optimizer, params: list[Tensor], *, inputs_given: bool, closure: bool
    ) -> None:
        """Refuse, before the inner step, a step that could not be measured.

        Needs a model, a captured training batch (unless inputs were given or a closure will
        run the forward), and the model holding every parameter the step moves: a
        parameter the module does not hold would be left out of the JVP and make r too small.
        """
        if self.model is None:
            raise NoBatchError(
                "StepGuard has no model to measure: pass StepGuard(optimizer, model=net) "
                "(or attach(optimizer, net))"
            )
        if not (inputs_given or closure) and (self.capture is None or not self.capture.batches):
            raise NoBatchError(_NO_BATCH)
        key = tuple((id(p), p.requires_grad) for p in params)
        if key != self._params_key:
            module = self.module
            self._foreign = _foreign_parameters(module, optimizer)
            index = {id(p): i for i, p in enumerate(params)}
            self._layout = [(n, p, index.get(id(p))) for n, p in module.named_parameters() if p.requires_grad]
            self._params_key = key
        if self._foreign:
            _refuse_foreign([(label, p) for label, p in self._foreign if p.grad is not None])

    # ---------------------------------------------------------------- after the inner step

    def measure(
        self,
        snapshot: ParameterSnapshot,
        update: Update | None,
        tau: Tensor,
        observed: Mapping[str, Any],
        *,
        step: int,
        closure: bool,
        estimator: str,
        summarize_on_host: bool,
        timings: dict[str, float],
    ) -> tuple[str, dict[str, Tensor], dict[str, Tensor]]:
        """The logit velocities at θ₀ along Δθ/τ on the step's batches, and their statistics.

        ``tau`` is the length the velocities are measured per: τ itself, or under FSDP2 the
        last step's global τ (the statistics are corrected after the reduction).
        """
        parts = self._parts(observed, step, closure)
        theta0 = snapshot.theta0
        delta = update.views() if update is not None else []
        primals: dict[str, Tensor] = {}
        tangent: dict[str, Tensor] = {}
        for name, p, i in self._layout:
            own = local_tensor(p)  # this rank's shard under FSDP2, else p
            primals[name] = own.detach() if i is None else alias(theta0[i])
            tangent[name] = torch.zeros_like(own) if i is None else alias(delta[i])
        with contextlib.ExitStack() as stack:
            if update is not None:  # along 2^e·Δθ, which is Δθ again afterwards, bit for bit
                tau = stack.enter_context(update.scaled_near_unit(tau))
            return self._measure_parts(primals, tangent, tau, parts, estimator, summarize_on_host, timings)

    def _measure_parts(
        self,
        primals: dict[str, Tensor],
        tangent: dict[str, Tensor],
        tau: Tensor,
        parts: list[Part],
        estimator: str,
        summarize_on_host: bool,
        timings: dict[str, float],
    ) -> tuple[str, dict[str, Tensor], dict[str, Tensor]]:
        head = self.head
        velocity_fn = None
        if self.sharded is not None:
            sharded, logits_fn, config = self.sharded, self.logits_fn, self.config

            def velocity_fn(batch: Batch, theta: Mapping[str, Tensor], direction: Mapping[str, Tensor]):
                return sharded.logit_velocity(
                    batch, theta, direction, logits_fn=logits_fn, mode=config.mode,
                    chunk_size=config.attention_chunk,
                )

        return measure_update(
            self.module,
            primals,
            tangent,
            tau,
            parts,
            config=self.config,
            logits_fn=self.logits_fn if head is None else None,
            estimator=estimator,
            summarize_on_host=summarize_on_host,
            timings=timings,
            before_part=None if head is None else lambda part: setattr(head, "targets", part.targets),
            velocity_fn=velocity_fn,
        )

    def step_ended(self) -> None:
        """The step is over (committed or rolled back): forwards from now on belong to the next."""
        if self.capture is not None:
            self.capture.step_ended()

    def after_step(self) -> None:
        """Give the verdict of the one-time output check once its gradient was seen."""
        if self.output_check is not None and not self.output_check.done:
            self.output_check.verdict()

    def close(self) -> None:
        if self.capture is not None:
            self.capture.remove()
        if self.output_check is not None:
            self.output_check.close()

    def _parts(self, observed: Mapping[str, Any], step: int, closure: bool) -> list[Part]:
        """The step's forwards (every micro-batch since the last step), each with the rows that count."""
        if "inputs" in observed:
            batches = [Batch.from_inputs(observed["inputs"], training=self.model.training)]
        else:
            batches, fresh = self.capture.take()
            if not batches:
                raise NoBatchError(_NO_BATCH)
            if not fresh and step > 0:
                logger.warning(
                    "StepGuard is measuring step %d on the batch of an earlier step: the model "
                    "ran no training forward since the last step",
                    step,
                )
            if closure:  # a closure re-evaluates one batch, possibly several times
                batches = batches[-1:]
        targets = self._per_batch(observed.get("targets"), "targets", len(batches))
        masks = self._per_batch(observed.get("mask"), "mask", len(batches))
        parts = []
        for batch, target, mask in zip(batches, targets, masks, strict=True):
            if self.rows_fn is not None and target is None and mask is None:
                rows = self.rows_fn(batch.args, batch.kwargs)
                target, mask = rows.get("targets"), rows.get("mask")
            parts.append(Part(batch, target, mask))
        return parts

    def _per_batch(self, value: Any, name: str, batches: int) -> list[Any]:
        """``targets`` / ``mask`` per micro-batch: one tensor for one batch, or one entry per batch."""
        if isinstance(value, (list, tuple)):
            if len(value) != batches:
                raise ValueError(
                    f"{name} has {len(value)} entries but the step had {batches} training forwards "
                    f"(micro-batches): pass one {name} tensor per forward, in order"
                )
            return list(value)
        if value is None or batches == 1:
            return [*([None] * (batches - 1)), value]
        if not self._warned_single_rows:
            self._warned_single_rows = True
            warnings.warn(
                f"StepGuard: one {name} tensor for a step with {batches} training forwards "
                f"(gradient accumulation): it is applied to the last forward only. Pass a list "
                f"with one {name} tensor per forward (or rows_fn=...), so that every "
                "micro-batch's rows are counted as its loss counts them.",
                UserWarning,
                stacklevel=6,
            )
        return [*([None] * (batches - 1)), value]


_NO_BATCH = (
    "StepGuard has no training batch to measure this step on: no forward of the model ran in "
    "train mode with autograd enabled before step(). Run the forward of the model passed as "
    "model=... (in train mode), or pass guard.step(inputs=batch)."
)


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
