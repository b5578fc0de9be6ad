"""Functional forms of every loss in :mod:`stepguard.losses` (stateless, no components)."""

from __future__ import annotations

from stepguard.losses.aggregate import (
    bag_level_loss,
    bag_means,
    instance_level_loss,
    interpolated_aggregate_loss,
)
from stepguard.losses.auc import auc_square_minmax, aucm_minmax, aucm_primal
from stepguard.losses.comp_sum import (
    adv_comp_sum_loss,
    comp_sum_loss,
    gce_loss,
    mae_loss,
    nce_loss,
    rce_loss,
    sce_loss,
)
from stepguard.losses.ensloss import ensloss_derivatives, ensloss_surrogate, inverse_box_cox
from stepguard.losses.hypersimplex import (
    hypersimplex_binary_loss,
    hypersimplex_k,
    hypersimplex_multiclass_loss,
    hypersimplex_threshold,
    soft_binary_argmax,
    soft_binary_argmax_jacobian,
)
from stepguard.losses.ldr import ldr_gaps, ldr_kl_loss, ldr_normalize
from stepguard.losses.margin_face import (
    arc_margin_logits,
    cos_margin_logits,
    cosine_logits,
    plus_margins,
)
from stepguard.losses.mpt import (
    focal_distillation_kl,
    focal_distillation_lm,
    margin_calibrated_logits,
)
from stepguard.losses.opl import opl_loss
from stepguard.losses.preference import dpo_loss, ipo_loss, sequence_log_probs, simpo_loss
from stepguard.losses.presto import (
    cumulative_class_probs,
    cumulative_logits,
    ordinal_log_likelihood,
    presto_penalty,
)
from stepguard.losses.soft_label import hard_label_logistic_loss, soft_target_bce_loss
from stepguard.losses.soft_margin import hinge_loss, soft_margin_loss
from stepguard.losses.stablemax import (
    cross_entropy_in_dtype,
    log_stablemax,
    stablemax,
    stablemax_cross_entropy,
    stablemax_s,
)
from stepguard.losses.symmetric import binary_unhinged_loss, symmetric_ce_loss, symmetrize
from stepguard.losses.tcm import tcm_loss
from stepguard.losses.zloss import (
    cross_entropy_with_z_loss,
    logz_squared_penalty,
    spherical_z_loss,
    z_scores,
)

__all__ = [
    "adv_comp_sum_loss",
    "arc_margin_logits",
    "auc_square_minmax",
    "aucm_minmax",
    "aucm_primal",
    "bag_level_loss",
    "bag_means",
    "binary_unhinged_loss",
    "comp_sum_loss",
    "cos_margin_logits",
    "cosine_logits",
    "cross_entropy_in_dtype",
    "cross_entropy_with_z_loss",
    "cumulative_class_probs",
    "cumulative_logits",
    "dpo_loss",
    "ensloss_derivatives",
    "ensloss_surrogate",
    "focal_distillation_kl",
    "focal_distillation_lm",
    "gce_loss",
    "hard_label_logistic_loss",
    "hinge_loss",
    "hypersimplex_binary_loss",
    "hypersimplex_k",
    "hypersimplex_multiclass_loss",
    "hypersimplex_threshold",
    "instance_level_loss",
    "interpolated_aggregate_loss",
    "inverse_box_cox",
    "ipo_loss",
    "ldr_gaps",
    "ldr_kl_loss",
    "ldr_normalize",
    "log_stablemax",
    "logz_squared_penalty",
    "mae_loss",
    "margin_calibrated_logits",
    "nce_loss",
    "opl_loss",
    "ordinal_log_likelihood",
    "plus_margins",
    "presto_penalty",
    "rce_loss",
    "sce_loss",
    "sequence_log_probs",
    "simpo_loss",
    "soft_binary_argmax",
    "soft_binary_argmax_jacobian",
    "soft_margin_loss",
    "soft_target_bce_loss",
    "spherical_z_loss",
    "stablemax",
    "stablemax_cross_entropy",
    "stablemax_s",
    "symmetric_ce_loss",
    "symmetrize",
    "tcm_loss",
    "z_scores",
]
