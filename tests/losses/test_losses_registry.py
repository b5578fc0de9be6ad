"""Looking losses up by name."""

from __future__ import annotations

import inspect
import re

import pytest

from stepguard.losses import DPOLoss, get, hyperparameters, info, names


def test_names_are_sorted_lowercase_snake_case_and_cover_the_suite() -> None:
    listed = names()
    assert listed == sorted(listed)
    assert all(re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", n) for n in listed)
    for required in (
        "dpo",
        "ipo",
        "simpo",
        "arcface",
        "aucm",
        "tcm",
        "opl",
        "presto",
        "ensloss",
        "ldr_kl",
        "aldr_kl",
    ):
        assert required in listed


def test_get_returns_a_configured_instance() -> None:
    loss = get("dpo", beta=0.2, label_smoothing=0.05)
    assert isinstance(loss, DPOLoss)
    assert (loss.beta, loss.label_smoothing, loss.reference_free) == (0.2, 0.05, False)
    assert get("dpo") is not get("dpo")


def test_unknown_name_lists_the_valid_choices() -> None:
    with pytest.raises(ValueError, match="unknown loss 'dpoo'") as excinfo:
        get("dpoo")
    message = str(excinfo.value)
    assert "Did you mean 'dpo'" in message
    assert all(name in message for name in names())


def test_unknown_hyperparameter_is_named_with_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="no hyperparameter 'gamma'") as excinfo:
        get("dpo", gamma=1.0)
    assert "beta, label_smoothing, reference_free" in str(excinfo.value)


def test_missing_required_hyperparameter_is_named() -> None:
    with pytest.raises(ValueError, match="needs 'a', 'b'"):
        get("spherical_z_loss")


def test_hyperparameters_and_info() -> None:
    hp = hyperparameters("simpo")
    assert hp["beta"] == 2.0 and hp["gamma_beta_ratio"] == 0.25
    assert hyperparameters("presto")["lam"] is inspect.Parameter.empty
    assert info("aucm").meaningful_value is False
    assert info("aucm").batch_coupled is True
