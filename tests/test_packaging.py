"""The package list in pyproject.toml covers every subpackage, so a wheel ships them all."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")
ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "stepguard").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    found |= {
        "stepguard.integrations"
        + "".join("." + p for p in init.parent.relative_to(ROOT / "integrations").parts)
        for init in (ROOT / "integrations").rglob("__init__.py")
    }
    assert found <= listed, f"add to [tool.setuptools].packages: {sorted(found - listed)}"
    assert config["package-dir"]["stepguard.integrations"] == "integrations"


def test_core_imports_only_torch_and_pydantic() -> None:
    import subprocess
    import sys

    code = (
        "import sys, stepguard; "
        "heavy = [m for m in ('tensorboard', 'prometheus_client', 'matplotlib', 'lightning', 'transformers') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == ""


def test_numpy_is_a_core_dependency() -> None:
    """Without numpy, every ``import torch`` warns "Failed to initialize NumPy" (torch does not require it)."""
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.split(">")[0].split("=")[0].strip() == "numpy" for d in dependencies), dependencies
