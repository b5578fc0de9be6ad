"""The overhead benchmark in a tiny configuration: output structure and internal consistency.

Nothing here asserts a speed: timings on a shared machine are noise at this size. The
checks are that the reported numbers agree with each other (ratios are quotients of the
reported medians, the guard's timed phases fit inside the step time, memory adds up)
and that every entry point (function, ``stepguard bench``, the example script) runs.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from stepguard.cli import main as cli_main
from stepguard.tools import bench, bench_models
from stepguard.tools.bench import BenchSettings, format_table, run_bench, write_json
from stepguard.tools.bench_models import builtin_workload, user_workload

ROOT = Path(__file__).resolve().parents[1]
TINY = {"steps": 2, "rounds": 3, "warmup": 2, "every": (1, 2), "memory_steps": 2}


@pytest.fixture(scope="module")
def result() -> dict[str, Any]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = run_bench(BenchSettings(models=("mlp",), sink="jsonl", threads=1, **TINY))
        out["threads_after_run"] = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    return out


def test_structure(result: dict[str, Any]) -> None:
    assert {"machine", "settings", "targets", "models"} <= set(result)
    machine = result["machine"]
    assert machine["threads"] == 1 and machine["device"] == "cpu" and machine["torch"] == torch.__version__
    assert result["settings"]["block"] == 2  # a multiple of every measure_every
    (entry,) = result["models"]
    assert entry["name"] == "mlp" and entry["parameters"] == 64 * 128 + 128 + 128 * 10 + 10
    names = [row["variant"] for row in entry["variants"]]
    assert names == ["every 1", "every 2", "budget 0.1"]
    assert len(entry["plain"]["step_ms"]["values"]) == TINY["rounds"]


def test_threads_pinned_during_the_run_and_restored_after(result: dict[str, Any]) -> None:
    assert result["machine"]["threads"] == 1
    assert result["threads_after_run"] == 2


def test_ratios_are_quotients_of_the_reported_medians(result: dict[str, Any]) -> None:
    entry = result["models"][0]
    plain = entry["plain"]["step_ms"]
    assert plain["median"] == pytest.approx(statistics.median(plain["values"]))
    assert plain["min"] <= plain["q25"] <= plain["median"] <= plain["q75"] <= plain["max"]
    for row in entry["variants"]:
        step = row["step_ms"]
        assert step["median"] == pytest.approx(statistics.median(step["values"]))
        assert row["ratio"] == pytest.approx(step["median"] / plain["median"])
        per_round = [g / p for g, p in zip(step["values"], plain["values"], strict=True)]
        assert row["ratio_rounds"]["values"] == pytest.approx(per_round)
        assert row["ratio_rounds"]["min"] <= row["ratio_rounds"]["median"] <= row["ratio_rounds"]["max"]
        assert row["overhead_ms"] == pytest.approx(step["median"] - plain["median"])
        assert row["step_ms_mean"] == pytest.approx(statistics.fmean(step["values"]))


def test_split_fits_inside_the_guarded_step(result: dict[str, Any]) -> None:
    entry = result["models"][0]
    for row in entry["variants"]:
        split = dict(row["split_ms"])
        assert {"snapshot", "optimizer", "diff", "measure", "decide", "commit", "sinks", "untimed"} <= set(
            split
        )
        parts = {k: split.pop(k) for k in ("jvp", "statistics") if k in split}  # parts of "measure"
        assert sum(parts.values()) <= split["measure"] + 1e-9
        assert set(parts) == ({"jvp", "statistics"} if row["measured_fraction"] > 0 else set())
        timed = {k: v for k, v in split.items() if k != "untimed"}
        assert all(v >= 0 for v in timed.values())
        # every timed phase runs inside the step, so their sum cannot exceed the step time
        assert sum(timed.values()) <= row["step_ms_mean"]
        guard = sum(v for k, v in timed.items() if k != "optimizer")
        assert row["guard_ms"] == pytest.approx(guard)
        assert guard + split["untimed"] == pytest.approx(row["overhead_ms_mean"])
        assert row["steps_timed"] == TINY["rounds"] * result["settings"]["block"]


def test_measurement_schedule_is_reported(result: dict[str, Any]) -> None:
    rows = {row["variant"]: row for row in result["models"][0]["variants"]}
    assert rows["every 1"]["measured_fraction"] == 1.0
    assert rows["every 1"]["estimators"] == {"jvp": rows["every 1"]["steps_timed"]}
    assert 0.5 <= rows["every 2"]["measured_fraction"] <= 1.0  # triggers may add measurements
    for row in rows.values():  # a budget may stretch the interval past the few timed steps
        assert 0.0 <= row["measured_fraction"] <= 1.0
        assert sum(row["estimators"].values()) == round(row["measured_fraction"] * row["steps_timed"])


def test_memory_accounting(result: dict[str, Any]) -> None:
    memory = result["models"][0]["memory"]
    assert "error" not in memory, memory.get("error")
    param_bytes = memory["parameter_bytes"]
    assert param_bytes == result["models"][0]["parameter_bytes"]
    plain, monitor, veto = (memory["variants"][k] for k in ("plain", "monitor", "veto"))
    for row in (plain, monitor, veto):
        assert row["peak_bytes"] >= row["resident_bytes"] > 0
        assert row["transient_bytes"] == row["peak_bytes"] - row["resident_bytes"]
    # plain keeps parameters, gradients and Adam's two moments: at least 4 copies
    assert plain["resident_bytes"] >= 4 * param_bytes
    # the guard keeps at least θ₀; a policy that can veto also keeps Adam's two moments
    assert monitor["extra_resident_bytes"] >= param_bytes
    assert veto["extra_resident_bytes"] >= monitor["extra_resident_bytes"] + 2 * param_bytes
    for row in (monitor, veto):
        assert row["peak_ratio"] == pytest.approx(row["peak_bytes"] / plain["peak_bytes"])
        assert row["extra_resident_param_copies"] == pytest.approx(row["extra_resident_bytes"] / param_bytes)


def test_table_and_json(result: dict[str, Any], tmp_path: Path) -> None:
    table = format_table(result)
    for text in ("mlp", "plain", "every 1", "every 2", "snapshot", "measure", "memory", "copies resident"):
        assert text in table
    path = write_json(result, tmp_path / "out" / "bench.json")
    loaded = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    assert loaded["models"][0]["variants"][0]["ratio"] == pytest.approx(
        result["models"][0]["variants"][0]["ratio"]
    )


def test_budget_mode_is_a_variant_unless_switched_off() -> None:
    with_budget = bench.variants_for(BenchSettings(models=("mlp",), budget=0.1))
    assert [v.name for v in with_budget] == ["plain", "every 1", "every 4", "every 16", "budget 0.1"]
    without = bench.variants_for(BenchSettings(models=("mlp",), budget=None))
    assert [v.name for v in without] == ["plain", "every 1", "every 4", "every 16"]
    guard = bench.make_guard(
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), torch.nn.Linear(1, 2), budget=0.1
    )
    assert guard.config.budget == 0.1


def test_the_bench_is_outside_what_a_training_step_imports() -> None:
    code = "import sys, stepguard; print(any(m.startswith('stepguard.tools') for m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_settings_validation() -> None:
    with pytest.raises(ValueError, match="unknown built-in"):
        BenchSettings(models=("resnet",))
    with pytest.raises(ValueError, match="nothing to benchmark"):
        BenchSettings(models=())
    with pytest.raises(ValueError, match="budget"):
        BenchSettings(budget=1.5)
    assert BenchSettings(steps=5, every=(1, 4, 16)).block == 16
    assert BenchSettings(steps=40, every=(1, 4, 16)).block == 48


def test_builtin_workloads_have_masked_tokens_and_batchnorm() -> None:
    lm = builtin_workload("lm", pool=2)
    targets = lm.batches[0].targets
    assert targets.ndim == 2 and (targets == -100).any() and (targets != -100).any()
    net = lm.factory()
    logits = net(lm.batches[0].inputs)
    assert logits.shape == (*targets.shape, 64)
    assert torch.isfinite(lm.loss_fn(logits, targets))
    cnn = builtin_workload("cnn", pool=1)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in cnn.factory().modules())


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "bench_user_net.py").write_text(
        textwrap.dedent(
            """
            import torch

            def make_net():
                return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))

            def make_lm():
                return torch.nn.Sequential(torch.nn.Embedding(7, 8), torch.nn.Linear(8, 7))
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "bench_user_net"


def test_user_workload_shapes(user_module: str, tmp_path: Path) -> None:
    w = user_workload(f"{user_module}:make_net", input_shape=(3, 4), batch_size=8, pool=2)
    assert w.batches[0].inputs.shape == (8, 3, 4) and w.batches[0].targets.shape == (8,)
    assert int(w.batches[0].targets.max()) < 5
    lm = user_workload(f"{user_module}:make_lm", input_shape=(6,), vocab=7, classes=3, batch_size=4, pool=1)
    assert lm.batches[0].inputs.dtype == torch.long and lm.batches[0].targets.shape == (4, 6)
    assert int(lm.batches[0].targets.max()) < 3
    data = tmp_path / "data.pt"
    torch.save({"inputs": torch.randn(20, 12), "targets": torch.randint(0, 5, (20,))}, data)
    from_file = user_workload(f"{user_module}:make_net", data=data, batch_size=8)
    assert len(from_file.batches) == 2 and from_file.batches[1].targets.shape == (8,)
    with pytest.raises(ValueError, match="input-shape"):
        user_workload(f"{user_module}:make_net")
    with pytest.raises(ValueError, match=r"pkg\.module:factory"):
        user_workload("no_colon_here", input_shape=(12,))


def test_cli_bench_on_a_user_model(
    user_module: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    argv = [
        "bench",
        "--model",
        f"{user_module}:make_net",
        "--input-shape",
        "12",
        "--batch-size",
        "16",
        "--steps",
        "1",
        "--rounds",
        "2",
        "--warmup",
        "1",
        "--every",
        "1",
        "--no-budget",
        "--no-memory",
        "--quiet",
        "--json",
        str(out),
    ]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert f"{user_module}:make_net" in printed and "every 1" in printed
    result = json.loads(out.read_text())
    (entry,) = result["models"]
    assert [row["variant"] for row in entry["variants"]] == ["every 1"]
    assert "memory" not in entry
    assert cli_main(["bench", "--model", "nowhere_at_all:net", "--input-shape", "3", "--quiet"]) == 2
    assert "cannot import" in capsys.readouterr().err


def test_example_script_help() -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "overhead.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--model" in proc.stdout and "--budget" in proc.stdout and "--json" in proc.stdout


def test_summarize() -> None:
    s = bench.summarize([3.0, 1.0, 2.0])
    assert (s["median"], s["min"], s["max"]) == (2.0, 1.0, 3.0)
    assert math.isnan(bench.summarize([])["median"])


def test_no_diagnostics_reaches_every_timed_guard() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    settings = bench.settings_from_args(parser.parse_args(["--models", "mlp", "--no-diagnostics"]))
    assert settings.diagnostics is False
    variants = bench.variants_for(settings)
    assert [v.diagnostics for v in variants if v.guarded] == [False] * (len(variants) - 1)
    net = torch.nn.Linear(3, 2)
    for budget in (None, 0.1):
        guard = bench.make_guard(
            torch.optim.SGD(net.parameters(), lr=0.1), net, budget=budget, diagnostics=False
        )
        assert guard.config.diagnostics is False and guard.config.budget == budget


# ---------------------------------------------------------------- the Hugging Face Llamas, reduced

TINY_LLAMA = bench_models.LlamaSpec(vocab=97, batch_size=2, length=8, hidden=32, heads=4, intermediate=64)


@pytest.fixture
def tiny_llamas(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("transformers")
    for name in ("llama32k", "llama128k"):
        monkeypatch.setitem(bench_models.LLAMAS, name, TINY_LLAMA)


@pytest.mark.slow  # about 5 s: four memory runs under the profiler and the first-steps timing
def test_llama_workload_in_reduced_form(tiny_llamas: None) -> None:
    settings = BenchSettings(
        models=("llama32k",),
        policy="clip",
        steps=1,
        rounds=2,
        warmup=1,
        every=(1,),
        memory_steps=1,
        first_steps=3,
    )
    result = run_bench(settings)
    (entry,) = result["models"]
    assert entry["name"] == "llama32k" and "vocab 97" in entry["description"]
    assert [row["variant"] for row in entry["variants"]] == ["every 1", "budget 0.1"]
    assert entry["variants"][0]["estimators"] == {"jvp": 2}  # forward-mode rules, not a fallback
    memory = entry["memory"]
    assert "error" not in memory, memory.get("error")
    assert set(memory["variants"]) == {"plain", "monitor", "veto", "clip"}
    assert memory["logits_bytes"] == 2 * 8 * 97 * 4
    clip = memory["variants"]["clip"]
    assert clip["extra_peak_logits"] == pytest.approx(clip["extra_peak_bytes"] / memory["logits_bytes"])
    assert clip["extra_resident_param_copies"] >= 1  # θ₀ at least
    first = entry["first_steps"]
    assert first["steps"] == 3 and first["target"] == pytest.approx(1.15)
    assert first["ratio"] == pytest.approx(first["budget_s"] / first["plain_s"])
    assert 1 <= first["measured_steps"] <= 3  # the first step is always measured
    table = format_table(result)
    assert "logits)" in table and "over the first 3 steps" in table and "clip" in table


def test_llama_without_transformers_is_unavailable_not_a_crash(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # find_spec then reports it missing
    with pytest.raises(bench_models.WorkloadUnavailable, match=r"transformers.*\.\[transformers\]"):
        builtin_workload("llama32k")
    argv = ["bench", "--models", "llama32k,llama128k", "--quiet", "--no-memory"]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("unavailable") == 2 and "pip install" in printed


def test_llamas_are_opt_in() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.settings_from_args(parser.parse_args([])).models == ("mlp", "cnn", "lm")
    chosen = bench.settings_from_args(parser.parse_args(["--models", "llama32k,llama128k"]))
    assert chosen.models == ("llama32k", "llama128k")
    with pytest.raises(ValueError, match="first_steps"):
        BenchSettings(first_steps=10, budget=None)
