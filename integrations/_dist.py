"""Which process of a distributed job this is (torch.distributed, else torchrun's env vars)."""

from __future__ import annotations

import os
import sys


def process_rank() -> tuple[int, int]:
    """The global and node-local rank of this process.

    Uses ``torch.distributed`` when a process group is initialized, else the ``RANK`` and
    ``LOCAL_RANK`` environment variables that launchers such as ``torchrun`` set, else
    ``(0, 0)``.

    Returns:
        ``(rank, local_rank)``.
    """
    rank: int | None = None
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        rank = int(dist.get_rank())
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    return rank, local_rank
