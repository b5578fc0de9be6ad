"""The preset policies: ``monitor``, ``clip`` (the paper's τ ≤ c·ρ_a) and ``veto``."""

from __future__ import annotations

import math

from stepguard.policy.base import Policy
from stepguard.report import Decision, StepReport


def _nonfinite(report: StepReport) -> Decision | None:
    if not math.isfinite(report.tau):
        return Decision("veto", 0.0, f"non-finite update: tau={report.tau}", "nonfinite")
    if math.isnan(report.r) or math.isnan(report.rho_a):
        return Decision(
            "veto", 0.0, f"non-finite measurement: r={report.r}, rho_a={report.rho_a}", "nonfinite"
        )
    return None


class MonitorPolicy(Policy):
    """Measure and report; never change a step."""

    name = "monitor"
    may_veto = False

    def decide(self, report: StepReport) -> Decision:
        return Decision("allow", 1.0, "monitor only", None)


class ClipPolicy(Policy):
    """The radius controller: apply θ₀ + (c·ρ_a/τ)·Δθ whenever τ > c·ρ_a ("Ghosts of Softmax", §5).

    The scale c·ρ_a/τ = c/r makes the applied step exactly c·ρ_a long, so its normalized
    step is c. The optimizer state (Adam's moments, momentum) keeps its usual update; only
    the applied step shrinks. A non-finite update or measurement is vetoed.

    Args:
        target_r: c, the normalized step to clip to (1 is the radius itself; 0.5 is the
            paper's "definitively safe" start).
    """

    name = "clip"

    def __init__(self, target_r: float = 1.0) -> None:
        if not (target_r > 0 and math.isfinite(target_r)):
            raise ValueError(f"target_r must be a positive finite number, got {target_r}")
        self.target_r = float(target_r)

    def decide(self, report: StepReport) -> Decision:
        bad = _nonfinite(report)
        if bad is not None:
            return bad
        if report.r > self.target_r:
            scale = self.target_r / report.r
            return Decision(
                "clip",
                scale,
                f"r={report.r:.4g} > {self.target_r:g}: step scaled by {scale:.4g} to r={self.target_r:g}",
                "clip_r",
            )
        return Decision("allow", 1.0, f"r={report.r:.4g} <= {self.target_r:g}", None)

    def __repr__(self) -> str:
        return f"ClipPolicy(target_r={self.target_r})"


class VetoPolicy(Policy):
    """Skip any step whose normalized step r exceeds ``max_r`` (and any non-finite one).

    A vetoed step leaves the parameters and the optimizer state exactly as they were
    before it.

    Args:
        max_r: the largest r that is still applied.
    """

    name = "veto"

    def __init__(self, max_r: float = 1.0) -> None:
        if not (max_r > 0):
            raise ValueError(f"max_r must be positive, got {max_r}")
        self.max_r = float(max_r)

    def decide(self, report: StepReport) -> Decision:
        bad = _nonfinite(report)
        if bad is not None:
            return bad
        if report.r > self.max_r:
            return Decision("veto", 0.0, f"r={report.r:.4g} > {self.max_r:g}: step skipped", "veto_r")
        return Decision("allow", 1.0, f"r={report.r:.4g} <= {self.max_r:g}", None)

    def __repr__(self) -> str:
        return f"VetoPolicy(max_r={self.max_r})"


PRESETS = {"monitor": MonitorPolicy, "clip": ClipPolicy, "veto": VetoPolicy}


def resolve_policy(policy: str | Policy) -> Policy:
    """A :class:`Policy` from a preset name (``"monitor"``, ``"clip"``, ``"veto"``) or as is."""
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, str):
        try:
            return PRESETS[policy]()
        except KeyError:
            raise ValueError(
                f"unknown policy {policy!r}; use one of {sorted(PRESETS)} or a Policy instance"
            ) from None
    raise TypeError(f"policy must be a preset name or a Policy, got {type(policy).__name__}")
