"""The HTML report: self-contained, with the plots and tables, and drawn by a real browser."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
import torch
from analysis_helpers import small_mlp

from stepguard.analysis import Probe, analyze
from stepguard.analysis.html import render_html
from stepguard.analysis.outputs import write_outputs
from stepguard.analysis.svg import Chart, Series, nice_ticks, render_chart


@pytest.fixture(scope="module")
def eventful(tmp_path_factory, clip_run):
    """The clipped run (flagged at r = 1) plus a checkpoint with NaN weights and a corrupt one."""
    root = tmp_path_factory.mktemp("eventful")
    for f in clip_run.files:
        shutil.copy(f, root / f.name)
    state = torch.load(clip_run.files[-1])
    state["0.weight"] = torch.full_like(state["0.weight"], float("nan"))
    torch.save(state, root / "step_6.pt")
    (root / "step_7.pt").write_bytes(b"broken")
    shutil.copy(clip_run.files[-1], root / "step_8.pt")
    result = analyze(root, small_mlp, Probe(clip_run.x, clip_run.y), flips=True)
    out = tmp_path_factory.mktemp("eventful_out")
    write_outputs(result, out, tensorboard=False)
    return result, out


def test_the_page_is_self_contained_and_lists_what_went_wrong(eventful) -> None:
    result, out = eventful
    html = (out / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>")
    # nothing fetched: no scripts, stylesheets, images or fonts from anywhere
    for pattern in (r"<script", r"<link", r"<img", r"\bsrc=", r"url\(", r"@import"):
        assert not re.search(pattern, html, re.IGNORECASE), pattern
    assert set(re.findall(r"https?://[^\"' )]+", html)) == {"http://www.w3.org/2000/svg"}  # the SVG namespace
    assert html.count("<svg") >= 5
    for title in (
        "Normalized step r",
        "Step length",
        "Loss per checkpoint",
        "Accuracy per checkpoint",
        "Softmax collapse",
        "Negative flips",
    ):
        assert title in html
    flags = {f for t in result.transitions for f in t.flags}
    assert {"r>=1", "non-finite"} <= flags
    assert f"Flagged transitions ({len(result.flagged)})" in html
    assert "r ≥ 1: the step went past the radius" in html
    assert "a non-finite τ, ρ_a, r or loss" in html
    assert "Missing transitions (2)" in html and "step_7.pt skipped: corrupt" in html
    assert "Skipped checkpoints (1)" in html


def test_charts_handle_gaps_logs_and_empty_data() -> None:
    nan, inf = float("nan"), float("inf")
    svg = render_chart(Chart("t", [Series("r", [0, 1, 2, 3, 4], [0.1, nan, 10.0, inf, 1000.0])], log_y=None))
    assert svg.count("<polyline") == 0 and svg.count("<circle") >= 3  # every point isolated by a gap
    assert "(log)" in svg
    linear = render_chart(Chart("t", [Series("a", [0, 1, 2], [0.2, 0.4, 0.3])]))
    assert "(log)" not in linear and linear.count("<polyline") == 1
    empty = render_chart(Chart("t", [Series("a", [0, 1], [nan, nan])]))
    assert "no finite values" in empty
    assert nice_ticks(0, 1) == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert nice_ticks(3, 1000, 6) == pytest.approx([200.0, 400.0, 600.0, 800.0, 1000.0])


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def _png_ink(data: bytes) -> float:
    """Fraction of non-zero bytes in the filtered image data (≈ 0 for a blank page)."""
    chunks, i = [], 8
    while i < len(data):
        (length,) = struct.unpack(">I", data[i : i + 4])
        kind = data[i + 4 : i + 8]
        if kind == b"IDAT":
            chunks.append(data[i + 8 : i + 8 + length])
        i += 12 + length
    raw = zlib.decompress(b"".join(chunks))
    return sum(1 for b in raw[:: max(1, len(raw) // 200_000)] if b) / len(raw[:: max(1, len(raw) // 200_000)])


@pytest.mark.requires_binary("chromium")
def test_the_page_renders_in_headless_chromium(eventful, tmp_path) -> None:
    _, out = eventful
    shot = tmp_path / "report.png"
    proc = subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1200,1600",
            (out / "report.html").resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = shot.read_bytes()
    assert _png_size(data) == (1200, 1600)
    assert len(data) > 40_000, "the screenshot is nearly empty"
    assert _png_ink(data) > 0.02
    try:
        from PIL import Image
    except ImportError:
        return
    colors = Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 24)
    total = sum(count for count, _ in colors)
    white = sum(count for count, rgb in colors if sum(rgb) >= 750)
    assert 1 - white / total > 0.05, "the page drew almost nothing"
    assert len(colors) > 100
    # the flag colour (#d62728: the r = 1 line, flagged circles, flagged r values) is on the page
    red = sum(count for count, (r, g, b) in colors if r > 180 and g < 90 and b < 90)
    assert red > 200


def test_docs_image_exists() -> None:
    image = Path(__file__).resolve().parents[2] / "docs" / "img" / "analyzer_report.png"
    assert image.exists(), "docs/img/analyzer_report.png: regenerate it as docs/analyzer.md describes"
    assert _png_size(image.read_bytes())[0] >= 800


def test_render_html_of_a_clean_run(monitor_run) -> None:
    result = analyze(monitor_run.ckpt_dir, small_mlp, Probe(monitor_run.x, monitor_run.y))
    html = render_html(result)
    assert "none flagged" in html and "Every transition between consecutive checkpoints was measured" in html
