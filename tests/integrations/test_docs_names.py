"""docs/integrations.md's name table agrees with the code (stepguard.integrations.naming)."""

from __future__ import annotations

import re
from typing import Any

from stepguard.integrations import naming

ROW = re.compile(r"^\| `(?P<field>[^`]+)` \| [^|]* \| (?P<tag>[^|]+) \| `(?P<metric>[^`]+)` \|$")


def table(helpers: Any) -> dict[str, tuple[str, str]]:
    text = (helpers.repo_root / "docs" / "integrations.md").read_text()
    section = text.split("## One name per number", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        match = ROW.match(line.strip())
        if match:
            rows[match["field"]] = (match["tag"].strip(), match["metric"])
    return rows


def test_every_field_is_documented_with_its_names(helpers: Any) -> None:
    rows = table(helpers)
    documented_keys = set(naming.GAUGES) | {"spread.count", "spread.<stat>"} | {
        f"{k}.<key>" for k in naming.NESTED}
    assert set(rows) == documented_keys
    for field, (tag, metric) in rows.items():
        key = re.sub(r"<(key|stat)>", "x", field)
        series = naming.prometheus_series(key)
        assert series is not None, field
        name, labels = series
        rendered = name + ("{" + ",".join(f'{k}="x"' for k in labels) + "}"
                           if labels else "")
        assert re.sub(r"<(key|stat)>", "x", metric) == rendered, field
        if field == "step":
            assert tag.startswith("—")
        else:
            assert re.sub(r"<(key|stat)>", "x", tag) == f"`{naming.tensorboard_tag(key)}`"
