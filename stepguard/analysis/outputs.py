"""Writing an analysis to disk: JSON lines, CSV, a summary, CLD scores, TensorBoard and HTML.

``OUT/report.jsonl``   one object per measured transition: the StepReport's JSON dict plus
                       ``step_from``, ``step_to``, ``checkpoint_from``, ``checkpoint_to``,
                       ``binding_radii``, ``bridged`` and ``flags``
``OUT/report.csv``     the same, flat (one column per scalar)
``OUT/checkpoints.csv`` every checkpoint: step, file, used or the error, loss and accuracy
``OUT/summary.json``   settings, flagged and missing transitions, skipped checkpoints, notes
``OUT/cld.json``, ``OUT/cld.csv``  CLD scores, per-class ranking and coreset (with ``--cld``)
``OUT/tensorboard/``   the reports through the TensorBoard sink (when tensorboard is installed)
``OUT/report.html``    a self-contained page with plots and the flagged transitions
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from stepguard.analysis.replay import AnalysisResult, Transition
from stepguard.sinks.jsonl import iter_json_objects, write_atomically

LEADING = ("step_from", "step_to", "tau", "rho_a", "r", "loss", "extras.accuracy")


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value


def write_jsonl(transitions: Iterable[Transition], path: Path) -> None:
    """One JSON object per transition (non-finite numbers as ``"inf"``, ``"-inf"``, ``"nan"``).

    The file is replaced atomically: a crash while writing leaves the previous report whole.
    """
    write_atomically(path, (json.dumps(t.to_dict(), allow_nan=False) + "\n" for t in transitions))


def read_jsonl(path: str | os.PathLike[str]) -> list[Transition]:
    """The transitions of a ``report.jsonl`` written by the analyzer.

    A corrupt or incomplete line is skipped with a
    :class:`~stepguard.sinks.CorruptLineWarning` naming the file and the line.
    """
    return [Transition.from_dict(data) for data in iter_json_objects(path)]


def transition_row(t: Transition) -> dict[str, Any]:
    """A flat row: the report's scalars plus steps, files, binding samples and flags."""
    scalars = t.report.scalars()
    scalars.pop("step", None)
    row: dict[str, Any] = {"step_from": t.step_from, "step_to": t.step_to}
    row.update(scalars)
    row.update(
        checkpoint_from=t.checkpoint_from,
        checkpoint_to=t.checkpoint_to,
        binding=" ".join(str(b) for b in t.report.binding),
        binding_radii=" ".join(f"{v:.6g}" for v in t.binding_radii),
        bridged=int(t.bridged),
        flags=";".join(t.flags),
    )
    return row


def write_csv(transitions: Iterable[Transition], path: Path) -> None:
    """``report.csv``: one row per transition, the columns the union of every row's keys."""
    rows = [transition_row(t) for t in transitions]
    columns = [c for c in LEADING if any(c in r for r in rows)]
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    _write_rows(path, columns, rows)


def write_checkpoints_csv(result: AnalysisResult, path: Path) -> None:
    """``checkpoints.csv``: every checkpoint, used or skipped (with the reason)."""
    rows = [dataclasses.asdict(c) for c in result.checkpoints]
    columns = [f.name for f in dataclasses.fields(result.checkpoints[0])] if rows else ["step"]
    _write_rows(path, columns, rows)


def _write_rows(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})


def summary(result: AnalysisResult, outputs: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The content of ``summary.json``."""
    rs = [t.report.r for t in result.transitions if not math.isnan(t.report.r)]
    return _json_value(
        {
            "settings": result.settings,
            "transitions": len(result.transitions),
            "max_r": max(rs) if rs else None,
            "flagged": [
                {"step_from": t.step_from, "step_to": t.step_to, "r": t.report.r, "flags": list(t.flags)}
                for t in result.flagged
            ],
            "missing": [dataclasses.asdict(m) for m in result.missing],
            "skipped_checkpoints": [
                {"step": c.step, "path": c.path, "error": c.error} for c in result.checkpoints if not c.ok
            ],
            "cld": None
            if result.cld is None
            else {"checkpoints": result.cld.checkpoints, "coreset_size": _len(result.cld.coreset)},
            "notes": result.notes,
            "seconds": round(result.seconds, 3),
            "outputs": dict(outputs or {}),
        }
    )


def _len(value: list[int] | None) -> int | None:
    return None if value is None else len(value)


def write_cld(result: AnalysisResult, out: Path) -> list[Path]:
    """``cld.json`` (scores, per-class ranking, coreset) and ``cld.csv`` (one row per sample)."""
    cld = result.cld
    if cld is None:
        return []
    rank = {i: r for members in cld.ranking.values() for r, i in enumerate(members)}
    (out / "cld.json").write_text(
        json.dumps(
            _json_value(
                {
                    "checkpoints": cld.checkpoints,
                    "scores": dict(zip(map(str, cld.indices), cld.scores, strict=True)),
                    "sorted_indices_per_class": {str(c): m for c, m in cld.ranking.items()},
                    "coreset": cld.coreset,
                }
            ),
            indent=1,
        )
    )
    rows = [
        {"index": i, "label": y, "score": s, "rank_in_class": rank.get(i, "")}
        for i, y, s in zip(cld.indices, cld.labels, cld.scores, strict=True)
    ]
    if cld.coreset is not None:
        keep = set(cld.coreset)
        for row in rows:
            row["in_coreset"] = int(row["index"] in keep)
    columns = ["index", "label", "score", "rank_in_class"] + (
        ["in_coreset"] if cld.coreset is not None else []
    )
    _write_rows(out / "cld.csv", columns, rows)
    return [out / "cld.json", out / "cld.csv"]


def write_tensorboard(transitions: Iterable[Transition], log_dir: Path) -> str | None:
    """Send the reports through the TensorBoard sink; returns a note when tensorboard is missing."""
    try:
        from stepguard.integrations.tensorboard import TensorBoardSink

        sink = TensorBoardSink(log_dir)
    except ImportError as exc:
        return f"TensorBoard events not written: {exc}"
    try:
        for t in transitions:
            sink.write(t.report)
    finally:
        sink.close()
    return None


def write_outputs(
    result: AnalysisResult,
    out_dir: str | os.PathLike[str],
    *,
    tensorboard: bool = True,
    html: bool = True,
) -> dict[str, Path]:
    """Write every output of an analysis into ``out_dir`` (created); returns name → path.

    A missing tensorboard package is not an error: a note is added to ``result.notes`` and
    ``summary.json``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {
        "report.jsonl": out / "report.jsonl",
        "report.csv": out / "report.csv",
        "checkpoints.csv": out / "checkpoints.csv",
    }
    write_jsonl(result.transitions, paths["report.jsonl"])
    write_csv(result.transitions, paths["report.csv"])
    write_checkpoints_csv(result, paths["checkpoints.csv"])
    for path in write_cld(result, out):
        paths[path.name] = path
    if tensorboard:
        note = write_tensorboard(result.transitions, out / "tensorboard")
        if note is None:
            paths["tensorboard"] = out / "tensorboard"
        elif note not in result.notes:
            result.notes.append(note)
    if html:
        from stepguard.analysis.html import render_html

        paths["report.html"] = out / "report.html"
        paths["report.html"].write_text(render_html(result), encoding="utf-8")
    paths["summary.json"] = out / "summary.json"
    listing = {k: str(v) for k, v in paths.items()}
    paths["summary.json"].write_text(json.dumps(summary(result, listing), indent=1, allow_nan=False))
    return paths
