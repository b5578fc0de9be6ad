"""The report fields a rule can read, by the dotted names of :meth:`StepReport.scalars`."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Iterator, Mapping

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
_SIMPLE = frozenset(
    f.name
    for f in dataclasses.fields(StepReport)
    if f.name not in ("spread", "entanglement", "extras", "timings", "rank", "world_size", "halt")
)
_SPREAD = frozenset(n.partition(".")[2] for n in FIELDS if n.startswith("spread."))
_NESTED = frozenset(p.rstrip(".") for p in PREFIXES)


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


class ReportValues(Mapping[str, float]):
    """The report's numbers by field name, read on demand; optional fields that are ``None`` are absent.

    Equal, key for key, to :meth:`StepReport.scalars`; a rule reads a handful of fields, so
    this avoids flattening the whole report on every step.
    """

    __slots__ = ("_all", "_report")

    def __init__(self, report: StepReport) -> None:
        self._report = report
        self._all: dict[str, float] | None = None

    def __getitem__(self, name: str) -> float:
        report = self._report
        if name in _SIMPLE:
            value = getattr(report, name)
            if not isinstance(value, (bool, int, float)):
                raise KeyError(name)
            return float(value)
        head, _, key = name.partition(".")
        if head == "spread" and key in _SPREAD:
            return float(getattr(report.spread, key))
        if head in _NESTED and key in getattr(report, head):
            return float(getattr(report, head)[key])
        raise KeyError(name)

    def _scalars(self) -> dict[str, float]:
        if self._all is None:
            self._all = self._report.scalars()
        return self._all

    def __iter__(self) -> Iterator[str]:
        return iter(self._scalars())

    def __len__(self) -> int:
        return len(self._scalars())


def report_values(report: StepReport) -> Mapping[str, float]:
    """The report's numbers by field name (see :class:`ReportValues`)."""
    return ReportValues(report)
