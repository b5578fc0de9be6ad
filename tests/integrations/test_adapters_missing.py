"""Framework adapters import their framework lazily and name the extra when it is missing."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("module", "blocked", "extra"),
    [
        ("stepguard.integrations.lightning", ("lightning", "pytorch_lightning"), "stepguard[lightning]"),
        ("stepguard.integrations.transformers", ("transformers",), "stepguard[transformers]"),
    ],
)
def test_missing_framework_names_the_extra(module: str, blocked: tuple[str, ...], extra: str) -> None:
    code = (
        "import sys\n"
        f"for name in {blocked!r}: sys.modules[name] = None\n"
        f"import stepguard\n"
        f"try:\n    import {module}\nexcept ImportError as exc:\n    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert extra in done.stdout
