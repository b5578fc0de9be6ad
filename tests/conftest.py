"""Shared fixtures and the ``requires_binary`` marker."""

from __future__ import annotations

import os
import shutil

import pytest
import torch


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker in item.iter_markers(name="requires_binary"):
        for name in marker.args:
            if shutil.which(name) is None:
                message = f"system binary {name!r} is not installed"
                if os.environ.get("CI", "").lower() == "true":
                    pytest.fail(f"{message}; .ci/install-system-deps.sh must install it", pytrace=False)
                pytest.skip(message)


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
