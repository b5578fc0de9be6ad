"""Look losses up by name: :func:`get` and :func:`names`."""

from __future__ import annotations

import difflib
import inspect
from typing import Any

from stepguard.losses._info import BY_NAME, LossInfo
from stepguard.losses.base import GuardedLoss

__all__ = ["get", "hyperparameters", "info", "names"]


def names() -> list[str]:
    """All registered loss names, sorted."""
    return sorted(BY_NAME)


def info(name: str) -> LossInfo:
    """The table row of a registered loss.

    Raises:
        ValueError: unknown name (the message lists the valid names).
    """
    if name not in BY_NAME:
        close = difflib.get_close_matches(str(name), BY_NAME, n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown loss {name!r}.{hint} Valid names: {', '.join(names())}")
    return BY_NAME[name]


def hyperparameters(name: str) -> dict[str, Any]:
    """The hyperparameters of a loss and their defaults (``inspect.Parameter.empty`` when
    required)."""
    signature = inspect.signature(info(name).cls.__init__)
    return {
        key: param.default
        for key, param in signature.parameters.items()
        if key != "self" and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD)
    }


def get(name: str, **hyperparameters_: Any) -> GuardedLoss:
    """Build the loss registered under ``name`` with the given hyperparameters.

    Example: ``get("dpo", beta=0.1, label_smoothing=0.1)``.

    Raises:
        ValueError: unknown name, unknown hyperparameter or missing required one; the
            message names the problem and lists the valid choices.
    """
    row = info(name)
    accepted = hyperparameters(name)
    unknown = sorted(set(hyperparameters_) - set(accepted))
    if unknown:
        raise ValueError(
            f"loss {name!r} has no hyperparameter {', '.join(repr(u) for u in unknown)}. "
            f"Valid hyperparameters: {', '.join(accepted)}"
        )
    missing = [
        key
        for key, default in accepted.items()
        if default is inspect.Parameter.empty and key not in hyperparameters_
    ]
    if missing:
        raise ValueError(
            f"loss {name!r} needs {', '.join(repr(m) for m in missing)}. "
            f"Valid hyperparameters: {', '.join(accepted)}"
        )
    return row.cls(**hyperparameters_)
