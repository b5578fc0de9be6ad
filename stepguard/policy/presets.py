"""The preset policies, each an instance of the rule engine: ``monitor``, ``clip``, ``clip-fixed``,
``veto`` and ``safe``.

The theory behind each is in ``docs/policies.md``; in short:

* ``monitor`` measures and never changes a step.
* ``clip-fixed`` is the radius controller of "Ghosts of Softmax" (arXiv 2603.13552, §5):
  the softmax cross-entropy's Taylor expansion along the step direction converges within
  ρ_a = π/Δ_a, and models did not fail for r = τ/ρ_a < 1, so the applied step is
  θ₀ + min(1, c/r)·Δθ on every step.
* ``clip`` applies the same controller only to the steps that need it: r > 10, r > 2
  several steps in a row, or r standing out from the run's own r (a spike).
* ``veto`` skips steps with r > c instead of shortening them.
* ``safe`` is for production: clip on r, skip non-finite steps and loss spikes, and halt
  when vetoes keep coming.
"""

from __future__ import annotations

import math
from pathlib import Path

from stepguard.policy.actions import Clip, Veto
from stepguard.policy.base import Policy
from stepguard.policy.conditions import AllOf, Consecutive, NonFinite, Spike, Threshold
from stepguard.policy.config import SUFFIXES
from stepguard.policy.rule_policy import RulePolicy
from stepguard.policy.rules import Rule


def _nonfinite() -> Rule:
    return Rule(name="nonfinite", condition=NonFinite(), action=Veto())


class MonitorPolicy(RulePolicy):
    """Measure and report; never change a step (a policy with no rules)."""

    def __init__(self) -> None:
        super().__init__((), name="monitor")

    def __repr__(self) -> str:
        return "MonitorPolicy()"


class ClipPolicy(RulePolicy):
    """The radius controller: apply θ₀ + (c·ρ_a/τ)·Δθ whenever τ > c·ρ_a ("Ghosts of Softmax", §5).

    The scale c·ρ_a/τ = c/r makes the applied step exactly c·ρ_a long, so its normalized
    step is c. The optimizer state (Adam's moments, momentum) keeps its usual update; only
    the applied step shrinks. A non-finite update or measurement is vetoed.

    Rules: ``nonfinite`` (veto), ``clip_r`` (r > c → clip to r = c).

    Args:
        target_r: c, the normalized step to clip to (1 is the radius itself; 0.5 is the
            paper's "definitively safe" start).
        restore_optimizer_state: a veto also restores the optimizer state; ``False``
            restores the parameters only and spares the guard its copy of the state.
    """

    def __init__(self, target_r: float = 1.0, *, restore_optimizer_state: bool = True) -> None:
        if not (target_r > 0 and math.isfinite(target_r)):
            raise ValueError(f"target_r must be a positive finite number, got {target_r}")
        self.target_r = float(target_r)
        super().__init__(
            [
                _nonfinite(),
                Rule(
                    name="clip_r",
                    condition=Threshold(field="r", op=">", value=self.target_r),
                    action=Clip(target=self.target_r),
                ),
            ],
            name="clip-fixed",
            restore_optimizer_state=restore_optimizer_state,
        )

    def __repr__(self) -> str:
        if "target_r" not in vars(self):  # built by from_config: the rules say it all
            return super().__repr__()
        return f"ClipPolicy(target_r={self.target_r})"


class VetoPolicy(RulePolicy):
    """Skip any step whose normalized step r exceeds ``max_r`` (and any non-finite one).

    A vetoed step leaves the parameters and the optimizer state exactly as they were
    before it.

    Rules: ``nonfinite`` (veto), ``veto_r`` (r > max_r → veto).

    Args:
        max_r: the largest r that is still applied.
        restore_optimizer_state: a veto also restores the optimizer state; ``False``
            restores the parameters only and spares the guard its copy of the state.
    """

    def __init__(self, max_r: float = 1.0, *, restore_optimizer_state: bool = True) -> None:
        if not (max_r > 0):
            raise ValueError(f"max_r must be positive, got {max_r}")
        self.max_r = float(max_r)
        super().__init__(
            [
                _nonfinite(),
                Rule(name="veto_r", condition=Threshold(field="r", op=">", value=self.max_r), action=Veto()),
            ],
            name="veto",
            restore_optimizer_state=restore_optimizer_state,
        )

    def __repr__(self) -> str:
        if "max_r" not in vars(self):  # built by from_config: the rules say it all
            return super().__repr__()
        return f"VetoPolicy(max_r={self.max_r})"


class RelativeClipPolicy(RulePolicy):
    """The ``clip`` preset: clip to ``target_r`` when r is extreme, stays high, or stands out from its past.

    Rules, in order:

    * ``nonfinite``: a NaN/inf update or measurement → veto.
    * ``clip_hard``: r > ``hard_r`` → clip to r = ``target_r``, whatever the run's history.
    * ``clip_sustained``: r > ``sustained_r`` on ``sustained_steps`` steps in a row (this
      one included) → clip to ``target_r``: a learning rate that keeps every step well
      outside the radius.
    * ``clip_r``: r > ``target_r`` *and* r is more than ``z`` standard deviations above its
      mean over the last ``window`` steps (judged after ``warmup`` steps; steps that fire
      stay out of the window) → clip to ``target_r``: a spike against the run's own r.

    Why not r ≤ 1 on every step (:class:`ClipPolicy`, the ``clip-fixed`` preset)? On
    language models r > 1 is the normal regime at a good learning rate: a tiny Llama at
    its best learning rate has median r 1.2 and single healthy steps up to r ≈ 11, and
    Adam's first steps are sign-like and long on every model. Clipping all of them cost
    2–4 % of validation loss; this rule keeps within 0.5 % of plain AdamW there while
    still clipping a ×1000 learning-rate spike, and a learning rate 100× too high on a
    classifier (the sustained rule). The evidence is on the Comparison page.

    Args:
        target_r: the normalized step a clipped step gets.
        z, window, warmup: the spike test on r (see :class:`~stepguard.policy.Spike`).
        hard_r: above this r a step is clipped whatever the run's history.
        sustained_r, sustained_steps: r above ``sustained_r`` this many steps in a row is
            clipped (``sustained_r=None``: no such rule).
        restore_optimizer_state: a veto also restores the optimizer state; ``False``
            restores the parameters only and spares the guard its copy of the state.
    """

    def __init__(
        self,
        target_r: float = 1.0,
        z: float = 3.0,
        window: int = 50,
        warmup: int = 10,
        hard_r: float = 10.0,
        sustained_r: float | None = 2.0,
        sustained_steps: int = 3,
        *,
        restore_optimizer_state: bool = True,
    ) -> None:
        if not (0 < target_r < hard_r and math.isfinite(hard_r)):
            raise ValueError(f"need 0 < target_r < hard_r < inf, got target_r={target_r}, hard_r={hard_r}")
        if sustained_r is not None and not (target_r <= sustained_r < hard_r):
            raise ValueError(
                f"need target_r <= sustained_r < hard_r, got target_r={target_r}, "
                f"sustained_r={sustained_r}, hard_r={hard_r} (sustained_r=None turns that rule off)"
            )
        if sustained_steps < 1:
            raise ValueError(f"sustained_steps must be at least 1, got {sustained_steps}")
        self.target_r, self.hard_r = float(target_r), float(hard_r)
        self.sustained_r = None if sustained_r is None else float(sustained_r)
        clip = Clip(target=self.target_r)
        rules = [
            _nonfinite(),
            Rule(name="clip_hard", condition=Threshold(field="r", op=">", value=self.hard_r), action=clip),
        ]
        if self.sustained_r is not None:
            above = Threshold(field="r", op=">", value=self.sustained_r)
            sustained = Consecutive(condition=above, count=sustained_steps)
            rules.append(Rule(name="clip_sustained", condition=sustained, action=clip))
        rules.append(
            Rule(
                name="clip_r",
                condition=AllOf(
                    conditions=(
                        Threshold(field="r", op=">", value=self.target_r),
                        Spike(field="r", z=z, window=window, warmup=warmup),
                    )
                ),
                action=clip,
            )
        )
        super().__init__(rules, name="clip", restore_optimizer_state=restore_optimizer_state)

    def __repr__(self) -> str:
        if "target_r" not in vars(self):  # built by from_config: the rules say it all
            return super().__repr__()
        return (
            f"RelativeClipPolicy(target_r={self.target_r}, hard_r={self.hard_r}, "
            f"sustained_r={self.sustained_r})"
        )


class SafePolicy(RulePolicy):
    """For production: clip on r, skip non-finite steps and loss spikes, halt on repeated vetoes.

    Rules, in order:

    * ``nonfinite``: a NaN/inf update, measurement, loss or gradient norm → veto.
    * ``loss_spike``: the step's loss is more than ``spike_z`` standard deviations above
      its mean over the last ``spike_window`` steps (after ``spike_warmup`` steps) → veto.
      This is PaLM's remedy for loss spikes (skip the batches that cause them), applied
      online. It needs the loss in the report (a closure, ``guard.step(loss=…)`` or
      ``guard.observe(loss=…)``); without it the rule never fires.
    * ``clip_r``: r > ``target_r`` → clip to r = ``target_r`` (the radius controller).

    ``max_consecutive_vetoes`` vetoes in a row halt training: a run whose steps are all
    being skipped is not training, and a person should look.

    Args:
        target_r: c of the radius controller.
        spike_z: the z-score of a loss spike.
        spike_window: the window of the loss statistics.
        spike_warmup: steps of loss history before spikes are judged.
        max_consecutive_vetoes: vetoes in a row that halt training.
        restore_optimizer_state: a veto also restores the optimizer state; ``False``
            restores the parameters only and spares the guard its copy of the state.
    """

    def __init__(
        self,
        target_r: float = 1.0,
        spike_z: float = 6.0,
        spike_window: int = 100,
        spike_warmup: int = 20,
        max_consecutive_vetoes: int = 5,
        *,
        restore_optimizer_state: bool = True,
    ) -> None:
        if not (target_r > 0 and math.isfinite(target_r)):
            raise ValueError(f"target_r must be a positive finite number, got {target_r}")
        self.target_r = float(target_r)
        super().__init__(
            [
                _nonfinite(),
                Rule(
                    name="loss_spike",
                    condition=Spike(field="loss", z=spike_z, window=spike_window, warmup=spike_warmup),
                    action=Veto(),
                ),
                Rule(
                    name="clip_r",
                    condition=Threshold(field="r", op=">", value=self.target_r),
                    action=Clip(target=self.target_r),
                ),
            ],
            name="safe",
            max_consecutive_vetoes=max_consecutive_vetoes,
            restore_optimizer_state=restore_optimizer_state,
        )

    def __repr__(self) -> str:
        if "target_r" not in vars(self):  # built by from_config: the rules say it all
            return super().__repr__()
        return f"SafePolicy(target_r={self.target_r})"


PRESETS: dict[str, type[RulePolicy]] = {
    "monitor": MonitorPolicy,
    "clip": RelativeClipPolicy,
    "clip-fixed": ClipPolicy,
    "veto": VetoPolicy,
    "safe": SafePolicy,
}


def resolve_policy(policy: str | Path | Policy) -> Policy:
    """A :class:`Policy` from a preset name, a policy file, or as is.

    Args:
        policy: ``"monitor"``, ``"clip"``, ``"clip-fixed"``, ``"veto"``, ``"safe"``; a path ending in
            ``.yaml``, ``.yml``, ``.json`` or ``.toml``; or a :class:`Policy`.

    Returns:
        The policy (a new instance for a name or a file).

    Raises:
        ValueError: an unknown name, or an invalid policy file.
        TypeError: anything else.
    """
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, (str, Path)):
        if str(policy) in PRESETS:
            return PRESETS[str(policy)]()
        if Path(policy).suffix.lower() in SUFFIXES:
            return RulePolicy.from_path(policy)
        raise ValueError(
            f"unknown policy {str(policy)!r}; use one of {sorted(PRESETS)}, a policy file "
            f"({', '.join(SUFFIXES)}) or a Policy instance"
        )
    raise TypeError(f"policy must be a preset name or a Policy, got {type(policy).__name__}")
