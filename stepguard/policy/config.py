"""The policy schema and its loaders: Python objects, dicts, and YAML, JSON or TOML files.

A policy file holds one mapping, e.g. in YAML::

    name: production
    max_consecutive_vetoes: 5
    rules:
      - {name: nonfinite, condition: nonfinite, action: veto}
      - name: loss_spike
        condition: {kind: spike, field: loss, z: 6, window: 100}
        action: veto
      - {name: clip_r, condition: "r > 1", action: {kind: clip, target: 1.0}}

Errors name the offending key: ``rules[2].condition.field: unknown report field 'rr'; …``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from stepguard.policy import actions, conditions
from stepguard.policy.actions import ACTION_KINDS
from stepguard.policy.conditions import CONDITION_KINDS
from stepguard.policy.rules import Escalation, Rule

SUFFIXES = (".yaml", ".yml", ".json", ".toml")
#: The largest policy file read (a policy is a few hundred bytes; this is checked before parsing).
MAX_POLICY_BYTES = 1 << 20
#: The most values (mappings, lists and scalars, YAML aliases counted each time) a policy file may hold.
MAX_POLICY_VALUES = 100_000
_WHAT_A_POLICY_HOLDS = "a policy file holds a mapping of policy keys, e.g. a name and its rules"


class PolicyConfig(BaseModel):
    """A rule-based policy as data.

    Args:
        name: the policy's name (shown in reports' context and logs).
        rules: the rules, in order.
        max_consecutive_vetoes: the consecutive-veto guard: when this many steps in a row
            are vetoed, ``on_max_vetoes`` decides (``None``: no guard).
        on_max_vetoes: ``"halt"`` stops training; ``"allow"`` gives up and applies the
            step (optax's ``apply_if_finite`` behaviour; a non-finite update is still vetoed).
        restore_optimizer_state: a veto also restores the optimizer state (moments,
            momentum) to what it was before the step; ``False`` keeps only the parameters
            and spares the guard its copy of the state.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(default="policy", min_length=1)
    rules: tuple[Rule, ...] = ()
    max_consecutive_vetoes: int | None = Field(default=None, ge=1)
    on_max_vetoes: Literal["halt", "allow"] = "halt"
    restore_optimizer_state: bool = True

    @field_validator("rules")
    @classmethod
    def _unique_names(cls, rules: tuple[Rule, ...]) -> tuple[Rule, ...]:
        first: dict[str, int] = {}
        for i, rule in enumerate(rules):
            if rule.name in first:
                raise PydanticCustomError(
                    "duplicate_rule_name",
                    "duplicate rule name '{name}' (first used by rules[{first}]); names must be unique",
                    {"name": rule.name, "first": first[rule.name], "at": [i, "name"]},
                )
            first[rule.name] = i
        return rules

    @model_validator(mode="after")
    def _finite_numbers(self) -> PolicyConfig:
        for at, value in _non_finite(self.rules, ["rules"]):
            raise PydanticCustomError(
                "finite_number",
                "must be a finite number, got {value}",
                {"value": repr(value), "at": at},
            )
        return self


def _non_finite(value: Any, at: list[str | int]) -> Iterator[tuple[list[str | int], float]]:
    """Every infinite or NaN float in ``value`` (models, tuples, lists), with its key path."""
    if isinstance(value, float) and not math.isfinite(value):
        yield at, value
    elif isinstance(value, BaseModel):
        for name, field in type(value).model_fields.items():
            yield from _non_finite(getattr(value, name), [*at, field.alias or name])
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            yield from _non_finite(item, [*at, i])


class PolicyConfigError(ValueError):
    """A policy configuration that does not validate; each error names its key.

    Attributes:
        errors: ``(key, message)`` pairs, e.g.
            ``("rules[2].condition.field", "unknown report field 'rr'; …")``.
        source: the file the configuration came from, if any.
    """

    def __init__(self, errors: Sequence[tuple[str, str]], source: str | None = None) -> None:
        self.errors = list(errors)
        self.source = source
        lines = [f"{key}: {message}" if key else message for key, message in self.errors]
        head = f"{source}: " if source else ""
        if len(lines) == 1:
            text = head + lines[0]
        else:
            text = f"{head}{len(lines)} errors in the policy\n" + "\n".join(f"  {line}" for line in lines)
        super().__init__(text)


def policy_config(data: Mapping[str, Any] | PolicyConfig, *, source: str | None = None) -> PolicyConfig:
    """Validate ``data`` into a :class:`PolicyConfig`.

    Args:
        data: the policy as a mapping (as read from a file) or an existing config.
        source: where ``data`` came from, for error messages.

    Returns:
        The validated configuration.

    Raises:
        PolicyConfigError: with one line per problem, each naming its key.
    """
    if isinstance(data, PolicyConfig):
        return data
    if not isinstance(data, Mapping):
        raise PolicyConfigError([("", f"a policy must be a mapping, got {type(data).__name__}")], source)
    try:
        return PolicyConfig.model_validate(dict(data))
    except ValidationError as exc:
        raise PolicyConfigError([_describe(err, data) for err in exc.errors()], source) from None


def read_policy_file(path: str | Path) -> dict[str, Any]:
    """Read a policy file (``.yaml``/``.yml``, ``.json`` or ``.toml``) into a dict, without validating it.

    Raises:
        FileNotFoundError: no such file.
        PolicyConfigError: an unknown suffix, an empty file or one over :data:`MAX_POLICY_BYTES`
            (checked before parsing), a syntax error, a top level that is not a mapping or is
            empty, or more than :data:`MAX_POLICY_VALUES` values.
        ModuleNotFoundError: a YAML file without PyYAML installed, or TOML on Python 3.10 without tomli.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        message = f"unknown policy file type {suffix or path.name!r}; use {', '.join(SUFFIXES)}"
        raise PolicyConfigError([("", message)], str(path))
    text = _read_text(path)
    try:
        if suffix == ".json":
            data = json.loads(text)
        elif suffix == ".toml":
            data = _toml().loads(text)
        else:
            yaml = _yaml()
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ValueError(str(exc)) from None
    except ValueError as exc:
        raise PolicyConfigError([("", f"cannot parse {suffix[1:].upper()}: {exc}")], str(path)) from None
    if data is None or (isinstance(data, Mapping) and not data):
        message = f"the file holds no policy keys (only comments or an empty mapping); {_WHAT_A_POLICY_HOLDS}"
        raise PolicyConfigError([("", message)], str(path))
    if not isinstance(data, Mapping):
        message = f"the top level must be a mapping of policy keys, got {type(data).__name__}"
        raise PolicyConfigError([("", message)], str(path))
    _check_count(data, str(path))
    return dict(data)


def _read_text(path: Path) -> str:
    """The file's text, refused before parsing when it is empty or larger than :data:`MAX_POLICY_BYTES`."""
    with open(path, "rb") as handle:
        raw = handle.read(MAX_POLICY_BYTES + 1)
        size = max(len(raw), path.stat().st_size)
    if len(raw) > MAX_POLICY_BYTES:
        message = (
            f"the file is {size:,} bytes; a policy file may be at most {MAX_POLICY_BYTES:,} bytes "
            "(1 MiB): is it the right file?"
        )
        raise PolicyConfigError([("", message)], str(path))
    if not raw.strip():
        raise PolicyConfigError([("", f"the file is empty; {_WHAT_A_POLICY_HOLDS}")], str(path))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        message = f"not UTF-8 text (byte {exc.start}): a policy file is YAML, JSON or TOML text"
        raise PolicyConfigError([("", message)], str(path)) from None


def _check_count(data: Any, source: str) -> None:
    """Refuse a policy of more than :data:`MAX_POLICY_VALUES` values (a YAML alias counts each time used)."""
    pending, count = [data], 0
    while pending:
        value = pending.pop()
        count += 1
        if count > MAX_POLICY_VALUES:
            message = (
                f"the policy holds more than {MAX_POLICY_VALUES:,} values (YAML aliases count "
                "each time they are used): is it the right file?"
            )
            raise PolicyConfigError([("", message)], source)
        if isinstance(value, Mapping):
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)


def load_policy_config(path: str | Path) -> PolicyConfig:
    """Read and validate a policy file (see :func:`read_policy_file`)."""
    return policy_config(read_policy_file(path), source=str(path))


def _yaml() -> Any:
    try:
        import yaml
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "reading a YAML policy needs PyYAML: pip install pyyaml (it comes with the "
            "stepguard[dev] and stepguard[all] extras), or write the policy as JSON or TOML"
        ) from None
    return yaml


def _toml() -> Any:
    try:
        import tomllib
    except ModuleNotFoundError:
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ModuleNotFoundError(
                "reading a TOML policy needs Python 3.11+ (tomllib) or the tomli package"
            ) from None
    return tomllib


# ------------------------------------------------------------------ error messages

_TAGS = frozenset(CONDITION_KINDS) | frozenset(ACTION_KINDS)
_CONDITION_CLASSES = {
    cls.model_fields["kind"].default: cls
    for cls in (
        conditions.Threshold,
        conditions.NonFinite,
        conditions.Spike,
        conditions.Consecutive,
        conditions.AllOf,
        conditions.AnyOf,
        conditions.Not,
        conditions.Always,
    )
}
_ACTION_CLASSES = {
    cls.model_fields["kind"].default: cls
    for cls in (actions.Allow, actions.Clip, actions.Veto, actions.Halt, actions.Warn, actions.Backoff)
}


def _describe(err: Mapping[str, Any], data: Any) -> tuple[str, str]:
    """One pydantic error as ``(dotted key, message)``."""
    loc = tuple(err["loc"])
    ctx = err.get("ctx") or {}
    if "at" in ctx:
        loc += tuple(ctx["at"])
    key, parent, parent_key = _walk(loc, data)
    kind, msg = err["type"], err["msg"]
    last = next((el for el in reversed(loc) if isinstance(el, str) and el not in _TAGS), "")
    union = "action" if last == "action" else "condition"
    kinds = ACTION_KINDS if union == "action" else CONDITION_KINDS
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
    elif kind == "union_tag_invalid":
        msg = f"unknown {union} kind {ctx.get('tag')!r}; known: {', '.join(kinds)}"
    elif kind == "union_tag_not_found":
        article = "an" if union == "action" else "a"
        msg = f"{article} {union} needs a 'kind' (one of {', '.join(kinds)})"
    elif kind == "missing":
        msg = "missing required key"
    elif kind == "extra_forbidden":
        known = _known_keys(parent, parent_key)
        msg = "unknown key" + (f"; known: {', '.join(known)}" if known else "")
    return key, msg


def _walk(loc: tuple[Any, ...], data: Any) -> tuple[str, Any, str]:
    """The dotted key of ``loc`` (dropping union tags), the mapping that holds it, and that mapping's key."""
    text = ""
    current: Any = data
    parent: Any = None
    parent_key = ""
    for el in loc:
        parent_here = current
        if isinstance(el, int):
            text += f"[{el}]"
            ok = isinstance(current, Sequence) and not isinstance(current, str) and 0 <= el < len(current)
            current = current[el] if ok else None
            continue
        if isinstance(current, Mapping) and el in current:
            parent, parent_key = parent_here, _last_name(text)
            text += f".{el}" if text else el
            current = current[el]
        elif el in _TAGS:
            continue
        else:
            parent, parent_key = parent_here, _last_name(text)
            text += f".{el}" if text else el
            current = None
    return text, parent, parent_key


def _last_name(text: str) -> str:
    return text.rsplit(".", 1)[-1].split("[", 1)[0] if text else ""


def _known_keys(parent: Any, parent_key: str) -> list[str]:
    if not isinstance(parent, Mapping):
        return []
    model: type[BaseModel] | None
    if "kind" in parent and parent_key in ("condition", "conditions"):
        model = _CONDITION_CLASSES.get(parent["kind"])
    elif "kind" in parent and parent_key == "action":
        model = _ACTION_CLASSES.get(parent["kind"])
    else:
        model = {"": PolicyConfig, "rules": Rule, "escalate": Escalation}.get(parent_key)
    if model is None:
        return []
    return [f.alias or name for name, f in model.model_fields.items()]
