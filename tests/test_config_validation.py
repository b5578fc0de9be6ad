"""GuardConfig refuses what would silently break the guard: non-finite numbers in any float field."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from stepguard import GuardConfig

FLOAT_FIELDS = ("fd_epsilon", "budget", "tau_jump", "r_alert", "min_cosine", "temperature")


def test_every_float_field_is_checked() -> None:
    floats = [
        name
        for name, field in GuardConfig.model_fields.items()
        if float in getattr(field.annotation, "__args__", (field.annotation,))
    ]
    assert sorted(floats) == sorted(FLOAT_FIELDS)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, "inf", "nan"])
@pytest.mark.parametrize("name", FLOAT_FIELDS)
def test_non_finite_numbers_are_refused_naming_the_field(name: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        GuardConfig(**{name: value})
    errors = info.value.errors()
    assert [e["loc"] for e in errors] == [(name,)]
    assert "finite number" in errors[0]["msg"]


def test_finite_values_are_kept() -> None:
    config = GuardConfig(
        fd_epsilon=1e-4, budget=0.1, tau_jump=2.0, r_alert=0.9, min_cosine=-1.0, temperature=0.5
    )
    assert (config.fd_epsilon, config.budget, config.r_alert) == (1e-4, 0.1, 0.9)
