"""``stepguard bench``: what a guard costs, in step time and memory, on your model or built-in ones.

Protocol (one process, one run):

* **Variants.** For each model: a *plain* training step (zero_grad, forward, loss,
  backward, ``torch.optim.Adam.step``) and the same step with the Adam optimizer wrapped
  in a :class:`~stepguard.StepGuard` that measures with a fresh JVP every 1, 4 and 16
  steps (``GuardConfig(measure_every=N)``), plus *budget* mode
  (``GuardConfig(budget=B)``) unless ``--no-budget``. Every variant has
  its own copy of the network, built from the same seed, and cycles through the same
  pre-built batches (data loading is not timed).
* **Timing.** After ``warmup`` steps of every variant, ``rounds`` rounds; in each round
  every variant runs one block of ``steps`` consecutive steps, timed with
  ``time.perf_counter`` (with ``torch.cuda.synchronize()`` before and after each block
  on CUDA). The order of the variants alternates between rounds (A B C … then … C B A),
  so a slow drift of the machine affects all of them alike. A variant's step time is the
  median over rounds of its block's mean step time; its ratio is that median over the
  plain step's median. The per-round ratios (guarded block over the same round's plain
  block) give the spread. The block length is rounded up to a multiple of every
  ``measure_every``, so each block holds the same number of measured steps.
* **Split.** The guard times its own phases per step in ``report.timings`` (snapshot,
  optimizer, diff, trigger, measure, reduce_sync, decide, commit: whatever keys the
  installed guard reports; ``optimizer`` is the inner step, not the guard's time, and
  ``jvp`` and ``statistics`` are the two largest parts of ``measure``). The
  split is the mean per timed step of each; ``sinks`` is the time spent in the bench's
  (optional) JSON-lines sink, and
  ``untimed`` is what remains of the mean overhead (guarded minus plain step time)
  after the timed phases: the forward capture hook, assembling the report, the step
  wrapper, and the timing noise, which can make it negative.
* **Memory.** Measured separately, for each of plain, ``monitor`` (no state backup) and
  ``veto`` (a copy of the optimizer state, restored on a veto): a fresh network,
  optimizer and guard are built and run for a few steps, counting every byte allocated
  meanwhile. On CUDA from ``torch.cuda.memory_allocated`` and
  ``torch.cuda.max_memory_allocated``; on CPU from the allocation and free events the
  PyTorch profiler records with ``profile_memory=True`` (the bytes of every tensor
  storage the CPU allocator hands out, in order, so the running sum gives the peak).
  *Peak* is the highest total during the run, *resident* the total after the last step
  (parameters, gradients, optimizer state and the guard's kept buffers); the
  difference is the step's transient memory (activations, the update Δθ, the JVP's
  tangents). Python objects (reports, dicts) are not counted: they are not tensors.

Timings on a shared machine are noisy: read the spread, not only the ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime
import gc
import io
import json
import math
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stepguard.config import GuardConfig
from stepguard.guard import StepGuard
from stepguard.report import StepReport, json_ready
from stepguard.tools.bench_models import (
    BUILTIN,
    DEFAULT_MODELS,
    Workload,
    WorkloadUnavailable,
    builtin_workload,
    user_workload,
)

#: The overhead targets the benchmark reports against (ratios to a plain Adam step).
TARGETS = {"every_1_ratio_max": 2.3, "budget_ratio_max": 1.10}
#: Phases the guard does *not* spend on the user's behalf (the inner optimizer's step).
NOT_GUARD = frozenset({"optimizer", "jvp", "statistics"})  # the inner step; parts of "measure"


@dataclass(frozen=True)
class BenchSettings:
    """What ``stepguard bench`` runs (the CLI flags).

    Attributes:
        models: built-in workloads to run (``"mlp"``, ``"cnn"``, ``"lm"``, ``"llama32k"``,
            ``"llama128k"``).
        user_model: ``"pkg.module:factory"`` of a user's model, run first.
        input_shape: per-sample input shape of the user's model (random inputs).
        classes: number of classes of the random targets (default: the output's last dim).
        vocab: draw integer tokens below this instead of normal inputs.
        data: a ``torch.save`` file with the user's inputs (and targets).
        batch_size: batch size (default: each workload's own).
        every: the ``measure_every`` values to time.
        budget: the budget of budget mode (None: skip it).
        policy: the guard's policy in the timed variants.
        diagnostics: ``GuardConfig.diagnostics`` of the timed guards.
        steps: steps per timed block (rounded up to a multiple of every ``every``).
        rounds: timed rounds (each runs one block of every variant).
        warmup: untimed steps of every variant before the rounds.
        threads: ``torch.set_num_threads`` during the run (None: leave as is).
        device: ``"cpu"`` or ``"cuda"``.
        memory: also measure memory.
        memory_steps: steps of each memory run.
        first_steps: also time the first this many steps of a fresh budget-mode guard
            against a fresh plain run (0: skip), set-up and first replay included.
        sink: ``"none"`` or ``"jsonl"`` (a JSON-lines sink in a temporary folder).
        lr: Adam's learning rate.
        seed: seed of the weights and batches.
    """

    models: tuple[str, ...] = DEFAULT_MODELS
    user_model: str | None = None
    input_shape: tuple[int, ...] | None = None
    classes: int | None = None
    vocab: int | None = None
    data: str | None = None
    batch_size: int | None = None
    every: tuple[int, ...] = (1, 4, 16)
    budget: float | None = 0.10
    policy: str = "monitor"
    diagnostics: bool = True
    steps: int = 32
    rounds: int = 15
    warmup: int = 32
    threads: int | None = 1
    device: str = "cpu"
    memory: bool = True
    memory_steps: int = 3
    first_steps: int = 0
    sink: str = "none"
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.models and not self.user_model:
            raise ValueError("nothing to benchmark: give --models and/or --model")
        unknown = [m for m in self.models if m not in BUILTIN]
        if unknown:
            raise ValueError(f"unknown built-in model(s) {unknown}; choose from {', '.join(BUILTIN)}")
        if not self.every or any(e < 1 for e in self.every):
            raise ValueError(f"every must be a non-empty list of integers >= 1, got {self.every}")
        if self.budget is not None and not 0 < self.budget < 1:
            raise ValueError(f"budget must lie in (0, 1), got {self.budget}")
        if self.steps < 1 or self.rounds < 1 or self.warmup < 0 or self.memory_steps < 1:
            raise ValueError("need steps >= 1, rounds >= 1, warmup >= 0 and memory_steps >= 1")
        if self.first_steps < 0:
            raise ValueError(f"first_steps must be >= 0, got {self.first_steps}")
        if self.first_steps and self.budget is None:
            raise ValueError("first_steps times budget mode: give a budget (not --no-budget)")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.sink not in ("none", "jsonl"):
            raise ValueError(f"sink must be 'none' or 'jsonl', got {self.sink!r}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")

    @property
    def block(self) -> int:
        """Steps per timed block: ``steps`` rounded up to a multiple of every ``measure_every``."""
        lcm = math.lcm(*self.every)
        return -(-self.steps // lcm) * lcm


# ---------------------------------------------------------------- the guard


def make_guard(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    *,
    policy: str = "monitor",
    measure_every: int = 1,
    budget: float | None = None,
    sinks: Sequence[Any] = (),
    diagnostics: bool = True,
) -> StepGuard:
    """A guard measuring every ``measure_every`` steps, or in budget mode when ``budget`` is given."""
    config = GuardConfig(measure_every=measure_every, budget=budget, diagnostics=diagnostics)
    return StepGuard(optimizer, model=model, policy=policy, sinks=sinks, config=config)


# ---------------------------------------------------------------- one benchmarked training loop


class TimedSink:
    """Wraps a sink and adds up the seconds spent in its ``write``."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = getattr(inner, "name", type(inner).__name__)
        self.seconds = 0.0
        self.recording = False

    def write(self, report: StepReport) -> None:
        start = time.perf_counter()
        try:
            self.inner.write(report)
        finally:
            if self.recording:
                self.seconds += time.perf_counter() - start

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()


@dataclass
class Variant:
    """One benchmarked configuration.

    Attributes:
        name: label in the table (``"plain"``, ``"every 4"``, ``"budget 0.1"``).
        guarded: whether the optimizer is wrapped in a guard.
        measure_every: the guard's ``measure_every`` (ignored in budget mode).
        budget: the guard's budget (None: fixed schedule).
        policy: the guard's policy.
        diagnostics: ``GuardConfig.diagnostics`` (False: radius, spread and binding only).
    """

    name: str
    guarded: bool
    measure_every: int = 1
    budget: float | None = None
    policy: str = "monitor"
    diagnostics: bool = True


class Runner:
    """A network, its optimizer (guarded or not) and a cursor over the batches.

    ``step()`` runs one full training step. While ``recording`` is on, each guarded
    step's ``report.timings`` are added up, and the measured steps and estimators counted.
    """

    def __init__(
        self,
        workload: Workload,
        variant: Variant,
        *,
        lr: float,
        seed: int,
        device: torch.device,
        sink_dir: Path | None = None,
    ) -> None:
        torch.manual_seed(seed)
        self.workload = workload
        self.variant = variant
        self.model = workload.factory().to(device)
        self.model.train()
        self.inner = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.sink: TimedSink | None = None
        self.guard: StepGuard | None = None
        if variant.guarded:
            sinks = []
            if sink_dir is not None:
                from stepguard.sinks.jsonl import JsonlSink

                slug = variant.name.replace(" ", "_")
                self.sink = TimedSink(JsonlSink(sink_dir / f"{workload.name.replace(':', '_')}-{slug}.jsonl"))
                sinks.append(self.sink)
            self.guard = make_guard(
                self.inner,
                self.model,
                policy=variant.policy,
                measure_every=variant.measure_every,
                budget=variant.budget,
                sinks=sinks,
                diagnostics=variant.diagnostics,
            )
        self.optimizer: torch.optim.Optimizer = self.guard if self.guard is not None else self.inner
        self.cursor = 0
        self.recording = False
        self.timings: dict[str, float] = {}
        self.recorded_steps = 0
        self.measured_steps = 0
        self.estimators: dict[str, int] = {}
        self.block_seconds: list[float] = []

    def set_recording(self, on: bool) -> None:
        self.recording = on
        if self.sink is not None:
            self.sink.recording = on

    def step(self) -> None:
        batch = self.workload.batches[self.cursor % len(self.workload.batches)]
        self.cursor += 1
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.workload.loss_fn(self.model(batch.inputs), batch.targets)
        loss.backward()
        if self.guard is None:
            self.inner.step()
            return
        report = self.guard.step(targets=batch.targets)
        if self.recording:
            self.recorded_steps += 1
            for key, seconds in report.timings.items():
                self.timings[key] = self.timings.get(key, 0.0) + seconds
            if report.measured:
                self.measured_steps += 1
                self.estimators[report.estimator] = self.estimators.get(report.estimator, 0) + 1

    def close(self) -> None:
        if self.guard is not None:
            self.guard.close()


# ---------------------------------------------------------------- statistics


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Median, quartiles, min and max of ``values`` (and the values)."""
    vals = [float(v) for v in values]
    if not vals:
        return {
            "median": math.nan,
            "q25": math.nan,
            "q75": math.nan,
            "min": math.nan,
            "max": math.nan,
            "values": [],
        }
    q25, _, q75 = statistics.quantiles(vals, n=4, method="inclusive") if len(vals) > 1 else (vals[0],) * 3
    return {
        "median": statistics.median(vals),
        "q25": q25,
        "q75": q75,
        "min": min(vals),
        "max": max(vals),
        "values": vals,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- timing


def variants_for(settings: BenchSettings) -> list[Variant]:
    """The plain variant, one per ``every``, and budget mode when ``settings.budget`` is set."""
    variants = [Variant("plain", guarded=False)]
    variants += [
        Variant(f"every {e}", True, measure_every=e, policy=settings.policy, diagnostics=settings.diagnostics)
        for e in settings.every
    ]
    if settings.budget is not None:
        variants.append(
            Variant(
                f"budget {settings.budget:g}",
                True,
                budget=settings.budget,
                policy=settings.policy,
                diagnostics=settings.diagnostics,
            )
        )
    return variants


def time_workload(
    workload: Workload, settings: BenchSettings, device: torch.device, sink_dir: Path | None
) -> dict[str, Any]:
    """Interleaved timing of every variant on one workload; see the module docstring."""
    variants = variants_for(settings)
    runners = [
        Runner(workload, v, lr=settings.lr, seed=settings.seed, device=device, sink_dir=sink_dir)
        for v in variants
    ]
    block = settings.block
    try:
        for runner in runners:
            for _ in range(settings.warmup):
                runner.step()
            runner.set_recording(True)
        gc.collect()
        _sync(device)
        for index in range(settings.rounds):
            order = runners if index % 2 == 0 else runners[::-1]
            for runner in order:
                _sync(device)
                start = time.perf_counter()
                for _ in range(block):
                    runner.step()
                _sync(device)
                runner.block_seconds.append((time.perf_counter() - start) / block)
    finally:
        for runner in runners:
            runner.close()

    plain = runners[0]
    plain_ms = [s * 1e3 for s in plain.block_seconds]
    plain_median = statistics.median(plain_ms)
    plain_mean = statistics.fmean(plain_ms)
    params = [p for p in plain.model.parameters() if p.requires_grad]
    rows = []
    for runner in runners[1:]:
        step_ms = [s * 1e3 for s in runner.block_seconds]
        median = statistics.median(step_ms)
        mean = statistics.fmean(step_ms)
        steps = max(runner.recorded_steps, 1)
        split = {k: v * 1e3 / steps for k, v in runner.timings.items()}
        if runner.sink is not None:
            split["sinks"] = runner.sink.seconds * 1e3 / steps
        guard_ms = sum(v for k, v in split.items() if k not in NOT_GUARD)
        split["untimed"] = (mean - plain_mean) - guard_ms
        rows.append(
            {
                "variant": runner.variant.name,
                "measure_every": None if runner.variant.budget is not None else runner.variant.measure_every,
                "budget": runner.variant.budget,
                "policy": runner.variant.policy,
                "step_ms": summarize(step_ms),
                "step_ms_mean": mean,
                "ratio": median / plain_median,
                "ratio_rounds": summarize(
                    [g / p for g, p in zip(runner.block_seconds, plain.block_seconds, strict=True)]
                ),
                "overhead_ms": median - plain_median,
                "overhead_ms_mean": mean - plain_mean,
                "guard_ms": guard_ms,
                "split_ms": split,
                "steps_timed": runner.recorded_steps,
                "measured_fraction": runner.measured_steps / steps,
                "estimators": dict(runner.estimators),
            }
        )
    return {
        "name": workload.name,
        "description": workload.description,
        "parameters": sum(p.numel() for p in params),
        "parameter_bytes": sum(p.numel() * p.element_size() for p in params),
        "plain": {"step_ms": summarize(plain_ms), "step_ms_mean": plain_mean},
        "variants": rows,
    }


# ---------------------------------------------------------------- memory


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (C++ log lines) for the duration; Python's stderr is flushed first."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_allocations(run: Callable[[], Any]) -> tuple[int, int, Any]:
    """Peak and final bytes of CPU tensor storage allocated while ``run()`` runs.

    Returns ``(peak, final, result)``; ``result`` is kept alive until the count is done.
    """
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # the profiler's C++ side logs its start and stop on fd 2
        prof.start()
    try:
        result = run()
    finally:
        with _quiet_stderr():
            prof.stop()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    total = peak = 0
    for _, nbytes in events:
        total += nbytes
        peak = max(peak, total)
    return peak, total, result


def _cuda_allocations(run: Callable[[], Any], device: torch.device) -> tuple[int, int, Any]:
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = run()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base, torch.cuda.memory_allocated(device) - base, result


def measure_memory(workload: Workload, settings: BenchSettings, device: torch.device) -> dict[str, Any]:
    """Peak and resident bytes of plain, ``monitor``, ``veto`` (and ``settings.policy``) training.

    See the module docstring. Extra bytes are also given in parameter copies and, for a
    sequence model (``workload.logits_bytes``), in logits-sized tensors.
    """
    variants = [Variant("plain", guarded=False)]
    variants += [Variant(p, True, policy=p) for p in _memory_policies(settings.policy)]
    method = (
        "torch.cuda.max_memory_allocated / memory_allocated"
        if device.type == "cuda"
        else "CPU allocator events of torch.profiler (profile_memory=True)"
    )
    out: dict[str, Any] = {"method": method, "steps": settings.memory_steps, "variants": {}}
    param_bytes = 0
    for variant in variants:

        def run(variant: Variant = variant) -> Runner:
            runner = Runner(workload, variant, lr=settings.lr, seed=settings.seed, device=device)
            for _ in range(settings.memory_steps):
                runner.step()
            return runner

        gc.collect()
        try:
            if device.type == "cuda":
                peak, final, runner = _cuda_allocations(run, device)
            else:
                peak, final, runner = _cpu_allocations(run)
        except Exception as exc:  # the profiler's event API is not a stable interface
            return {"method": method, "error": f"{type(exc).__name__}: {exc}", "variants": {}}
        param_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters() if p.requires_grad)
        runner.close()
        del runner
        out["variants"][variant.name] = {
            "peak_bytes": peak,
            "resident_bytes": final,
            "transient_bytes": peak - final,
        }
    plain = out["variants"]["plain"]
    out["parameter_bytes"] = param_bytes
    out["logits_bytes"] = workload.logits_bytes
    for name in _memory_policies(settings.policy):
        row = out["variants"][name]
        row["peak_ratio"] = row["peak_bytes"] / plain["peak_bytes"] if plain["peak_bytes"] else math.nan
        row["extra_peak_bytes"] = row["peak_bytes"] - plain["peak_bytes"]
        row["extra_resident_bytes"] = row["resident_bytes"] - plain["resident_bytes"]
        row["extra_transient_bytes"] = row["transient_bytes"] - plain["transient_bytes"]
        for key in ("extra_peak", "extra_resident", "extra_transient"):
            row[f"{key}_param_copies"] = row[f"{key}_bytes"] / param_bytes if param_bytes else math.nan
            if workload.logits_bytes:
                row[f"{key}_logits"] = row[f"{key}_bytes"] / workload.logits_bytes
    return out


def _memory_policies(policy: str) -> tuple[str, ...]:
    """``monitor`` and ``veto``, and the timed guards' policy when it is neither."""
    return ("monitor", "veto") if policy in ("monitor", "veto") else ("monitor", "veto", policy)


# ---------------------------------------------------------------- budget mode from the first step


def time_first_steps(
    workload: Workload, settings: BenchSettings, device: torch.device, chunk: int = 10
) -> dict[str, Any]:
    """The first ``settings.first_steps`` steps of a fresh budget-mode guard against a fresh plain run.

    No warm-up: the guard's set-up, its first replay and the budget's learning of the
    step's costs all count, as they do at the start of a user's run. The two runs
    alternate in chunks of ``chunk`` steps so that a drift of the machine hits both.
    """
    variants = [
        Variant("plain", guarded=False),
        Variant(
            f"budget {settings.budget:g}",
            True,
            budget=settings.budget,
            policy=settings.policy,
            diagnostics=settings.diagnostics,
        ),
    ]
    seconds = [0.0, 0.0]
    runners = [Runner(workload, v, lr=settings.lr, seed=settings.seed, device=device) for v in variants]
    runners[1].set_recording(True)
    try:
        done = 0
        while done < settings.first_steps:
            n = min(chunk, settings.first_steps - done)
            for index, runner in enumerate(runners):
                _sync(device)
                start = time.perf_counter()
                for _ in range(n):
                    runner.step()
                _sync(device)
                seconds[index] += time.perf_counter() - start
            done += n
    finally:
        for runner in runners:
            runner.close()
    guarded = runners[1]
    return {
        "steps": settings.first_steps,
        "budget": settings.budget,
        "plain_s": seconds[0],
        "budget_s": seconds[1],
        "ratio": seconds[1] / seconds[0],
        "target": 1 + settings.budget + 0.05 if settings.budget is not None else math.nan,
        "measured_steps": guarded.measured_steps,
    }


# ---------------------------------------------------------------- profile


def profile_guard(workload: Workload, settings: BenchSettings, device: torch.device, steps: int = 200) -> str:
    """cProfile of ``steps`` guarded steps (measuring every step) after a warm-up: the top functions."""
    runner = Runner(
        workload,
        Variant("every 1", True, policy=settings.policy, diagnostics=settings.diagnostics),
        lr=settings.lr,
        seed=settings.seed,
        device=device,
    )
    try:
        for _ in range(max(settings.warmup, 10)):
            runner.step()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(steps):
            runner.step()
        profiler.disable()
    finally:
        runner.close()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text).strip_dirs()
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(30)
    return text.getvalue()


# ---------------------------------------------------------------- the run


def machine_info(device: torch.device) -> dict[str, Any]:
    """Where the numbers come from: platform, CPUs, load, torch, threads, device, date."""
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    with contextlib.suppress(OSError, AttributeError):
        info["load_average"] = list(os.getloadavg())
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


def workloads_for(settings: BenchSettings) -> list[Workload | tuple[str, str]]:
    """The user's workload (when given) followed by the built-in ones.

    A built-in workload whose package is missing comes as ``(name, why)`` instead.
    """
    loads: list[Workload | tuple[str, str]] = []
    if settings.user_model:
        loads.append(
            user_workload(
                settings.user_model,
                input_shape=settings.input_shape,
                classes=settings.classes,
                vocab=settings.vocab,
                data=settings.data,
                batch_size=settings.batch_size or 64,
                seed=settings.seed,
            )
        )
    for name in settings.models:
        try:
            loads.append(builtin_workload(name, batch_size=settings.batch_size, seed=settings.seed))
        except WorkloadUnavailable as exc:
            loads.append((name, str(exc)))
    return loads


@contextlib.contextmanager
def _threads(threads: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_bench(
    settings: BenchSettings, *, progress: Callable[[str], None] | None = None, profile_steps: int = 0
) -> dict[str, Any]:
    """Run the benchmark; returns the result as a JSON-ready dict (see :func:`format_table`).

    Args:
        settings: what to run.
        progress: called with a line of text as each model starts.
        profile_steps: also profile this many guarded steps of the first model (cProfile).
    """
    device = torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but CUDA is not available")
    say = progress or (lambda _line: None)
    with _threads(settings.threads), contextlib.ExitStack() as stack:
        sink_dir = None
        if settings.sink == "jsonl":
            sink_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="stepguard-bench-")))
        result: dict[str, Any] = {
            "machine": machine_info(device),
            "settings": {**asdict(settings), "block": settings.block},
            "targets": dict(TARGETS),
            "models": [],
        }
        available = []
        for workload in workloads_for(settings):
            if isinstance(workload, tuple):
                say(f"{workload[0]} unavailable: {workload[1]}")
                result["models"].append({"name": workload[0], "unavailable": workload[1]})
                continue
            available.append(workload)
            result["models"].append(_bench_one(workload.to(device), settings, device, sink_dir, say))
        if profile_steps and available:
            workload = available[0].to(device)
            say(f"profiling {profile_steps} guarded steps of {workload.name}")
            result["profile"] = profile_guard(workload, settings, device, profile_steps)
        with contextlib.suppress(OSError, AttributeError):
            result["machine"]["load_average_after"] = list(os.getloadavg())
    return result


def _bench_one(
    workload: Workload,
    settings: BenchSettings,
    device: torch.device,
    sink_dir: Path | None,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Timing, then (as settings ask) memory and budget mode from the first step, of one workload."""
    say(f"timing {workload.name}: {workload.description}")
    entry = time_workload(workload, settings, device, sink_dir)
    if settings.memory:
        say(f"memory {workload.name}")
        entry["memory"] = measure_memory(workload, settings, device)
    if settings.first_steps:
        say(f"first {settings.first_steps} steps of {workload.name} in budget mode")
        entry["first_steps"] = time_first_steps(workload, settings, device)
    return entry


# ---------------------------------------------------------------- output


def _mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:.2f} MB"


def format_table(result: Mapping[str, Any]) -> str:
    """The human-readable report of a :func:`run_bench` result."""
    m = result["machine"]
    s = result["settings"]
    lines = [
        f"StepGuard overhead — {m['date']}, torch {m['torch']}, {m['device']}, "
        f"{m['threads']} thread(s) of {m['cpu_count']} CPUs, load {_load(m)}",
        f"{s['rounds']} rounds x {s['block']} steps per variant, interleaved, after {s['warmup']} warm-up "
        f"steps; policy {s['policy']}{'' if s.get('diagnostics', True) else ', radius only'}; "
        "median step time over rounds, ratio = guarded / plain, "
        "[min-max] of the per-round ratios",
    ]
    for entry in result["models"]:
        if "unavailable" in entry:
            lines += ["", f"{entry['name']}: unavailable: {entry['unavailable']}"]
            continue
        lines += ["", f"{entry['name']}: {entry['description']} ({entry['parameters']:,} parameters)"]
        plain = entry["plain"]["step_ms"]
        lines.append(
            f"  {'variant':<12} {'step ms':>8} {'ratio':>6}  {'per-round':<13} {'measured':>8}  estimator"
        )
        lines.append(f"  {'plain':<12} {plain['median']:8.3f} {1.0:6.2f}  {'':<13} {'':>8}")
        for row in entry["variants"]:
            spread = f"[{row['ratio_rounds']['min']:.2f}-{row['ratio_rounds']['max']:.2f}]"
            est = ",".join(sorted(row["estimators"])) or "-"
            lines.append(
                f"  {row['variant']:<12} {row['step_ms']['median']:8.3f} {row['ratio']:6.2f}  {spread:<13} "
                f"{row['measured_fraction']:8.0%}  {est}"
            )
        keys = _split_keys(entry["variants"])
        lines.append("  guard time per step, ms (mean over timed steps; 'optimizer' is the inner Adam step):")
        widths = [max(9, len(k)) + 1 for k in keys]
        header = "".join(f"{k:>{w}}" for k, w in zip(keys, widths, strict=True))
        lines.append(f"  {'variant':<12}{header}")
        for row in entry["variants"]:
            cells = "".join(
                f"{row['split_ms'].get(k, 0.0):{w}.3f}" for k, w in zip(keys, widths, strict=True)
            )
            lines.append(f"  {row['variant']:<12}{cells}")
        if entry.get("memory"):
            lines += _memory_lines(entry["memory"])
        first = entry.get("first_steps")
        if first:
            lines.append(
                f"  budget {first['budget']:g} over the first {first['steps']} steps (no warm-up): "
                f"{first['ratio']:.2f}x plain ({first['budget_s']:.1f} s / {first['plain_s']:.1f} s), "
                f"{first['measured_steps']} measured; target <= {first['target']:.2f}x"
            )
    if result.get("profile"):
        lines += ["", "cProfile of guarded steps (measure every step):", result["profile"]]
    return "\n".join(lines)


def _memory_lines(memory: Mapping[str, Any]) -> list[str]:
    lines = [f"  memory ({memory['method']}, {memory.get('steps', '?')} steps):"]
    if "error" in memory:
        return [*lines, f"    not measured: {memory['error']}"]
    pv = memory["variants"]["plain"]
    logits = memory.get("logits_bytes")
    lines.append(
        f"    {'plain':<8} peak {_mb(pv['peak_bytes'])}, resident {_mb(pv['resident_bytes'])}; "
        f"parameters {_mb(memory['parameter_bytes'])} (= 1 copy)"
        + (f"; logits {_mb(logits)} (= 1 logits)" if logits else "")
    )
    for name, v in memory["variants"].items():
        if name == "plain":
            continue
        at_peak = f"{v['extra_peak_param_copies']:+.2f} copies at peak ({_mb(v['extra_peak_bytes'])}"
        at_peak += f" = {v['extra_peak_logits']:.2f} logits)" if logits else ")"
        lines.append(
            f"    {name:<8} peak {_mb(v['peak_bytes'])} ({v['peak_ratio']:.2f}x plain): "
            f"{v['extra_resident_param_copies']:+.2f} copies resident, "
            f"{v['extra_transient_param_copies']:+.2f} copies transient, {at_peak}"
        )
    return lines


def _load(machine: Mapping[str, Any]) -> str:
    load = machine.get("load_average")
    return "n/a" if not load else f"{load[0]:.2f}"


def _split_keys(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    order = ["snapshot", "optimizer", "diff", "trigger", "measure", "jvp", "statistics"]
    order += ["sync", "reduce_sync", "decide", "commit", "sinks", "untimed"]
    seen = {k for row in rows for k in row["split_ms"]}
    return [k for k in order if k in seen] + sorted(seen - set(order))


def write_json(result: Mapping[str, Any], path: str | Path) -> Path:
    """Write a result as strict JSON (non-finite numbers as strings); returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(json_ready(result), indent=1, allow_nan=False) + "\n")
    return out


# ---------------------------------------------------------------- command line


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    return values


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``stepguard bench`` (shared with ``examples/overhead.py``)."""
    d = BenchSettings()
    what = parser.add_argument_group("what to benchmark")
    what.add_argument(
        "--models",
        type=_names,
        default=None,
        help=f"built-in models, comma-separated, from {','.join(BUILTIN)} "
        f"(default: {','.join(DEFAULT_MODELS)}, or none when --model is given; the Llamas "
        "need the transformers extra)",
    )
    what.add_argument(
        "--model", metavar="PKG.MODULE:FACTORY", help="your model: a factory called with no arguments"
    )
    what.add_argument(
        "--input-shape", type=_ints, metavar="D1,D2,…", help="per-sample input shape, e.g. 3,32,32"
    )
    what.add_argument(
        "--classes", type=int, help="classes of the random targets (default: the output's last dim)"
    )
    what.add_argument("--vocab", type=int, help="random integer tokens below VOCAB instead of normal inputs")
    what.add_argument("--data", metavar="FILE", help="torch.save file: a tensor, (inputs, targets) or a dict")
    what.add_argument("--batch-size", type=int, help="batch size (default: 64; 16 sequences for the LM)")
    how = parser.add_argument_group("how")
    how.add_argument("--every", type=_ints, default=d.every, help="measure_every values (default 1,4,16)")
    how.add_argument("--budget", type=float, default=d.budget, help="budget of budget mode (default 0.10)")
    how.add_argument("--no-budget", action="store_true", help="skip budget mode")
    how.add_argument(
        "--policy", choices=("monitor", "clip", "clip-fixed", "veto"), default=d.policy, help="guard policy"
    )
    how.add_argument(
        "--no-diagnostics",
        action="store_true",
        help="guards measure the radius only (GuardConfig(diagnostics=False))",
    )
    how.add_argument("--steps", type=int, default=d.steps, help="steps per timed block (default 32)")
    how.add_argument("--rounds", type=int, default=d.rounds, help="timed rounds (default 15)")
    how.add_argument("--warmup", type=int, default=d.warmup, help="warm-up steps per variant (default 32)")
    how.add_argument(
        "--threads", type=int, default=d.threads, help="torch threads (default 1; 0: torch's default)"
    )
    how.add_argument("--device", default=d.device, help="cpu or cuda (default cpu)")
    how.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    how.add_argument(
        "--memory-steps", type=int, default=d.memory_steps, help="steps of each memory run (default 3)"
    )
    how.add_argument(
        "--first-steps",
        type=int,
        default=d.first_steps,
        metavar="N",
        help="also time budget mode over the first N steps of a fresh guard, no warm-up (default 0: skip)",
    )
    how.add_argument(
        "--sink", choices=("none", "jsonl"), default=d.sink, help="give the guards a JSON-lines sink"
    )
    how.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate (default 1e-3)")
    how.add_argument("--seed", type=int, default=d.seed, help="seed of weights and batches")
    how.add_argument(
        "--profile", type=int, default=0, metavar="STEPS", help="also cProfile STEPS guarded steps"
    )
    out = parser.add_argument_group("output")
    out.add_argument("--json", metavar="OUT", help="also write the full result as JSON")
    out.add_argument("--quiet", action="store_true", help="no progress lines")


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    """:class:`BenchSettings` from parsed :func:`add_arguments` flags."""
    models = args.models if args.models is not None else (() if args.model else DEFAULT_MODELS)
    if args.model is None and (args.input_shape or args.data or args.vocab or args.classes):
        raise ValueError("--input-shape, --data, --vocab and --classes describe a --model; give one")
    return BenchSettings(
        models=tuple(models),
        user_model=args.model,
        input_shape=args.input_shape,
        classes=args.classes,
        vocab=args.vocab,
        data=args.data,
        batch_size=args.batch_size,
        every=args.every,
        budget=None if args.no_budget else args.budget,
        policy=args.policy,
        diagnostics=not args.no_diagnostics,
        steps=args.steps,
        rounds=args.rounds,
        warmup=args.warmup,
        threads=args.threads or None,
        device=args.device,
        memory=not args.no_memory,
        memory_steps=args.memory_steps,
        first_steps=args.first_steps,
        sink=args.sink,
        lr=args.lr,
        seed=args.seed,
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Run the bench for parsed flags: print the table, write ``--json``."""
    settings = settings_from_args(args)
    progress = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    result = run_bench(settings, progress=progress, profile_steps=args.profile)
    print(format_table(result))
    if args.json:
        print(f"JSON written to {write_json(result, args.json)}")
    return 0


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """A stand-alone parser with the bench's flags."""
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    add_arguments(parser)
    return parser


DESCRIPTION = (
    "Time a plain Adam training step against the same step under a StepGuard measuring every 1, 4 "
    "and 16 steps and in budget mode, interleaved in one process, on the built-in MLP, CNN (BatchNorm) "
    "and transformer LM or on your model; split the guard's own time by phase and measure the memory "
    "it adds."
)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Entry point of ``examples/overhead.py`` (the same flags as ``stepguard bench``)."""
    args = build_parser(prog).parse_args(argv)
    try:
        return run_from_args(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"{prog or 'bench'}: error: {exc}", file=sys.stderr)
        return 2


__all__ = [
    "TARGETS",
    "BenchSettings",
    "Runner",
    "TimedSink",
    "Variant",
    "add_arguments",
    "format_table",
    "main",
    "make_guard",
    "measure_memory",
    "profile_guard",
    "run_bench",
    "run_from_args",
    "settings_from_args",
    "summarize",
    "time_workload",
    "write_json",
]
