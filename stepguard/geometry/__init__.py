"""Geometry of one step: logit velocities along a direction and the radii they imply.

* :mod:`~stepguard.geometry.directions` — turn a user's direction into unit tangents.
* :mod:`~stepguard.geometry.logits` — find the logits in a model output and pick the rows that count.
* :mod:`~stepguard.geometry.jvp` — the logit velocities a = J_z·v (forward-mode AD, or a finite difference).
* :mod:`~stepguard.geometry.formulas` — Δ_a, ρ_a = π/Δ_a, the binary radius ρ*, the top-2 radii.
* :mod:`~stepguard.geometry.api` — the public :func:`radius` function.
"""

from stepguard.geometry.api import RadiusResult, radius
from stepguard.geometry.formulas import (
    binary_radius,
    logit_spread,
    rho_from_spread,
    top2_radius,
)

__all__ = [
    "RadiusResult",
    "binary_radius",
    "logit_spread",
    "radius",
    "rho_from_spread",
    "top2_radius",
]
