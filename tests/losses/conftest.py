"""Golden-file access and one input factory per registered loss."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "data" / "golden"

# Tolerances from the golden README: float32 cases and float64 cases.
F32 = {"rtol": 1e-5, "atol": 1e-6}
F64 = {"rtol": 1e-10, "atol": 1e-10}


def load_golden(name: str) -> dict[str, Any]:
    with open(GOLDEN_DIR / name) as handle:
        return json.load(handle)


@pytest.fixture(scope="session")
def golden() -> Callable[[str], dict[str, Any]]:
    return load_golden


def t32(values: Any) -> Tensor:
    return torch.tensor(values, dtype=torch.float32)


def t64(values: Any) -> Tensor:
    return torch.tensor(values, dtype=torch.float64)


def close(actual: Tensor, expected: Any, tol: dict[str, float] = F32) -> None:
    expected_t = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual.detach().reshape(expected_t.shape), expected_t, **tol)


def _logits(batch: int = 6, classes: int = 5) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(batch, classes, generator=generator)
    target = torch.tensor([0, 3, 1, 4, 2, 0][:batch])
    return logits, target


def _binary(batch: int = 8) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(4)
    scores = torch.randn(batch, generator=generator)
    labels = torch.tensor([1, 0, 0, 1, 0, 1, 0, 1][:batch])
    return scores, labels


def _embeddings() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(5)
    return torch.randn(6, 8, generator=generator), torch.tensor([0, 0, 1, 1, 2, 0])


def _preference() -> tuple[Tensor, ...]:
    generator = torch.Generator().manual_seed(6)
    return tuple(-10.0 * torch.rand(4, generator=generator) for _ in range(4))


Case = tuple[dict[str, Any], Callable[[], tuple[Any, ...]], Callable[[tuple[Any, ...]], Any]]


def _first(inputs: tuple[Any, ...]) -> Any:
    return inputs[0]


def _logit_case(**kwargs: Any) -> Case:
    return kwargs, _logits, _first


def _head_case(**kwargs: Any) -> Case:
    return (
        {"in_features": 8, "num_classes": 5, **kwargs},
        lambda: (
            _embeddings()[0],
            torch.tensor([0, 3, 1, 4, 2, 0]),
        ),
        _first,
    )


def _aucm_inputs() -> tuple[Tensor, Tensor]:
    scores, labels = _binary()
    return torch.sigmoid(scores), labels


def _multilabel_inputs() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(7)
    y_pred = torch.sigmoid(torch.randn(8, 3, generator=generator))
    y_true = torch.tensor(
        [[1, 0, 1], [0, 0, 1], [0, 1, 0], [1, 0, 0], [0, 1, 1], [0, 0, 0], [1, 1, 0], [0, 0, 1]]
    )
    return y_pred, y_true


def _mpt_inputs() -> tuple[Tensor, ...]:
    logits, target = _logits()
    generator = torch.Generator().manual_seed(8)
    return (
        logits,
        target,
        torch.randn(6, 3, generator=generator),
        torch.randn(6, 5, generator=generator),
    )


def _presto_inputs() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(9)
    return torch.randn(6, 2, generator=generator), torch.tensor([0, 1, 2, 1, 0, 2])


def _aggregate_inputs() -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(10)
    pred = torch.randn(7, generator=generator)
    return pred, torch.tensor([0, 0, 0, 1, 1, 2, 2]), torch.tensor([0.5, -1.0, 2.0])


def _adv_inputs() -> tuple[Tensor, Tensor, Tensor]:
    logits, target = _logits()
    return logits, logits + 0.1 * torch.randn(logits.shape), target


def _soft_inputs() -> tuple[Tensor, Tensor]:
    scores, _ = _binary()
    return scores, torch.sigmoid(0.5 * scores.flip(0))


def _pm1_inputs() -> tuple[Tensor, Tensor]:
    scores, labels = _binary()
    return scores, 2 * labels - 1


def _soft_margin_inputs() -> tuple[Tensor, ...]:
    scores, labels = _binary()
    return scores, 2 * labels - 1, torch.randn(1, 16)


def _aldr_inputs() -> tuple[Tensor, ...]:
    logits, target = _logits()
    return logits, target, torch.arange(6)


# name → (hyperparameters, input factory, radius_logits output selector)
CASES: dict[str, Case] = {
    "arcface": _head_case(),
    "cosface": _head_case(),
    "elastic_arcface": _head_case(generator=torch.Generator().manual_seed(0)),
    "elastic_cosface": _head_case(generator=torch.Generator().manual_seed(0)),
    "elastic_arcface_plus": _head_case(generator=torch.Generator().manual_seed(0)),
    "elastic_cosface_plus": _head_case(generator=torch.Generator().manual_seed(0)),
    "comp_sum": _logit_case(tau=1.5),
    "gce": _logit_case(),
    "mae": _logit_case(),
    "rce": _logit_case(),
    "sce": _logit_case(),
    "nce": _logit_case(),
    "adv_comp_sum": ({"nu": 0.5}, _adv_inputs, _first),
    "aucm": ({}, _aucm_inputs, _first),
    "auc_square": ({}, _aucm_inputs, _first),
    "multilabel_aucm": ({"num_labels": 3}, _multilabel_inputs, _first),
    "tcm": ({}, _embeddings, _first),
    "mpt": ({"num_old": 3}, _mpt_inputs, _first),
    "presto": ({"in_features": 2, "num_classes": 3, "lam": 0.01}, _presto_inputs, _first),
    "proportional_odds": ({"in_features": 2, "num_classes": 3}, _presto_inputs, _first),
    "ensloss": ({"generator": torch.Generator().manual_seed(0)}, _binary, _first),
    "symmetric_ce": _logit_case(bound=5.0),
    "binary_unhinged": ({"bound": 1.0}, _pm1_inputs, _first),
    "hypersimplex_multiclass": _logit_case(),
    "hypersimplex_binary": ({"regularization_strength": 1.0}, _binary, _first),
    "spherical_z_loss": _logit_case(a=1.0, b=1.0),
    "logz_squared": _logit_case(),
    "ce_z_loss": _logit_case(),
    "ldr_kl": _logit_case(),
    "aldr_kl": ({"num_samples": 6}, _aldr_inputs, _first),
    "opl": ({}, _embeddings, _first),
    "stablemax_ce": _logit_case(),
    "soft_target_bce": ({}, _soft_inputs, _first),
    "hard_label_logistic": ({}, _pm1_inputs, _first),
    "bag_level": ({}, _aggregate_inputs, _first),
    "instance_level": ({}, _aggregate_inputs, _first),
    "aggregate_interpolated": ({"rho": 0.5}, _aggregate_inputs, _first),
    "dpo": ({}, _preference, lambda inputs: inputs),
    "ipo": ({}, _preference, lambda inputs: inputs),
    "simpo": ({}, lambda: _preference()[:2], lambda inputs: inputs),
    "soft_margin": ({}, _soft_margin_inputs, _first),
}
