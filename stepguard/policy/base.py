"""The policy protocol."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from stepguard.report import Decision, StepReport


class Policy(ABC):
    """Decides what happens to a proposed step, given its :class:`StepReport`.

    The report a policy sees carries the measurement (τ, ρ_a, r, …) and ``action="allow"``;
    the policy returns a :class:`Decision`. Whatever state a policy keeps goes through
    ``state_dict``/``load_state_dict``, so it survives a resume together with the guard.

    ``needs_state_backup`` is the one switch for what a veto restores. True: the guard
    copies the optimizer state (Adam's moments, momentum) before every step, and a veto
    puts it back bit for bit. False: the guard keeps no copy, and a veto puts back the
    parameters only, leaving the optimizer state as the vetoed step left it. The choice is
    the policy's because the copy must be taken before the optimizer runs, before any
    decision exists. A policy that never vetoes sets it False and spares the copy.

    ``changes_steps`` says whether the policy can ever clip or veto. True (the default, the
    safe answer for a policy the guard cannot see into): when anything raises between the
    inner step and the commit, the guard puts θ₀ back. False: the policy only watches, so
    the step stays as the optimizer made it, as it would have without the guard. A
    :class:`~stepguard.policy.RulePolicy` derives it from its rules' actions (``monitor``,
    with no rules, and a policy of ``warn`` rules never change a step).

    The policies StepGuard ships are rule-based (:class:`~stepguard.policy.RulePolicy`,
    built from configuration with ``RulePolicy.from_config`` or ``RulePolicy.from_path``).
    Subclass ``Policy`` directly for a decision rule that is easier to write as code.
    """

    name: str = "policy"
    needs_state_backup: bool = True
    changes_steps: bool = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "may_veto" in vars(cls):
            raise TypeError(
                f"{cls.__name__} sets may_veto, which is now needs_state_backup: set "
                "needs_state_backup = False for a policy whose vetoes should not restore the "
                "optimizer state (or that never vetoes)"
            )

    @abstractmethod
    def decide(self, report: StepReport) -> Decision:
        """Return the decision for the step described by ``report``."""

    def state_dict(self) -> dict[str, Any]:
        """The policy's state, JSON-ready (empty for a stateless policy)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got keys {sorted(state)}")
