"""Building the model to replay: a zero-argument factory named as ``pkg.module:factory`` or
``path/to/file.py:factory``."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

from torch import nn

from stepguard.analysis.errors import FactoryError

Factory = Callable[[], nn.Module]


def load_factory(spec: str) -> Factory:
    """The callable named by ``spec``.

    Args:
        spec: ``"pkg.module:factory"`` (imported from the Python path, with the current
            directory first) or ``"path/to/file.py:factory"``; the factory may be a dotted
            attribute path (``module:Class.build``).

    Raises:
        FactoryError: the spec is malformed, the module cannot be imported, or it has no
            such callable.
    """
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr:
        raise FactoryError(
            f"--model {spec!r}: expected 'pkg.module:factory' or 'file.py:factory' "
            "(a zero-argument callable that builds the model)"
        )
    if module_part.endswith(".py") or "/" in module_part or "\\" in module_part:
        module = _import_file(spec, Path(module_part))
    else:
        module = _import_module(spec, module_part)
    target: object = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise FactoryError(f"--model {spec!r}: {module_part} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise FactoryError(f"--model {spec!r}: {attr} is a {type(target).__name__}, not a callable")
    return target  # type: ignore[return-value]


def _import_module(spec: str, name: str) -> object:
    added = False
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
        added = True
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise FactoryError(f"--model {spec!r}: cannot import module {name!r} ({exc})") from exc
    except Exception as exc:
        raise FactoryError(
            f"--model {spec!r}: importing {name!r} raised {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        if added:
            sys.path.remove(cwd)


def _import_file(spec: str, path: Path) -> object:
    if not path.is_file():
        raise FactoryError(f"--model {spec!r}: no such file {path}")
    name = f"stepguard_factory_{abs(hash(str(path.resolve())))}"
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise FactoryError(f"--model {spec!r}: {path} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module
    try:
        loader_spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise FactoryError(f"--model {spec!r}: running {path} raised {type(exc).__name__}: {exc}") from exc
    return module


def build_model(factory: Factory | nn.Module, *, name: str = "the factory") -> nn.Module:
    """Call the factory (or take a module as it is) and check that it gives an ``nn.Module``.

    Raises:
        FactoryError: the factory raises or returns something else.
    """
    if isinstance(factory, nn.Module):
        return factory
    try:
        model = factory()
    except Exception as exc:
        raise FactoryError(f"{name} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise FactoryError(f"{name} returned a {type(model).__name__}, not a torch.nn.Module")
    return model
