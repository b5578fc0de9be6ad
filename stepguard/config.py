"""Configuration of a guard, validated by pydantic (a misspelt key is an error, not a no-op)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class GuardConfig(BaseModel):
    """How a :class:`~stepguard.StepGuard` measures.

    Every number must be finite: ``inf`` or ``nan`` in any field is an error.

    Attributes:
        mode: ``"train"`` measures the training function (same dropout mask, batch
            statistics; running buffers untouched); ``"eval"`` measures the model in eval mode.
        estimator: ``"auto"`` uses forward-mode AD and falls back to a central finite
            difference for ops without a forward-mode rule; ``"jvp"`` or
            ``"finite_difference"`` force one.
        fd_epsilon: step of the finite difference (default: cube root of the dtype's eps).
        attention_chunk: keys per block of the replay's attention tangent (its memory is
            O(T·attention_chunk) per head; lower it when the replay runs out of memory).
        measure_every: measure with a fresh JVP every this many steps; in between, r is
            estimated as τ_t/ρ_a(last measured direction), and a jump of τ, an estimate
            near the boundary or a turn of the direction forces a fresh measurement.
        budget: instead of a fixed interval, keep the guard's own time within this
            fraction of the step's time without the guard (e.g. 0.10), with the same
            triggers.
        diagnostics: with each measurement, also compute the softmax-collapse fractions,
            the log Z moments, the largest logit gap and the NLM cosine (about 20 small
            tensor ops; ``False`` keeps the radius, spread and binding rows only, for the
            cheapest every-step guard).
        tau_jump, r_alert, min_cosine: the triggers (see :mod:`stepguard.schedule`).
        distributed: ``"auto"`` reduces measurements across ``torch.distributed`` ranks
            before deciding (Δ_a by MAX, counts by SUM), so every rank takes the same
            decision; ``"off"`` keeps each rank's own numbers (monitoring only).
        ignore_index: target value of rows (tokens) that do not count.
        temperature: the softmax temperature T the loss applies to the logits
            (ρ_a(T) = π·T/Δ_a of the raw logits).
        binding_k: how many binding samples (smallest top-2 radius) to report.
        max_spread_values: keep the per-sample spreads in the report when there are at
            most this many rows (for histograms); only quantiles otherwise.
        sink_max_failures: drop a sink after this many consecutive failures (None: never).
        veto_warning_after: warn once this many steps in a row were vetoed (None: never).
        halt_after_vetoes: raise :class:`~stepguard.HaltTraining` once this many steps in a
            row were vetoed (None: never): a run whose every step is skipped is not
            training, whatever policy decided it.
        assume_logits: declare that the model's outputs are softmax logits and skip the
            check of the first training step's gradient (the guard warns once when the
            loss's gradient with respect to the outputs does not sum to zero over classes,
            as it does for any loss of softmax(z): cross-entropy, label smoothing, focal).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    mode: Literal["train", "eval"] = "train"
    estimator: Literal["auto", "jvp", "finite_difference"] = "auto"
    fd_epsilon: float | None = Field(default=None, gt=0)
    attention_chunk: int = Field(default=256, ge=1)
    measure_every: int = Field(default=1, ge=1)
    budget: float | None = Field(default=None, gt=0, lt=1)
    diagnostics: bool = True
    tau_jump: float = Field(default=1.5, gt=1)
    r_alert: float = Field(default=0.5, gt=0)
    min_cosine: float = Field(default=0.5, ge=-1, le=1)
    distributed: Literal["auto", "off"] = "auto"
    ignore_index: int | None = -100
    temperature: float = Field(default=1.0, gt=0)
    binding_k: int = Field(default=5, ge=0)
    max_spread_values: int = Field(default=1024, ge=0)
    sink_max_failures: int | None = Field(default=None, ge=1)
    veto_warning_after: int | None = Field(default=10, ge=1)
    halt_after_vetoes: int | None = Field(default=100, ge=1)
    assume_logits: bool = False

    @model_validator(mode="before")
    @classmethod
    def _removed_restore_knob(cls, data: Any) -> Any:
        if isinstance(data, dict) and "restore_state_on_veto" in data:
            raise ValueError(
                "restore_state_on_veto was removed: whether a veto restores the optimizer state "
                "is the policy's choice, e.g. ClipPolicy(restore_optimizer_state=False) or "
                "restore_optimizer_state: false in a policy file (a Policy subclass sets "
                "needs_state_backup = False)"
            )
        return data
