"""A dispatch mode that records the aten ops run while it is active (shared by the geometry tests)."""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode


class AtenOps(TorchDispatchMode):
    """The aten ops that ran while active, by name (``aten::mm`` …)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))
