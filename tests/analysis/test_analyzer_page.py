"""docs/analyzer.md: the numbers its prose gives for the LR-spike run are what its commands produce.

The commands are read from the page's "Reproducing the image" block and run in-process in a
temporary folder; the numbers are read from the page's text with regular expressions, so a
change to either side fails here. A number written with k decimals is compared after rounding
to k decimals; one written "≈ x" or "about x" is compared to within 5 %. Timings are not checked.
"""

from __future__ import annotations

import contextlib
import csv
import inspect
import io
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from stepguard.analysis import Transition, read_report
from stepguard.analysis.example import main as example_main
from stepguard.analysis.example import save_demo_checkpoints
from stepguard.cli import main as stepguard_main
from stepguard.demo import digits_mlp

PAGE = Path(__file__).resolve().parents[2] / "docs" / "analyzer.md"
NUM = r"(\d+(?:\.\d+)?)"
ABOUT = 0.05
EXAMPLE_MODULE = "stepguard.analysis.example"


def _prose() -> str:
    """The page's text with its whitespace collapsed (sentences wrap across lines)."""
    return re.sub(r"\s+", " ", PAGE.read_text(encoding="utf-8"))


def _stated(pattern: str) -> tuple[str, ...]:
    """The groups of ``pattern`` in the page's prose; fails naming the pattern when it is gone."""
    match = re.search(pattern, _prose())
    assert match, f"{PAGE.name} no longer says {pattern!r}: update the page and this test together"
    return match.groups()


def _rounds_to(value: float, written: str) -> bool:
    """Whether ``value`` rounded to as many decimals as ``written`` has is ``written``."""
    decimals = len(written.partition(".")[2])
    return round(value, decimals) == float(written)


def _about(value: float, written: str) -> bool:
    return abs(value - float(written)) <= ABOUT * float(written)


def _bash_commands(heading: str) -> list[list[str]]:
    """The commands of the first bash block after ``heading``, continuations joined, comments dropped."""
    text = PAGE.read_text(encoding="utf-8")
    section = text[text.index(heading) :]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, f"{PAGE.name}: no bash block after {heading!r}"
    joined = block.group(1).replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in joined.splitlines() if line.strip()]


def _command(heading: str, start: list[str]) -> list[str]:
    """The argument list (after ``start``) of the command beginning with ``start`` in that block."""
    found = [argv for argv in _bash_commands(heading) if argv[: len(start)] == start]
    assert len(found) == 1, f"{PAGE.name}: expected one `{' '.join(start)}` after {heading!r}, got {found}"
    return found[0][len(start) :]


def _example_argv() -> list[str]:
    return _command("## Reproducing the image", ["python", "-m", EXAMPLE_MODULE])


def _analyze_argv() -> list[str]:
    return _command("## Reproducing the image", ["stepguard"])


@dataclass
class Run:
    """What the page's two commands printed and wrote."""

    printed: str
    folder: Path
    transitions: list[Transition]
    checkpoints: list[dict[str, Any]]
    summary: dict[str, Any]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The page's example and analyze commands, run in a fresh folder."""
    folder = tmp_path_factory.mktemp("lrspike")
    analyze = _analyze_argv()
    printed = io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the page's timings; several threads crawl when the cores are busy
    try:
        with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
            patch.chdir(folder)
            assert example_main(_example_argv()) == 0
            assert stepguard_main([*analyze, "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = folder / analyze[analyze.index("--out") + 1]
    with open(out / "checkpoints.csv", newline="", encoding="utf-8") as rows:
        checkpoints = list(csv.DictReader(rows))
    return Run(
        printed=printed.getvalue(),
        folder=folder,
        transitions=read_report(out / "report.jsonl"),
        checkpoints=checkpoints,
        summary=json.loads((out / "summary.json").read_text(encoding="utf-8")),
    )


def _spike_at() -> int:
    return int(_stated(r"multiplied by \d+ from step (\d+) on")[0])


def test_the_page_shows_one_analyze_command() -> None:
    at_top = _command("# Post-hoc analyzer", ["stepguard"])
    assert at_top == _analyze_argv(), "the command at the top and the one reproducing the image differ"


def test_the_runs_settings_on_the_page_are_the_examples() -> None:
    inputs, hidden, classes, batch, steps, spike, spike_at = map(
        int,
        _stated(
            r"(\d+)-(\d+)-(\d+) MLP, Adam, batch (\d+)\) trained for (\d+) steps, "
            r"with the learning rate multiplied by (\d+) from step (\d+) on"
        ),
    )
    defaults = {k: p.default for k, p in inspect.signature(save_demo_checkpoints).parameters.items()}
    assert (hidden, batch, steps, spike, spike_at) == (
        defaults["hidden"],
        defaults["batch_size"],
        defaults["steps"],
        defaults["spike"],
        defaults["spike_at"],
    )
    layers = [m for m in digits_mlp(hidden) if hasattr(m, "in_features")]
    assert [layers[0].in_features, layers[0].out_features, layers[-1].out_features] == [
        inputs,
        hidden,
        classes,
    ]
    assert not _example_argv()[1:], (
        "the page's example command passes options: compare those, not the defaults"
    )


@pytest.mark.slow
def test_the_commands_write_the_checkpoints_and_transitions_the_page_counts(run: Run) -> None:
    (checkpoints,) = _stated(r"# (\d+) checkpoints \+ runs/lrspike/live\.jsonl")
    assert re.match(rf"{checkpoints} checkpoints in ", run.printed), run.printed
    assert (run.folder / "runs" / "lrspike" / "live.jsonl").is_file()
    transitions, probe = _stated(r"analysis of the (\d+) transitions on the (\d+)-sample probe")
    assert run.summary["transitions"] == len(run.transitions) == int(transitions)
    assert run.summary["settings"]["probe_size"] == int(probe)


@pytest.mark.slow
def test_r_before_and_after_the_spike_is_what_the_page_says(run: Run) -> None:
    spike_at = _spike_at()
    low, high = _stated(rf"Until step {spike_at}, r stays between {NUM} and {NUM}\.")
    before = [t.report.r for t in run.transitions if t.step_from < spike_at]
    assert _rounds_to(min(before), low) and _rounds_to(max(before), high), (min(before), max(before))
    first, peak = _stated(rf"The first spiked transition has r = {NUM}, and the next ones reach r ≈ {NUM}\.")
    after = [t.report.r for t in run.transitions if t.step_from >= spike_at]
    assert _rounds_to(after[0], first), after[0]
    assert _about(max(after[1:]), peak), max(after[1:])


@pytest.mark.slow
def test_loss_and_accuracy_around_the_spike_are_what_the_page_says(run: Run) -> None:
    spike_at = _spike_at()
    loss_from, loss_to = _stated(rf"Loss jumps from {NUM} to about {NUM}")
    acc_from, acc_low, acc_high = _stated(rf"accuracy falls from {NUM} to between {NUM} and {NUM}")
    at_spike = next(c for c in run.checkpoints if int(c["step"]) == spike_at)
    later = [c for c in run.checkpoints if int(c["step"]) > spike_at]
    assert _rounds_to(float(at_spike["loss"]), loss_from), at_spike
    assert _about(max(float(c["loss"]) for c in later), loss_to)
    assert _rounds_to(float(at_spike["accuracy"]), acc_from), at_spike
    accuracy = [float(c["accuracy"]) for c in later]
    assert _rounds_to(min(accuracy), acc_low) and _rounds_to(max(accuracy), acc_high), (
        min(accuracy),
        max(accuracy),
    )


@pytest.mark.slow
def test_the_flagged_transitions_and_softmax_collapse_are_what_the_page_says(run: Run) -> None:
    spike_at = _spike_at()
    through, above = _stated(
        rf"Every spiked transition through step (\d+) is flagged \(none before the spike is\), with r above {NUM}\."
    )
    assert not [t.step_from for t in run.transitions if t.step_from < spike_at and t.flags]
    spiked = [t for t in run.transitions if spike_at <= t.step_from <= int(through)]
    assert len(spiked) == int(through) - spike_at + 1
    assert [t.step_from for t in spiked if "r>=1" not in t.flags or t.report.r <= float(above)] == []
    (collapse,) = _stated(rf"[Tt]he softmax-collapse fraction rises to {NUM} at the same time")
    fractions = [t.report.sc_fraction for t in run.transitions]
    assert _rounds_to(max(fractions), collapse)
    assert run.transitions[fractions.index(max(fractions))].step_from >= spike_at
