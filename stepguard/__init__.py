"""StepGuard: measure every optimizer step against the softmax's safe-step radius."""

from stepguard.report import Decision, SpreadSummary, StepReport

__all__ = ["Decision", "SpreadSummary", "StepReport"]
__version__ = "0.1.0"
