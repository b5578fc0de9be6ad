"""JSON-lines sink: one report per line, flushed as it is written, safe to resume.

Reading is tolerant: a corrupt line (a torn write, a fragment glued to the next record by
an older writer) is skipped with a :class:`CorruptLineWarning` naming the file and line,
and the whole record after a glued fragment is recovered.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

from stepguard.report import StepReport

Mode = Literal["resume", "append", "overwrite"]
MODES: tuple[str, ...] = ("resume", "append", "overwrite")


class CorruptLineWarning(UserWarning):
    """A line of a JSON-lines file could not be read and was skipped."""


class JsonlSink:
    """Write each :class:`StepReport` as one JSON object per line.

    Every line is written with a single ``write`` and flushed, so another process can
    read the file while training runs (a reader sees only whole lines, plus possibly one
    partial last line, which :func:`read_jsonl` skips). Non-finite floats are written as
    the strings ``"inf"``, ``"-inf"`` and ``"nan"`` (strict JSON has no such numbers).

    What happens to an existing file is decided on the first write, from the step of the
    first report written (a guard resumed from its ``state_dict`` continues its step count):

    * ``"resume"`` (default): keep the records whose step is below the first step written
      now and drop the rest. A fresh run (first step 0) starts a new file; a run resumed
      from a checkpoint continues the file with every step exactly once.
    * ``"append"``: keep every record already there (several runs, or every attempt of a
      resumed run, in one file).
    * ``"overwrite"``: start a new file at once, whatever it held.

    In ``"resume"`` and ``"append"`` an incomplete last line (a process killed mid-write)
    and corrupt lines are dropped, so the next record starts on a line of its own. Kept
    records are never rewritten in place: the file is cut after the last kept line, or,
    when records must be removed from its middle, rewritten to a temporary file that
    replaces it atomically.

    Args:
        path: the file to write; parent folders are created.
        mode: ``"resume"``, ``"append"`` or ``"overwrite"`` (see above).
        append: the older spelling: ``True`` is ``mode="append"``, ``False`` is the default.
        fsync: also ``os.fsync`` after each line (durable against power loss; slower).
    """

    name = "jsonl"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        mode: Mode | None = None,
        append: bool | None = None,
        fsync: bool = False,
    ) -> None:
        self.mode: Mode = _resolve_mode(mode, append)
        self.path = Path(path)
        if self.path.is_dir():
            raise IsADirectoryError(f"JsonlSink path {self.path} is a directory; give a file name")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self._file: TextIO | None = None
        self._closed = False
        if self.mode == "overwrite":
            self._file = open(self.path, "w", encoding="utf-8")  # noqa: SIM115

    def write(self, report: StepReport) -> None:
        if self._closed:
            raise ValueError(f"JsonlSink {self.path} is closed")
        if self._file is None:
            keep = _keep_all if self.mode == "append" else _keep_below(report.step)
            prepare(self.path, keep)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        self._file.write(json.dumps(report.to_dict(), allow_nan=False) + "\n")
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())

    def flush(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.flush()

    def close(self) -> None:
        self._closed = True
        if self._file is not None and not self._file.closed:
            self._file.close()


def _resolve_mode(mode: str | None, append: bool | None) -> Mode:
    if mode is not None and append is not None:
        raise ValueError("give JsonlSink either mode= or the older append=, not both")
    if mode is None:
        return "append" if append else "resume"
    if mode not in MODES:
        raise ValueError(f"unknown JsonlSink mode {mode!r}; use one of {', '.join(MODES)}")
    return mode  # type: ignore[return-value]


# ------------------------------------------------------------------ reading


@dataclass(frozen=True)
class Line:
    """One line of a JSON-lines file as read back.

    Attributes:
        number: its line number (from 1).
        start, end: its byte offsets (``end`` past the newline).
        data: the decoded object, or ``None`` when the line is corrupt or incomplete.
        clean: the bytes on disk are exactly one JSON object (nothing was recovered or lost).
        raw: the bytes on disk.
    """

    number: int
    start: int
    end: int
    data: Any
    clean: bool
    raw: bytes


def scan(path: str | os.PathLike[str]) -> Iterator[Line]:
    """The lines of a JSON-lines file, warning (:class:`CorruptLineWarning`) about bad ones.

    A line that is not JSON is tried for a whole object at its end (an older writer glued a
    torn fragment to the next record); if none is found it is yielded with ``data=None``.
    An incomplete last line (no newline) is yielded with ``data=None``. Blank lines are
    left out.
    """
    with open(path, "rb") as handle:
        offset = 0
        for number, raw in enumerate(handle, start=1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            if not raw.endswith(b"\n"):
                _warn(
                    path,
                    number,
                    f"incomplete last line ({len(raw)} bytes without a newline: the "
                    "writer was stopped mid-line or is still writing it); skipped",
                )
                yield Line(number, start, offset, None, False, raw)
                return
            data, clean = _decode(path, number, raw)
            yield Line(number, start, offset, data, clean, raw)


def _decode(path: str | os.PathLike[str], number: int, raw: bytes) -> tuple[Any, bool]:
    text = raw.decode("utf-8", errors="replace")
    try:
        return json.loads(text), True
    except ValueError as exc:
        error = exc
    for at in _object_starts(text):
        try:
            data = json.loads(text[at:])
        except ValueError:
            continue
        _warn(path, number, f"{at} bytes of a torn record before a whole one; the fragment was dropped")
        return data, False
    _warn(path, number, f"not JSON ({error}); skipped")
    return None, False


def _object_starts(text: str) -> Iterator[int]:
    at = text.find('{"', 1)
    while at != -1:
        yield at
        at = text.find('{"', at + 1)


def _warn(path: str | os.PathLike[str], number: int, message: str) -> None:
    warnings.warn(f"{os.fspath(path)}, line {number}: {message}", CorruptLineWarning, stacklevel=4)


def iter_json_objects(path: str | os.PathLike[str]) -> Iterator[Any]:
    """The JSON objects of a JSON-lines file, skipping (with a warning) every unreadable line."""
    for line in scan(path):
        if line.data is not None:
            yield line.data


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[StepReport]:
    """Yield the reports of a JSON-lines file, skipping corrupt or incomplete lines with a warning."""
    for data in iter_json_objects(path):
        yield StepReport.from_dict(data)


def read_jsonl(path: str | os.PathLike[str]) -> list[StepReport]:
    """All readable reports of a JSON-lines file (see :func:`iter_jsonl`)."""
    return list(iter_jsonl(path))


# ------------------------------------------------------------------ preparing a file to continue

Keep = Callable[[Any], bool]


def _keep_all(data: Any) -> bool:
    return True


def _keep_below(step: int) -> Keep:
    def keep(data: Any) -> bool:
        value = data.get("step") if isinstance(data, dict) else None
        return isinstance(value, int) and value < step

    return keep


def prepare(path: str | os.PathLike[str], keep: Keep) -> None:
    """Leave in ``path`` only its readable records for which ``keep`` holds, each on a whole line.

    When the kept lines are exactly the file's first lines, untouched, the file is cut after
    them (the kept bytes are never rewritten); otherwise the kept records go to a temporary
    file in the same folder that then replaces ``path`` (:func:`os.replace`), so a crash at
    any moment leaves either the old file or the new one. A missing file is left missing.
    """
    path = Path(path)
    if not path.exists():
        return
    cut, rewrite = _plan(path, keep)
    if rewrite:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CorruptLineWarning)  # the first pass reported them
            write_atomically(path, _kept_lines(path, keep))
    elif cut != path.stat().st_size:
        os.truncate(path, cut)


def _plan(path: Path, keep: Keep) -> tuple[int, bool]:
    """Where the file's leading run of clean kept lines ends, and whether kept records lie beyond it."""
    cut, in_prefix, rewrite = 0, True, False
    for line in scan(path):
        kept = line.data is not None and keep(line.data)
        if kept and line.clean and in_prefix:
            cut = line.end
        elif kept:
            rewrite = True
        else:
            in_prefix = False
    return cut, rewrite


def _kept_lines(path: Path, keep: Keep) -> Iterator[str]:
    for line in scan(path):
        if line.data is not None and keep(line.data):
            yield line.raw.decode("utf-8", errors="replace") if line.clean else json.dumps(line.data) + "\n"


def write_atomically(path: str | os.PathLike[str], lines: Iterable[str]) -> None:
    """Write ``lines`` to a temporary file beside ``path`` that then replaces it (:func:`os.replace`).

    A crash at any moment leaves either the old file or the whole new one, never a mix.
    """
    path = Path(path)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.writelines(lines)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
