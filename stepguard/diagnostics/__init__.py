"""Per-step diagnostics beyond the softmax radius.

* :mod:`.collapse`: softmax collapse (SC), the fraction of rows whose softmax is exactly
  one-hot in the training dtype, and the logit scale that drives it.
* :mod:`.nlm`: naive loss minimization (NLM), updates that only rescale the logits.
* :mod:`.entanglement`: gradient entanglement of objectives such as chosen and rejected
  log-likelihoods.
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
)
from stepguard.diagnostics.nlm import nlm_cosine, update_param_cosine

__all__ = [
    "Entanglement",
    "EntanglementProbe",
    "SoftmaxCollapse",
    "absorption_gap",
    "entanglement",
    "entanglement_from_gram",
    "nlm_cosine",
    "softmax_collapse",
    "softmax_collapse_stats",
    "update_param_cosine",
]
