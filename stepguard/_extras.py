"""Install hints for StepGuard's optional extras, for a clone and for an installed package."""

from __future__ import annotations

import importlib.util
from importlib import metadata

_EXTRA_MARKER = "extra =="


def extra_requirements(extra: str) -> list[str]:
    """The requirements that ``stepguard[extra]`` adds, read from the installed metadata.

    Returns an empty list when StepGuard's metadata is not installed (a bare source tree).
    """
    try:
        requires = metadata.requires("stepguard") or []
    except metadata.PackageNotFoundError:
        return []
    found = []
    for entry in requires:
        requirement, _, marker = entry.partition(";")
        names = [part.split("==", 1)[1].strip().strip("'\"") for part in marker.split(" and ")
                 if _EXTRA_MARKER in part]
        if extra in names:
            found.append(requirement.strip())
    return found


def install_hint(extra: str) -> str:
    """How to install ``extra``: in a clone (editable) and for an installed StepGuard."""
    packages = " ".join(f"'{r}'" for r in extra_requirements(extra)) or f"'stepguard[{extra}]'"
    return f"pip install -e '.[{extra}]' in a StepGuard clone, or pip install {packages}"


def missing_extra(module: str, extra: str, feature: str) -> str | None:
    """A one-line error when ``module`` cannot be imported, else ``None`` (nothing is imported)."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if found:
        return None
    return f"{feature} needs {module} (the {extra!r} extra): {install_hint(extra)}"
