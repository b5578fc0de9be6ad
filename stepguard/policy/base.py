"""The policy protocol."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stepguard.report import Decision, StepReport

if TYPE_CHECKING:
    from stepguard.policy.rule_policy import RulePolicy


class Policy(ABC):
    """Decides what happens to a proposed step, given its :class:`StepReport`.

    The report a policy sees carries the measurement (τ, ρ_a, r, …) and ``action="allow"``;
    the policy returns a :class:`Decision`. A policy whose decisions can be ``"veto"``
    sets ``may_veto = True`` so the guard keeps a copy of the optimizer state to restore.
    Whatever state a policy keeps goes through ``state_dict``/``load_state_dict``, so it
    survives a resume together with the guard.

    The policies StepGuard ships are rule-based (:class:`~stepguard.policy.RulePolicy`);
    :meth:`from_dict` and :meth:`from_file` build one from configuration. Subclass
    ``Policy`` directly for a decision rule that is easier to write as code.
    """

    name: str = "policy"
    may_veto: bool = True

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

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> RulePolicy:
        """A rule-based policy from a mapping (the schema of :class:`~stepguard.policy.PolicyConfig`).

        Raises:
            PolicyConfigError: a line per problem, each naming its key
                (``rules[2].condition.field: unknown report field 'rr'; known: …``).
        """
        from stepguard.policy.rule_policy import RulePolicy

        return RulePolicy.from_config(data)

    @staticmethod
    def from_file(path: str | Path) -> RulePolicy:
        """A rule-based policy from a ``.yaml``/``.yml`` (needs PyYAML), ``.json`` or ``.toml`` file.

        Raises:
            FileNotFoundError: no such file.
            PolicyConfigError: a syntax error or an invalid policy, naming the key.
            ModuleNotFoundError: YAML without PyYAML installed.
        """
        from stepguard.policy.rule_policy import RulePolicy

        return RulePolicy.from_path(path)
