"""Replaying a run from its checkpoints: one :class:`~stepguard.StepReport` per transition.

The transition from checkpoint t to t+1 is the update Δθ = θ_{t+1} − θ_t, measured at θ_t
(parameters and buffers of checkpoint t) on the probe with the same functions the live guard
uses (:mod:`stepguard.measure`): a guard that saw the same batch reports the same τ, ρ_a and
r. Every checkpoint is also evaluated on the probe (loss, accuracy, per-sample loss and
correctness) for the loss curves, negative flips and CLD scores.

A checkpoint that cannot be read or does not match the model is recorded and skipped: the
two transitions touching it are reported missing, unless ``bridge=True`` measures the
update from the checkpoint before it to the one after it in their place.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from stepguard.analysis.checkpoints import CheckpointFile, LoadedState, load_state, resolve
from stepguard.analysis.errors import AnalysisError, CheckpointError, NoCheckpointsError
from stepguard.analysis.metrics import (
    RowEvaluation,
    cld_coreset,
    cld_ranking,
    cld_scores,
    evaluate_rows,
    flip_rate,
)
from stepguard.analysis.model import Factory, build_model
from stepguard.analysis.probe import Probe, check_targets, probe_logits
from stepguard.config import GuardConfig
from stepguard.geometry.jvp import Batch, Mode
from stepguard.geometry.logits import LogitsFn
from stepguard.measure import build_report, global_norm, measure_update, sync_to_host
from stepguard.report import StepReport

logger = logging.getLogger("stepguard.analysis")

Progress = Callable[[int, int, str], None]

FLAG_R = "r>=1"
FLAG_NON_FINITE = "non-finite"
FLAG_SC_RISING = "sc-rising"


@dataclass(frozen=True)
class Transition:
    """The measured update between two checkpoints.

    Attributes:
        step_from, step_to: the checkpoints' steps (``report.step`` is ``step_from``).
        checkpoint_from, checkpoint_to: their file names.
        report: the :class:`StepReport` (``source="replay"``); the probe loss at θ_from is
            ``report.loss``; ``report.extras`` holds ``accuracy`` and, when asked for,
            ``val_loss``, ``val_accuracy``, ``negative_flip_rate`` and ``negative_flips``.
        binding_radii: the top-2 radius of each sample in ``report.binding`` (same order).
        bridged: the update spans a skipped checkpoint.
        flags: why the transition is flagged (``"r>=1"``, ``"non-finite"``, ``"sc-rising"``).
    """

    step_from: int
    step_to: int
    checkpoint_from: str
    checkpoint_to: str
    report: StepReport
    binding_radii: tuple[float, ...] = ()
    bridged: bool = False
    flags: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The report's JSON dict plus ``step_from``, ``step_to``, the files, radii and flags."""
        out = self.report.to_dict()
        out.update(
            step_from=self.step_from,
            step_to=self.step_to,
            checkpoint_from=self.checkpoint_from,
            checkpoint_to=self.checkpoint_to,
            binding_radii=[_json_float(v) for v in self.binding_radii],
            bridged=self.bridged,
            flags=list(self.flags),
        )
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Transition:
        """Inverse of :meth:`to_dict`."""
        own = {f.name for f in dataclasses.fields(cls)} - {"report"}
        report = StepReport.from_dict({k: v for k, v in data.items() if k not in own})
        radii = [float(v) for v in data.get("binding_radii", ())]
        return cls(
            step_from=int(data["step_from"]),
            step_to=int(data["step_to"]),
            checkpoint_from=str(data["checkpoint_from"]),
            checkpoint_to=str(data["checkpoint_to"]),
            report=report,
            binding_radii=tuple(radii),
            bridged=bool(data.get("bridged", False)),
            flags=tuple(data.get("flags", ())),
        )


def _json_float(value: float) -> float | str:
    return (
        value if math.isfinite(value) else ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))
    )


@dataclass(frozen=True)
class CheckpointRecord:
    """One checkpoint: whether it was used, and the probe's loss and accuracy there.

    ``loss``/``accuracy`` are measured as the transitions are (``mode``); ``val_loss`` and
    ``val_accuracy`` on the validation probe in eval mode.
    """

    step: int
    path: str
    ok: bool
    error: str | None = None
    source: str | None = None
    prefix: str | None = None
    loss: float | None = None
    accuracy: float | None = None
    val_loss: float | None = None
    val_accuracy: float | None = None


@dataclass(frozen=True)
class MissingTransition:
    """A transition between consecutive checkpoints that was not measured, and why."""

    step_from: int
    step_to: int
    checkpoint_from: str
    checkpoint_to: str
    reason: str


@dataclass(frozen=True)
class CLDResult:
    """CLD scores of the probe's samples (``scores[i]`` belongs to probe sample ``indices[i]``)."""

    indices: list[int]
    labels: list[int]
    scores: list[float]
    ranking: dict[int, list[int]]
    coreset: list[int] | None
    checkpoints: int


@dataclass
class AnalysisResult:
    """Everything one analysis produced (see :func:`analyze`)."""

    transitions: list[Transition]
    checkpoints: list[CheckpointRecord]
    missing: list[MissingTransition]
    cld: CLDResult | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def flagged(self) -> list[Transition]:
        """The transitions with at least one flag."""
        return [t for t in self.transitions if t.flags]


@dataclass
class _Good:
    index: int
    file: CheckpointFile
    state: dict[str, Any]
    measured: RowEvaluation
    plain: RowEvaluation | None
    val: RowEvaluation | None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"cpu"`` (default), ``"cuda"``/``"cuda:N"``, or ``"auto"`` (CUDA when available).

    Raises:
        AnalysisError: CUDA was asked for and is not available.
    """
    text = str(device or "cpu")
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(text)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AnalysisError(f"--device {text}: CUDA is not available on this machine (use cpu)")
    return dev


def analyze(
    checkpoints: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    model: Factory | nn.Module,
    probe: Probe,
    *,
    validation: Probe | None = None,
    mode: Mode | None = None,
    device: str | torch.device | None = "cpu",
    flips: bool = False,
    cld: bool = False,
    cld_fraction: float | None = None,
    bridge: bool = False,
    strict: bool = False,
    key: str | None = None,
    prefix: str | None = None,
    unsafe_load: bool = False,
    config: GuardConfig | None = None,
    logits_fn: LogitsFn | None = None,
    seed: int = 0,
    r_limit: float = 1.0,
    sc_rise: float = 0.01,
    progress: Progress | None = None,
) -> AnalysisResult:
    """Measure every transition between consecutive checkpoints of a run.

    Args:
        checkpoints: a directory (files ordered by the step in their names) or a list of files
            in order.
        model: a zero-argument factory building the network (or the module itself).
        probe: the data the transitions are measured on.
        validation: a second probe, for CLD scores (and validation loss and accuracy).
        mode: ``"train"`` (default) measures the training function (dropout drawn from
            ``seed``, batch statistics); ``"eval"`` the inference one. Overrides ``config.mode``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``.
        flips: compute the negative-flip rate of each transition (eval mode).
        cld: compute CLD scores from the per-sample losses (needs ``validation`` with targets
            and 3 or more usable checkpoints).
        cld_fraction: also select a coreset: the top fraction of each class.
        bridge: measure across a skipped checkpoint instead of reporting both transitions
            touching it as missing.
        strict: stop at the first bad checkpoint instead of skipping it.
        key, prefix: where the state dict lies in each file, and the key prefix to strip
            (both detected by default).
        unsafe_load: allow pickled Python objects in checkpoints (trusted files only).
        config: measurement settings (binding_k, temperature, ignore_index, estimator).
        logits_fn: picks the logits from the model's output.
        seed: seed of the random numbers the replayed forward draws (dropout).
        r_limit: transitions with r at or above it are flagged (the paper's r = 1).
        sc_rise: transitions whose softmax-collapse fraction rose by this much or more since
            the previous transition are flagged.
        progress: called as ``progress(done, total, text)`` after each checkpoint.

    Raises:
        NoCheckpointsError: no checkpoint, or fewer than two usable ones.
        FactoryError, ProbeError, CheckpointError (with ``strict``): see their messages.
    """
    start = time.perf_counter()
    files = resolve(checkpoints)
    base = config or GuardConfig()
    cfg = base if mode is None else base.model_copy(update={"mode": mode})
    dev = resolve_device(device)
    net = build_model(model).to(dev)
    net.train()
    probe = probe.to(dev)
    validation = validation.to(dev) if validation is not None else None
    if (flips or cld) and probe.targets is None:
        raise AnalysisError(f"negative flips and CLD scores need targets: probe {probe.name} has none")
    if cld and (validation is None or validation.targets is None):
        raise AnalysisError("CLD scores need a validation probe with targets (--validation FILE)")
    replay = _Replay(net, probe, validation, cfg, logits_fn, seed, flips or cld)

    records: list[CheckpointRecord] = []
    transitions: list[Transition] = []
    failures: dict[tuple[int, int], str] = {}
    measured: set[tuple[int, int]] = set()
    good: list[_Good] = []
    for i, ckpt in enumerate(files):
        try:
            loaded = load_state(ckpt.path, net, key=key, prefix=prefix, unsafe=unsafe_load)
        except CheckpointError as exc:
            if strict:
                raise
            logger.info("skipping %s", exc)
            records.append(CheckpointRecord(step=ckpt.step, path=str(ckpt.path), ok=False, error=exc.problem))
            _tick(progress, i + 1, len(files), f"{ckpt.name}: skipped")
            continue
        prev = good[-1] if good else None
        pending: tuple[StepReport, tuple[float, ...], float] | None = None
        if prev is not None and (prev.index == i - 1 or bridge):
            try:
                pending = replay.transition(prev, loaded.state)
            except (RuntimeError, ValueError) as exc:
                failures[(prev.index, i)] = f"measurement failed: {type(exc).__name__}: {exc}"
                logger.info("transition %s -> %s: %s", prev.file.name, ckpt.name, exc)
        try:
            current = replay.enter(i, ckpt, loaded)
        except CheckpointError as exc:
            if strict:
                raise
            records.append(CheckpointRecord(step=ckpt.step, path=str(ckpt.path), ok=False, error=exc.problem))
            _tick(progress, i + 1, len(files), f"{ckpt.name}: skipped")
            continue
        good.append(current)
        records.append(replay.record(current, loaded))
        if pending is not None and prev is not None:
            transitions.append(replay.finish(prev, current, *pending, flips=flips))
            measured.add((prev.index, i))
        last = transitions[-1].report.r if transitions and pending is not None else None
        _tick(progress, i + 1, len(files), ckpt.name + (f"  r={last:.3g}" if last is not None else ""))

    if len(good) < 2:
        bad = [r for r in records if not r.ok]
        problems = "; ".join(f"{r.path}: {r.error}" for r in bad[:3])
        if len(bad) > 3:
            problems += f"; … and {len(bad) - 3} more"
        raise NoCheckpointsError(
            f"{len(good)} of {len(files)} checkpoints could be used; a transition needs two"
            + (f" ({problems})" if problems else "")
        )
    transitions = flag_transitions(transitions, r_limit=r_limit, sc_rise=sc_rise)
    missing = _missing(files, measured, transitions, records, failures)
    notes: list[str] = []
    cld_result = None
    if cld:
        cld_result, note = replay.cld(good, cld_fraction)
        if note:
            notes.append(note)
    settings = {
        "checkpoints": len(files),
        "usable_checkpoints": len(good),
        "probe": probe.name,
        "probe_size": probe.size,
        "validation": validation.name if validation is not None else None,
        "mode": cfg.mode,
        "device": str(dev),
        "model": type(net).__name__,
        "flips": flips,
        "cld": cld,
        "bridge": bridge,
        "seed": seed,
        "r_limit": r_limit,
        "sc_rise": sc_rise,
    }
    return AnalysisResult(
        transitions=transitions,
        checkpoints=records,
        missing=missing,
        cld=cld_result,
        settings=settings,
        notes=notes,
        seconds=time.perf_counter() - start,
    )


def _tick(progress: Progress | None, done: int, total: int, text: str) -> None:
    if progress is not None:
        progress(done, total, text)


class _Replay:
    """The model, the probes and the measurement settings of one analysis."""

    def __init__(
        self,
        model: nn.Module,
        probe: Probe,
        validation: Probe | None,
        config: GuardConfig,
        logits_fn: LogitsFn | None,
        seed: int,
        plain: bool,
    ) -> None:
        self.model = model
        self.probe = probe
        self.validation = validation
        self.config = config
        self.logits_fn = logits_fn
        self.batch: Batch = probe.batch(seed=seed)
        self.val_batch: Batch | None = validation.batch(seed=seed) if validation is not None else None
        self.plain = plain
        self.estimator = config.estimator
        # every row's top-2 radius comes to the host whole, so the binding samples' radii
        # need no second JVP; spreads beyond config.max_spread_values are dropped afterwards
        rows = max(probe.size, 1) * _rows_per_sample(probe)
        self.measure_config = config.model_copy(
            update={"max_spread_values": max(config.max_spread_values, rows)}
        )
        self.checked: set[int] = set()

    # ------------------------------------------------------------ checkpoints

    def evaluate(self, probe: Probe, batch: Batch, mode: Mode) -> RowEvaluation:
        logits = probe_logits(self.model, probe, batch, mode=mode, logits_fn=self.logits_fn)
        if id(probe) not in self.checked:
            check_targets(probe, logits, ignore_index=self.config.ignore_index)
            self.checked.add(id(probe))
        return evaluate_rows(
            logits,
            probe.targets,
            probe.mask,
            ignore_index=self.config.ignore_index,
            temperature=self.config.temperature,
        )

    def enter(self, index: int, ckpt: CheckpointFile, loaded: LoadedState) -> _Good:
        """Load a checkpoint into the model and evaluate the probes there."""
        try:
            self.model.load_state_dict(loaded.state)
        except RuntimeError as exc:
            raise CheckpointError(str(ckpt.path), f"does not load into the model ({exc})") from exc
        measured = self.evaluate(self.probe, self.batch, self.config.mode)
        plain = None
        if self.plain:
            plain = measured if self.config.mode == "eval" else self.evaluate(self.probe, self.batch, "eval")
        val = None
        if self.validation is not None and self.val_batch is not None:
            val = self.evaluate(self.validation, self.val_batch, "eval")
        return _Good(index, ckpt, loaded.state, measured, plain, val)

    def record(self, good: _Good, loaded: LoadedState) -> CheckpointRecord:
        return CheckpointRecord(
            step=good.file.step,
            path=str(good.file.path),
            ok=True,
            source=loaded.source,
            prefix=loaded.prefix,
            loss=good.measured.mean_loss,
            accuracy=good.measured.accuracy,
            val_loss=good.val.mean_loss if good.val is not None else None,
            val_accuracy=good.val.accuracy if good.val is not None else None,
        )

    # ------------------------------------------------------------ transitions

    def transition(
        self, prev: _Good, state_to: Mapping[str, Any]
    ) -> tuple[StepReport, tuple[float, ...], float]:
        """Measure θ_to − θ_from at θ_from (the model must hold ``prev``'s state)."""
        start = time.perf_counter()
        theta0 = {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}
        update = {n: state_to[n].to(device=p.device, dtype=p.dtype) - p for n, p in theta0.items()}
        tau = global_norm(list(update.values()))
        used, scalars, vectors = measure_update(
            self.model,
            theta0,
            update,
            tau,
            self.batch,
            config=self.measure_config,
            targets=self.probe.targets,
            mask=self.probe.mask,
            logits_fn=self.logits_fn,
            estimator=self.estimator,
        )
        if self.estimator == "auto" and used == "finite_difference":
            self.estimator = "finite_difference"
        values = sync_to_host({"tau": tau, **scalars}, vectors)
        report = build_report(
            values,
            step=prev.file.step,
            estimator=used,
            measured=True,
            loss=prev.measured.mean_loss,
            source="replay",
            binding_k=self.config.binding_k,
        )
        radii = self._binding_radii(values, report, update)
        if len(report.spread.values) > self.config.max_spread_values:
            report = dataclasses.replace(report, spread=dataclasses.replace(report.spread, values=()))
        return report, radii, time.perf_counter() - start

    def _binding_radii(
        self, values: Mapping[str, Any], report: StepReport, update: dict[str, Tensor]
    ) -> tuple[float, ...]:
        """The top-2 radius of each binding sample: from the measured rows when they came to
        the host whole (the usual case), else from one more JVP (:func:`stepguard.radius`)."""
        if not report.binding:
            return ()
        if "top2" in values:
            top2 = values["top2"]
            positions = values.get("positions") or range(len(top2))
            where = {int(p): i for i, p in enumerate(positions)}
            return tuple(float(top2[where[b]]) for b in report.binding if b in where)
        if not (report.tau > 0 and math.isfinite(report.tau)):
            return ()
        from stepguard.geometry.api import radius

        try:
            result = radius(
                self.model,
                self.batch,
                direction=update,
                logits_fn=self.logits_fn,
                targets=self.probe.targets,
                mask=self.probe.mask,
                ignore_index=self.config.ignore_index,
                temperature=self.config.temperature,
                mode=self.config.mode,
                estimator=self.estimator,
            )
        except ValueError:
            return ()
        assert not isinstance(result, list)
        top2_t = result.top2.detach().to(torch.float64).cpu()
        if result.positions is None:
            rows = list(report.binding)
        else:
            where = {int(p): i for i, p in enumerate(result.positions.tolist())}
            rows = [where[b] for b in report.binding if b in where]
        return tuple(float(top2_t[r]) for r in rows)

    def finish(
        self,
        prev: _Good,
        current: _Good,
        report: StepReport,
        radii: tuple[float, ...],
        seconds: float,
        *,
        flips: bool,
    ) -> Transition:
        """The transition's record, with accuracy, validation and flip metrics in ``extras``."""
        extras: dict[str, float] = {}
        if prev.measured.accuracy is not None:
            extras["accuracy"] = prev.measured.accuracy
        if prev.val is not None:
            if prev.val.mean_loss is not None:
                extras["val_loss"] = prev.val.mean_loss
            if prev.val.accuracy is not None:
                extras["val_accuracy"] = prev.val.accuracy
        if flips and prev.plain is not None and current.plain is not None:
            rate, count = flip_rate(prev.plain, current.plain)
            extras["negative_flip_rate"] = rate
            extras["negative_flips"] = float(count)
        report = dataclasses.replace(report, extras=extras, timings={"measure": seconds})
        return Transition(
            step_from=prev.file.step,
            step_to=current.file.step,
            checkpoint_from=prev.file.name,
            checkpoint_to=current.file.name,
            report=report,
            binding_radii=radii,
            bridged=current.index - prev.index > 1,
        )

    # ------------------------------------------------------------ CLD

    def cld(self, good: Sequence[_Good], fraction: float | None) -> tuple[CLDResult | None, str | None]:
        if len(good) < 3:
            return None, f"CLD scores need 3 or more usable checkpoints, got {len(good)}: skipped"
        first = good[0].plain
        if first is None or len(first.shape) > 2:
            return None, "CLD scores need one row of logits per sample (no sequence outputs): skipped"
        train = torch.stack([g.plain.loss for g in good if g.plain is not None and g.plain.loss is not None])
        val = torch.stack([g.val.loss for g in good if g.val is not None and g.val.loss is not None])
        labels = first.targets
        val_labels = good[0].val.targets if good[0].val is not None else None
        if labels is None or val_labels is None:
            return None, "CLD scores need targets in both probes: skipped"
        scores = cld_scores(train, labels, val, val_labels)
        indices = (
            list(range(labels.numel())) if first.positions is None else [int(p) for p in first.positions]
        )
        local = cld_ranking(scores, labels)
        ranking = {c: [indices[j] for j in members] for c, members in local.items()}
        coreset = cld_coreset(ranking, fraction) if fraction is not None else None
        return (
            CLDResult(
                indices=indices,
                labels=[int(v) for v in labels.tolist()],
                scores=[float(v) for v in scores.tolist()],
                ranking=ranking,
                coreset=coreset,
                checkpoints=len(good),
            ),
            None,
        )


def _rows_per_sample(probe: Probe) -> int:
    for value in (probe.targets, probe.mask):
        if value is not None and value.ndim > 1:
            return int(value[0].numel())
    return 1


R_TOLERANCE = 1e-6


def flag_transitions(
    transitions: Sequence[Transition], *, r_limit: float = 1.0, sc_rise: float = 0.01
) -> list[Transition]:
    """Set each transition's flags: r ≥ ``r_limit``, a non-finite number, or a rising SC fraction.

    r counts as reaching the limit within a relative 10⁻⁶, the rounding of a replayed step
    that a ``clip`` policy cut to r = 1 exactly. SC rises when the softmax-collapse fraction
    grew by ``sc_rise`` or more (a fraction of the probe) since the previous transition.
    """
    out: list[Transition] = []
    last_sc: float | None = None
    for t in transitions:
        rep = t.report
        flags: list[str] = []
        if rep.r >= r_limit * (1 - R_TOLERANCE):
            flags.append(FLAG_R)
        numbers = [rep.tau, rep.r, rep.loss if rep.loss is not None else 0.0]
        if any(not math.isfinite(v) for v in numbers) or math.isnan(rep.rho_a):
            flags.append(FLAG_NON_FINITE)
        sc = rep.sc_fraction
        if sc is not None and last_sc is not None and sc - last_sc >= sc_rise and sc > last_sc:
            flags.append(FLAG_SC_RISING)
        if sc is not None and not math.isnan(sc):
            last_sc = sc
        out.append(dataclasses.replace(t, flags=tuple(flags)))
    return out


def _missing(
    files: Sequence[CheckpointFile],
    measured: set[tuple[int, int]],
    transitions: Sequence[Transition],
    records: Sequence[CheckpointRecord],
    failures: Mapping[tuple[int, int], str],
) -> list[MissingTransition]:
    by_path = {r.path: r for r in records}
    bridges = [t for t in transitions if t.bridged]
    out: list[MissingTransition] = []
    for j in range(len(files) - 1):
        a, b = files[j], files[j + 1]
        if (j, j + 1) in measured:
            continue
        reasons = []
        for f in (a, b):
            rec = by_path.get(str(f.path))
            if rec is not None and not rec.ok:
                reasons.append(f"{f.name} skipped: {rec.error}")
        if (j, j + 1) in failures:
            reasons.append(failures[(j, j + 1)])
        bridge = next((t for t in bridges if t.step_from <= a.step and b.step <= t.step_to), None)
        if bridge is not None:
            reasons.append(f"bridged by {bridge.step_from} → {bridge.step_to}")
        out.append(MissingTransition(a.step, b.step, a.name, b.name, "; ".join(reasons) or "not measured"))
    return out
