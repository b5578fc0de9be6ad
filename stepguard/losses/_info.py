"""One row per registered loss: its name, class, coupling, value semantics and golden file.

The shared conformance test walks this table, so a new loss is registered here and gets
the protocol checks for free.
"""

from __future__ import annotations

from dataclasses import dataclass

from stepguard.losses import (
    aggregate,
    auc,
    comp_sum,
    ensloss,
    hypersimplex,
    ldr,
    margin_face,
    mpt,
    opl,
    preference,
    presto,
    soft_label,
    soft_margin,
    stablemax,
    symmetric,
    tcm,
    zloss,
)
from stepguard.losses.base import GuardedLoss


@dataclass(frozen=True)
class LossInfo:
    """A registered loss.

    Attributes:
        name: registry name (lowercase snake case).
        cls: the module class.
        batch_coupled: the loss couples the samples of a batch.
        meaningful_value: the value is a meaningful training curve.
        golden: the golden file (under ``tests/data/golden``) that pins it, if any.
        faithful: it has a ``faithful=True`` mode reproducing the reference code.
    """

    name: str
    cls: type[GuardedLoss]
    batch_coupled: bool = False
    meaningful_value: bool = True
    golden: str | None = None
    faithful: bool = False


LOSSES: tuple[LossInfo, ...] = (
    LossInfo("arcface", margin_face.ArcFaceLoss, golden="elasticface.json", faithful=True),
    LossInfo("cosface", margin_face.CosFaceLoss, golden="elasticface.json"),
    LossInfo(
        "elastic_arcface", margin_face.ElasticArcFaceLoss, golden="elasticface.json", faithful=True
    ),
    LossInfo("elastic_cosface", margin_face.ElasticCosFaceLoss, golden="elasticface.json"),
    LossInfo(
        "elastic_arcface_plus",
        margin_face.ElasticArcFacePlusLoss,
        batch_coupled=True,
        golden="elasticface.json",
        faithful=True,
    ),
    LossInfo(
        "elastic_cosface_plus",
        margin_face.ElasticCosFacePlusLoss,
        batch_coupled=True,
        golden="elasticface.json",
        faithful=True,
    ),
    LossInfo("comp_sum", comp_sum.CompSumLoss),
    LossInfo("gce", comp_sum.GCELoss, golden="robust_ce_family_apl.json", faithful=True),
    LossInfo("mae", comp_sum.MAELoss, golden="robust_ce_family_apl.json", faithful=True),
    LossInfo("rce", comp_sum.RCELoss, golden="robust_ce_family_apl.json", faithful=True),
    LossInfo("sce", comp_sum.SCELoss, golden="robust_ce_family_apl.json", faithful=True),
    LossInfo("nce", comp_sum.NCELoss, golden="robust_ce_family_apl.json"),
    LossInfo("adv_comp_sum", comp_sum.AdvCompSumLoss),
    LossInfo(
        "aucm",
        auc.AUCMLoss,
        batch_coupled=True,
        meaningful_value=False,
        golden="aucm_libauc.json",
        faithful=True,
    ),
    LossInfo("auc_square", auc.AUCSquareLoss, batch_coupled=True, meaningful_value=False),
    LossInfo(
        "multilabel_aucm",
        auc.MultiLabelAUCMLoss,
        batch_coupled=True,
        meaningful_value=False,
        golden="aucm_libauc.json",
        faithful=True,
    ),
    LossInfo("tcm", tcm.TCMLoss, batch_coupled=True, golden="tcm.json"),
    LossInfo("mpt", mpt.MPTLoss, golden="mpt_negative_flip.json"),
    LossInfo("presto", presto.PRESTOLoss, golden="presto.json"),
    LossInfo("proportional_odds", presto.ProportionalOddsLoss),
    LossInfo(
        "ensloss",
        ensloss.EnsLoss,
        batch_coupled=True,
        meaningful_value=False,
        golden="ensloss.json",
    ),
    LossInfo("symmetric_ce", symmetric.SymmetricCELoss),
    LossInfo("binary_unhinged", symmetric.BinaryUnhingedLoss),
    LossInfo(
        "hypersimplex_multiclass",
        hypersimplex.HypersimplexMulticlassLoss,
        batch_coupled=True,
        golden="hypersimplex_soft_binary_argmax.json",
        faithful=True,
    ),
    LossInfo(
        "hypersimplex_binary",
        hypersimplex.HypersimplexBinaryLoss,
        batch_coupled=True,
        golden="hypersimplex_soft_binary_argmax.json",
        faithful=True,
    ),
    LossInfo("spherical_z_loss", zloss.SphericalZLoss),
    LossInfo("logz_squared", zloss.LogZSquaredPenalty, golden="zloss_logZ_squared.json"),
    LossInfo("ce_z_loss", zloss.CrossEntropyWithZLoss, golden="zloss_logZ_squared.json"),
    LossInfo("ldr_kl", ldr.LDRKLLoss, golden="ldr_kl.json", faithful=True),
    LossInfo("aldr_kl", ldr.ALDRKLLoss, golden="ldr_kl.json", faithful=True),
    LossInfo("opl", opl.OPLLoss, batch_coupled=True, golden="opl.json", faithful=True),
    LossInfo(
        "stablemax_ce",
        stablemax.StableMaxCrossEntropyLoss,
        golden="stablemax_perpgrad.json",
        faithful=True,
    ),
    LossInfo("soft_target_bce", soft_label.SoftTargetBCELoss),
    LossInfo("hard_label_logistic", soft_label.HardLabelLogisticLoss),
    LossInfo("bag_level", aggregate.BagLevelLoss, batch_coupled=True),
    LossInfo("instance_level", aggregate.InstanceLevelLoss, batch_coupled=True),
    LossInfo("aggregate_interpolated", aggregate.AggregateInterpolatedLoss, batch_coupled=True),
    LossInfo("dpo", preference.DPOLoss),
    LossInfo("ipo", preference.IPOLoss),
    LossInfo("simpo", preference.SimPOLoss),
    LossInfo("soft_margin", soft_margin.SoftMarginLoss, golden="soft_margin_nn_svm.json"),
)

BY_NAME: dict[str, LossInfo] = {info.name: info for info in LOSSES}
