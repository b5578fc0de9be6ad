"""The protocol every registered loss follows, checked from the ``_info`` table."""

from __future__ import annotations

import contextlib
import inspect
import re
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import CASES, GOLDEN_DIR
from torch import Tensor

from stepguard.losses import BatchCouplingWarning, GuardedLoss, get, names
from stepguard.losses._info import LOSSES

NAMES = names()


def _build(name: str) -> tuple[GuardedLoss, tuple[Any, ...]]:
    kwargs, factory, _ = CASES[name]
    inputs = tuple(
        x.clone().requires_grad_(True) if isinstance(x, Tensor) and x.is_floating_point() else x
        for x in factory()
    )
    return get(name, **kwargs), inputs


@contextlib.contextmanager
def no_host_sync() -> Iterator[None]:
    """Make every tensor-to-Python conversion raise."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("host synchronisation inside forward")

    saved = {
        key: getattr(Tensor, key)
        for key in ("item", "tolist", "__bool__", "__int__", "__float__", "numpy")
    }
    try:
        for key in saved:
            setattr(Tensor, key, refuse)
        yield
    finally:
        for key, value in saved.items():
            setattr(Tensor, key, value)


def test_every_registered_loss_has_an_input_case() -> None:
    assert sorted(CASES) == NAMES


@pytest.mark.parametrize("row", LOSSES, ids=lambda row: row.name)
def test_table_row_matches_the_class(row: Any) -> None:
    assert issubclass(row.cls, GuardedLoss)
    assert row.cls.batch_coupled is row.batch_coupled
    assert row.cls.meaningful_value is row.meaningful_value
    if row.golden is not None:
        assert (GOLDEN_DIR / row.golden).is_file()
    assert ("faithful" in inspect.signature(row.cls.__init__).parameters) is row.faithful


@pytest.mark.parametrize("name", NAMES)
def test_docstring_gives_formula_paper_and_shapes(name: str) -> None:
    doc = inspect.getdoc(get(name, **CASES[name][0]).__class__) or ""
    assert "$" in doc, "formula"
    assert re.search(r'Paper: [^"]*"[^"]+"', doc), "paper with its title"
    assert "Shapes:" in doc


@pytest.mark.parametrize("name", NAMES)
def test_forward_is_finite_records_detached_scalars_and_backpropagates(name: str) -> None:
    loss, inputs = _build(name)
    with no_host_sync():
        value = loss(*inputs)
    assert isinstance(value, Tensor) and value.ndim == 0
    assert torch.isfinite(value)
    assert loss.components, "components must not be empty"
    for key, part in loss.components.items():
        assert isinstance(part, Tensor), key
        assert part.ndim == 0, key
        assert not part.requires_grad, key
    value.backward()
    grads = [x.grad for x in inputs if isinstance(x, Tensor) and x.grad is not None]
    grads += [p.grad for p in loss.parameters() if p.grad is not None]
    assert grads, "the loss must reach its inputs or parameters"
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", NAMES)
def test_radius_logits_are_differentiable_or_refused_clearly(name: str) -> None:
    loss, inputs = _build(name)
    selector = CASES[name][2]
    target = (
        inputs[1]
        if len(inputs) > 1 and isinstance(inputs[1], Tensor) and not inputs[1].is_floating_point()
        else None
    )
    if not loss.has_radius_logits:
        with pytest.raises(NotImplementedError, match=type(loss).__name__):
            loss.radius_logits(selector(inputs), target)
        return
    with torch.no_grad():
        for param in loss.parameters():
            param.add_(0.1 * torch.randn_like(param))
    logits = loss.radius_logits(selector(inputs), target)
    assert isinstance(logits, Tensor) and logits.is_floating_point()
    assert torch.isfinite(logits).all()
    (grad,) = torch.autograd.grad(logits.sum(), [inputs[0]], allow_unused=True)
    assert grad is not None and grad.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_batch_coupled_losses_warn_once_under_accumulation(name: str) -> None:
    loss, inputs = _build(name)
    loss.note_accumulation(4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss(*inputs)
        loss(*inputs)
    coupling = [w for w in caught if issubclass(w.category, BatchCouplingWarning)]
    assert len(coupling) == (1 if loss.batch_coupled else 0)
    if coupling:
        assert issubclass(coupling[0].category, UserWarning)
        assert "accumulated micro-batches" in str(coupling[0].message)


def test_accumulation_steps_argument_and_validation() -> None:
    loss = get("tcm", accumulation_steps=2)
    with pytest.warns(BatchCouplingWarning):
        loss(*CASES["tcm"][1]())
    with pytest.raises(ValueError, match="positive int"):
        get("tcm", accumulation_steps=0)


@pytest.mark.parametrize("name", ["aucm", "auc_square", "multilabel_aucm", "aldr_kl"])
def test_state_lives_in_the_state_dict(name: str) -> None:
    loss, inputs = _build(name)
    loss(*inputs)
    state = loss.state_dict()
    expected = {"aldr_kl": {"lam"}}.get(name, {"a", "b", "alpha"})
    assert expected <= set(state)
    twin, _ = _build(name)
    twin.load_state_dict(state)
    for key in expected:
        torch.testing.assert_close(twin.state_dict()[key], state[key])


def _per_sample(name: str) -> bool:
    return (
        "reduction" in inspect.signature(get(name, **CASES[name][0]).__class__.__init__).parameters
    )


@pytest.mark.parametrize("name", [n for n in NAMES if _per_sample(n)])
def test_reduction_none_then_mean_matches_mean(name: str) -> None:
    kwargs, factory, _ = CASES[name]
    inputs = factory()
    mean = get(name, **kwargs)(*inputs)
    per_item = get(name, **{**kwargs, "reduction": "none"})(*inputs)
    total = get(name, **{**kwargs, "reduction": "sum"})(*inputs)
    assert per_item.ndim == 1
    torch.testing.assert_close(per_item.sum(), total)
    if name not in {
        "bag_level",
        "aggregate_interpolated",
        "presto",
        "proportional_odds",
        "ce_z_loss",
    }:
        torch.testing.assert_close(per_item.mean(), mean)


@pytest.mark.parametrize("name", [n for n in NAMES if _per_sample(n)])
def test_unknown_reduction_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="reduction"):
        get(name, **{**CASES[name][0], "reduction": "avg"})
