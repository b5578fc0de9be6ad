"""The policy protocol."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from stepguard.report import Decision, StepReport


class Policy(ABC):
    """Decides what happens to a proposed step, given its :class:`StepReport`.

    The report a policy sees carries the measurement (τ, ρ_a, r, …) and ``action="allow"``;
    the policy returns a :class:`Decision`. A policy whose decisions can be ``"veto"``
    sets ``may_veto = True`` so the guard keeps a copy of the optimizer state to restore.
    Whatever state a policy keeps goes through ``state_dict``/``load_state_dict``, so it
    survives a resume together with the guard.
    """

    name: str = "policy"
    may_veto: bool = True

    @abstractmethod
    def decide(self, report: StepReport) -> Decision:
        """Return the decision for the step described by ``report``."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got keys {sorted(state)}")
