"""JSON-lines sink: one report per line, flushed as it is written."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from stepguard.report import StepReport


class JsonlSink:
    """Append each :class:`StepReport` as one JSON object per line.

    Every line is written with a single ``write`` and flushed, so another process can
    read the file while training runs (a reader sees only whole lines, plus possibly one
    partial last line, which :func:`read_jsonl` skips). Non-finite floats are written as
    the strings ``"inf"``, ``"-inf"`` and ``"nan"`` (strict JSON has no such numbers).

    Args:
        path: the file to write; parent folders are created.
        append: keep existing lines (default: start a new file).
        fsync: also ``os.fsync`` after each line (durable against power loss; slower).
    """

    name = "jsonl"

    def __init__(self, path: str | os.PathLike[str], *, append: bool = False, fsync: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self._file = open(self.path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115

    def write(self, report: StepReport) -> None:
        self._file.write(json.dumps(report.to_dict(), allow_nan=False) + "\n")
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())

    def flush(self) -> None:
        if not self._file.closed:
            self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[StepReport]:
    """Yield the reports of a JSON-lines file, skipping a partially written last line."""
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.endswith("\n"):
                return
            if line.strip():
                yield StepReport.from_dict(json.loads(line))


def read_jsonl(path: str | os.PathLike[str]) -> list[StepReport]:
    """All complete reports of a JSON-lines file."""
    return list(iter_jsonl(path))
