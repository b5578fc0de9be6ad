"""``stepguard compare``: the harness on a reduced grid, and its rules on hand-made results.

These check the harness (rows, missing peers, bad names, the stable-range, spike and
divergence rules), not the numbers of the comparison.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from stepguard.policy import RelativeClipPolicy
from stepguard.report import StepReport
from stepguard.tools import compare
from stepguard.tools.compare import (
    RunResult,
    Settings,
    count_loss_spikes,
    format_rows,
    format_tables,
    run_comparison,
    stable_lrs,
    summarize,
    warmup_clip_policy,
    within,
)
from stepguard.tools.compare_workloads import WORKLOADS, build_workload

TINY = {"workloads": ("digits-mlp",), "lrs": (1e-3, 1e-1), "steps": 4, "eval_every": 2}


@pytest.fixture(scope="module")
def tiny_results() -> tuple[Settings, list[RunResult]]:
    settings = Settings(methods=("plain", "clip-norm", "stepguard"), **TINY)
    return settings, run_comparison(settings)


def test_the_table_has_a_row_per_condition_method_and_lr(tiny_results, tmp_path: Path) -> None:
    settings, results = tiny_results
    keys = [(r.condition, r.method, r.lr) for r in results]
    expected = [(c, m, lr) for c in ("none", "spike") for m in settings.methods for lr in settings.lrs]
    assert keys == expected
    assert all(len(r.losses) == 4 and r.status in ("ok", "diverged") and r.seconds > 0 for r in results)
    table = format_rows(results).splitlines()
    assert len(table) == 2 + len(expected)
    summary = summarize(results, settings)
    compare.write_json(tmp_path / "c.json", settings, results, summary)
    payload = json.loads((tmp_path / "c.json").read_text())
    assert [(r["condition"], r["method"], r["lr"]) for r in payload["runs"]] == expected
    tables = format_tables(results, summary)
    assert tables.count("| stepguard |") == 2 and "lr 0.001" in tables


def test_runs_written_to_json_merge_back_into_the_same_tables(tiny_results, tmp_path: Path) -> None:
    settings, results = tiny_results
    summary = summarize(results, settings)
    compare.write_json(tmp_path / "a" / "comparison.json", settings, results, summary)
    merged, loaded, _ = compare.load_runs([tmp_path / "a" / "comparison.json"])
    assert merged == settings
    assert [(r.condition, r.method, r.lr, r.status) for r in loaded] == [
        (r.condition, r.method, r.lr, r.status) for r in results
    ]
    assert (
        compare.main(["--from-json", str(tmp_path / "a" / "comparison.json"), "--out", str(tmp_path / "b")])
        == 0
    )
    assert (tmp_path / "b" / "comparison.md").read_text().startswith(format_tables(results, summary))


def test_the_spike_multiplies_the_lr_only_inside_its_window() -> None:
    spike = compare.default_spike(60)
    assert (spike.at, spike.length) == (20, 3)
    assert [spike.multiplier(s) for s in (19, 20, 22, 23)] == [1.0, 1000.0, 1000.0, 1.0]


def test_a_missing_peer_is_reported_as_missing_not_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "zclip", None)  # import zclip now raises ImportError
    settings = Settings(methods=("plain", "zclip"), conditions=("none",), **TINY)
    results = run_comparison(settings)
    missing = [r for r in results if r.method == "zclip"]
    assert len(missing) == 2 and all(r.status == "missing" for r in missing)
    assert all("pip install zclip" in r.note and r.seconds == 0 and not r.losses for r in missing)
    summary = summarize(results, settings)
    assert summary["workloads"]["digits-mlp"]["none"]["methods"]["zclip"]["status"] == "missing"
    assert "| zclip | missing: zclip cannot be imported" in format_tables(results, summary)


@pytest.mark.parametrize(
    ("losses", "spikes"),
    [
        ([1.0] * 30, 0),
        ([1.0] * 10 + [3.0] + [1.0] * 10, 1),
        ([1.0] * 10 + [3.0, 4.0, 3.0] + [1.0] * 10, 1),  # one run of spiking steps counts once
        ([1.0] * 10 + [3.0] + [1.0] * 5 + [2.5] + [1.0] * 5, 2),
        ([0.02] * 10 + [0.09] + [0.02] * 5, 0),  # 4.5x the median, but under the 0.1 nat margin
        ([1.0] * 10 + [1.9] + [1.0] * 5, 0),  # under 2x the median
        ([5.0, 1.0, 1.0, 1.0], 0),  # too little history to judge
        ([1.0] * 10 + [math.nan], 1),
        ([1.0] * 10 + [math.inf, math.nan], 1),
    ],
)
def test_loss_spikes_are_counted_by_the_stated_rule(losses: list[float], spikes: int) -> None:
    assert count_loss_spikes(losses) == spikes


def _row(method: str, lr: float, final: float, status: str = "ok", workload: str = "digits-mlp") -> RunResult:
    return RunResult(workload, "none", method, lr, status=status, final=final)


def test_the_stable_range_is_within_two_percent_of_the_best() -> None:
    rows = [
        _row("m", 1e-3, 0.90),
        _row("m", 1e-2, 0.981),
        _row("m", 1e-1, 0.979),
        _row("m", 1.0, 0.99, "diverged"),
    ]
    assert stable_lrs(rows, best=1.0, higher_is_better=True) == [1e-2]
    # lower is better: within 2 % above the best loss
    losses = [_row("m", 1e-3, 2.04), _row("m", 1e-2, 2.05), _row("m", 1e-1, math.inf, "diverged")]
    assert stable_lrs(losses, best=2.0, higher_is_better=False) == [1e-3]
    assert not within(math.nan, 1.0, True) and not within(1.0, math.nan, True)


def test_the_summary_ranges_time_and_gap(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [
        _row("plain", 1e-3, 0.95),
        _row("plain", 1e-2, 0.97),
        _row("plain", 1e-1, 0.99, "diverged"),  # a diverged run is never plain's best
        _row("g", 1e-3, 0.95),
        _row("g", 1e-2, 0.965),
        _row("g", 1e-1, 0.98),
    ]
    for r, seconds in zip(rows, (1, 1, 1, 2, 2, 2), strict=True):
        r.seconds = seconds
    settings = Settings(workloads=("digits-mlp",), methods=("plain", "stepguard"), conditions=("none",))
    cell = summarize(rows, settings)["workloads"]["digits-mlp"]["none"]
    assert cell["best"] == 0.98 and cell["plain_best_lr"] == 1e-2
    g = cell["methods"]["g"]
    assert g["stable_lrs"] == [1e-2, 1e-1] and g["time_ratio"] == 2.0
    assert g["gap_at_plain_best_lr"] == pytest.approx(0.005 / 0.97) and not g["no_cost"]
    assert cell["methods"]["plain"]["stable_lrs"] == [1e-2] and cell["methods"]["plain"]["diverged_lrs"] == [
        1e-1
    ]
    for r in rows:
        r.condition = "spike"
    spiked = summarize(rows, Settings(workloads=("digits-mlp",), conditions=("spike",)))
    assert math.isnan(spiked["workloads"]["digits-mlp"]["spike"]["methods"]["g"]["gap_at_plain_best_lr"])


def test_a_workload_where_plain_diverges_everywhere_is_reported_and_left_out_of_the_totals() -> None:
    rows = [_row("plain", lr, math.nan, "diverged", "grid-mlp-ln") for lr in (1e-2, 1e-1)]
    rows += [_row("stepguard", lr, 0.9, "ok", "grid-mlp-ln") for lr in (1e-2, 1e-1)]
    rows += [_row("plain", 1e-2, 0.9), _row("stepguard", 1e-2, 0.9)]
    settings = Settings(
        workloads=("digits-mlp", "grid-mlp-ln"), methods=("plain", "stepguard"), conditions=("none",)
    )
    summary = summarize(rows, settings)
    assert summary["workloads"]["grid-mlp-ln"]["none"]["plain_diverges_everywhere"]
    assert summary["excluded_workloads"] == ["grid-mlp-ln"]
    assert summary["overall"]["stepguard"]["none"] == 1  # digits-mlp only
    assert "diverges at every LR" in format_tables(rows, summary)


def test_unknown_names_list_the_known_ones(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match=r"unknown method.*'adamm'.*known: plain, clip-norm"):
        Settings(methods=("plain", "adamm"))
    with pytest.raises(ValueError, match=r"unknown workload.*'mnist'.*known: digits-mlp"):
        Settings(workloads=("mnist",))
    with pytest.raises(ValueError, match="known: digits-mlp"):
        build_workload("mnist")
    with pytest.raises(SystemExit) as exit_info:
        compare.main(["--methods", "plain,adamm"])
    assert exit_info.value.code == 2
    assert "unknown method(s) 'adamm'; known: plain" in capsys.readouterr().err


def test_every_workload_builds_a_model_that_fits_its_batches() -> None:
    for name in WORKLOADS:
        if name == "llama":
            pytest.importorskip("transformers")
        workload = build_workload(name)
        batch = next(workload.batches(0))
        logits = workload.forward(workload.make_model(), batch.inputs)
        assert float(workload.loss(logits, batch.targets)) > 0
        assert set(workload.evaluate(workload.make_model())) == {"val_loss", "accuracy"}


def test_the_warmup_policy_allows_early_steps_up_to_its_early_target() -> None:
    policy = warmup_clip_policy(target_r=1.0, early_target_r=3.0, warmup_steps=100)

    def decide(step: int, r: float) -> tuple[str, float]:
        d = policy.decide(StepReport(step=step, tau=r, rho_a=1.0, r=r, delta_a=math.pi))
        return d.action, d.scale

    assert decide(0, 2.5) == ("allow", 1.0)
    assert decide(0, 6.0) == ("clip", pytest.approx(0.5))
    assert decide(100, 2.5) == ("clip", pytest.approx(0.4))
    assert decide(100, 0.9) == ("allow", 1.0)


def test_plot_without_matplotlib_stops_before_running(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(compare, "run_comparison", lambda *a, **k: pytest.fail("ran without matplotlib"))
    with pytest.raises(SystemExit) as exit_info:
        compare.main(["--workloads", "digits-mlp", "--out", str(tmp_path), "--plot", str(tmp_path / "c.png")])
    assert exit_info.value.code == 2
    assert "--plot needs matplotlib: pip install -e '.[plot]'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_workload_whose_package_is_missing_gives_missing_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    settings = Settings(
        workloads=("llama",), methods=("plain", "stepguard"), lrs=(1e-3,), conditions=("none",)
    )
    results = run_comparison(settings)
    assert [(r.method, r.status) for r in results] == [("plain", "missing"), ("stepguard", "missing")]
    assert "pip install transformers" in results[0].note


def test_the_relative_policy_clips_what_stands_out_from_the_runs_own_r() -> None:
    def decider():
        policy = RelativeClipPolicy(target_r=1.0, z=3.0, window=50, warmup=10, hard_r=10.0)

        def decide(step: int, r: float) -> tuple[str, float]:
            d = policy.decide(StepReport(step=step, tau=r, rho_a=1.0, r=r, delta_a=math.pi))
            return d.action, d.scale

        return decide

    decide = decider()
    assert decide(0, 20.0) == ("clip", pytest.approx(0.05))  # above the hard cap: clipped from the start
    decide = decider()
    assert decide(0, 3.0) == ("allow", 1.0)  # no history yet
    for step in range(1, 30):
        assert decide(step, 1.2 + 0.1 * (step % 3))[0] == "allow"  # r > 1 is this run's normal
    assert decide(30, 6.0) == ("clip", pytest.approx(1 / 6))  # stands out: clipped to r = 1
    assert decide(31, 0.5) == ("allow", 1.0)
