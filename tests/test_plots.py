"""``stepguard.plots.plot_demo``: the demo's figure of r and test accuracy around the spike."""

from __future__ import annotations

import json
import math
import re
import struct
import sys
from pathlib import Path

import pytest

from stepguard.plots import load_demo_summary, plot_demo

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _history(steps: int, spike_at: int, *, guarded: bool) -> dict[str, object]:
    r = [0.05 * (1 + i / steps) if i < spike_at else 400.0 / (1 + i - spike_at) for i in range(steps)]
    rho = [0.2] * steps
    tau = [ri * p for ri, p in zip(r, rho, strict=True)]
    actions = ["clip" if guarded and ri > 1 else "allow" for ri in r]
    applied = [p if a == "clip" else t for t, p, a in zip(tau, rho, actions, strict=True)]
    if guarded:
        accuracy = [0.5 + 0.4 * i / steps for i in range(steps)]
    else:
        accuracy = [0.5 + 0.4 * i / steps if i < spike_at else 0.1 for i in range(steps)]
    return {
        "name": "guarded" if guarded else "plain",
        "policy": "clip" if guarded else "monitor",
        "accuracy": accuracy,
        "loss": [1.0] * steps,
        "r": r,
        "rho_a": rho,
        "tau": tau,
        "applied_tau": applied,
        "actions": actions,
        "seconds": 0.1,
    }


def _write_summary(folder: Path, steps: int = 60, spike_at: int = 20) -> Path:
    summary = {
        "settings": {"lr": 1e-3, "spike": 1000.0, "spike_at": spike_at, "steps": steps, "policy": "clip"},
        "runs": [{"run": "plain", "policy": "monitor"}, {"run": "guarded", "policy": "clip"}],
        "history": {
            "plain": _history(steps, spike_at, guarded=False),
            "guarded": _history(steps, spike_at, guarded=True),
        },
    }
    path = folder / "summary.json"
    path.write_text(json.dumps(summary))
    return path


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, "not a PNG file"
    assert data[12:16] == b"IHDR", "PNG without an IHDR header chunk"
    return struct.unpack(">II", data[16:24])


def test_plot_demo_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    summary = _write_summary(tmp_path)
    out = plot_demo(summary, tmp_path / "figs" / "demo.png", dpi=80)
    assert out == tmp_path / "figs" / "demo.png"
    width, height = _png_size(out)
    assert width >= 400 and height >= 300
    assert out.stat().st_size > 10_000, "the PNG is suspiciously small for two panels of curves"


def test_plot_demo_tolerates_non_finite_values(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = _write_summary(tmp_path)
    summary = json.loads(path.read_text())
    summary["history"]["plain"]["r"][25] = "inf"
    summary["history"]["plain"]["r"][26] = "nan"
    summary["history"]["guarded"]["rho_a"][27] = math.inf
    summary["history"]["guarded"]["r"][0] = 0.0
    path.write_text(json.dumps(summary))
    out = plot_demo(path, tmp_path / "demo.png", dpi=60)
    assert _png_size(out)[0] > 0


@pytest.mark.slow
def test_plot_demo_from_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    from stepguard.cli import main

    png = tmp_path / "demo.png"
    run = str(tmp_path / "run")
    code = main(["demo", "--steps", "8", "--spike-at", "4", "--out", run, "--plot", str(png), "--quiet"])
    assert code == 0
    assert "plot written to" in capsys.readouterr().out
    assert _png_size(png)[0] > 0
    assert png.stat().st_size > 10_000


def test_missing_summary_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "summary.json"
    with pytest.raises(FileNotFoundError, match=r"no demo summary at .*stepguard demo --out"):
        plot_demo(missing, tmp_path / "demo.png")
    assert not (tmp_path / "demo.png").exists()


def test_a_file_that_is_not_a_summary_is_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "summary.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_demo_summary(bad)
    bad.write_text(json.dumps({"settings": {}, "history": {"plain": {"r": []}}}))
    with pytest.raises(ValueError, match=r"history\.plain lacks"):
        load_demo_summary(bad)


def test_missing_matplotlib_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    summary = _write_summary(tmp_path)
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=re.escape("pip install -e '.[plot]'")):
        plot_demo(summary, tmp_path / "demo.png")


def test_importing_stepguard_does_not_import_matplotlib() -> None:
    import subprocess

    code = "import stepguard, stepguard.plots, sys; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
