"""Policies from dicts and files: the same policy in YAML, JSON and TOML, and errors that name the key."""

from __future__ import annotations

import json
import math
import sys
import textwrap

import pytest

from stepguard import StepReport
from stepguard.cli import main
from stepguard.policy import (
    ClipPolicy,
    PolicyConfigError,
    RulePolicy,
    SafePolicy,
    VetoPolicy,
    resolve_policy,
)

YAML = """\
name: production
max_consecutive_vetoes: 5
rules:
  - {name: nonfinite, condition: nonfinite, action: veto}
  - name: loss_spike
    condition: {kind: spike, field: loss, z: 6, window: 50, warmup: 10}
    action: veto
    escalate: {after: 3, action: {kind: halt, message: look at the data}}
  - name: collapse
    condition: {kind: threshold, field: sc_fraction, op: gt, value: 0.2}
    action: {kind: warn, every: 50}
  - {name: clip_r, condition: r > 1, action: {kind: clip, target: 1.0}}
"""

JSON = {
    "name": "production",
    "max_consecutive_vetoes": 5,
    "rules": [
        {"name": "nonfinite", "condition": "nonfinite", "action": "veto"},
        {
            "name": "loss_spike",
            "condition": {"kind": "spike", "field": "loss", "z": 6, "window": 50, "warmup": 10},
            "action": "veto",
            "escalate": {"after": 3, "action": {"kind": "halt", "message": "look at the data"}},
        },
        {
            "name": "collapse",
            "condition": {"kind": "threshold", "field": "sc_fraction", "op": ">", "value": 0.2},
            "action": {"kind": "warn", "every": 50},
        },
        {"name": "clip_r", "condition": "r > 1", "action": {"kind": "clip", "target": 1.0}},
    ],
}

TOML = """\
name = "production"
max_consecutive_vetoes = 5

[[rules]]
name = "nonfinite"
condition = "nonfinite"
action = "veto"

[[rules]]
name = "loss_spike"
condition = { kind = "spike", field = "loss", z = 6, window = 50, warmup = 10 }
action = "veto"
escalate = { after = 3, action = { kind = "halt", message = "look at the data" } }

[[rules]]
name = "collapse"
condition = { kind = "threshold", field = "sc_fraction", op = ">", value = 0.2 }
action = { kind = "warn", every = 50 }

[[rules]]
name = "clip_r"
condition = "r > 1"
action = { kind = "clip", target = 1.0 }
"""


@pytest.fixture
def files(tmp_path):
    (tmp_path / "p.yaml").write_text(YAML)
    (tmp_path / "p.json").write_text(json.dumps(JSON))
    (tmp_path / "p.toml").write_text(TOML)
    return tmp_path


def test_the_same_policy_from_yaml_json_toml_and_a_dict(files) -> None:
    pytest.importorskip("yaml")
    pytest.importorskip("tomllib")
    configs = [RulePolicy.from_path(files / f"p.{ext}").config for ext in ("yaml", "json", "toml")]
    configs.append(RulePolicy.from_config(JSON).config)
    assert configs[0] == configs[1] == configs[2] == configs[3]
    policy = RulePolicy.from_path(files / "p.yaml")
    assert isinstance(policy, RulePolicy) and policy.name == "production" and policy.needs_state_backup
    assert [r.name for r in policy.rules] == ["nonfinite", "loss_spike", "collapse", "clip_r"]
    assert policy.rules[2].condition.op == ">"  # `gt` is read as `>`
    d = policy.decide(StepReport(step=0, tau=3.0, rho_a=1.0, r=3.0, delta_a=math.pi))
    assert (d.action, d.rule) == ("clip", "clip_r")


def test_to_dict_round_trips_every_preset_and_a_loaded_policy(files) -> None:
    for policy in (ClipPolicy(0.5), VetoPolicy(2.0), SafePolicy(), RulePolicy.from_config(JSON)):
        again = RulePolicy.from_config(json.loads(json.dumps(policy.to_dict())))
        assert again.config == policy.config


def test_resolve_policy_reads_a_policy_file(files) -> None:
    policy = resolve_policy(str(files / "p.json"))
    assert policy.name == "production"
    with pytest.raises(FileNotFoundError):
        resolve_policy(str(files / "missing.toml"))


def _rules(*rules) -> dict:
    ok = {"name": "ok", "condition": "r > 1", "action": "clip"}
    return {"rules": [ok, ok | {"name": "ok2"}, *rules]}


@pytest.mark.parametrize(
    ("data", "key", "message"),
    [
        (
            _rules(
                {"name": "x", "condition": {"kind": "threshold", "field": "rr", "value": 1}, "action": "veto"}
            ),
            "rules[2].condition.field",
            "unknown report field 'rr' (did you mean 'r'?); known: step, tau, rho_a, r,",
        ),
        (
            _rules({"name": "x", "condition": "rr > 1", "action": "veto"}),
            "rules[2].condition.field",
            "unknown report field 'rr'",
        ),
        (
            _rules({"name": "x", "condition": "r >> 1", "action": "veto"}),
            "rules[2].condition",
            "cannot read condition 'r >> 1'",
        ),
        (
            _rules({"name": "x", "condition": {"kind": "spike", "field": "loss", "zz": 1}, "action": "veto"}),
            "rules[2].condition.zz",
            "unknown key; known: kind, field, z, window",
        ),
        (
            _rules(
                {
                    "name": "x",
                    "condition": {"kind": "spike", "field": "loss", "window": 5, "warmup": 9},
                    "action": "veto",
                }
            ),
            "rules[2].condition",
            "warmup (9) cannot exceed window (5)",
        ),
        (
            _rules({"name": "x", "condition": {"kind": "bogus"}, "action": "veto"}),
            "rules[2].condition",
            "unknown condition kind 'bogus'; known: threshold",
        ),
        (
            _rules({"name": "x", "condition": {"field": "r"}, "action": "veto"}),
            "rules[2].condition",
            "a condition needs a 'kind'",
        ),
        (
            _rules({"name": "x", "condition": "r > 1", "action": "nuke"}),
            "rules[2].action",
            "unknown action 'nuke'; known: allow, clip, veto",
        ),
        (
            _rules({"name": "x", "condition": "r > 1", "action": {"kind": "clip", "target": 0}}),
            "rules[2].action.target",
            "greater than 0",
        ),
        (
            _rules({"name": "x", "condition": "r > 1", "action": {"kind": "backoff", "factor": 2}}),
            "rules[2].action.factor",
            "less than 1",
        ),
        (
            _rules(
                {
                    "name": "x",
                    "condition": {"kind": "threshold", "field": "r", "op": "=>", "value": 1},
                    "action": "veto",
                }
            ),
            "rules[2].condition.op",
            "unknown operator '=>'",
        ),
        (
            _rules(
                {
                    "name": "x",
                    "condition": {"kind": "all", "conditions": ["r > 1", "tua > 2"]},
                    "action": "veto",
                }
            ),
            "rules[2].condition.conditions[1].field",
            "unknown report field 'tua'",
        ),
        (
            _rules({"name": "x", "condtion": "r > 1", "action": "veto"}),
            "rules[2].condtion",
            "unknown key; known: name, condition, action, continue, cooldown, escalate",
        ),
        (_rules({"name": "x", "action": "veto"}), "rules[2].condition", "missing required key"),
        (
            _rules({"name": "ok", "condition": "r > 2", "action": "veto"}),
            "rules[2].name",
            "duplicate rule name 'ok' (first used by rules[0])",
        ),
        (
            _rules({"name": "max_consecutive_vetoes", "condition": "r > 2", "action": "veto"}),
            "rules[2].name",
            "reserved",
        ),
        (
            _rules({"name": "bad name", "condition": "r > 2", "action": "veto"}),
            "rules[2].name",
            "must start with a letter",
        ),
        (
            _rules(
                {
                    "name": "x",
                    "condition": "r > 2",
                    "action": "veto",
                    "escalate": {"after": 1, "action": "halt"},
                }
            ),
            "rules[2].escalate.after",
            "greater than or equal to 2",
        ),
        (
            _rules({"name": "x", "condition": "r > 2", "action": "veto", "cooldown": -1}),
            "rules[2].cooldown",
            "greater than or equal to 0",
        ),
        (
            {"max_vetoes": 3},
            "max_vetoes",
            "unknown key; known: name, rules, max_consecutive_vetoes, on_max_vetoes",
        ),
        ({"on_max_vetoes": "panic"}, "on_max_vetoes", "'halt' or 'allow'"),
    ],
)
def test_config_errors_name_the_offending_key(data, key, message) -> None:
    with pytest.raises(PolicyConfigError) as info:
        RulePolicy.from_config(data)
    keys = [k for k, _ in info.value.errors]
    assert key in keys, info.value.errors
    text = dict(info.value.errors)[key]
    assert message in text, text
    assert f"{key}: " in str(info.value)


def test_several_errors_are_all_listed_and_a_file_names_itself(tmp_path) -> None:
    pytest.importorskip("yaml")
    path = tmp_path / "bad.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            rules:
              - {name: a, condition: rr > 1, action: veto}
              - {name: b, condition: r > 1, action: explode}
            """
        )
    )
    with pytest.raises(PolicyConfigError) as info:
        RulePolicy.from_path(path)
    text = str(info.value)
    assert text.startswith(f"{path}: 2 errors in the policy")
    assert "rules[0].condition.field: unknown report field 'rr'" in text
    assert "rules[1].action: unknown action 'explode'" in text


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("p.yaml", "rules: [\n", "cannot parse YAML"),
        ("p.json", "{", "cannot parse JSON"),
        ("p.toml", "rules = [", "cannot parse TOML"),
        ("p.yaml", "", "the file is empty"),
        ("p.json", "[1, 2]", "the top level must be a mapping"),
        ("p.txt", "", "unknown policy file type '.txt'"),
    ],
)
def test_unreadable_files_are_clear_errors(tmp_path, name, content, message) -> None:
    if name.endswith(".yaml"):
        pytest.importorskip("yaml")
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(PolicyConfigError, match=message):
        RulePolicy.from_path(path)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("p.toml", "", "the file is empty"),
        ("p.toml", "\n  \n", "the file is empty"),
        ("p.json", "", "the file is empty"),
        ("p.yaml", "\n", "the file is empty"),
        ("p.toml", "# rules to come\n", r"holds no policy keys \(only comments or an empty mapping\)"),
        ("p.yaml", "# rules to come\n", r"holds no policy keys \(only comments or an empty mapping\)"),
        ("p.json", "{}", r"holds no policy keys \(only comments or an empty mapping\)"),
    ],
)
def test_a_policy_file_without_a_policy_is_refused_in_every_format(tmp_path, name, content, message) -> None:
    if name.endswith(".yaml"):
        pytest.importorskip("yaml")
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(PolicyConfigError, match=f"{message}; a policy file holds a mapping of policy keys"):
        RulePolicy.from_path(path)


@pytest.mark.parametrize("name", ["p.toml", "p.yaml", "p.json"])
def test_an_oversized_policy_file_is_refused_before_parsing(tmp_path, monkeypatch, name) -> None:
    path = tmp_path / name
    path.write_bytes(b"#" * (1 << 20) + b"\n")

    def parse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the file was parsed")

    monkeypatch.setattr(json, "loads", parse)
    with pytest.raises(
        PolicyConfigError, match=r"the file is 1,048,577 bytes; a policy file may be at most 1,048,576"
    ):
        RulePolicy.from_path(path)


def test_a_yaml_alias_bomb_is_refused_quickly(tmp_path) -> None:
    pytest.importorskip("yaml")
    levels = ["c0: &c0 {kind: threshold, field: r, value: 1}"]
    for k in range(1, 7):  # 10**6 thresholds once the aliases are expanded
        refs = ", ".join([f"*c{k - 1}"] * 10)
        levels.append(f"c{k}: &c{k} {{kind: all, conditions: [{refs}]}}")
    body = "\n".join(f"  {line}" for line in levels)
    path = tmp_path / "bomb.yaml"
    path.write_text(f"x-defs:\n{body}\nrules:\n  - {{name: a, condition: *c6, action: veto}}\n")
    with pytest.raises(PolicyConfigError, match="more than 100,000 values"):
        RulePolicy.from_path(path)


@pytest.mark.parametrize(
    ("rule", "key", "got"),
    [
        ({"condition": "r > inf"}, "rules[0].condition.value", "inf"),
        (
            {"condition": {"kind": "threshold", "field": "r", "value": -math.inf}},
            "rules[0].condition.value",
            "-inf",
        ),
        ({"condition": {"kind": "spike", "field": "loss", "z": math.inf}}, "rules[0].condition.z", "inf"),
        (
            {"condition": {"kind": "spike", "field": "loss", "min_std": math.inf}},
            "rules[0].condition.min_std",
            "inf",
        ),
        (
            {
                "condition": {
                    "kind": "all",
                    "conditions": ["nonfinite", {"kind": "spike", "field": "r", "min_rel_std": math.inf}],
                }
            },
            "rules[0].condition.conditions[1].min_rel_std",
            "inf",
        ),
    ],
)
def test_non_finite_numbers_in_a_policy_are_refused(rule, key, got) -> None:
    with pytest.raises(PolicyConfigError) as info:
        RulePolicy.from_config({"rules": [{"name": "a", "action": "veto", **rule}]})
    assert dict(info.value.errors)[key] == f"must be a finite number, got {got}", info.value.errors


def test_non_finite_numbers_in_a_policy_file_fail_policy_check(tmp_path, capsys) -> None:
    path = tmp_path / "p.toml"
    path.write_text(
        '[[rules]]\nname = "a"\naction = "veto"\ncondition = {kind = "spike", field = "loss", z = inf}\n'
    )
    assert main(["policy", "check", str(path)]) == 2
    assert "rules[0].condition.z: must be a finite number, got inf" in capsys.readouterr().err
    path.write_text("")
    assert main(["policy", "check", str(path)]) == 2
    assert f"{path}: the file is empty" in capsys.readouterr().err


def test_yaml_without_pyyaml_names_the_package_and_the_extra(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "yaml", None)
    path = tmp_path / "p.yaml"
    path.write_text(YAML)
    with pytest.raises(ModuleNotFoundError, match=r"pip install pyyaml .*stepguard\[dev\]"):
        RulePolicy.from_path(path)
    assert main(["policy", "check", str(path)]) == 2


# ----------------------------------------------------------------------------- the CLI


def test_policy_check_prints_a_one_line_summary(files, capsys) -> None:
    pytest.importorskip("yaml")
    assert main(["policy", "check", str(files / "p.yaml")]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert out == (
        f"{files / 'p.yaml'}: policy 'production' is valid: 4 rules: nonfinite (veto), "
        "loss_spike (veto), collapse (warn), clip_r (clip); halt after 5 vetoes in a row\n"
    )


def test_policy_check_exits_2_with_the_keyed_error(tmp_path, capsys) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"rules": [{"name": "a", "condition": "rr > 1", "action": "veto"}]}))
    assert main(["policy", "check", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(
        f"stepguard policy: error: {path}: rules[0].condition.field: unknown report field 'rr'"
    )
    assert main(["policy", "check", str(tmp_path / "missing.json")]) == 2


def test_policy_check_runs_as_a_module(files) -> None:
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "stepguard", "policy", "check", str(files / "p.json")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and "is valid: 4 rules" in done.stdout
