"""Running a test's worker on several real processes: gloo over loopback, a file store."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp


def join_gloo(rank: int, store: str, world: int) -> None:
    """In a worker: join the gloo process group of ``world`` ranks through the file ``store``."""
    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)


def spawn_ranks(
    worker: Callable[..., None], tmp_path: Path, *args: Any, world: int = 2, timeout: float = 240
) -> None:
    """Run ``worker(rank, store, out, *args)`` on ``world`` spawned processes; fail on a hang or a crash.

    ``store`` is the rendezvous file, ``out`` the folder (``tmp_path``) where each rank writes
    what the test reads back.
    """
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=worker, args=(rank, str(tmp_path / "store"), str(tmp_path), *args))
        for rank in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not hung, f"ranks {hung} hung past {timeout} s"
    assert [p.exitcode for p in procs] == [0] * world, f"worker exit codes {[p.exitcode for p in procs]}"


COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
    "broadcast_object_list", "reduce_scatter_tensor", "all_to_all", "barrier",
)


class GuardCollectives:
    """In a worker: count the ``torch.distributed`` collectives that StepGuard's own code calls.

    Each collective function is wrapped; a call counts when the function that made it lives in
    a ``stepguard`` module, so FSDP's own gathers and the test's collectives do not count.
    ``take()`` returns the count since the last ``take()``.
    """

    def __init__(self) -> None:
        import sys

        import torch.distributed as dist

        self._count = 0
        for name in COLLECTIVES:
            real = getattr(dist, name)

            def counted(*args: Any, __real: Callable[..., Any] = real, **kwargs: Any) -> Any:
                caller = sys._getframe(1).f_globals.get("__name__", "")
                if caller.split(".")[0] == "stepguard":
                    self._count += 1
                return __real(*args, **kwargs)

            setattr(dist, name, counted)

    def take(self) -> int:
        count, self._count = self._count, 0
        return count
