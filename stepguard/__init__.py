"""StepGuard: measure every optimizer step against the softmax's safe-step radius.

Public names (re-exported here; the implementation lives in the submodules):

* :class:`StepGuard`, :func:`attach` — guard an optimizer (wrapper or hooks).
* :func:`radius` — ρ_a of a model along any direction(s).
* :class:`StepReport`, :class:`Decision`, :class:`SpreadSummary` — the per-step record.
* :class:`GuardConfig` — measurement settings; :class:`Policy` and the presets.
"""

from importlib import metadata as _metadata

from stepguard.config import GuardConfig
from stepguard.engine import HaltTraining, NoBatchError
from stepguard.errors import ReplayOutOfMemoryError
from stepguard.geometry import RadiusResult, radius
from stepguard.guard import StepGuard
from stepguard.hooks import GuardHandle, attach
from stepguard.policy import ClipPolicy, MonitorPolicy, Policy, Rule, RulePolicy, SafePolicy, VetoPolicy
from stepguard.report import Decision, SpreadSummary, StepReport

__all__ = [
    "ClipPolicy",
    "Decision",
    "GuardConfig",
    "GuardHandle",
    "HaltTraining",
    "MonitorPolicy",
    "NoBatchError",
    "Policy",
    "RadiusResult",
    "ReplayOutOfMemoryError",
    "Rule",
    "RulePolicy",
    "SafePolicy",
    "SpreadSummary",
    "StepGuard",
    "StepReport",
    "VetoPolicy",
    "attach",
    "radius",
]

try:  # the installed distribution's version: one source, pyproject.toml
    __version__ = _metadata.version("stepguard")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
