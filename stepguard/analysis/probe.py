"""The probe: the fixed data every transition is measured on.

A probe file is a ``torch.save``d dict with ``inputs`` (a tensor, a tuple of positional
inputs or a dict of keyword inputs) and optionally ``targets`` (class indices per sample or
position; 0/1 for a one-logit head) and ``mask`` (True where a sample or position counts).
``digits`` names the embedded digits data: the train split of seed 0 (``digits:test`` for
the test split).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from stepguard.analysis.errors import ProbeError
from stepguard.geometry.jvp import Batch, Mode, replay_context
from stepguard.geometry.logits import LogitsFn, extract_logits

PROBE_KEYS = ("inputs", "targets", "mask")
DIGITS_SPLITS = ("train", "test")


@dataclass(frozen=True)
class Probe:
    """Inputs (and optional targets and mask) of the replayed forward.

    Attributes:
        inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs.
        targets: class indices, one per sample (or position); ``None`` when unknown.
        mask: True where a sample (or position) counts; ``None``: all count.
        name: where it came from, for messages and the report.
    """

    inputs: Any
    targets: Tensor | None = None
    mask: Tensor | None = None
    name: str = "probe"

    def to(self, device: torch.device | str) -> Probe:
        """The same probe with every tensor on ``device``."""
        return replace(
            self,
            inputs=_move(self.inputs, device),
            targets=None if self.targets is None else self.targets.to(device),
            mask=None if self.mask is None else self.mask.to(device),
        )

    @property
    def size(self) -> int:
        """The number of samples (the leading dimension of the first input tensor)."""
        for value in _tensors(self.inputs):
            return int(value.shape[0]) if value.ndim else 1
        return 0

    def batch(self, *, seed: int = 0, training: bool = True) -> Batch:
        """A replayable forward of the probe: the same random numbers at every checkpoint.

        The CPU generator, and the CUDA generator of every device the inputs live on, start
        from ``seed`` at each replay (so dropout draws the same mask every time).
        """
        devices = sorted({t.device.index or 0 for t in _tensors(self.inputs) if t.is_cuda})
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            batch = Batch.from_inputs(self.inputs, training=training)
            for index in devices:
                batch.device_rng_states[index] = torch.cuda.get_rng_state(index)
        return batch


def _move(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: _move(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_move(v, device) for v in value)
    return value


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def describe_inputs(value: Any) -> str:
    """Shapes and dtypes of the inputs, e.g. ``Tensor(256, 64) float32``."""
    if isinstance(value, Tensor):
        return f"Tensor{tuple(value.shape)} {str(value.dtype).replace('torch.', '')}"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {describe_inputs(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(describe_inputs(v) for v in value) + ")"
    return type(value).__name__


def digits_probe(split: str = "train", seed: int = 0) -> Probe:
    """The embedded digits data (64 features in [0, 1], 10 classes), ``train`` or ``test`` split."""
    from stepguard.datasets import digits_split

    if split not in DIGITS_SPLITS:
        raise ProbeError(f"digits split must be one of {DIGITS_SPLITS}, got {split!r}")
    data = digits_split(seed)
    x, y = (data.x_train, data.y_train) if split == "train" else (data.x_test, data.y_test)
    return Probe(inputs=x, targets=y, name=f"digits:{split}")


def load_probe(spec: str | os.PathLike[str]) -> Probe:
    """A probe from a file, or the embedded digits data (``digits``, ``digits:test``).

    Raises:
        ProbeError: the file is missing or corrupt, is not a dict with ``inputs``, has
            unknown keys, or its tensors disagree in their number of samples.
    """
    text = os.fspath(spec)
    if text in ("digits", "digits:train", "digits:test"):
        return digits_probe(text.partition(":")[2] or "train")
    path = Path(text)
    if not path.is_file():
        raise ProbeError(f"probe {path}: no such file (pass a torch.save'd dict, or 'digits')")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise ProbeError(f"probe {path}: cannot be read ({type(exc).__name__}: {first})") from exc
    if isinstance(obj, Tensor):
        obj = {"inputs": obj}
    if not isinstance(obj, Mapping) or "inputs" not in obj:
        keys = list(obj) if isinstance(obj, Mapping) else type(obj).__name__
        raise ProbeError(
            f"probe {path}: expected a dict with 'inputs' (and optional 'targets', 'mask'), got {keys}"
        )
    unknown = [k for k in obj if k not in PROBE_KEYS]
    if unknown:
        raise ProbeError(f"probe {path}: unknown keys {unknown}; a probe holds only {list(PROBE_KEYS)}")
    probe = Probe(inputs=obj["inputs"], targets=obj.get("targets"), mask=obj.get("mask"), name=str(path))
    _check_consistent(probe)
    return probe


def _check_consistent(probe: Probe) -> None:
    tensors = _tensors(probe.inputs)
    if not tensors:
        raise ProbeError(f"probe {probe.name}: 'inputs' holds no tensor ({describe_inputs(probe.inputs)})")
    for key in ("targets", "mask"):
        value = getattr(probe, key)
        if value is None:
            continue
        if not isinstance(value, Tensor):
            raise ProbeError(f"probe {probe.name}: {key!r} must be a tensor, got {type(value).__name__}")
        if value.ndim == 0 or value.shape[0] != probe.size:
            raise ProbeError(
                f"probe {probe.name}: {key!r} has shape {tuple(value.shape)} but the inputs hold "
                f"{probe.size} samples ({describe_inputs(probe.inputs)})"
            )


def probe_logits(
    model: nn.Module,
    probe: Probe,
    batch: Batch,
    *,
    mode: Mode,
    logits_fn: LogitsFn | None = None,
) -> Tensor:
    """The model's logits on the probe, computed as the replay computes them (no gradient).

    Raises:
        ProbeError: the forward fails (the inputs do not fit the model) or gives no logits.
    """
    try:
        with torch.no_grad(), replay_context(model, batch, mode):
            return extract_logits(model(*batch.args, **batch.kwargs), logits_fn).detach()
    except (TypeError, ValueError, RuntimeError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise ProbeError(
            f"probe {probe.name} does not fit the model: its forward on "
            f"{describe_inputs(probe.inputs)} raised {type(exc).__name__}: {first}"
        ) from exc


def check_targets(probe: Probe, logits: Tensor, *, ignore_index: int | None = -100) -> None:
    """Targets and mask must have one entry per row of the logits, and targets a valid class.

    Raises:
        ProbeError: naming the probe, the shapes and the classes.
    """
    lead = tuple(logits.shape[:-1]) if logits.ndim > 1 else tuple(logits.shape)
    classes = logits.shape[-1] if logits.ndim > 1 else 1
    for key in ("targets", "mask"):
        value = getattr(probe, key)
        if value is not None and tuple(value.shape) != lead:
            raise ProbeError(
                f"probe {probe.name}: {key!r} has shape {tuple(value.shape)} but the model's logits "
                f"{tuple(logits.shape)} have rows {lead}"
            )
    y = probe.targets
    if y is None:
        return
    if y.is_floating_point() and classes > 1:
        raise ProbeError(f"probe {probe.name}: 'targets' must be class indices (integers), got {y.dtype}")
    valid = y if y.is_floating_point() or ignore_index is None else y[y != ignore_index]
    if valid.numel() == 0:
        return
    high = 1 if classes == 1 else classes - 1
    low, top = float(valid.min()), float(valid.max())
    if low < 0 or top > high:
        raise ProbeError(
            f"probe {probe.name}: targets range over [{low:g}, {top:g}] but the model has "
            f"{classes} output{'s' if classes > 1 else ''} (valid: 0..{high}, or {ignore_index} to ignore)"
        )
