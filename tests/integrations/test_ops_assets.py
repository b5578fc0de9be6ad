"""The shipped ops files: Grafana dashboard, Prometheus alerting rules and scrape config."""

from __future__ import annotations

import copy
import enum
import json
import re
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Any

import pytest

from stepguard.integrations import assets, naming

GRAFANA_COLUMNS = 24

# ---------------------------------------------------------------- Grafana's dashboard model
# The dashboard is checked against the typed model that Grafana publishes for its dashboards
# (grafana-foundation-sdk, Apache-2.0, a dev extra): every value must have the model's type,
# every key the model requires must be there, and no key may be unknown to the model.

_MISSING = object()


def _json_key(attribute: str) -> str:
    """The JSON key of a model attribute: ``grid_pos`` → ``gridPos``, ``id_val`` → ``id``."""
    head, *rest = attribute.removesuffix("_val").split("_")
    return head + "".join(part.title() for part in rest)


def _optional(hint: Any) -> bool:
    return type(None) in typing.get_args(hint)


def _model_problems(value: Any, source: Any, path: str) -> list[str]:
    problems = []
    for attribute, hint in typing.get_type_hints(type(value)).items():
        key = _json_key(attribute)
        given = source.get(key, _MISSING) if isinstance(source, dict) else _MISSING
        if given is _MISSING:
            if not _optional(hint):
                problems.append(f"{path}.{key}: required by the model, missing")
            continue
        problems += _problems(getattr(value, attribute), hint, f"{path}.{key}", given)
    return problems


def _problems(value: Any, hint: Any, path: str, source: Any) -> list[str]:
    """What is wrong with ``value`` (built from JSON ``source``) as an instance of ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in (typing.Any, object):
        return []
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return [] if type(None) in args else [f"{path}: null is not allowed"]
        arms = [a for a in args if a is not type(None)]
        matching = [a for a in arms if isinstance(a, type) and isinstance(value, a)] or arms
        results = [_problems(value, arm, path, source) for arm in matching]
        return [] if any(not r for r in results) else min(results, key=len)
    if origin is typing.Literal:
        return [] if value in args else [f"{path}: {value!r} is not one of {list(args)}"]
    if origin is list:
        if not isinstance(value, list):
            return [f"{path}: expected a list, got {value!r:.60}"]
        return [p for i, item in enumerate(value)
                for p in _problems(item, args[0], f"{path}[{i}]", source[i])]
    if origin is dict:
        return [] if isinstance(value, dict) else [f"{path}: expected an object, got {value!r:.60}"]
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        allowed = [member.value for member in hint]
        ok = isinstance(value, hint) or value in allowed
        return [] if ok else [f"{path}: {value!r} is not one of {allowed}"]
    if hint is bool or hint is str:
        ok = isinstance(value, hint)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(hint, type):
        if not isinstance(value, hint):
            return [f"{path}: expected {hint.__name__}, got {value!r:.60}"]
        return _model_problems(value, source, path)
    else:
        return []
    return [] if ok else [f"{path}: expected {hint.__name__}, got {value!r:.60}"]


def _dropped(source: Any, kept: Any, path: str) -> list[str]:
    """Keys of ``source`` that the model's round trip ``kept`` lost: unknown to the model."""
    if isinstance(source, dict) and isinstance(kept, dict):
        return [p for key, value in source.items()
                for p in ([f"{path}.{key}: not a field of the model"] if key not in kept
                          else _dropped(value, kept[key], f"{path}.{key}"))]
    if isinstance(source, list) and isinstance(kept, list) and len(source) == len(kept):
        return [p for i, (a, b) in enumerate(zip(source, kept, strict=True))
                for p in _dropped(a, b, f"{path}[{i}]")]
    return []


def dashboard_problems(dashboard: dict[str, Any]) -> list[str]:
    """Every way ``dashboard`` departs from Grafana's dashboard model: types, required and unknown keys."""
    from grafana_foundation_sdk.cog import plugins
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard

    plugins.register_default_plugins()  # typed panel options, field configs and Prometheus queries
    model = Dashboard.from_json(copy.deepcopy(dashboard))
    round_trip = json.loads(json.dumps(model, cls=JSONEncoder))
    return _model_problems(model, dashboard, "dashboard") + _dropped(dashboard, round_trip, "dashboard")



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


def test_dashboard_matches_grafanas_dashboard_model(require_module: Any) -> None:
    if sys.version_info < (3, 11):
        pytest.skip("grafana-foundation-sdk needs Python 3.11 or newer")
    require_module("grafana_foundation_sdk")
    problems = dashboard_problems(dashboard())
    assert not problems, "the dashboard departs from Grafana's model:\n" + "\n".join(problems)
    # and the check does reject a broken copy: a wrong type, a missing required key, a misspelt key
    broken = dashboard()
    broken["panels"][0]["gridPos"]["w"] = "12"
    del broken["templating"]
    broken["panels"][1]["fieldconfig"] = broken["panels"][1].pop("fieldConfig")
    assert sorted(dashboard_problems(broken)) == [
        "dashboard.panels[0].gridPos.w: expected int, got '12'",
        "dashboard.panels[1].fieldconfig: not a field of the model",
        "dashboard.templating: required by the model, missing",
    ]


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
