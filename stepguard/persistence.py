"""The guard's state in a checkpoint: what ``state_dict()`` keeps under ``"stepguard"``, read back.

Every key of the state exists from the first step on, whatever the run did; the parts whose
shape grows with the run (the policy's windows, the counts per rule) travel as one JSON
string each. ``torch.distributed.checkpoint`` loads into a template built by a fresh guard,
and refuses a checkpoint whose keys that template lacks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from stepguard.ledger import StepLedger
from stepguard.norms import LocalNorms, ShardedNorms
from stepguard.policy import Policy
from stepguard.report import ACTIONS
from stepguard.trigger import MeasurementTrigger


def guard_state(
    ledger: StepLedger,
    trigger: MeasurementTrigger,
    estimator: str,
    policy: Policy,
    norms: LocalNorms | ShardedNorms,
) -> dict[str, Any]:
    """The committed-step counts, the measurement schedule, the estimator in use, the policy's
    state and (FSDP2) the reference length of the next replay."""
    schedule = trigger.state_dict()
    return {
        "step": ledger.step_count,
        "counters": dict(ledger.counters),
        "rule_counters": json.dumps(dict(ledger.rule_counters)),
        "last_rho": schedule["last_rho"],
        "estimator": estimator,
        "schedule": schedule["schedule"],
        "policy": json.dumps(policy.state_dict()),
        "consecutive_vetoes": ledger.vetoes.count,
        "reference_tau": norms.reference_tau,
    }


def load_guard_state(
    state: Mapping[str, Any],
    ledger: StepLedger,
    trigger: MeasurementTrigger,
    policy: Policy,
    norms: LocalNorms | ShardedNorms,
    estimator: str,
) -> str:
    """Resume ``ledger``, ``trigger``, ``policy`` and ``norms`` from :func:`guard_state`; returns
    the saved estimator (``estimator`` when the state has none).

    Raises:
        ValueError: ``state`` is not a guard's state (it lacks ``step`` or ``counters``).
    """
    missing = {"step", "counters"} - set(state)
    if missing:
        raise ValueError(f"not a StepGuard state: missing {sorted(missing)}")
    ledger.step_count = int(state["step"])
    ledger.counters = {a: int(state["counters"].get(a, 0)) for a in ACTIONS}
    ledger.rule_counters = {str(k): int(v) for k, v in _decoded(state.get("rule_counters", {})).items()}
    trigger.load_state_dict(state)
    policy.load_state_dict(_decoded(state.get("policy", {})))
    ledger.vetoes.count = int(state.get("consecutive_vetoes", 0))
    norms.reference_tau = state.get("reference_tau")
    return state.get("estimator", estimator)


def _decoded(value: str | Mapping[str, Any]) -> dict[str, Any]:
    """A JSON part of the state (or, from a checkpoint written before it was JSON, the mapping)."""
    return dict(json.loads(value)) if isinstance(value, str) else dict(value)
