"""Small helpers shared by the example scripts: list flags, seed statistics, JSON output.

The models, data and training loops live in :mod:`stepguard.demo` and
:mod:`stepguard.datasets`; this module only holds what the command-line examples add on
top (parsing ``--seeds 0,1,2``, "median [min, max]" cells, writing JSON that stays valid
when a run diverges to NaN or infinity).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

from stepguard.report import json_ready

T = TypeVar("T")


def parse_list(text: str, kind: Callable[[str], T]) -> list[T]:
    """``"0,1,2"`` → ``[0, 1, 2]`` with ``kind`` applied to each non-empty item.

    Raises:
        ValueError: the list is empty.
    """
    items = [kind(part.strip()) for part in text.split(",") if part.strip()]
    if not items:
        raise ValueError(f"expected a comma-separated list, got {text!r}")
    return items


def stats(values: Iterable[float]) -> dict[str, Any]:
    """Median, min, max and the values themselves (NaN values are ignored in the statistics)."""
    vals = [float(v) for v in values]
    finite = [v for v in vals if not math.isnan(v)]
    if not finite:
        return {"median": math.nan, "min": math.nan, "max": math.nan, "values": vals}
    return {
        "median": statistics.median(finite),
        "min": min(finite),
        "max": max(finite),
        "values": vals,
    }


def cell(summary: Mapping[str, Any], fmt: str = ".3f") -> str:
    """A table cell ``"median [min, max]"`` from :func:`stats`."""
    return f"{summary['median']:{fmt}} [{summary['min']:{fmt}}, {summary['max']:{fmt}}]"


def write_json(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` as strict JSON (parents created); returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(json_ready(payload), indent=1, allow_nan=False) + "\n")
    return out


def set_threads(threads: int | None) -> None:
    """Pin torch's intra-op threads (``None`` keeps torch's default)."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
