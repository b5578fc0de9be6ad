"""Plots of StepGuard runs (matplotlib: the ``plot`` extra, ``pip install -e '.[plot]'`` in a clone).

matplotlib is imported when a plot is drawn, not when StepGuard is imported. Figures are
drawn on matplotlib's Agg canvas directly, so plotting works without a display and leaves
the pyplot state and the global backend of the calling program alone.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from stepguard._extras import install_hint

_NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
_RUN_KEYS = ("accuracy", "r", "rho_a", "tau", "applied_tau", "actions")


def _matplotlib() -> tuple[Any, Any]:
    """The ``Figure`` class and the Agg canvas, or an ImportError naming the extra."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(f"plotting needs matplotlib: {install_hint('plot')}") from exc
    return Figure, FigureCanvasAgg


def load_demo_summary(summary_json_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check the ``summary.json`` written by ``stepguard demo``.

    Args:
        summary_json_path: the file, ``OUT/summary.json`` for ``stepguard demo --out OUT``.

    Returns:
        The summary: ``settings``, ``runs`` and ``history.{plain,guarded}``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a demo summary.
    """
    path = Path(summary_json_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no demo summary at {path}: run `stepguard demo --out {path.parent}` first "
            "(it writes summary.json there)"
        )
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(summary, Mapping) or not isinstance(summary.get("history"), Mapping):
        raise ValueError(f"{path} is not a `stepguard demo` summary: it has no 'history'")
    for run in ("plain", "guarded"):
        history = summary["history"].get(run)
        missing = [k for k in _RUN_KEYS if not isinstance(history, Mapping) or k not in history]
        if missing:
            raise ValueError(f"{path}: history.{run} lacks {missing}; rerun `stepguard demo`")
    return dict(summary)


def _floats(values: Sequence[Any]) -> list[float]:
    return [_NON_FINITE[v] if isinstance(v, str) else float(v) for v in values]


def _positive(values: Sequence[float]) -> list[float]:
    """Values for a log axis: non-finite or non-positive entries become gaps (NaN)."""
    return [v if math.isfinite(v) and v > 0 else math.nan for v in values]


def plot_demo(
    summary_json_path: str | os.PathLike[str],
    out_png: str | os.PathLike[str],
    *,
    before: int = 30,
    after: int = 100,
    dpi: int = 150,
) -> Path:
    """Plot the normalized step r and the test accuracy of both demo runs around the spike.

    Top panel: r = τ/ρ_a of every step for the plain run and the guarded run's proposed
    update, the r the guarded run actually applied, and the line r = 1 (log scale).
    Bottom panel: test accuracy after every step of both runs. A vertical line marks the
    first spiked step.

    Args:
        summary_json_path: ``summary.json`` written by ``stepguard demo``.
        out_png: the PNG to write (parent folders are created).
        before: steps shown before the spike.
        after: steps shown from the spike on.
        dpi: resolution of the PNG.

    Returns:
        The path of the PNG.

    Raises:
        FileNotFoundError: no summary at ``summary_json_path``.
        ValueError: the file is not a demo summary, or ``before``/``after`` are negative.
        ImportError: matplotlib is not installed (the ``plot`` extra).
    """
    if before < 0 or after < 1:
        raise ValueError(f"need before >= 0 and after >= 1, got {before}, {after}")
    summary = load_demo_summary(summary_json_path)
    Figure, FigureCanvasAgg = _matplotlib()

    settings = summary.get("settings", {})
    plain, guarded = summary["history"]["plain"], summary["history"]["guarded"]
    steps = len(plain["r"])
    spike_at = int(settings.get("spike_at", 0))
    lo, hi = max(0, spike_at - before), min(steps, spike_at + after)
    x = list(range(lo, hi))

    def window(values: Sequence[Any]) -> list[float]:
        return _floats(values)[lo:hi]

    rho = window(guarded["rho_a"])
    applied_r = [
        t / p if p > 0 and math.isfinite(t / p) else math.nan
        for t, p in zip(window(guarded["applied_tau"]), rho, strict=True)
    ]
    clipped = sum(1 for a in guarded["actions"][lo:hi] if a == "clip")
    vetoed = sum(1 for a in guarded["actions"][lo:hi] if a == "veto")
    policy = next((row.get("policy") for row in summary.get("runs", []) if row.get("run") == "guarded"), None)
    guarded_label = f"guarded ({policy})" if policy else "guarded"

    fig = Figure(figsize=(9.5, 6.0), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))

    top.plot(x, _positive(window(plain["r"])), color="tab:red", lw=1.4, label="plain: r")
    top.plot(
        x,
        _positive(window(guarded["r"])),
        color="tab:blue",
        lw=1.0,
        ls="--",
        label=f"{guarded_label}: r proposed",
    )
    top.plot(x, _positive(applied_r), color="tab:blue", lw=1.8, label=f"{guarded_label}: r applied")
    top.axhline(1.0, color="black", lw=0.9, ls=":", label="r = 1")
    top.set_yscale("log")
    top.set_ylabel(r"normalized step $r = \tau/\rho_a$")
    top.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)

    bottom.plot(x, window(plain["accuracy"]), color="tab:red", lw=1.4, label="plain")
    bottom.plot(x, window(guarded["accuracy"]), color="tab:blue", lw=1.8, label=guarded_label)
    bottom.set_ylim(0.0, 1.02)
    bottom.set_ylabel("test accuracy")
    bottom.set_xlabel("step")
    bottom.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)

    spike = settings.get("spike")
    if lo <= spike_at < hi:
        label = f"LR ×{spike:g} from step {spike_at}" if isinstance(spike, (int, float)) else "spike"
        for ax in (top, bottom):
            ax.axvline(spike_at, color="gray", lw=1.0, ls="-.", zorder=0)
        top.annotate(
            label,
            xy=(spike_at, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(-4, -4),
            textcoords="offset points",
            ha="right",
            va="top",
            fontsize=8,
            color="dimgray",
        )
    for ax in (top, bottom):
        ax.grid(True, which="major", alpha=0.3)
        ax.set_xlim(lo, max(hi - 1, lo + 1))

    title = "StepGuard demo: learning-rate spike"
    lr = settings.get("lr")
    if isinstance(lr, (int, float)):
        title += f" (Adam, base lr {lr:g})"
    fig.suptitle(title, fontsize=11)
    counts = f"guarded run in this window: {clipped} clipped, {vetoed} vetoed"
    bottom.set_title(counts, fontsize=8, loc="right", color="dimgray")

    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=dpi)
    return out
