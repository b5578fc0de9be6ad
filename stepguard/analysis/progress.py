"""A one-line progress bar on standard error (redrawn in place on a terminal)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """Call as ``bar(done, total, text)``; on a terminal the line is redrawn in place, otherwise
    a line is printed every tenth of the way (and at the end).

    Args:
        stream: where to draw (default: standard error).
        width: characters of the bar.
    """

    def __init__(self, stream: TextIO | None = None, width: int = 28) -> None:
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.perf_counter()
        self._last_decile = -1
        self._drawn = False

    def __call__(self, done: int, total: int, text: str = "") -> None:
        total = max(total, 1)
        decile = 10 * done // total
        if not self.tty and decile == self._last_decile and done != total:
            return
        self._last_decile = decile
        filled = int(self.width * done / total)
        elapsed = time.perf_counter() - self.start
        line = f"analyze [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} {elapsed:5.1f}s  {text}"
        if self.tty:
            print("\r" + line[:160].ljust(100), end="", file=self.stream, flush=True)
            self._drawn = True
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        """End the line on a terminal."""
        if self.tty and self._drawn:
            print(file=self.stream, flush=True)
