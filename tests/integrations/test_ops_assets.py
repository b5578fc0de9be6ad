"""The shipped ops files: Grafana dashboard, Prometheus alerting rules and scrape config."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from stepguard.integrations import assets, naming

GRAFANA_COLUMNS = 24


def dashboard() -> dict[str, Any]:
    return json.loads(assets.grafana_dashboard().read_text())


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd)


def test_assets_ship_inside_the_package() -> None:
    for path in (assets.grafana_dashboard(), assets.prometheus_alerts(),
                 assets.prometheus_alert_tests(), assets.prometheus_scrape_config()):
        assert path.is_file(), path
        # pyproject's package-data ships grafana/*.json and prometheus/*.yml
        assert path.suffix in {".json", ".yml"}


@pytest.mark.requires_binary("promtool")
def test_alert_rules_pass_their_promtool_unit_tests() -> None:
    done = promtool("test", "rules", assets.prometheus_alert_tests().name,
                    cwd=assets.prometheus_alert_tests().parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


@pytest.mark.requires_binary("promtool")
def test_rules_and_scrape_config_are_valid() -> None:
    done = promtool("check", "rules", str(assets.prometheus_alerts()))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 5 rules found" in done.stdout
    done = promtool("check", "config", assets.prometheus_scrape_config().name,
                    cwd=assets.prometheus_scrape_config().parent)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_validates_against_grafanas_schema(helpers: Any, require_module: Any) -> None:
    schema_path = helpers.grafana_schema
    if not schema_path.is_file():
        pytest.fail(
            f"Grafana's dashboard JSON schema is missing: expected {schema_path} (it is kept "
            "outside the repository, next to it under shared/reference/grafana/)",
            pytrace=False,
        )
    jsonschema = require_module("jsonschema")
    schema = json.loads(schema_path.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(dashboard()), key=lambda e: list(e.absolute_path))
    detail = "\n".join(
        f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}"
        + "".join(f"\n    {c.message[:200]}" for c in (e.context or [])[:4])
        for e in errors
    )
    assert not errors, f"{len(errors)} schema errors:\n{detail}"
    # and the validator does reject a broken copy (the check can fail)
    broken = dashboard()
    broken["panels"][0]["gridPos"]["w"] = "12"
    del broken["templating"]
    assert len(list(validator.iter_errors(broken))) >= 2


def test_dashboard_layout_and_datasource() -> None:
    dash = dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["run"]["allValue"] == ".*"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in dash["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            assert 'run=~"$run"' in target["expr"], (panel["title"], target["expr"])
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= GRAFANA_COLUMNS, panel["title"]
        mine = {(pos["x"] + dx, pos["y"] + dy) for dx in range(pos["w"]) for dy in range(pos["h"])}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine


def test_dashboard_shows_the_stepguard_views() -> None:
    panels = {p["title"]: p for p in dashboard()["panels"]}

    def exprs(title: str) -> str:
        return " ".join(t["expr"] for t in panels[title]["targets"])

    r_panel = panels["Normalized step r against the r = 1 boundary"]
    assert "stepguard_normalized_step{" in exprs(r_panel["title"])
    assert "stepguard_normalized_step_max{" in exprs(r_panel["title"])
    defaults = r_panel["fieldConfig"]["defaults"]
    assert {"value": 1, "color": "red"} in defaults["thresholds"]["steps"]
    assert defaults["custom"]["thresholdsStyle"]["mode"].startswith("line")
    assert "stepguard_radius{" in exprs("Radius rho_a and step length tau")
    assert "stepguard_step_length{" in exprs("Radius rho_a and step length tau")
    assert "stepguard_actions_total{" in exprs("Policy actions per minute")
    assert "stepguard_softmax_collapse_ratio{" in exprs("Softmax collapse")
    assert "stepguard_entanglement{" in exprs("Gradient entanglement")


@pytest.mark.requires_binary("promtool")
def test_dashboard_promql_parses(helpers: Any, tmp_path: Path) -> None:
    queries = helpers.dashboard_queries()
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:panel_{i}", "expr": expr} for i, (_, _, expr) in enumerate(queries)
    ]}]}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    done = promtool("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(queries)} rules found" in done.stdout


def test_every_metric_in_the_dashboard_and_alerts_is_exported(helpers: Any) -> None:
    pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    from stepguard.integrations.prometheus import PrometheusSink

    sink = PrometheusSink(port=0, run="names")
    try:
        sink.write(helpers.make_report(0))
        text = helpers.http_get(sink.url).decode()
    finally:
        sink.close()
    exported = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
    used = set()
    for _, _, expr in helpers.dashboard_queries():
        used |= set(re.findall(r"\bstepguard_[a-z0-9_]+", expr))
    used |= set(re.findall(r"\bstepguard_[a-z0-9_]+", assets.prometheus_alerts().read_text()))
    assert used, "no StepGuard metric found in the dashboard or the alerts"
    assert used <= exported, f"not exported: {sorted(used - exported)}"
    # and every gauge of the name table is exported under its documented name
    assert {m.name for m in naming.GAUGES.values()} <= exported
