"""Policies decide each step from its report: allow it, clip it to the safe radius, or veto it."""

from stepguard.policy.base import Policy
from stepguard.policy.presets import ClipPolicy, MonitorPolicy, VetoPolicy, resolve_policy

__all__ = ["ClipPolicy", "MonitorPolicy", "Policy", "VetoPolicy", "resolve_policy"]
