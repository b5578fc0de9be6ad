"""The report fields a rule can read, by the dotted names of :meth:`StepReport.scalars`."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Mapping

from stepguard.report import SpreadSummary, StepReport

#: Nested mappings of the report whose keys are only known at run time (``entanglement.ratio_chosen``).
PREFIXES: tuple[str, ...] = ("entanglement.", "extras.", "timings.")

# The decision part of a report is what the policy produces, not something it reads.
_DECISION = frozenset({"action", "scale", "applied_tau", "reason", "rule"})
_NOT_SCALARS = frozenset({"rank", "world_size"})


def _report_fields() -> tuple[str, ...]:
    hints = typing.get_type_hints(StepReport)
    names: list[str] = []
    for f in dataclasses.fields(StepReport):
        if f.name in _DECISION or f.name in _NOT_SCALARS:
            continue
        kind = hints[f.name]
        if kind in (int, float, bool) or kind == (float | None):
            names.append(f.name)
        elif f.name == "spread":
            names.extend(f"spread.{s.name}" for s in dataclasses.fields(SpreadSummary) if s.name != "values")
    return tuple(names)


#: Every fixed field name a rule may name (the prefixed families come on top).
FIELDS: tuple[str, ...] = _report_fields()
_FIELD_SET = frozenset(FIELDS)


def check_field(name: str) -> str:
    """Return ``name`` if a report can carry it, else raise a :class:`ValueError` listing the known names.

    Args:
        name: a dotted report field such as ``"r"``, ``"spread.q99"`` or ``"entanglement.ratio_chosen"``.

    Returns:
        ``name`` unchanged.

    Raises:
        ValueError: the report has no such field.
    """
    if name in _FIELD_SET:
        return name
    for prefix in PREFIXES:
        if name.startswith(prefix) and len(name) > len(prefix):
            return name
    close = difflib.get_close_matches(name, FIELDS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    families = ", ".join(f"{p}<key>" for p in PREFIXES)
    raise ValueError(f"unknown report field {name!r}{hint}; known: {', '.join(FIELDS)}, {families}")


def report_values(report: StepReport) -> Mapping[str, float]:
    """The report's numbers by field name, as :meth:`StepReport.scalars` (optional fields that
    are ``None`` are absent).

    Reading only the fields a rule names, lazily, saved nothing measurable (a ``clip``
    decision takes about 20 µs either way), so a rule reads the flat mapping (see the
    architecture page).
    """
    return report.scalars()
