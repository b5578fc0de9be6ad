"""Moved to :mod:`stepguard.tools.bench_models`; this name stays only until its last importers move."""

from stepguard.tools.bench_models import BUILTIN, builtin_workload

__all__ = ["BUILTIN", "builtin_workload"]
