"""What the caller tells the coming step beside the optimizer: inputs, targets, a mask, the loss,
and objectives whose gradient entanglement to measure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from stepguard.diagnostics import EntanglementProbe


class StepInputs:
    """Collects :meth:`observe` and :meth:`watch` until the step takes them (:meth:`take`)."""

    def __init__(self) -> None:
        self._given: dict[str, Any] = {}
        self._probe: EntanglementProbe | None = None

    def observe(self, **values: Any) -> None:
        """Keep every value that is not None for the coming step."""
        self._given.update((key, value) for key, value in values.items() if value is not None)

    def watch(
        self, objectives: Mapping[str, Tensor], params: Sequence[Tensor], *, lengths: Mapping[str, Any] | None
    ) -> None:
        """The Gram matrix of the objectives' gradients now; their realized changes after the step."""
        if not objectives:
            raise ValueError("watch() needs at least one named objective, e.g. chosen=..., rejected=...")
        if self._probe is None:
            self._probe = EntanglementProbe()
        self._probe.observe(objectives, params, lengths=lengths)
        self._given["watched"] = True

    @property
    def inputs_given(self) -> bool:
        """Explicit inputs replace the captured training batch."""
        return "inputs" in self._given

    def take(self) -> tuple[dict[str, Any], EntanglementProbe | None]:
        """What was given for this step (the next starts empty); the probe, when objectives were watched."""
        given, self._given = self._given, {}
        return given, self._probe if given.get("watched") else None
