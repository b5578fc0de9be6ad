"""Policies decide each step from its report: allow it, clip it, veto it, or halt training.

A :class:`RulePolicy` is an ordered set of :class:`Rule` objects, each a condition on the
report (and on running statistics the policy keeps) and an action; the presets are
instances of it. See ``docs/policies.md``.
"""

from stepguard.policy.actions import Allow, Backoff, Clip, Halt, Proposal, StepContext, Veto, Warn
from stepguard.policy.base import Policy
from stepguard.policy.conditions import AllOf, Always, AnyOf, Consecutive, NonFinite, Not, Spike, Threshold
from stepguard.policy.config import PolicyConfig, PolicyConfigError, load_policy_config, policy_config
from stepguard.policy.fields import FIELDS, check_field
from stepguard.policy.presets import (
    PRESETS,
    ClipPolicy,
    MonitorPolicy,
    RelativeClipPolicy,
    SafePolicy,
    VetoPolicy,
    resolve_policy,
)
from stepguard.policy.rule_policy import Alert, Evaluation, RulePolicy
from stepguard.policy.rules import MAX_VETOES_RULE, Escalation, Rule

__all__ = [
    "FIELDS",
    "MAX_VETOES_RULE",
    "PRESETS",
    "Alert",
    "AllOf",
    "Allow",
    "Always",
    "AnyOf",
    "Backoff",
    "Clip",
    "ClipPolicy",
    "Consecutive",
    "Escalation",
    "Evaluation",
    "Halt",
    "MonitorPolicy",
    "NonFinite",
    "Not",
    "Policy",
    "PolicyConfig",
    "PolicyConfigError",
    "Proposal",
    "RelativeClipPolicy",
    "Rule",
    "RulePolicy",
    "SafePolicy",
    "Spike",
    "StepContext",
    "Threshold",
    "Veto",
    "VetoPolicy",
    "Warn",
    "check_field",
    "load_policy_config",
    "policy_config",
    "resolve_policy",
]
