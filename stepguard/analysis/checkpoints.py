"""Finding checkpoint files, ordering them by step, and reading the model's state dict out of each.

Formats read:

* ``*.pt`` / ``*.pth``: a state dict, a dict holding one under ``state_dict``,
  ``model_state_dict``, ``model`` or ``module`` (or a key you name), or a whole pickled
  module (``unsafe=True`` only);
* ``*.ckpt`` (PyTorch Lightning): the ``state_dict`` entry, whose keys carry the
  LightningModule's attribute prefix (``model.``), detected and stripped;
* ``*.safetensors``: read with the ``safetensors`` package (``pip install 'stepguard[analyze]'``);
* a ``torch.distributed.checkpoint`` (DCP) directory, the format FSDP2 runs save (a directory
  holding a ``.metadata`` file): its tensors are read whole into this one process, whatever
  the number of ranks that wrote it; the model is found under the same keys as in a file.

Key prefixes such as ``model.`` (Lightning), ``module.`` (DistributedDataParallel) and
``_orig_mod.`` (``torch.compile``) are detected by matching the keys against the model's.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from stepguard.analysis.errors import AnalysisError, CheckpointError, NoCheckpointsError

SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors")
DCP_METADATA = ".metadata"
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "module")
PREFERRED_PREFIXES = ("model.", "module.", "_orig_mod.", "model.module.", "module._orig_mod.")
_STEP_PATTERN = re.compile(r"(?:global_step|step|iteration|iter|it)[=_\-]?(\d+)", re.IGNORECASE)
_NUMBER = re.compile(r"\d+")
_REFUSED_GLOBAL = (  # how the torch versions we support name what a weights-only load refused
    re.compile(r"GLOBAL (\S+) was not an allowed global"),
    re.compile(r"unsupported GLOBAL (\S+) whose module"),
    re.compile(r"Unsupported global: GLOBAL (\S+)"),
    re.compile(r"Unsupported class (\S+)"),
    re.compile(r"add_safe_globals`?,? but got <class '([^']+)'>"),
    re.compile(r"unrecognized function (.+?)(?: which belongs to|\n|$)"),
)
_WEIGHTS_ONLY = ("Weights only load failed", "WeightsUnpickler error")
UNSAFE_FLAG = "--unsafe-load"
_SAFETENSORS_HINT = "pip install 'stepguard[analyze]'"


@dataclass(frozen=True)
class CheckpointFile:
    """One checkpoint of a run.

    Attributes:
        path: the file.
        step: the training step it was saved at (from its name, or its position in the list).
    """

    path: Path
    step: int

    @property
    def is_dcp(self) -> bool:
        """Whether the checkpoint is a ``torch.distributed.checkpoint`` directory."""
        return is_dcp_checkpoint(self.path)

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class LoadedState:
    """A state dict read from a checkpoint, with keys matched to the model's.

    Attributes:
        state: parameter and buffer values by the model's own names.
        source: where in the file it came from, e.g. ``"state_dict (Lightning)"``.
        prefix: the key prefix that was stripped (``""``: none).
    """

    state: dict[str, Any]
    source: str
    prefix: str


def natural_key(name: str) -> tuple[Any, ...]:
    """Sort key that orders embedded numbers by value: ``step_9`` before ``step_10``."""
    parts = re.split(r"(\d+)", name)
    return tuple(int(p) if i % 2 else p.lower() for i, p in enumerate(parts))


def step_from_name(name: str) -> int | None:
    """The step number in a checkpoint's file name, or ``None`` when it holds no number.

    A number after ``step``/``global_step``/``iter`` wins (``epoch=3-step=1200.ckpt`` is
    step 1200); otherwise the last number in the name (``ckpt_000120.pt`` is 120).
    """
    stem = name
    for suffix in SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    tagged = _STEP_PATTERN.findall(stem)
    if tagged:
        return int(tagged[-1])
    numbers = _NUMBER.findall(stem)
    return int(numbers[-1]) if numbers else None


def discover(directory: str | os.PathLike[str]) -> list[CheckpointFile]:
    """The checkpoint files (and DCP directories) directly in ``directory``, ordered by step.

    Files whose name holds no number (Lightning's ``last.ckpt``, a copy of the newest) are
    left out when the others are numbered; when none is numbered, the files are taken in
    natural order and numbered 0, 1, 2, ...

    Raises:
        NoCheckpointsError: the directory does not exist or holds no checkpoint file.
        AnalysisError: two files carry the same step number.
    """
    root = Path(directory)
    if not root.is_dir():
        raise NoCheckpointsError(f"checkpoint directory {root} does not exist or is not a directory")
    if is_dcp_checkpoint(root):
        raise NoCheckpointsError(
            f"{root} is one torch.distributed.checkpoint (it holds {DCP_METADATA}): give the directory "
            "that holds the run's checkpoint directories, or list them with --checkpoints"
        )
    files = [
        p for p in root.iterdir()
        if (p.is_file() and p.name.lower().endswith(SUFFIXES)) or is_dcp_checkpoint(p)
    ]
    if not files:
        raise NoCheckpointsError(
            f"no checkpoints in {root}: expected files ending in {', '.join(SUFFIXES)} or "
            f"torch.distributed.checkpoint directories (holding {DCP_METADATA})"
        )
    numbered = [p for p in files if step_from_name(p.name) is not None]
    if not numbered:
        ordered = sorted(files, key=lambda p: natural_key(p.name))
        return [CheckpointFile(p, i) for i, p in enumerate(ordered)]
    ordered = sorted(numbered, key=lambda p: (step_from_name(p.name), natural_key(p.name)))
    checkpoints = [CheckpointFile(p, int(step_from_name(p.name) or 0)) for p in ordered]
    _check_unique(checkpoints)
    return checkpoints


def from_list(paths: Sequence[str | os.PathLike[str]]) -> list[CheckpointFile]:
    """Checkpoints in the order given, with their steps from the names when every name has a
    distinct number (their positions 0, 1, 2, ... otherwise). Missing files stay in the list:
    reading them fails later, and that checkpoint is reported and skipped.
    """
    if not paths:
        raise NoCheckpointsError("the list of checkpoints is empty")
    given = [Path(p) for p in paths]
    steps = [step_from_name(p.name) for p in given]
    if all(s is not None for s in steps) and len(set(steps)) == len(steps):
        return [CheckpointFile(p, int(s or 0)) for p, s in zip(given, steps, strict=True)]
    return [CheckpointFile(p, i) for i, p in enumerate(given)]


def resolve(source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[CheckpointFile]:
    """A directory (see :func:`discover`) or an explicit list (see :func:`from_list`)."""
    if isinstance(source, (str, os.PathLike)):
        return discover(source)
    return from_list(list(source))


def _check_unique(checkpoints: Iterable[CheckpointFile]) -> None:
    seen: dict[int, Path] = {}
    for ckpt in checkpoints:
        if ckpt.step in seen:
            raise AnalysisError(
                f"two checkpoints have step {ckpt.step}: {seen[ckpt.step].name} and {ckpt.name}; "
                "name the ones to analyze with --checkpoints"
            )
        seen[ckpt.step] = ckpt.path


# ---------------------------------------------------------------- reading


def read_file(path: str | os.PathLike[str], *, unsafe: bool = False) -> Any:
    """The object stored in a checkpoint file (CPU tensors).

    Args:
        path: the file (``.safetensors`` is read with ``safetensors``, a DCP directory with
            :func:`read_dcp`, anything else with ``torch.load``).
        unsafe: allow arbitrary pickled objects (``weights_only=False``): only for files you trust.

    Raises:
        CheckpointError: the file is missing, unreadable or corrupt.
    """
    path = Path(path)
    where = str(path)
    if is_dcp_checkpoint(path):
        return read_dcp(path, unsafe=unsafe)
    if path.is_dir():
        raise CheckpointError(
            where, f"a directory, but not a torch.distributed.checkpoint (no {DCP_METADATA} in it)"
        )
    if not path.is_file():
        raise CheckpointError(where, "no such file")
    if path.name.lower().endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise CheckpointError(
                where, f"reading safetensors files needs the safetensors package ({_SAFETENSORS_HINT})"
            ) from exc
        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:
            raise CheckpointError(where, f"not a readable safetensors file ({_describe(exc)})") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=not unsafe)
    except Exception as exc:
        refusal = None if unsafe else weights_only_refusal(str(exc))
        if refusal is not None:
            raise CheckpointError(where, refusal) from exc
        raise CheckpointError(where, f"corrupt or not a PyTorch checkpoint ({_describe(exc)})") from exc


def is_dcp_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a ``torch.distributed.checkpoint`` directory (it holds ``.metadata``)."""
    return Path(path).is_dir() and (Path(path) / DCP_METADATA).is_file()


_DCP_SAFE_GLOBALS = {
    "torch": {"Size"} | {n for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype)},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _RefusedGlobal(pickle.UnpicklingError):
    """A ``.metadata`` pickle names a global outside DCP's own classes."""


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata`` file, allowing only the classes that describe a checkpoint."""

    def find_class(self, module: str, name: str) -> Any:
        dcp_module = module.startswith("torch.distributed.checkpoint.") and not name.startswith("__")
        if dcp_module or name in _DCP_SAFE_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        raise _RefusedGlobal(f"global {module}.{name} is not allowed")


def _dcp_metadata(path: Path, unsafe: bool) -> Any:
    data = (path / DCP_METADATA).read_bytes()
    try:
        return pickle.loads(data) if unsafe else _MetadataUnpickler(io.BytesIO(data)).load()
    except _RefusedGlobal as exc:
        raise CheckpointError(
            str(path),
            f"its {DCP_METADATA} holds Python objects that a safe read refuses ({exc}); if you trust "
            f"the checkpoint, pass {UNSAFE_FLAG} (loading it runs the file's pickled code)",
        ) from exc
    except Exception as exc:
        raise CheckpointError(str(path), f"corrupt {DCP_METADATA} ({_describe(exc)})") from exc


def read_dcp(path: str | os.PathLike[str], *, unsafe: bool = False) -> dict[str, Any]:
    """The tensors of a ``torch.distributed.checkpoint`` directory, whole, in this process.

    Every rank's shards are read and put together (no process group is needed), and the
    result is nested as it was saved (``{"model": {...}, "optim": {...}}``). Only tensors are
    read unless ``unsafe``: DCP stores other values as pickles that a full ``torch.load``
    would run; the ``.metadata`` index is itself a pickle, read allowing only DCP's own
    classes.

    Raises:
        CheckpointError: the directory is not a readable DCP checkpoint.
    """
    path = Path(path)
    where = str(path)
    try:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
    except ImportError as exc:  # pragma: no cover - torch built without torch.distributed
        raise CheckpointError(
            where, f"reading a DCP checkpoint needs torch.distributed ({_describe(exc)})"
        ) from exc
    metadata = _dcp_metadata(path, unsafe)
    entries = getattr(metadata, "state_dict_metadata", None)
    if not isinstance(entries, Mapping):
        raise CheckpointError(where, f"its {DCP_METADATA} is not a DCP index")
    keys = set(entries) if unsafe else {k for k, v in entries.items() if isinstance(v, TensorStorageMetadata)}
    if not keys:
        raise CheckpointError(where, "a DCP checkpoint that holds no tensors")

    class _Reader(dcp.FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            return metadata

    state: dict[str, Any] = {}
    try:
        # what torch.distributed.checkpoint.format_utils.dcp_to_torch_save does, in memory
        planner = _EmptyStateDictLoadPlanner(keys=keys)
        _load_state_dict(state, storage_reader=_Reader(str(path)), planner=planner, no_dist=True)
    except Exception as exc:
        raise CheckpointError(where, f"not a readable DCP checkpoint ({_describe(exc)})") from exc
    return state


def weights_only_refusal(message: str) -> str | None:
    """Explain a ``torch.load(weights_only=True)`` refusal, naming the blocked global in full.

    Returns ``None`` when ``message`` names no refused global: the file is then corrupt or
    not a PyTorch checkpoint (junk bytes and plain pickles also stop the weights-only
    unpickler, at an unsupported operand, and a full load would fail on them too).
    """
    if not any(mark in message for mark in _WEIGHTS_ONLY):
        return None
    for pattern in _REFUSED_GLOBAL:
        found = pattern.search(message)
        if found:
            return (
                f"it holds Python objects that a weights-only load refuses (the global "
                f"{found.group(1).rstrip('.,;')} is not allowed); if you trust the file, pass "
                f"{UNSAFE_FLAG} (loading it runs the file's pickled code)"
            )
    return None


def _describe(exc: BaseException) -> str:
    message = str(exc)
    if "WeightsUnpickler error:" in message:  # skip torch's advice about weights_only
        message = message.split("WeightsUnpickler error:", 1)[1]
    text = [line.strip() for line in message.strip().splitlines() if line.strip()]
    first = text[0][:200] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _is_state_dict(obj: Any) -> bool:
    if not isinstance(obj, Mapping) or not obj:
        return False
    return all(isinstance(v, Tensor) or str(k).endswith("_extra_state") for k, v in obj.items())


def extract_state_dict(obj: Any, path: str, *, key: str | None = None) -> tuple[dict[str, Any], str]:
    """The state dict inside a loaded checkpoint, and a description of where it was found.

    Raises:
        CheckpointError: no state dict was found (the message lists the top-level keys).
    """
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict()), "a pickled module"
    if not isinstance(obj, Mapping):
        raise CheckpointError(path, f"holds a {type(obj).__name__}, not a state dict")
    lightning = any("lightning" in str(k) for k in obj) or ("state_dict" in obj and "global_step" in obj)
    if key is not None:
        if key not in obj:
            raise CheckpointError(path, f"has no key {key!r}; its keys are {_keys(obj)}")
        inner = obj[key]
        inner = inner.state_dict() if isinstance(inner, nn.Module) else inner
        if not _is_state_dict(inner):
            raise CheckpointError(path, f"entry {key!r} is not a state dict (name → tensor)")
        return dict(inner), repr(key)
    if _is_state_dict(obj):
        return dict(obj), "the top level"
    for name in CONTAINER_KEYS:
        inner = obj.get(name)
        if isinstance(inner, nn.Module):
            return dict(inner.state_dict()), f"{name!r} (a pickled module)"
        if _is_state_dict(inner):
            return dict(inner), f"{name!r}" + (" (Lightning)" if lightning else "")
    raise CheckpointError(
        path,
        f"holds no state dict: looked for a mapping of tensors at the top level and under "
        f"{', '.join(repr(k) for k in CONTAINER_KEYS)}; its keys are {_keys(obj)} "
        "(name the entry with --key)",
    )


def _keys(obj: Mapping[Any, Any], limit: int = 8) -> str:
    keys = [repr(k) for k in list(obj)[:limit]]
    more = f", … ({len(obj)} in all)" if len(obj) > limit else ""
    return "[" + ", ".join(keys) + more + "]"


# ---------------------------------------------------------------- matching


def match_state_dict(
    state: Mapping[str, Any],
    model: nn.Module,
    path: str,
    *,
    prefix: str | None = None,
) -> tuple[dict[str, Any], str]:
    """Rename ``state``'s keys to the model's and check that every entry fits.

    Args:
        state: the checkpoint's state dict.
        model: the model it must load into.
        path: the checkpoint (for messages).
        prefix: strip exactly this prefix; ``None`` detects it: none when the keys already
            match, else the prefix under which every one of the model's keys is found
            (keys outside it, e.g. a Lightning module's loss or metrics, are ignored).

    Returns:
        ``(state, prefix)``: the state dict under the model's names, and the prefix stripped.

    Raises:
        CheckpointError: keys are missing or unexpected, or a tensor's shape differs.
    """
    expected = model.state_dict(keep_vars=True)
    if prefix is None:
        prefix = _detect_prefix(state, expected)
    if prefix:
        renamed = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    else:
        renamed = dict(state)
    _fill_tied(renamed, expected)
    missing = [k for k in expected if k not in renamed]
    unexpected = [k for k in renamed if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of the model's {len(expected)} keys are missing ({_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} keys are not in the model ({_few(unexpected)})")
        hint = f" after stripping the prefix {prefix!r}" if prefix else ""
        raise CheckpointError(
            path,
            f"does not match the model{hint}: "
            + "; ".join(parts)
            + " — is --model the factory of the network that was trained?",
        )
    wrong = []
    for name, ref in expected.items():
        value = renamed[name]
        if isinstance(ref, Tensor) and isinstance(value, Tensor) and tuple(value.shape) != tuple(ref.shape):
            wrong.append(f"{name}: checkpoint {tuple(value.shape)}, model {tuple(ref.shape)}")
    if wrong:
        shown = "; ".join(wrong[:3]) + (f"; … ({len(wrong)} in all)" if len(wrong) > 3 else "")
        raise CheckpointError(path, f"does not match the model: shapes differ ({shown})")
    return {k: renamed[k] for k in expected}, prefix


def _few(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (", …" if len(names) > limit else "")


def _detect_prefix(state: Mapping[str, Any], expected: Mapping[str, Any]) -> str:
    if all(k in state for k in expected):
        return ""
    counts: dict[str, int] = {}
    for key in state:
        for i, char in enumerate(key):
            if char == "." and key[i + 1 :] in expected:
                counts[key[: i + 1]] = counts.get(key[: i + 1], 0) + 1
    needed = len(_distinct(expected))
    full = [p for p, n in counts.items() if n >= needed]
    if not full:
        # no prefix covers every key: keep the best one, so the error names what is missing
        return max(counts, key=lambda p: counts[p]) if counts else ""
    for preferred in PREFERRED_PREFIXES:
        if preferred in full:
            return preferred
    return min(full, key=len)


def _distinct(expected: Mapping[str, Any]) -> set[int]:
    return {id(v) for v in expected.values()}


def _fill_tied(state: dict[str, Any], expected: Mapping[str, Any]) -> None:
    """Tied weights saved once (``safetensors.torch.save_model``): fill in the other names."""
    by_id: dict[int, list[str]] = {}
    for name, value in expected.items():
        by_id.setdefault(id(value), []).append(name)
    for names in by_id.values():
        if len(names) < 2:
            continue
        present = next((n for n in names if n in state), None)
        if present is None:
            continue
        for name in names:
            state.setdefault(name, state[present])


def load_state(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    key: str | None = None,
    prefix: str | None = None,
    unsafe: bool = False,
) -> LoadedState:
    """Read a checkpoint and match its state dict to ``model`` (see :func:`match_state_dict`).

    Raises:
        CheckpointError: naming the file and the problem.
    """
    where = str(path)
    obj = read_file(path, unsafe=unsafe)
    raw, source = extract_state_dict(obj, where, key=key)
    state, stripped = match_state_dict(raw, model, where, prefix=prefix)
    return LoadedState(state=state, source=source, prefix=stripped)
