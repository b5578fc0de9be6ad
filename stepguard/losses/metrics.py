"""Monitoring metrics that come with the losses (none of them is a loss)."""

from __future__ import annotations

from stepguard.losses.auc import aucm_primal
from stepguard.losses.cld import cld_coreset, cld_ranking, cld_scores
from stepguard.losses.mpt import negative_flip_rate, relative_negative_flip_rate
from stepguard.losses.perpgrad import gradient_weight_cosine
from stepguard.losses.preference import entanglement_ratios
from stepguard.losses.stablemax import softmax_collapse_fraction, zero_loss_fraction
from stepguard.losses.tcm import opis, opis_from_embeddings

__all__ = [
    "aucm_primal",
    "cld_coreset",
    "cld_ranking",
    "cld_scores",
    "entanglement_ratios",
    "gradient_weight_cosine",
    "negative_flip_rate",
    "opis",
    "opis_from_embeddings",
    "relative_negative_flip_rate",
    "softmax_collapse_fraction",
    "zero_loss_fraction",
]
