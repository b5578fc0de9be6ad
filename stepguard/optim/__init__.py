"""Optimizers and solvers that come with the papers behind the loss suite.

* :class:`PerpGrad` (alias :class:`OrthoGrad`): the ⊥Grad optimizer wrapper, which removes
  each gradient's component along its weights before the base optimizer's step.
* :func:`fit_presto`: the PRESTO / proportional-odds solver (proximal Newton).
"""

from __future__ import annotations

from stepguard.optim.perpgrad import OrthoGrad, PerpGrad, orthogonalize_gradients_, perp_gradient
from stepguard.optim.presto import PrestoFit, fit_presto

__all__ = ["OrthoGrad", "PerpGrad", "PrestoFit", "fit_presto", "orthogonalize_gradients_", "perp_gradient"]
