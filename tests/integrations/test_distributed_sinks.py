"""Sinks under torch.distributed: two gloo ranks on loopback, each training under a StepGuard.

The guard reduces each step's numbers across ranks, so both ranks hold the same report. By
default only rank 0 exports (Prometheus endpoint, TensorBoard files); ``per_rank=True``
exports from every rank with a ``rank`` label.
"""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("prometheus_client", reason="needs the prometheus extra")
pytest.importorskip("tensorboard", reason="needs the tensorboard extra")

pytestmark = pytest.mark.slow

WORLD = 2
STEPS = 3


def _scrape(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {
        s.name + json.dumps(dict(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }


def _rank_main(rank: int, store: str, out_dir: str) -> None:
    """One rank: guard a small MLP (different data per rank) with three sinks attached."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from stepguard import StepGuard
    from stepguard.integrations import PrometheusSink, TensorBoardSink

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)  # same initial weights on every rank
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                    torch.nn.Linear(16, 4))
        generator = torch.Generator().manual_seed(100 + rank)  # different data per rank
        x = torch.randn(16, 8, generator=generator)
        y = torch.randint(0, 4, (16,), generator=generator)
        once = PrometheusSink(port=0, run="ddp")
        each = PrometheusSink(port=0, run="ddp", per_rank=True)
        board = TensorBoardSink(Path(out_dir) / f"tb-rank{rank}")
        guard = StepGuard(torch.optim.SGD(model.parameters(), lr=0.1), model=model,
                          sinks=[once, each, board])
        reports = []
        for _ in range(STEPS):
            F.cross_entropy(model(x), y).backward()
            reports.append(guard.step(targets=y))
            guard.zero_grad()
        record: dict[str, Any] = {
            "rank": rank,
            "r": [r.r for r in reports],
            "report_rank": reports[-1].rank,
            "once": {"active": once.active, "url": once.url},
            "each": {"active": each.active, "labels": each.labels},
            "board_active": board.active,
            "once_samples": _scrape(once.url) if once.url else None,
            "each_samples": _scrape(each.url) if each.url else None,
            "failures": dict(guard.engine.sinks.failures),
        }
        dist.barrier()
        guard.close()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown, where gloo's threads can abort after the work is saved


def test_rank_zero_exports_once_and_per_rank_exports_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch.multiprocessing as mp

    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)  # the rank must come from torch.distributed
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # gloo listens on loopback only
    mp.spawn(_rank_main, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD,
             join=True)
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]

    assert records[0]["r"] == records[1]["r"]  # reduced across ranks by the guard
    assert [rec["report_rank"] for rec in records] == [0, 1]
    assert all(rec["failures"] == {"prometheus": 0, "tensorboard": 0} for rec in records)
    last_r = records[0]["r"][-1]

    # default: exported once, from rank 0
    assert records[0]["once"]["active"] and records[0]["once"]["url"]
    assert not records[1]["once"]["active"] and records[1]["once"]["url"] is None
    key = "stepguard_normalized_step" + json.dumps({"run": "ddp"})
    assert records[0]["once_samples"][key] == last_r
    assert records[0]["once_samples"]["stepguard_steps_total" + json.dumps({"run": "ddp"})] == (
        STEPS)

    # per rank: every rank exports, labelled
    for rank, rec in enumerate(records):
        assert rec["each"]["labels"] == {"run": "ddp", "rank": str(rank)}
        labels = json.dumps({"rank": str(rank), "run": "ddp"})
        assert rec["each_samples"]["stepguard_normalized_step" + labels] == last_r

    # TensorBoard: rank 0 only
    assert [rec["board_active"] for rec in records] == [True, False]
    assert (tmp_path / "tb-rank0").is_dir()
    assert not (tmp_path / "tb-rank1").exists()
    assert os.listdir(tmp_path / "tb-rank0")
