"""Moved to :mod:`stepguard.tools.bench`; this name stays only until its last importers move."""

from stepguard.tools.bench import (
    DESCRIPTION,
    _cpu_allocations,
    add_arguments,
    machine_info,
    main,
    run_from_args,
    summarize,
    write_json,
)

__all__ = [
    "DESCRIPTION",
    "_cpu_allocations",
    "add_arguments",
    "machine_info",
    "main",
    "run_from_args",
    "summarize",
    "write_json",
]
