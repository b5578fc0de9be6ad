"""StepGuard's loss suite: every loss is a :class:`GuardedLoss` module with a functional twin.

Build one by name with :func:`get` (``get("dpo", beta=0.1)``) or import its class. Each
loss reports its named parts in ``components`` after a forward, says which logits its
softmax or sigmoid acts on (``radius_logits``), and declares whether its value is a
meaningful curve and whether it couples the samples of a batch. See ``docs/losses.md``.

Only losses live here. What the papers ship beside them lives where it belongs: the ⊥Grad
optimizer and the PRESTO solver in :mod:`stepguard.optim`, the Hadamard layer in
:mod:`stepguard.layers`, the monitoring metrics in :mod:`stepguard.diagnostics` (softmax
collapse, gradient–weight cosine, entanglement ratios, OPIS) and
:mod:`stepguard.analysis.metrics` (negative flips, CLD).
"""

from __future__ import annotations

from stepguard.losses import functional
from stepguard.losses.aggregate import AggregateInterpolatedLoss, BagLevelLoss, InstanceLevelLoss
from stepguard.losses.auc import AUCMLoss, AUCSquareLoss, MultiLabelAUCMLoss
from stepguard.losses.base import BatchCouplingWarning, GuardedLoss
from stepguard.losses.comp_sum import (
    AdvCompSumLoss,
    CompSumLoss,
    GCELoss,
    MAELoss,
    NCELoss,
    RCELoss,
    SCELoss,
)
from stepguard.losses.ensloss import EnsLoss
from stepguard.losses.hypersimplex import HypersimplexBinaryLoss, HypersimplexMulticlassLoss
from stepguard.losses.ldr import ALDRKLLoss, LDRKLLoss
from stepguard.losses.margin_face import (
    ArcFaceLoss,
    CosFaceLoss,
    ElasticArcFaceLoss,
    ElasticArcFacePlusLoss,
    ElasticCosFaceLoss,
    ElasticCosFacePlusLoss,
)
from stepguard.losses.mpt import MPTLoss
from stepguard.losses.opl import OPLLoss
from stepguard.losses.preference import DPOLoss, IPOLoss, SimPOLoss
from stepguard.losses.presto import PRESTOLoss, ProportionalOddsLoss
from stepguard.losses.registry import get, hyperparameters, info, names
from stepguard.losses.soft_label import HardLabelLogisticLoss, SoftTargetBCELoss
from stepguard.losses.soft_margin import SoftMarginLoss
from stepguard.losses.stablemax import StableMaxCrossEntropyLoss
from stepguard.losses.symmetric import BinaryUnhingedLoss, SymmetricCELoss
from stepguard.losses.tcm import TCMLoss
from stepguard.losses.zloss import CrossEntropyWithZLoss, LogZSquaredPenalty, SphericalZLoss

__all__ = [
    "ALDRKLLoss",
    "AUCMLoss",
    "AUCSquareLoss",
    "AdvCompSumLoss",
    "AggregateInterpolatedLoss",
    "ArcFaceLoss",
    "BagLevelLoss",
    "BatchCouplingWarning",
    "BinaryUnhingedLoss",
    "CompSumLoss",
    "CosFaceLoss",
    "CrossEntropyWithZLoss",
    "DPOLoss",
    "ElasticArcFaceLoss",
    "ElasticArcFacePlusLoss",
    "ElasticCosFaceLoss",
    "ElasticCosFacePlusLoss",
    "EnsLoss",
    "GCELoss",
    "GuardedLoss",
    "HardLabelLogisticLoss",
    "HypersimplexBinaryLoss",
    "HypersimplexMulticlassLoss",
    "IPOLoss",
    "InstanceLevelLoss",
    "LDRKLLoss",
    "LogZSquaredPenalty",
    "MAELoss",
    "MPTLoss",
    "MultiLabelAUCMLoss",
    "NCELoss",
    "OPLLoss",
    "PRESTOLoss",
    "ProportionalOddsLoss",
    "RCELoss",
    "SCELoss",
    "SimPOLoss",
    "SoftMarginLoss",
    "SoftTargetBCELoss",
    "SphericalZLoss",
    "StableMaxCrossEntropyLoss",
    "SymmetricCELoss",
    "TCMLoss",
    "functional",
    "get",
    "hyperparameters",
    "info",
    "names",
]
