"""Every policy written out in docs/policies.md is a valid policy."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from stepguard.policy import RulePolicy

DOC = Path(__file__).resolve().parents[2] / "docs" / "policies.md"
BLOCKS = re.findall(r"```yaml\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


def test_the_page_has_policies() -> None:
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("block", BLOCKS, ids=[f"yaml{i}" for i in range(len(BLOCKS))])
def test_each_yaml_policy_in_the_docs_validates(block: str) -> None:
    yaml = pytest.importorskip("yaml")
    policy = RulePolicy.from_config(yaml.safe_load(block))
    assert policy.rules
