"""A rule: a named condition and the action taken when it holds."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

from stepguard.policy.actions import AnyAction
from stepguard.policy.conditions import AnyCondition

#: The rule name a decision carries when the policy's consecutive-veto guard decides.
MAX_VETOES_RULE = "max_consecutive_vetoes"
RESERVED_NAMES = frozenset({MAX_VETOES_RULE})
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")


class Escalation(BaseModel):
    """Replace a rule's action once it has fired on ``after`` consecutive steps.

    The ``after``-th firing in a row and every later one in the same run take ``action``;
    the run ends at the first step where the rule does not fire.

    Args:
        after: how many consecutive firings escalate (at least 2).
        action: the stronger action, e.g. ``"halt"`` after repeated vetoes.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    after: int = Field(ge=2)
    action: AnyAction


class Rule(BaseModel):
    """When ``condition`` holds, take ``action``.

    Rules are evaluated in order; the first rule that fires decides, unless it continues
    (``continue_``, by default true for ``warn`` and ``backoff``, whose proposals then
    combine with those of later rules: the scales multiply, a veto or halt dominates).

    Args:
        name: a unique, stable name: the decision's ``rule``, the key of the guard's
            per-rule counters and of the policy's saved state.
        condition: a condition, or a short form such as ``"r > 1"`` or ``"nonfinite"``.
        action: an action, or a bare kind such as ``"veto"``.
        continue_: go on to later rules after this one fires (``continue`` in files).
        cooldown: after firing, the rule stays silent for this many steps.
        escalate: a stronger action once the rule has fired several steps in a row.

    Example:
        >>> Rule(name="clip_r", condition="r > 1", action={"kind": "clip", "target": 1.0}).describe()
        'clip_r: if r > 1 then clip to r=1'
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str
    condition: AnyCondition
    action: AnyAction
    continue_: bool | None = Field(default=None, alias="continue")
    cooldown: int = Field(default=0, ge=0)
    escalate: Escalation | None = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if not _NAME.match(name):
            raise ValueError(
                f"rule name {name!r} must start with a letter or '_' and hold only letters, "
                "digits, '_', '.' and '-'"
            )
        if name in RESERVED_NAMES:
            raise ValueError(f"rule name {name!r} is reserved for the policy's consecutive-veto guard")
        return name

    def continues_after(self, action: object) -> bool:
        """Whether evaluation goes on after this rule fires with ``action``."""
        if self.continue_ is not None:
            return self.continue_
        return bool(getattr(type(action), "continues", False))

    def describe(self) -> str:
        """The rule in words."""
        text = f"{self.name}: if {self.condition.describe()} then {self.action.describe()}"
        if self.escalate is not None:
            text += f", {self.escalate.action.describe()} after {self.escalate.after} in a row"
        return text
