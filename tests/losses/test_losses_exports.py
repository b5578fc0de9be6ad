"""``stepguard.losses`` exports losses, their functional forms and the registry: nothing else."""

from __future__ import annotations

import inspect

import stepguard.losses as L
from stepguard.losses.base import GuardedLoss

REGISTRY = {"get", "hyperparameters", "info", "names"}


def test_every_export_is_a_loss_or_the_registry() -> None:
    others = {
        name
        for name in L.__all__
        if not (inspect.isclass(getattr(L, name)) and issubclass(getattr(L, name), GuardedLoss))
    }
    assert others == REGISTRY | {"functional", "BatchCouplingWarning"}


def test_every_registered_loss_is_exported() -> None:
    exported = {getattr(L, name) for name in L.__all__}
    assert {L.info(name).cls for name in L.names()} <= exported


def test_what_ships_beside_the_losses_lives_elsewhere() -> None:
    import stepguard.analysis.metrics as metrics
    import stepguard.diagnostics as diagnostics
    import stepguard.layers as layers
    import stepguard.optim as optim

    assert callable(optim.PerpGrad) and optim.OrthoGrad is optim.PerpGrad and callable(optim.fit_presto)
    assert callable(layers.HadamardLinear)
    for name in ("gradient_weight_cosine", "entanglement_ratios", "opis", "opis_from_embeddings"):
        assert callable(getattr(diagnostics, name))
    for name in ("cld_scores", "negative_flip_rate", "relative_negative_flip_rate"):
        assert callable(getattr(metrics, name))
        assert not hasattr(L, name) and not hasattr(L.functional, name)
