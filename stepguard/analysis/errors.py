"""The errors of the post-hoc analyzer: each names the file and what is wrong with it.

They derive from :class:`ValueError`, so ``stepguard analyze`` prints them as one line and
exits with status 2.
"""

from __future__ import annotations


class AnalysisError(ValueError):
    """The analyzer cannot go on with its input (a file, the model factory or the probe)."""


class CheckpointError(AnalysisError):
    """A checkpoint cannot be read, holds no state dict, or does not match the model.

    Attributes:
        path: the checkpoint file.
        problem: what is wrong, without the file name.
    """

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"checkpoint {path}: {problem}")


class NoCheckpointsError(AnalysisError):
    """A directory holds no checkpoint files, or too few usable ones to form a transition."""


class ProbeError(AnalysisError):
    """The probe data cannot be loaded, or does not fit the model."""


class FactoryError(AnalysisError):
    """The model factory cannot be imported, called, or does not return an ``nn.Module``."""
