"""Post-hoc analysis of a finished run from its checkpoints (``stepguard analyze``).

Every transition between consecutive checkpoints is measured with the live guard's own
functions (:mod:`stepguard.measure`), so a replay of a guarded run reports the r the guard
saw. See ``docs/analyzer.md``.

* :func:`analyze` — measure every transition; returns an :class:`AnalysisResult`.
* :func:`write_outputs` — ``report.jsonl``, ``report.csv``, ``checkpoints.csv``,
  ``summary.json``, TensorBoard events and ``report.html``; :func:`read_report` reads
  ``report.jsonl`` back as :class:`Transition` objects.
* :func:`load_probe`, :func:`load_factory`, :func:`discover` — the inputs.
* :func:`negative_flip_rate`, :func:`relative_negative_flip_rate`, :func:`cld_scores` — the
  metrics across checkpoints.
"""

from stepguard.analysis.checkpoints import CheckpointFile, discover, load_state, natural_key, step_from_name
from stepguard.analysis.errors import (
    AnalysisError,
    CheckpointError,
    FactoryError,
    NoCheckpointsError,
    ProbeError,
)
from stepguard.analysis.metrics import (
    cld_coreset,
    cld_ranking,
    cld_scores,
    negative_flip_rate,
    relative_negative_flip_rate,
)
from stepguard.analysis.model import build_model, load_factory
from stepguard.analysis.outputs import read_jsonl as read_report
from stepguard.analysis.outputs import write_outputs
from stepguard.analysis.probe import Probe, digits_probe, load_probe
from stepguard.analysis.replay import (
    AnalysisResult,
    CheckpointRecord,
    CLDResult,
    MissingTransition,
    Transition,
    analyze,
)

__all__ = [
    "AnalysisError",
    "AnalysisResult",
    "CLDResult",
    "CheckpointError",
    "CheckpointFile",
    "CheckpointRecord",
    "FactoryError",
    "MissingTransition",
    "NoCheckpointsError",
    "Probe",
    "ProbeError",
    "Transition",
    "analyze",
    "build_model",
    "cld_coreset",
    "cld_ranking",
    "cld_scores",
    "digits_probe",
    "discover",
    "load_factory",
    "load_probe",
    "load_state",
    "natural_key",
    "negative_flip_rate",
    "read_report",
    "relative_negative_flip_rate",
    "step_from_name",
    "write_outputs",
]
