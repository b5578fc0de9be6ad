"""Per-step diagnostics beyond the softmax radius.

* :mod:`.collapse`: softmax collapse (SC), the fraction of rows whose softmax is exactly
  one-hot in the training dtype, and the logit scale that drives it.
* :mod:`.nlm`: naive loss minimization (NLM), updates that only rescale the logits.
* :mod:`.entanglement`: gradient entanglement of objectives such as chosen and rejected
  log-likelihoods.
* :mod:`.opis`: the operating-point inconsistency of an embedding model's thresholds.
"""

from __future__ import annotations

from stepguard.diagnostics.collapse import (
    SoftmaxCollapse,
    absorption_gap,
    softmax_collapse,
    softmax_collapse_stats,
)
from stepguard.diagnostics.entanglement import (
    Entanglement,
    EntanglementProbe,
    entanglement,
    entanglement_from_gram,
    entanglement_ratios,
)
from stepguard.diagnostics.nlm import gradient_weight_cosine, nlm_cosine, update_param_cosine
from stepguard.diagnostics.opis import opis, opis_from_embeddings

__all__ = [
    "Entanglement",
    "EntanglementProbe",
    "SoftmaxCollapse",
    "absorption_gap",
    "entanglement",
    "entanglement_from_gram",
    "entanglement_ratios",
    "gradient_weight_cosine",
    "nlm_cosine",
    "opis",
    "opis_from_embeddings",
    "softmax_collapse",
    "softmax_collapse_stats",
    "update_param_cosine",
]
