"""The exceptions a guarded step can raise."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stepguard.report import StepReport


class NoBatchError(RuntimeError):
    """The guard has no training batch (or no model) to measure the step on.

    Raised before the inner optimizer runs, so the step is not applied.
    """


class HaltTraining(RuntimeError):
    """A policy decided that training must stop; raised after the step was committed and reported.

    Attributes:
        step: the step index the guard was at.
        reason: the policy's reason.
        report: the :class:`~stepguard.StepReport` of that step.
    """

    def __init__(self, report: StepReport) -> None:
        self.step = report.step
        self.reason = report.reason
        self.report = report
        super().__init__(
            f"StepGuard halted training at step {report.step}: {report.reason} (rule {report.rule})"
        )


class ReplayOutOfMemoryError(MemoryError):
    """The measurement's replay of a batch ran out of memory; the step was not applied.

    Attributes:
        rows: the rows (tokens or samples) of the batch that was replayed.
        requested: bytes of the allocation that failed, when the allocator said.
    """

    def __init__(self, detail: str, *, rows: int | None, requested: int | None, attention_chunk: int) -> None:
        self.rows, self.requested = rows, requested
        asked = f" (an allocation of {requested / 2**20:,.0f} MiB failed)" if requested else ""
        batch = f" of {rows:,} rows" if rows else ""
        super().__init__(
            f"the guard's replay of the batch{batch} ran out of memory{asked}: {detail}. At its peak the "
            "replay holds the logits and their tangent (2 × rows × vocabulary × bytes per logit) and, "
            "per attention layer, blocks of batch × heads × queries × attention_chunk "
            f"(attention_chunk={attention_chunk}). Fix: lower GuardConfig(attention_chunk=...), "
            "measure fewer rows (a smaller micro-batch, or rows_fn / a mask), or leave the model's "
            "memory more headroom; the step was rolled back"
        )
