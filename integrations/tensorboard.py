"""TensorBoard sink: every step report as scalars, spread histograms and decision texts.

What one report writes (tags under ``stepguard/``, step = ``report.step``):

* ``stepguard/<key>`` for every key of :meth:`StepReport.scalars` except ``step`` (the
  x-axis already is the step): ``stepguard/r``, ``stepguard/rho_a``, ``stepguard/tau``,
  ``stepguard/delta_a``, ``stepguard/spread.max``, ``stepguard/sc_fraction``,
  ``stepguard/entanglement.<k>``, ``stepguard/extras.<k>``, ...
* ``stepguard/r_limit``: the r = 1 boundary (``r_limit``), drawn against ``stepguard/r``.
* ``stepguard/actions/<action>``: how many steps so far were allowed, clipped, vetoed.
* ``stepguard/spread``: a histogram of the per-sample spreads Δ_n, when the report
  carries them.
* ``stepguard/decision``: a text entry for each decision whose action is in ``decisions``.
* Once per sink, a custom-scalars layout (TensorBoard's "Custom Scalars" tab): r against
  the boundary, ρ_a and τ, actions, softmax collapse, entanglement.

Non-finite values: scalars are written as they are. TensorBoard stores NaN and ±Inf (as
32-bit floats, like every scalar) and its charts leave such points out, so a NaN step
shows as a gap, and ``stepguard/rho_a`` is ``+Inf`` on steps whose logits did not move.
Histograms leave non-finite spreads out (a histogram cannot bin them).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

from stepguard._extras import install_hint
from stepguard.integrations._dist import process_rank
from stepguard.integrations.naming import tensorboard_tag
from stepguard.report import ACTIONS, StepReport

R_LIMIT_TAG = tensorboard_tag("r_limit")
SPREAD_HISTOGRAM_TAG = tensorboard_tag("spread")
DECISION_TAG = tensorboard_tag("decision")


def action_tag(action: str) -> str:
    """The tag of the running count of one action, e.g. ``stepguard/actions/veto``."""
    return tensorboard_tag(f"actions/{action}")


def custom_scalars_layout() -> dict[str, dict[str, list[Any]]]:
    """The custom-scalars layout the sink writes (chart title → regexes of tags)."""
    t = tensorboard_tag
    return {
        "StepGuard": {
            "normalized step r against the r = 1 boundary": [
                "Multiline", [f"^{t('r')}$", f"^{R_LIMIT_TAG}$"]],
            "radius rho_a and step length tau": [
                "Multiline", [f"^{t('rho_a')}$", f"^{t('tau')}$", f"^{t('applied_tau')}$"]],
            "actions (cumulative)": ["Multiline", [f"^{t('actions')}/.*"]],
            "softmax collapse": [
                "Multiline", [f"^{t('sc_fraction')}$", f"^{t('sc_zero_loss_fraction')}$",
                              f"^{t('nlm_cosine')}$"]],
            "gradient entanglement": ["Multiline", [rf"^{t('entanglement')}\..*"]],
        }
    }


def _summary_writer_class() -> type:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # torch's wrapper raises when the tensorboard package is absent
        raise ImportError(
            f"TensorBoardSink needs the tensorboard package ({exc}); install it with "
            f"{install_hint('tensorboard')}"
        ) from exc
    return SummaryWriter


def wait_for_a_later_event_file_name(log_dir: str | os.PathLike[str]) -> None:
    """Sleep until a new event file in ``log_dir`` will sort after every file already there.

    TensorBoard reads a folder's event files in the order of their names, and a resumed
    run's purge only works when its file comes after the crashed run's. The writer names
    a file ``events.out.tfevents.<whole seconds>.<host>.<pid>.<counter>`` with an unpadded
    counter, so two files of one process in one second sort wrongly once the counter
    passes 9 ("…10" < "…9"). Waiting for the next whole second (at most one, and only when
    a file of this very second is there) gives the new file a later name.
    """
    folder = Path(log_dir)
    if not folder.is_dir():
        return
    stamps = []
    for path in folder.glob("events.out.tfevents.*"):
        part = path.name.split(".")[3]
        if part.isdigit():
            stamps.append(int(part))
    latest = max(stamps, default=None)
    while latest is not None and int(time.time()) <= latest:
        time.sleep(max(0.01, latest + 1 - time.time()))


class TensorBoardSink:
    """Writes StepGuard step reports to TensorBoard event files.

    Args:
        log_dir: the run directory (point ``tensorboard --logdir`` at it or its parent).
        r_limit: where the boundary line ``stepguard/r_limit`` is drawn (the paper's r = 1).
        histograms: write the per-sample spread histogram when a report carries the spreads.
        decisions: actions whose decisions are written as text (``()`` for none).
        flush_secs: how often the writer flushes to disk in the background.
        max_queue: events queued before a flush is forced.
        rank_zero_only: under torch.distributed, write only from global rank 0 (reports are
            already reduced across ranks, so every rank holds the same numbers); the other
            ranks' sinks do nothing.
        rank: this process's global rank (detected from torch.distributed or ``RANK`` when
            ``None``).

    The event file is opened at the first report. When that report's step is above 0 (a
    guard resumed from its ``state_dict``), events an earlier run wrote at that step or
    later are purged, so a resumed run shows every step once.

    Raises:
        ImportError: when the tensorboard package is not installed.
    """

    name = "tensorboard"

    def __init__(
        self,
        log_dir: str | os.PathLike[str],
        *,
        r_limit: float = 1.0,
        histograms: bool = True,
        decisions: Collection[str] = ("clip", "veto"),
        flush_secs: int = 10,
        max_queue: int = 100,
        rank_zero_only: bool = True,
        rank: int | None = None,
    ) -> None:
        writer_class = _summary_writer_class()
        self.log_dir = os.fspath(log_dir)
        self.r_limit = float(r_limit)
        self.histograms = histograms
        self.decisions = frozenset(decisions)
        unknown = self.decisions - set(ACTIONS)
        if unknown:
            raise ValueError(f"decisions must be among {ACTIONS}, got {sorted(unknown)}")
        self.rank = process_rank()[0] if rank is None else rank
        self.active = self.rank == 0 or not rank_zero_only
        self.action_counts = dict.fromkeys(ACTIONS, 0)
        self._layout_written = False
        self._closed = False
        self._writer: Any = None
        self._writer_class = writer_class
        self._writer_options = {"flush_secs": flush_secs, "max_queue": max_queue}

    def write(self, report: StepReport) -> None:
        """Write one report (a no-op on ranks that do not write)."""
        if self._closed:
            raise RuntimeError(f"TensorBoardSink({self.log_dir!r}) is closed")
        if not self.active:
            return
        step = report.step
        if self._writer is None:
            # A run resumed at step s > 0 purges the events a crashed run wrote from s on
            # (TensorBoard's purge_step), so every step is shown once.
            wait_for_a_later_event_file_name(self.log_dir)
            self._writer = self._writer_class(
                log_dir=self.log_dir, purge_step=step if step > 0 else None, **self._writer_options
            )
        writer = self._writer
        if not self._layout_written:
            writer.add_custom_scalars(custom_scalars_layout())
            self._layout_written = True
        for key, value in report.scalars().items():
            if key != "step":
                writer.add_scalar(tensorboard_tag(key), value, step)
        writer.add_scalar(R_LIMIT_TAG, self.r_limit, step)
        self.action_counts[report.action] += 1
        for action, count in self.action_counts.items():
            writer.add_scalar(action_tag(action), count, step)
        if self.histograms:
            spreads = [v for v in report.spread.values if math.isfinite(v)]
            if spreads:
                import numpy as np  # a dependency of tensorboard

                writer.add_histogram(SPREAD_HISTOGRAM_TAG, np.asarray(spreads), step)
        if report.action in self.decisions:
            writer.add_text(DECISION_TAG, decision_text(report), step)

    def flush(self) -> None:
        """Write pending events to disk."""
        if self._writer is not None and not self._closed:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file (closing twice is harmless)."""
        if self._writer is not None and not self._closed:
            self._writer.close()
        self._closed = True


def decision_text(report: StepReport) -> str:
    """The markdown line written for a decision, e.g. ``**veto** at step 12 (rule ...): ...``."""
    rule = f" (rule `{report.rule}`)" if report.rule else ""
    reason = f": {report.reason}" if report.reason else ""
    return (
        f"**{report.action}** at step {report.step}{rule}{reason} "
        f"— r = {report.r:.4g}, scale = {report.scale:.4g}"
    )
