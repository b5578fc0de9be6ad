"""The Python examples of docs/diagnostics.md run, in order, and print what their comments say."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

PAGE = Path(__file__).resolve().parents[2] / "docs" / "diagnostics.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", PAGE.read_text(encoding="utf-8"), re.S | re.M)


def promised(block: str) -> list[list[float]]:
    """For each ``print(...)  # 1.0 0.5`` line, the numbers its comment promises."""
    found = []
    for line in block.splitlines():
        code, _, comment = line.partition("#")
        numbers = comment.split()
        if "print(" in code and numbers and all(re.fullmatch(r"-?\d+\.\d+", n) for n in numbers):
            found.append([float(n) for n in numbers])
    return found


def test_page_examples_run_and_print_what_they_promise() -> None:
    blocks = python_blocks()
    assert len(blocks) == 4
    torch.manual_seed(0)
    namespace: dict[str, object] = {"__name__": "diagnostics_page"}
    checked = 0
    for index, block in enumerate(blocks):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block, f"diagnostics.md[block {index}]", "exec"), namespace)
        printed = [
            [float(v) for v in re.findall(r"-?\d+\.\d+", line)] for line in out.getvalue().splitlines()
        ]
        for numbers in promised(block):
            assert any(got == pytest.approx(numbers, abs=1e-6) for got in printed), (
                f"block {index} promises {numbers}, printed {out.getvalue()!r}"
            )
            checked += 1
        listed = re.search(r"print\(sorted\(.*\)\)\n((?:# .*\n)+)", block + "\n")
        if listed:
            expected = re.findall(r"'([^']+)'", listed.group(1))
            assert str(expected) in out.getvalue(), f"block {index} lists {expected}"
            checked += 1
    assert checked == 7
