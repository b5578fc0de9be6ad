"""Actions: what a rule does to the step when its condition holds.

Each action is a frozen pydantic model with pure methods over an explicit, JSON-ready state:

* ``fire(ctx, state, detail) -> (Proposal, state)`` when the rule fires;
* ``idle(ctx, state) -> (Proposal | None, state)`` on the steps where it does not (only a
  learning-rate backoff that is still recovering proposes anything then).

A :class:`Proposal` is a factor on the proposed update Δθ: 1 (allow), s ∈ [0, 1) (clip) or
0 (veto), possibly with ``halt``. Proposals of several rules combine as a chain: the scales
multiply, and each clip sees the step as already scaled by the rules before it
(``ctx.scale``), so ``backoff`` followed by ``clip`` applies min(s_backoff, c/r), never less.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from stepguard.report import Action

State = dict[str, Any]

#: Order of precedence when several rules take part in one decision.
SEVERITY: dict[str, int] = {"allow": 0, "clip": 1, "veto": 2}


@dataclass(frozen=True)
class StepContext:
    """What an action may read while the policy decides one step.

    Attributes:
        t: the policy's own step counter (0 for the first step it decides).
        step: the report's step index (for messages).
        values: the report's numbers by dotted name.
        scale: the product of the scales proposed by the rules before this one.
    """

    t: int
    step: int
    values: dict[str, float]
    scale: float = 1.0


@dataclass(frozen=True)
class Proposal:
    """One rule's contribution to a decision.

    Attributes:
        action: ``"allow"``, ``"clip"`` or ``"veto"``.
        scale: the factor on Δθ: 1 for allow, in [0, 1) for clip, 0 for veto.
        reason: why, in words.
        halt: stop training after this step.
        alert: a message to log now (a warning that is due), or ``None``.
        level: the logging level name of ``alert``.
    """

    action: Action
    scale: float
    reason: str
    halt: bool = False
    alert: str | None = None
    level: str = "warning"


class _Action(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Whether evaluation goes on to later rules after this action fires (``Rule.continue_`` overrides).
    continues: ClassVar[bool] = False
    #: Whether this action can leave the step undone (so the guard must keep the optimizer state).
    can_veto: ClassVar[bool] = False

    def init(self) -> State:
        """The state before the first step."""
        return {}

    def fire(self, ctx: StepContext, state: State, detail: str) -> tuple[Proposal, State]:
        """The proposal when the rule fires; ``detail`` says why its condition holds."""
        raise NotImplementedError

    def idle(self, ctx: StepContext, state: State) -> tuple[Proposal | None, State]:
        """The proposal on a step where the rule does not fire (``None``: nothing to add)."""
        return None, state

    def describe(self) -> str:
        """The action in words."""
        return str(getattr(self, "kind", type(self).__name__))


class Allow(_Action):
    """Apply the step as proposed and stop evaluating later rules (a whitelist, e.g. during warm-up)."""

    kind: Literal["allow"] = "allow"

    def fire(self, ctx: StepContext, state: State, detail: str) -> tuple[Proposal, State]:
        return Proposal("allow", 1.0, f"{detail}: allowed"), state


class Clip(_Action):
    """Shrink the step so that ``field`` (r or τ) is at most ``target``: the radius controller.

    With x the field's value for the step as scaled so far (``ctx.scale``·x), the scale is
    s = min(1, target/x); for ``field="r"`` and target c this is the paper's θ₀ + (c·ρ_a/τ)·Δθ
    ("Ghosts of Softmax", arXiv 2603.13552, §5). r and τ are both linear in the applied step,
    so the clipped step has exactly ``field = target``. A non-finite x or τ cannot be scaled
    (θ₀ + s·Δθ would stay non-finite), so that step is vetoed instead.

    Args:
        target: the largest value of ``field`` that is applied.
        field: ``"r"`` (normalized step) or ``"tau"`` (step length ‖Δθ‖).
    """

    kind: Literal["clip"] = "clip"
    target: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    field: Literal["r", "tau"] = "r"
    can_veto: ClassVar[bool] = True

    def fire(self, ctx: StepContext, state: State, detail: str) -> tuple[Proposal, State]:
        raw = ctx.values.get(self.field)
        if raw is None:
            return Proposal("allow", 1.0, f"{detail}: no {self.field} to clip"), state
        x = raw * ctx.scale if ctx.scale != 1.0 else raw
        tau = ctx.values.get("tau", 0.0)
        if not (math.isfinite(x) and math.isfinite(tau)):
            reason = f"{detail}: {self.field}={raw} cannot be scaled: step skipped"
            return Proposal("veto", 0.0, reason), state
        if x <= self.target:
            reason = f"{detail}: {self.field}={x:.4g} <= {self.target:g} as scaled"
            return Proposal("allow", 1.0, reason), state
        scale = self.target / x
        return (
            Proposal("clip", scale, f"{detail}: step scaled by {scale:.4g} to {self.field}={self.target:g}"),
            state,
        )

    def describe(self) -> str:
        return f"clip to {self.field}={self.target:g}"


class Veto(_Action):
    """Skip the step: θ stays θ₀ and, unless the policy says otherwise, the optimizer state too."""

    kind: Literal["veto"] = "veto"
    can_veto: ClassVar[bool] = True

    def fire(self, ctx: StepContext, state: State, detail: str) -> tuple[Proposal, State]:
        return Proposal("veto", 0.0, f"{detail}: step skipped"), state


class Halt(_Action):
    """Stop training: the guard commits this step (vetoed by default), reports it, then raises.

    Args:
        message: a sentence added to the reason (what to look at, whom to call).
        step_action: what happens to this step before training stops: ``"veto"`` or ``"allow"``.
    """

    kind: Literal["halt"] = "halt"
    message: str = ""
    step_action: Literal["veto", "allow"] = "veto"
    can_veto: ClassVar[bool] = True

    def fire(self, ctx: StepContext, state: State, detail: str) -> tuple[Proposal, State]:
        extra = f"; {self.message}" if self.message else ""
        reason = f"{detail}: training halted at step {ctx.step}{extra}"
        scale = 0.0 if self.step_action == "veto" else 1.0
        return Proposal(self.step_action, scale, reason, halt=True), state

    def describe(self) -> str:
        return "halt" if self.step_action == "veto" else "halt after applying the step"


class Warn(_Action):
    """Log a warning and allow the step; evaluation goes on to later rules by default.

    The message is logged (logger ``stepguard.policy``) at most once every ``every`` steps
    per rule; every step where the condition holds still carries the reason and the rule.

    Args:
        every: the least number of steps between two logged messages of this rule.
        level: ``"info"``, ``"warning"`` or ``"error"``.
    """

    kind: Literal["warn"] = "warn"
    every: int = Field(default=100, ge=1)
    level: Literal["info", "warning", "error"] = "warning"
    continues: ClassVar[bool] = True

    def init(self) -> State:
        return {"last_logged": None}

    def fire(self, ctx: StepContext, state: State, detail: str) -> tuple[Proposal, State]:
        last = state.get("last_logged")
        if last is None or ctx.t - int(last) >= self.every:
            return Proposal("allow", 1.0, detail, alert=detail, level=self.level), {"last_logged": ctx.t}
        return Proposal("allow", 1.0, detail), state

    def describe(self) -> str:
        return f"warn (at most every {self.every} steps)"


class Backoff(_Action):
    """Lower the learning rate by ``factor`` and let it recover over ``recover_steps`` steps.

    For optimizers whose state does not depend on the learning rate (SGD with or without
    momentum, Adam/AdamW, RMSprop, Adagrad) the proposed update is linear in this step's lr:
    Δθ = −lr·u(state, g). Applying s·Δθ is then exactly a step with learning rate s·lr, while
    the moments update as usual. So a backoff is a clip-type decision whose scale is state:

        s ← max(min_scale, s_now·factor)     when the rule fires,
        s_k = 1 − (1 − s)·w(k/N)            k steps later (N = ``recover_steps``),

    with w(u) = 1 − u (``linear``), (1 + cos πu)/2 (``cosine``), or s_k = s^(1−k/N)
    (``exponential``), and s_N = 1. The scale multiplies whatever learning rate the
    scheduler sets; ``param_groups`` are not written.

    Args:
        factor: the multiplier on the current scale when the rule fires.
        min_scale: the floor of the scale.
        recover_steps: N, the steps until the full learning rate is back.
        schedule: ``"linear"``, ``"cosine"`` or ``"exponential"``.
    """

    kind: Literal["backoff"] = "backoff"
    factor: float = Field(default=0.5, gt=0, lt=1)
    min_scale: float = Field(default=1e-3, gt=0, le=1)
    recover_steps: int = Field(default=100, ge=1)
    schedule: Literal["linear", "cosine", "exponential"] = "linear"
    continues: ClassVar[bool] = True
    can_veto: ClassVar[bool] = True

    def init(self) -> State:
        return {}

    def current(self, state: State, t: int) -> float:
        """The scale in force at policy step ``t`` (1 when no backoff is active)."""
        if "s0" not in state:
            return 1.0
        s0, u = float(state["s0"]), (t - int(state["t0"])) / self.recover_steps
        if u >= 1:
            return 1.0
        if self.schedule == "exponential":
            return s0 ** (1.0 - u)
        w = 1.0 - u if self.schedule == "linear" else (1.0 + math.cos(math.pi * u)) / 2.0
        return 1.0 - (1.0 - s0) * w

    def fire(self, ctx: StepContext, state: State, detail: str) -> tuple[Proposal, State]:
        s = max(self.min_scale, self.current(state, ctx.t) * self.factor)
        reason = f"{detail}: learning rate backed off to {s:.3g}x, recovering over {self.recover_steps} steps"
        return Proposal("clip", s, reason), {"s0": s, "t0": ctx.t}

    def idle(self, ctx: StepContext, state: State) -> tuple[Proposal | None, State]:
        s = self.current(state, ctx.t)
        if s >= 1.0:
            return None, {}
        k = ctx.t - int(state["t0"])
        return Proposal("clip", s, f"learning-rate backoff at {s:.3g}x ({k}/{self.recover_steps})"), state

    def describe(self) -> str:
        return f"back off lr x{self.factor:g} (recover over {self.recover_steps} steps)"


ACTION_KINDS: tuple[str, ...] = ("allow", "clip", "veto", "halt", "warn", "backoff")


def _parse_action(value: Any) -> Any:
    """Accept a bare kind (``"veto"``) as the short form of an action with its defaults."""
    if isinstance(value, str):
        if value.strip() not in ACTION_KINDS:
            raise ValueError(f"unknown action {value!r}; known: {', '.join(ACTION_KINDS)}")
        return {"kind": value.strip()}
    return value


#: Any action, told apart by its ``kind`` (a bare kind string is read with the defaults).
AnyAction = Annotated[
    Union[Allow, Clip, Veto, Halt, Warn, Backoff],  # noqa: UP007
    Field(discriminator="kind"),
    BeforeValidator(_parse_action),
]
