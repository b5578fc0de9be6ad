"""TensorBoardSink output served by the real TensorBoard server, read over HTTP and in Chromium."""

from __future__ import annotations

import io
import math
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("tensorboard", reason="needs the tensorboard extra")

import numpy as np

from stepguard.integrations.tensorboard import DECISION_TAG, SPREAD_HISTOGRAM_TAG, TensorBoardSink

RUN = "guarded"
STEPS = 30
SPIKE_STEP = 20
CHARTED = ("r", "rho_a", "tau", "delta_a")


def f32(value: float) -> float:
    return float(np.float32(value))


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, module_processes: Any, helpers: Any
) -> Iterator[tuple[str, list[Any]]]:
    """A run of 30 reports (a spike of r at step 20, a veto at 25) behind a live TensorBoard."""
    log_root = tmp_path_factory.mktemp("tb")
    reports = []
    for step in range(STEPS):
        overrides: dict[str, Any] = {"r": 0.1 + 0.01 * step}
        if step == SPIKE_STEP:
            overrides = {"r": 5.0, "action": "clip", "scale": 0.2, "reason": "r=5 > 1"}
        if step == 25:
            overrides = {"action": "veto", "scale": 0.0, "reason": "non-finite loss"}
        reports.append(helpers.make_report(step, **overrides))
    sink = TensorBoardSink(log_root / RUN)
    for report in reports:
        sink.write(report)
    sink.close()
    base = helpers.start_tensorboard(module_processes, log_root, [RUN])
    yield base, reports


def scalars(helpers: Any, base: str, tag: str) -> list[list[float]]:
    return helpers.http_json(f"{base}/data/plugin/scalars/scalars", {"run": RUN, "tag": tag})


def test_http_api_serves_every_scalar_exactly(served: tuple[str, list[Any]], helpers: Any) -> None:
    base, reports = served
    tags = helpers.http_json(f"{base}/data/plugin/scalars/tags")[RUN]
    keys = [k for k in reports[0].scalars() if k != "step"]
    assert {f"stepguard/{k}" for k in keys} <= set(tags)
    for key in keys:
        points = scalars(helpers, base, f"stepguard/{key}")
        assert [int(p[1]) for p in points] == list(range(STEPS)), key
        got = [p[2] for p in points]
        want = [f32(rep.scalars()[key]) for rep in reports]
        assert got == want, key


def test_http_api_serves_histograms_texts_and_layout(
    served: tuple[str, list[Any]], helpers: Any
) -> None:
    base, reports = served
    histograms = helpers.http_json(f"{base}/data/plugin/histograms/histograms",
                                   {"run": RUN, "tag": SPREAD_HISTOGRAM_TAG})
    assert [int(h[1]) for h in histograms] == list(range(STEPS))
    for (_, _, buckets), rep in zip(histograms, reports, strict=True):
        assert sum(b[2] for b in buckets) == pytest.approx(len(rep.spread.values))
        # the plugin re-bins at float32 precision
        assert buckets[0][0] <= f32(min(rep.spread.values))
        assert f32(max(rep.spread.values)) <= buckets[-1][1]

    texts = helpers.http_json(f"{base}/data/plugin/text/text",
                              {"run": RUN, "tag": f"{DECISION_TAG}/text_summary"})
    assert [t["step"] for t in texts] == [SPIKE_STEP, 25]
    assert "clip" in texts[0]["text"] and "non-finite loss" in texts[1]["text"]

    layout = helpers.http_json(f"{base}/data/plugin/custom_scalars/layout")
    charts = {c["title"]: c["multiline"]["tag"] for cat in layout["category"]
              for c in cat["chart"]}
    assert charts["normalized step r against the r = 1 boundary"] == [
        "^stepguard/r$", "^stepguard/r_limit$"]


_CARDS_JS = """
(() => [...document.querySelectorAll('scalar-card-component')].map(card => {
  const chart = card.querySelector('line-chart');
  const box = chart ? chart.getBoundingClientRect() : null;
  return {
    title: card.querySelector('tb-truncated-path')?.getAttribute('title') ?? null,
    box: box ? [box.left, box.top, box.right, box.bottom] : null,
    series: chart ? [...chart.querySelectorAll('.series-view > svg > path')].map(p => ({
      d: p.getAttribute('d') || '', stroke: getComputedStyle(p).stroke})) : [],
  };
}))()
"""


def _points(d: str) -> list[tuple[float, float]]:
    return [tuple(float(v) for v in part.split(","))  # type: ignore[misc]
            for part in d.lstrip("M").split("L") if part]


def _rgb(css: str) -> tuple[int, int, int]:
    parts = css[css.index("(") + 1:css.index(")")].split(",")
    return int(parts[0]), int(parts[1]), int(parts[2])


@pytest.mark.requires_binary("chromium")
def test_chromium_renders_the_stepguard_charts(
    served: tuple[str, list[Any]], chromium: Any, helpers: Any, tmp_path: Path,
    require_module: Any,
) -> None:
    image_module = require_module("PIL.Image")
    base, _ = served
    regex = "^stepguard/(" + "|".join(CHARTED) + ")$"
    # forceSVG: lines are drawn as SVG paths (checkable in the DOM) rather than in WebGL.
    chromium.open(f"{base}/?{urllib.parse.urlencode({'forceSVG': 'true', 'tagFilter': regex})}"
                  "#timeseries")

    def rendered() -> list[dict[str, Any]] | None:
        cards = chromium.evaluate(_CARDS_JS) or []
        complete = [c for c in cards
                    if any(len(_points(s["d"])) == STEPS for s in c["series"])]
        return cards if len(complete) == len(CHARTED) else None

    cards = helpers.poll(rendered, timeout=40, interval=0.5,
                         what="TensorBoard to draw the four StepGuard charts")
    by_title = {c["title"]: c for c in cards}
    assert set(by_title) == {f"stepguard/{k}" for k in CHARTED}

    # The raw r series peaks (smallest screen y) exactly at the spike.
    r_lines = [_points(s["d"]) for s in by_title["stepguard/r"]["series"]]
    assert any(min(range(STEPS), key=lambda i, ln=ln: ln[i][1]) == SPIKE_STEP
               for ln in r_lines if len(ln) == STEPS)

    png = chromium.screenshot()
    (tmp_path / "tensorboard.png").write_bytes(png)
    image = image_module.open(io.BytesIO(png)).convert("RGB")
    width, height = chromium.evaluate("[window.innerWidth, window.innerHeight]")
    assert image.size == (width, height)
    pixels = np.asarray(image, dtype=np.int32)
    for title, card in by_title.items():
        left, top, right, bottom = (math.floor(v) for v in card["box"])
        region = pixels[max(top, 0):min(bottom, height), max(left, 0):min(right, width)]
        assert region.size, f"{title}: chart is outside the viewport"
        inked = 0
        for series in card["series"]:
            color = np.array(_rgb(series["stroke"]))
            inked = max(inked, int((np.abs(region - color).sum(axis=2) <= 24).sum()))
        # A drawn line of 30 points leaves hundreds of pixels in its colour; an empty chart
        # (the state the WebGL renderer was sometimes caught in) leaves none.
        assert inked >= 150, f"{title}: only {inked} pixels in the line colour"
