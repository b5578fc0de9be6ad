"""``stepguard compare``: StepGuard side by side with the stabilizers users already run.

Protocol (one process; every method sees the same data, seed, steps and learning rates):

* **Methods.** ``plain`` AdamW; ``clip-norm``: ``torch.nn.utils.clip_grad_norm_(…, 1.0)``
  before AdamW; ``zclip``: ZClip (``mode="zscore", alpha=0.97, z_thresh=2.5``) before
  AdamW; ``spam`` and ``stable-spam``: the drop-in optimizers of ``pytorch_optimizer``;
  ``skipstep``: OLMo-core's ``SkipStepAdamW`` (loss and gradient norm handed over before
  every step); ``stepguard``: AdamW under ``StepGuard(policy="clip")``, measured every
  step; ``stepguard-budget``: the same in budget mode (``budget=0.10``);
  ``stepguard-fixed`` (and ``-fixed-budget``): the ``clip-fixed`` preset, r ≤ 1 on every
  step; ``stepguard-warmup``, ``-warmup10`` and ``-relative``: the candidates the ``clip``
  preset was chosen from (see :func:`warmup_clip_policy` and the Comparison page).
  Every AdamW-like optimizer keeps its own defaults except ``lr`` and weight decay 0.01.
  A peer whose package cannot be imported is reported as missing, never replaced.
* **Workloads** (:mod:`stepguard.tools.compare_workloads`): the digits MLP, the three
  models of the architecture grid, a byte-level transformer LM and a Hugging Face Llama on
  the English text that ships with Python.
* **Conditions.** ``none``: the constant learning rate; ``spike``: the learning rate
  multiplied by ``spike`` (1000) for ``spike_len`` steps from ``spike_at`` on (a third of
  the run), then back.
* **Scores** (:func:`summarize`): the final held-out score (accuracy, or validation loss
  for the language models), the worst held-out score from the spike on, loss spikes
  (:func:`count_loss_spikes`), the stable-LR range (:func:`stable_lrs`: LRs whose result
  is within 2 % of the best of all methods and LRs on that workload and condition), the
  wall-time ratio to ``plain``, and the gap to ``plain`` at plain's best LR.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from stepguard.guard import StepGuard
from stepguard.policy import (
    AllOf,
    Clip,
    NonFinite,
    Policy,
    RelativeClipPolicy,
    Rule,
    RulePolicy,
    Threshold,
    Veto,
)
from stepguard.report import json_ready
from stepguard.tools.compare_workloads import METRICS, WORKLOADS, Workload, build_workload, describe, needs

WEIGHT_DECAY = 0.01
CLIP_NORM = 1.0
TOLERANCE = 0.02  # the stable range: within 2 % of the best result
NO_COST = 0.005  # "no cost of safety": within 0.5 % of plain at plain's best LR
CONDITIONS = ("none", "spike")


# --------------------------------------------------------------------------- the candidate policy


def warmup_clip_policy(
    target_r: float = 1.0, early_target_r: float = 3.0, warmup_steps: int = 100
) -> RulePolicy:
    """The clip policy with a looser target during the first ``warmup_steps`` steps.

    Rules, in order: ``nonfinite`` (veto); ``clip_r_early``: before ``warmup_steps``,
    r > ``early_target_r`` → clip to ``early_target_r``; ``clip_r``: from ``warmup_steps``
    on, r > ``target_r`` → clip to ``target_r``. Adam's first steps have r ≈ 1–3 on
    language models (every coordinate moves by about the learning rate); clipping them to
    1 slows the start of every run, while a spike still meets a clip.
    """
    early = Threshold(field="step", op="<", value=float(warmup_steps))
    late = Threshold(field="step", op=">=", value=float(warmup_steps))
    return RulePolicy(
        [
            Rule(name="nonfinite", condition=NonFinite(), action=Veto()),
            Rule(
                name="clip_r_early",
                condition=AllOf(conditions=(early, Threshold(field="r", op=">", value=early_target_r))),
                action=Clip(target=early_target_r),
            ),
            Rule(
                name="clip_r",
                condition=AllOf(conditions=(late, Threshold(field="r", op=">", value=target_r))),
                action=Clip(target=target_r),
            ),
        ],
        name="clip-warmup",
    )


# --------------------------------------------------------------------------- methods


class Runner:
    """One method's optimizer around a model: ``param_groups`` to set the LR, ``step`` after backward."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
        self.optimizer = optimizer
        self.model = model

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, loss: Tensor, targets: Tensor) -> str:
        """Take the step; returns what happened to it (``allow``, ``clip``, ``veto``, ``skip``)."""
        self.optimizer.step()
        return "allow"

    def close(self) -> None:
        """Release what the method holds (a guard's sinks)."""


class ClipNormRunner(Runner):
    def step(self, loss: Tensor, targets: Tensor) -> str:
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP_NORM)
        self.optimizer.step()
        return "clip" if float(norm) > CLIP_NORM else "allow"


class ZClipRunner(Runner):
    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
        from zclip import ZClip

        super().__init__(optimizer, model)
        self.zclip = ZClip(mode="zscore", alpha=0.97, z_thresh=2.5)

    def step(self, loss: Tensor, targets: Tensor) -> str:
        self.zclip.step(self.model)
        self.optimizer.step()
        return "allow"


class SkipStepRunner(Runner):
    def step(self, loss: Tensor, targets: Tensor) -> str:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        self.optimizer.latest_loss = loss.detach()
        self.optimizer.latest_grad_norm = torch.nn.utils.get_total_norm(grads)
        self.optimizer.step()
        return "skip" if float(self.optimizer.step_skipped) > 0.5 else "allow"


class GuardRunner(Runner):
    def __init__(self, guard: StepGuard, model: nn.Module) -> None:
        super().__init__(guard, model)
        self.guard = guard
        self.r: list[float] = []
        self.scale: list[float] = []

    def step(self, loss: Tensor, targets: Tensor) -> str:
        report = self.guard.step(loss=loss.detach(), targets=targets)
        self.r.append(report.r)
        self.scale.append(report.scale)
        return report.action

    def close(self) -> None:
        self.guard.close()


def _adamw(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)


def _guarded(
    policy: Callable[[], str | Policy], budget: float | None = None
) -> Callable[[nn.Module, float], Runner]:
    def build(model: nn.Module, lr: float) -> Runner:
        return GuardRunner(StepGuard(_adamw(model, lr), model=model, policy=policy(), budget=budget), model)

    return build


def _spam(kind: str) -> Callable[[nn.Module, float], Runner]:
    def build(model: nn.Module, lr: float) -> Runner:
        optimizer = getattr(importlib.import_module("pytorch_optimizer"), kind)
        return Runner(optimizer(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY), model)

    return build


def _skipstep(model: nn.Module, lr: float) -> Runner:
    from olmo_core.optim import SkipStepAdamW

    return SkipStepRunner(SkipStepAdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY), model)


@dataclass(frozen=True)
class Method:
    """A stabilizer: how to build it around a model, and the package it needs (None: torch only)."""

    name: str
    description: str
    build: Callable[[nn.Module, float], Runner]
    module: str | None = None
    pip: str | None = None


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("plain", "AdamW", lambda model, lr: Runner(_adamw(model, lr), model)),
        Method(
            "clip-norm",
            f"clip_grad_norm_(max_norm={CLIP_NORM}) + AdamW",
            lambda model, lr: ClipNormRunner(_adamw(model, lr), model),
        ),
        Method(
            "zclip",
            'ZClip(mode="zscore", alpha=0.97, z_thresh=2.5) + AdamW',
            lambda model, lr: ZClipRunner(_adamw(model, lr), model),
            "zclip",
            "zclip",
        ),
        Method("spam", "pytorch_optimizer.SPAM", _spam("SPAM"), "pytorch_optimizer", "pytorch_optimizer"),
        Method(
            "stable-spam",
            "pytorch_optimizer.StableSPAM",
            _spam("StableSPAM"),
            "pytorch_optimizer",
            "pytorch_optimizer",
        ),
        Method(
            "skipstep",
            "olmo_core.optim.SkipStepAdamW (rolling 128, sigma 6)",
            _skipstep,
            "olmo_core.optim",
            "ai2-olmo-core",
        ),
        Method(
            "stepguard",
            'StepGuard(AdamW, policy="clip"): r > 10, r > 2 three steps in a row, or r > 1 and 3σ over '
            "its mean → r = 1; every step",
            _guarded(lambda: "clip"),
        ),
        Method(
            "stepguard-budget",
            'StepGuard(AdamW, policy="clip", budget=0.10)',
            _guarded(lambda: "clip", budget=0.10),
        ),
        Method(
            "stepguard-fixed",
            'StepGuard(AdamW, policy="clip-fixed"): r ≤ 1 on every step (the earlier clip preset)',
            _guarded(lambda: "clip-fixed"),
        ),
        Method(
            "stepguard-fixed-budget",
            'StepGuard(AdamW, policy="clip-fixed", budget=0.10)',
            _guarded(lambda: "clip-fixed", budget=0.10),
        ),
        Method(
            "stepguard-warmup",
            "StepGuard(AdamW, policy=warmup_clip_policy()): r ≤ 3 for 100 steps, then r ≤ 1",
            _guarded(warmup_clip_policy),
        ),
        Method(
            "stepguard-relative",
            "StepGuard(AdamW, policy=RelativeClipPolicy(sustained_r=None)): r > 10, or r > 1 and 3σ over "
            "its mean → r = 1",
            _guarded(lambda: RelativeClipPolicy(sustained_r=None)),
        ),
        Method(
            "stepguard-warmup10",
            "StepGuard(AdamW, policy=warmup_clip_policy(1, 2, 10)): r ≤ 2 for 10 steps, then r ≤ 1",
            _guarded(lambda: warmup_clip_policy(1.0, 2.0, 10)),
        ),
    )
}


def guard_method(name: str, policy: Callable[[], str | Policy], budget: float | None = None) -> Method:
    """A method that trains AdamW under a StepGuard with a fresh ``policy()`` (and ``budget``) per run."""
    return Method(name, f"StepGuard(AdamW, policy={name})", _guarded(policy, budget))


def resolve_methods(names: Iterable[str]) -> list[Method]:
    """The methods called ``names``.

    Raises:
        ValueError: an unknown name; the message lists the known ones.
    """
    names = list(names)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(map(repr, unknown))}; known: {', '.join(METHODS)}")
    return [METHODS[n] for n in names]


def missing_package(method: Method) -> str | None:
    """Why ``method`` cannot run here (``"zclip is not installed: pip install zclip"``), or None."""
    if method.module is None:
        return None
    try:
        importlib.import_module(method.module)
    except ImportError as exc:
        return f"{method.module} cannot be imported ({exc}): pip install {method.pip}"
    return None


# --------------------------------------------------------------------------- one run


@dataclass(frozen=True)
class Spike:
    """The injected learning-rate spike: ``factor`` × LR on steps ``[at, at + length)``."""

    factor: float = 1000.0
    at: int = 0
    length: int = 1

    def __post_init__(self) -> None:
        if not (self.factor > 0 and math.isfinite(self.factor)):
            raise ValueError(f"spike factor must be a positive finite number, got {self.factor}")
        if self.at < 0 or self.length < 1:
            raise ValueError(f"need spike at >= 0 and length >= 1, got {self.at}, {self.length}")

    def multiplier(self, step: int) -> float:
        return self.factor if self.at <= step < self.at + self.length else 1.0


def default_spike(steps: int, factor: float = 1000.0) -> Spike:
    """×``factor`` from a third of the run on, for a twentieth of it (at least one step)."""
    return Spike(factor=factor, at=steps // 3, length=max(1, steps // 20))


@dataclass
class RunResult:
    """One (workload, condition, method, LR) run."""

    workload: str
    condition: str
    method: str
    lr: float
    status: str = "ok"  # ok | diverged | missing | error
    note: str = ""
    final: float = math.nan
    final_val_loss: float = math.nan
    final_accuracy: float = math.nan
    worst_after_spike: float = math.nan
    loss_spikes: int = 0
    actions: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    eval_steps: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    r: list[float] = field(default_factory=list)
    scale: list[float] = field(default_factory=list)


def _score(workload: Workload, values: Mapping[str, float]) -> float:
    return values[workload.metric]


def _worse(workload: Workload, a: float, b: float) -> float:
    """The worse of two scores (NaN and inf count as worst)."""
    if not math.isfinite(a) or not math.isfinite(b):
        return math.nan if workload.higher_is_better else math.inf
    return min(a, b) if workload.higher_is_better else max(a, b)


def train(
    workload: Workload,
    method: Method,
    lr: float,
    *,
    seed: int = 0,
    spike: Spike | None = None,
    eval_every: int = 10,
    condition: str = "none",
) -> RunResult:
    """Train ``workload`` once with ``method`` at ``lr``; evaluation every ``eval_every`` steps.

    A run whose training loss turns non-finite stops there and is ``diverged``; so is a run
    that ends no better than it started (validation loss at least its initial value).
    """
    result = RunResult(workload.name, condition, method.name, lr)
    torch.manual_seed(seed)
    model = workload.make_model()
    model.train()
    initial = workload.evaluate(model)["val_loss"]
    runner = method.build(model, lr)
    batches = workload.batches(seed)
    start = time.perf_counter()
    try:
        for step in range(workload.steps):
            for group in runner.param_groups:
                group["lr"] = lr * (spike.multiplier(step) if spike else 1.0)
            batch = next(batches)
            loss = workload.loss(workload.forward(model, batch.inputs), batch.targets)
            runner.zero_grad()
            loss.backward()
            action = runner.step(loss, batch.targets)
            result.actions[action] = result.actions.get(action, 0) + 1
            result.losses.append(float(loss.detach()))
            if not math.isfinite(result.losses[-1]):
                result.status, result.note = "diverged", f"non-finite training loss at step {step}"
                break
            if (step + 1) % eval_every == 0 or step + 1 == workload.steps:
                result.eval_steps.append(step + 1)
                result.scores.append(_score(workload, workload.evaluate(model)))
    finally:
        result.seconds = time.perf_counter() - start
        runner.close()
    if isinstance(runner, GuardRunner):
        result.r, result.scale = runner.r, runner.scale
    _finish(result, workload, model, initial, spike)
    return result


def _finish(
    result: RunResult, workload: Workload, model: nn.Module, initial: float, spike: Spike | None
) -> None:
    worst_value = math.nan if workload.higher_is_better else math.inf
    if result.status == "diverged":
        result.final = result.worst_after_spike = worst_value
        result.final_val_loss = math.inf
    else:
        last = workload.evaluate(model)
        result.final, result.final_val_loss, result.final_accuracy = (
            _score(workload, last),
            last["val_loss"],
            last["accuracy"],
        )
        if not result.final_val_loss < initial:
            result.status, result.note = (
                "diverged",
                f"validation loss {result.final_val_loss:.4g} >= initial {initial:.4g}",
            )
        if spike is not None:
            after = [s for t, s in zip(result.eval_steps, result.scores, strict=True) if t > spike.at]
            worst = after[0] if after else result.final
            for value in after[1:]:
                worst = _worse(workload, worst, value)
            result.worst_after_spike = worst
    result.loss_spikes = count_loss_spikes(result.losses)


# --------------------------------------------------------------------------- the rules


def count_loss_spikes(
    losses: Sequence[float], window: int = 20, factor: float = 2.0, margin: float = 0.1, min_history: int = 5
) -> int:
    """Loss spikes: runs of consecutive steps whose loss is non-finite, or above both ``factor`` × m
    and m + ``margin``, where m is the median of the previous ``window`` finite losses (judged once
    ``min_history`` are known). Each run of such steps counts once.
    """
    count, inside = 0, False
    for t, value in enumerate(losses):
        history = [v for v in losses[max(0, t - window) : t] if math.isfinite(v)]
        if not math.isfinite(value):
            spike = True
        elif len(history) < min_history:
            spike = False
        else:
            m = statistics.median(history)
            spike = value > factor * m and value > m + margin
        count += spike and not inside
        inside = spike
    return count


def within(value: float, best: float, higher_is_better: bool, tolerance: float = TOLERANCE) -> bool:
    """Whether ``value`` is within ``tolerance`` (relative) of ``best``; non-finite values never are."""
    if not (math.isfinite(value) and math.isfinite(best)):
        return False
    slack = tolerance * abs(best)
    return value >= best - slack if higher_is_better else value <= best + slack


def best_of(values: Iterable[float], higher_is_better: bool) -> float:
    """The best finite value (NaN when there is none)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan
    return max(finite) if higher_is_better else min(finite)


def stable_lrs(
    results: Sequence[RunResult], best: float, higher_is_better: bool, tolerance: float = TOLERANCE
) -> list[float]:
    """The LRs of ``results`` whose final score is within ``tolerance`` of ``best`` (never a diverged run)."""
    return sorted(
        r.lr for r in results if r.status == "ok" and within(r.final, best, higher_is_better, tolerance)
    )


# --------------------------------------------------------------------------- the sweep


@dataclass(frozen=True)
class Settings:
    """What :func:`run_comparison` runs."""

    workloads: tuple[str, ...] = tuple(WORKLOADS)
    methods: tuple[str, ...] = tuple(METHODS)
    lrs: tuple[float, ...] | None = None  # None: each workload's own sweep
    conditions: tuple[str, ...] = CONDITIONS
    steps: int | None = None  # None: each workload's own
    spike: float = 1000.0
    seed: int = 0
    eval_every: int = 10
    threads: int = 1

    def __post_init__(self) -> None:
        unknown = [w for w in self.workloads if w not in WORKLOADS]
        if unknown:
            raise ValueError(
                f"unknown workload(s) {', '.join(map(repr, unknown))}; known: {', '.join(WORKLOADS)}"
            )
        resolve_methods(self.methods)
        bad = [c for c in self.conditions if c not in CONDITIONS]
        if bad:
            raise ValueError(f"unknown condition(s) {bad}; known: {', '.join(CONDITIONS)}")
        if self.lrs is not None and not all(lr > 0 and math.isfinite(lr) for lr in self.lrs):
            raise ValueError(f"learning rates must be positive and finite, got {self.lrs}")
        if self.threads < 1 or self.eval_every < 1:
            raise ValueError("threads and eval_every must be at least 1")


def _missing_row(workload: Workload, condition: str, method: Method, lr: float, why: str) -> RunResult:
    return RunResult(workload.name, condition, method.name, lr, status="missing", note=why)


def run_comparison(
    settings: Settings, *, progress: Callable[[RunResult], None] | None = None
) -> list[RunResult]:
    """Every workload × condition × method × LR of ``settings``; a method that cannot run: missing rows."""
    methods = resolve_methods(settings.methods)
    missing = {m.name: missing_package(m) for m in methods}
    results: list[RunResult] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        for name in settings.workloads:
            why_not = _workload_unavailable(name)
            workload = build_workload(name) if why_not is None else None
            for condition in settings.conditions:
                for method in methods:
                    for lr in settings.lrs or (workload.lrs if workload else (math.nan,)):
                        if workload is None:
                            row = RunResult(
                                name, condition, method.name, lr, status="missing", note=why_not or ""
                            )
                        else:
                            row = _one(workload, settings, condition, method, lr, missing[method.name])
                        results.append(row)
                        if progress is not None:
                            progress(row)
    finally:
        torch.set_num_threads(threads)
    return results


def _workload_unavailable(name: str) -> str | None:
    package = needs(name)
    if package is None:
        return None
    try:
        importlib.import_module(package)
    except ImportError as exc:
        return f"{package} cannot be imported ({exc}): pip install {package}"
    return None


def _one(
    workload: Workload, settings: Settings, condition: str, method: Method, lr: float, missing: str | None
) -> RunResult:
    if settings.steps is not None:
        workload = workload.with_steps(settings.steps)
    if missing is not None:
        return _missing_row(workload, condition, method, lr, missing)
    spike = default_spike(workload.steps, settings.spike) if condition == "spike" else None
    try:
        return train(
            workload,
            method,
            lr,
            seed=settings.seed,
            spike=spike,
            eval_every=settings.eval_every,
            condition=condition,
        )
    except (RuntimeError, ValueError, FloatingPointError) as exc:  # a method that raises on a bad step
        row = RunResult(
            workload.name, condition, method.name, lr, status="error", note=f"{type(exc).__name__}: {exc}"
        )
        row.final = row.worst_after_spike = math.nan if workload.higher_is_better else math.inf
        return row


# --------------------------------------------------------------------------- the summary


def summarize(results: Sequence[RunResult], settings: Settings) -> dict[str, Any]:
    """Per workload × condition: the best result, each method's stable LRs, time ratio and no-cost gap."""
    out: dict[str, Any] = {"workloads": {}, "overall": {}}
    keys = sorted(
        {(r.workload, r.condition) for r in results},
        key=lambda k: (list(settings.workloads).index(k[0]), CONDITIONS.index(k[1])),
    )
    for name, condition in keys:
        rows = [r for r in results if r.workload == name and r.condition == condition]
        higher = _higher(name)
        out["workloads"].setdefault(name, {})[condition] = _summarize_cell(rows, higher, condition)
    excluded = {
        name
        for name, cells in out["workloads"].items()
        if cells.get("none", {}).get("plain_diverges_everywhere")
    }
    for method in settings.methods:
        out["overall"][method] = {
            condition: sum(
                len(cells[condition]["methods"][method]["stable_lrs"])
                for name, cells in out["workloads"].items()
                if name not in excluded
                and condition in cells
                and method in cells[condition]["methods"]
                and cells[condition]["methods"][method]["status"] != "missing"
            )
            for condition in settings.conditions
        }
    out["excluded_workloads"] = sorted(excluded)
    return out


def _higher(workload: str) -> bool:
    return METRICS.get(workload, "accuracy") == "accuracy"


def _summarize_cell(rows: Sequence[RunResult], higher: bool, condition: str = "none") -> dict[str, Any]:
    """Best score, plain's best LR, and per method its stable LRs, time ratio and gap to plain.

    The gap to plain at plain's best LR (the cost of safety) is judged without a spike only.
    """
    ran = [r for r in rows if r.status in ("ok", "diverged", "error")]
    best = best_of((r.final for r in ran if r.status == "ok"), higher)
    plain = [r for r in rows if r.method == "plain" and r.status != "missing"]
    plain_seconds = sum(r.seconds for r in plain)
    plain_ok = [r for r in plain if r.status == "ok" and math.isfinite(r.final)]
    plain_best = max(plain_ok, key=lambda r: r.final if higher else -r.final, default=None)
    methods: dict[str, Any] = {}
    for method in dict.fromkeys(r.method for r in rows):
        mine = [r for r in rows if r.method == method]
        methods[method] = _summarize_method(
            mine, best, higher, plain_seconds, plain_best if condition == "none" else None
        )
    return {
        "best": best,
        "plain_best_lr": plain_best.lr if plain_best else None,
        "plain_diverges_everywhere": bool(plain) and all(r.status != "ok" for r in plain),
        "methods": methods,
    }


def _summarize_method(
    mine: Sequence[RunResult], best: float, higher: bool, plain_seconds: float, plain_best: RunResult | None
) -> dict[str, Any]:
    if all(r.status == "missing" for r in mine):
        return {"status": "missing", "note": mine[0].note, "stable_lrs": []}
    stable = stable_lrs(mine, best, higher)
    seconds = sum(r.seconds for r in mine)
    gap = math.nan
    if plain_best is not None:
        at = next((r for r in mine if r.lr == plain_best.lr), None)
        if at is not None and at.status == "ok":
            gap = (
                (plain_best.final - at.final) / abs(plain_best.final)
                if higher
                else ((at.final - plain_best.final) / abs(plain_best.final))
            )
        elif at is not None:
            gap = math.inf
    return {
        "status": "ran",
        "stable_lrs": stable,
        "stable_range": [stable[0], stable[-1]] if stable else None,
        "diverged_lrs": sorted(r.lr for r in mine if r.status != "ok"),
        "loss_spikes": sum(r.loss_spikes for r in mine),
        "time_ratio": seconds / plain_seconds if plain_seconds > 0 else math.nan,
        "gap_at_plain_best_lr": gap,
        "no_cost": bool(gap <= NO_COST) if math.isfinite(gap) else False,
    }


# --------------------------------------------------------------------------- tables, JSON, figure


def _fmt(value: float, higher: bool) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "—"
    return f"{value:.3f}"


def _lr(lr: float) -> str:
    return f"{lr:g}"


def format_rows(results: Sequence[RunResult]) -> str:
    """One markdown row per run: workload, condition, method, LR, status, scores, spikes, seconds."""
    lines = [
        "| workload | condition | method | lr | status | final | worst after spike | loss spikes | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        higher = _higher(r.workload)
        lines.append(
            f"| {r.workload} | {r.condition} | {r.method} | {_lr(r.lr)} | {r.status} | "
            f"{_fmt(r.final, higher)} | "
            f"{_fmt(r.worst_after_spike, higher)} | {r.loss_spikes} | {r.seconds:.2f} |"
        )
    return "\n".join(lines)


def format_tables(results: Sequence[RunResult], summary: Mapping[str, Any]) -> str:
    """Per workload × condition, a markdown table: a column per LR (final, worst after the spike), scores."""
    blocks = []
    for name, cells in summary["workloads"].items():
        higher = _higher(name)
        metric = (
            "test accuracy (higher is better)" if higher else "validation loss, nats/byte (lower is better)"
        )
        for condition, cell in cells.items():
            rows = [r for r in results if r.workload == name and r.condition == condition]
            lrs = sorted({r.lr for r in rows})
            title = f"### {name}, {'LR spike ×1000' if condition == 'spike' else 'no spike'}: {metric}"
            note = ""
            if cell["plain_diverges_everywhere"] and condition == "none":
                note = "\n\nPlain AdamW diverges at every LR here without a spike: left out of the totals."
            elif cell["plain_diverges_everywhere"]:
                note = "\n\nPlain AdamW diverges at every LR under the spike."
            what = "final (worst after the spike)" if condition == "spike" else "final"
            head = [
                "method",
                *(f"lr {_lr(lr)}" for lr in lrs),
                "stable LRs",
                "loss spikes",
                "time ×",
                "gap at plain's best LR",
            ]
            lines = [
                title + note,
                "",
                f"Cells: {what}; **bold**: within 2 % of the best ({_fmt(cell['best'], higher)}).",
                "",
                "| " + " | ".join(head) + " |",
                "|" + "---|" * len(head),
            ]
            for method, info in cell["methods"].items():
                lines.append(_method_line(method, info, rows, lrs, cell["best"], higher, condition))
            blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _method_line(
    method: str,
    info: Mapping[str, Any],
    rows: Sequence[RunResult],
    lrs: Sequence[float],
    best: float,
    higher: bool,
    condition: str,
) -> str:
    if info["status"] == "missing":
        return f"| {method} | missing: {info['note']} |" + " |" * (len(lrs) + 3)
    cells = []
    for lr in lrs:
        r = next((x for x in rows if x.method == method and x.lr == lr), None)
        if r is None:
            cells.append("")
            continue
        text = "diverged" if r.status != "ok" else _fmt(r.final, higher)
        if r.status == "ok" and within(r.final, best, higher):
            text = f"**{text}**"
        if condition == "spike" and r.status == "ok":
            text += f" ({_fmt(r.worst_after_spike, higher)})"
        cells.append(text)
    stable = info["stable_lrs"]
    span = f"{_lr(stable[0])}–{_lr(stable[-1])} ({len(stable)})" if stable else "none"
    gap = info["gap_at_plain_best_lr"]
    gap_text = (
        "—"
        if not isinstance(gap, float) or math.isnan(gap)
        else ("diverged" if math.isinf(gap) else f"{100 * gap:+.2f} %")
    )
    return (
        f"| {method} | " + " | ".join(cells) + f" | {span} | {info['loss_spikes']} | "
        f"{info['time_ratio']:.2f} | {gap_text} |"
    )


def format_overall(summary: Mapping[str, Any], settings: Settings) -> str:
    """Per method: stable (workload, LR) cells summed over the workloads, per condition."""
    head = [
        "method",
        *(f"stable cells, {'spike' if c == 'spike' else 'no spike'}" for c in settings.conditions),
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, counts in summary["overall"].items():
        lines.append(f"| {method} | " + " | ".join(str(counts[c]) for c in settings.conditions) + " |")
    if summary["excluded_workloads"]:
        lines.append("")
        lines.append("Left out (plain diverges at every LR): " + ", ".join(summary["excluded_workloads"]))
    return "\n".join(lines)


def write_json(
    path: Path,
    settings: Settings,
    results: Sequence[RunResult],
    summary: Mapping[str, Any],
    *,
    history: bool = False,
) -> None:
    """The settings, one record per run (curves only with ``history``) and the summary, as strict JSON."""
    drop = () if history else ("losses", "r", "scale", "eval_steps", "scores")
    rows = [{k: v for k, v in asdict(r).items() if k not in drop} for r in results]
    payload = {
        "settings": asdict(settings),
        "workloads": {
            n: describe(build_workload(n)) for n in settings.workloads if _workload_unavailable(n) is None
        },
        "methods": {n: METHODS[n].description for n in settings.methods},
        "torch": torch.__version__,
        "runs": rows,
        "summary": summary,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_ready(payload), indent=1, allow_nan=False) + "\n")


def load_runs(paths: Sequence[Path]) -> tuple[Settings, list[RunResult], float]:
    """Settings (workloads and methods joined in order), runs and summed wall time of comparison files."""
    settings: Settings | None = None
    results: list[RunResult] = []
    wall = 0.0
    for path in paths:
        payload = json.loads(path.read_text())
        fields = {**payload["settings"]}
        fields.update({k: tuple(v) for k, v in fields.items() if isinstance(v, list)})
        mine = Settings(**fields)
        if settings is None:
            settings = mine
        else:
            workloads = settings.workloads + tuple(w for w in mine.workloads if w not in settings.workloads)
            methods = settings.methods + tuple(m for m in mine.methods if m not in settings.methods)
            settings = Settings(**{**asdict(settings), "workloads": workloads, "methods": methods})
        for row in payload["runs"]:
            row = {k: (float(v) if v in ("nan", "inf", "-inf") else v) for k, v in row.items()}
            results.append(RunResult(**row))
        wall += float(payload["summary"].get("wall_seconds", 0.0))
    if settings is None:
        raise ValueError("--from-json needs at least one file")
    return settings, results, wall


def plot(path: Path, results: Sequence[RunResult], summary: Mapping[str, Any]) -> None:
    """Result vs LR per method: a row of panels per workload, a column per condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["workloads"])
    every = list(dict.fromkeys(r.method for r in results))
    palette = plt.get_cmap("tab20")
    colors = {m: palette((2 * k) % 20 + (2 * k) // 20) for k, m in enumerate(every)}
    conditions = sorted({c for cells in summary["workloads"].values() for c in cells}, key=CONDITIONS.index)
    fig, axes = plt.subplots(
        len(names), len(conditions), figsize=(5.5 * len(conditions), 2.8 * len(names)), squeeze=False
    )
    for i, name in enumerate(names):
        for j, condition in enumerate(conditions):
            ax = axes[i][j]
            rows = [
                r
                for r in results
                if r.workload == name and r.condition == condition and r.status != "missing"
            ]
            for method in dict.fromkeys(r.method for r in rows):
                mine = sorted((r for r in rows if r.method == method), key=lambda r: r.lr)
                ys = [r.final if r.status == "ok" else math.nan for r in mine]
                ax.plot(
                    [r.lr for r in mine],
                    ys,
                    marker="o",
                    ms=3,
                    label=method,
                    color=colors[method],
                    ls="-" if method.startswith("stepguard") else "--",
                    lw=2.0 if method.startswith("stepguard") else 1.0,
                )
            ax.set_xscale("log")
            ax.set_title(f"{name}, {'LR spike ×1000' if condition == 'spike' else 'no spike'}", fontsize=9)
            ax.set_ylabel("test accuracy" if _higher(name) else "val loss (nats/byte)", fontsize=8)
            ax.tick_params(labelsize=7)
    axes[-1][0].set_xlabel("learning rate")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8)
    fig.tight_layout(rect=(0, 0.04 + 0.01 * (len(labels) > 5), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------- command line


DESCRIPTION = (
    "StepGuard side by side with gradient-norm clipping, ZClip, SPAM, StableSPAM and SkipStepAdamW: the "
    "same data, seeds and steps, over a learning-rate sweep, with and without a x1000 learning-rate spike; "
    "writes comparison.json and comparison.md (and a figure with --plot)."
)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m stepguard.tools.compare`` (the flags of ``stepguard compare``)."""
    parser = argparse.ArgumentParser(
        prog="stepguard compare",
        description=DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``stepguard compare``."""
    parser.add_argument(
        "--workloads", default=",".join(WORKLOADS), help=f"comma list from {', '.join(WORKLOADS)}"
    )
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma list from {', '.join(METHODS)}")
    parser.add_argument(
        "--lrs", default=None, help="comma list of learning rates (default: 1e-4,1e-3,1e-2,1e-1,1)"
    )
    parser.add_argument("--conditions", default=",".join(CONDITIONS), help="none, spike or both")
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps of every run (default: per workload)"
    )
    parser.add_argument("--spike", type=float, default=1000.0, help="LR multiplier during the spike")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=10, help="steps between held-out evaluations")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default="runs/compare", help="folder for comparison.json and comparison.md")
    parser.add_argument("--plot", default=None, metavar="PNG", help="also draw result vs LR per method")
    parser.add_argument(
        "--history", action="store_true", help="keep per-step curves (loss, r, scale) in the JSON"
    )
    parser.add_argument("--quiet", action="store_true", help="no line per run")
    parser.add_argument(
        "--from-json",
        nargs="+",
        default=None,
        metavar="JSON",
        help="run nothing: merge the runs of earlier comparison.json files (e.g. workloads run in separate "
        "processes) and write the tables, JSON and figure again",
    )
    return parser


def _split(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _progress(row: RunResult) -> None:
    print(
        f"{row.workload:<16} {row.condition:<5} {row.method:<16} lr {_lr(row.lr):<7} {row.status:<8} "
        f"final {row.final:.4g}  worst after spike {row.worst_after_spike:.4g}  spikes {row.loss_spikes}  "
        f"{row.seconds:.1f} s {row.note}",
        file=sys.stderr,
        flush=True,
    )


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The :class:`Settings` of parsed flags.

    Raises:
        ValueError: an unknown workload, method or condition (naming the known ones), or a bad number.
    """
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    return Settings(
        workloads=_split(args.workloads),
        methods=_split(args.methods),
        lrs=tuple(float(v) for v in _split(args.lrs)) if args.lrs else None,
        conditions=_split(args.conditions),
        steps=args.steps,
        spike=args.spike,
        seed=args.seed,
        eval_every=args.eval_every,
        threads=args.threads,
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Run the comparison for parsed flags; print the tables; write ``comparison.json``/``.md`` in ``--out``.

    Raises:
        ValueError: bad flags, or ``--plot`` without matplotlib (checked before anything runs).
    """
    settings = settings_from_args(args)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("--plot needs matplotlib: pip install -e '.[plot]'") from None
    start = time.perf_counter()
    if args.from_json:
        settings, results, wall = load_runs([Path(p) for p in args.from_json])
    else:
        results = run_comparison(settings, progress=None if args.quiet else _progress)
        wall = time.perf_counter() - start
    summary = summarize(results, settings)
    summary["wall_seconds"] = wall
    out = Path(args.out)
    write_json(out / "comparison.json", settings, results, summary, history=args.history)
    text = format_tables(results, summary) + "\n\n## Totals\n\n" + format_overall(summary, settings) + "\n"
    (out / "comparison.md").write_text(text)
    print(text)
    print(f"wall time {wall:.0f} s; written {out / 'comparison.json'} and {out / 'comparison.md'}")
    if args.plot:
        plot(Path(args.plot), results, summary)
        print(f"figure written to {args.plot}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stepguard.tools.compare``: :func:`run_from_args`; bad input exits 2 with one line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))


if __name__ == "__main__":
    sys.exit(main())
