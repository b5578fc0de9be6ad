"""Small inline-SVG charts (line charts and a histogram) for the self-contained HTML report.

No plotting library: the page must open offline, with nothing fetched. Non-finite values
leave a gap in a line (and on a log axis so do values ≤ 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from html import escape

PALETTE = ("#1f6fb4", "#e08214", "#2c9c4a", "#8e44ad", "#c0392b", "#7f8c8d")
FLAG_COLOR = "#d62728"


@dataclass
class Series:
    """One line of a chart."""

    name: str
    x: Sequence[float]
    y: Sequence[float]
    color: str = PALETTE[0]
    dashed: bool = False
    points: bool = True


@dataclass
class Chart:
    """A line chart: series, reference lines, highlighted points and shaded x ranges.

    Attributes:
        hlines: ``(y, label, color)`` horizontal reference lines (e.g. r = 1).
        highlights: ``(x, y)`` points circled in red (flagged transitions).
        spans: ``(x0, x1, label)`` shaded x ranges (missing transitions).
        log_y: ``True``, ``False`` or ``None`` (log when the positive values span > 100×).
        y_range: fixed ``(low, high)`` for a linear axis.
    """

    title: str
    series: list[Series]
    y_label: str = ""
    x_label: str = "step"
    hlines: list[tuple[float, str, str]] = field(default_factory=list)
    highlights: list[tuple[float, float]] = field(default_factory=list)
    spans: list[tuple[float, float, str]] = field(default_factory=list)
    log_y: bool | None = None
    y_range: tuple[float, float] | None = None
    width: int = 1080
    height: int = 270


MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 72, 20, 34, 44


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def nice_ticks(low: float, high: float, count: int = 6) -> list[float]:
    """Round tick values covering [low, high]."""
    if not math.isfinite(low) or not math.isfinite(high):
        return []
    if high <= low:
        return [low]
    raw = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step - 1e-9) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(0.0 if abs(value) < step * 1e-9 else value)
        value += step
    return ticks


def _format(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        return f"{value:.0e}".replace("e+0", "e").replace("e-0", "e-")
    return f"{value:.4g}"


def render_chart(chart: Chart) -> str:
    """The chart as an ``<svg>`` element."""
    w, h = chart.width, chart.height
    pw, ph = w - MARGIN_LEFT - MARGIN_RIGHT, h - MARGIN_TOP - MARGIN_BOTTOM
    xs = _finite([x for s in chart.series for x in s.x]) + [v for a, b, _ in chart.spans for v in (a, b)]
    ys = _finite([y for s in chart.series for y in s.y]) + [y for y, _, _ in chart.hlines]
    log_y = chart.log_y
    positive = [y for y in ys if y > 0]
    if log_y is None:
        log_y = bool(positive) and max(positive) / min(positive) > 100
    if log_y and not positive:
        log_y = False
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
        f'role="img" aria-label="{escape(chart.title)}">',
        f'<rect x="0" y="0" width="{w}" height="{h}" fill="#ffffff"/>',
        f'<text x="{MARGIN_LEFT}" y="20" font-size="15" font-weight="600" fill="#222">'
        f"{escape(chart.title)}</text>",
    ]
    if not xs or not ys:
        parts.append(
            f'<text x="{w / 2}" y="{h / 2}" text-anchor="middle" font-size="14" fill="#888">'
            "no finite values</text>"
        )
        parts.append("</svg>")
        return "".join(parts)
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if log_y:
        lo, hi = math.log10(min(positive)), math.log10(max(positive))
        lo, hi = math.floor(lo), math.ceil(hi)
        if hi == lo:
            hi = lo + 1
    elif chart.y_range is not None:
        lo, hi = chart.y_range
    else:
        lo, hi = min(ys), max(ys)
        pad = (hi - lo) * 0.06 or abs(hi) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad

    def px(x: float) -> float:
        return MARGIN_LEFT + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float | None:
        if y is None or not math.isfinite(y):
            return None
        if log_y:
            if y <= 0:
                return None
            y = math.log10(y)
        return MARGIN_TOP + (1 - (y - lo) / (hi - lo)) * ph

    parts.append(
        f'<rect x="{MARGIN_LEFT}" y="{MARGIN_TOP}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#bbb"/>'
    )
    for a, b, label in chart.spans:
        left, right = px(a), px(b)
        parts.append(
            f'<rect x="{left:.1f}" y="{MARGIN_TOP}" width="{max(right - left, 2):.1f}" height="{ph}" '
            f'fill="#999" fill-opacity="0.22"><title>{escape(label)}</title></rect>'
        )
    y_ticks = [10.0**e for e in range(int(lo), int(hi) + 1)] if log_y else nice_ticks(lo, hi)
    for t in y_ticks:
        y = py(t)
        if y is None or y < MARGIN_TOP - 0.5 or y > MARGIN_TOP + ph + 0.5:
            continue
        parts.append(
            f'<line x1="{MARGIN_LEFT}" x2="{MARGIN_LEFT + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e3e3e3"/>'
            f'<text x="{MARGIN_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11" fill="#444">'
            f"{_format(t)}</text>"
        )
    for t in nice_ticks(x0, x1, 8):
        x = px(t)
        parts.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{MARGIN_TOP + ph}" y2="{MARGIN_TOP + ph + 4}" '
            'stroke="#666"/>'
            f'<text x="{x:.1f}" y="{MARGIN_TOP + ph + 17}" text-anchor="middle" font-size="11" fill="#444">'
            f"{_format(t)}</text>"
        )
    parts.append(
        f'<text x="{MARGIN_LEFT + pw / 2}" y="{h - 8}" text-anchor="middle" font-size="12" fill="#444">'
        f"{escape(chart.x_label)}</text>"
        f'<text x="16" y="{MARGIN_TOP + ph / 2}" text-anchor="middle" font-size="12" fill="#444" '
        f'transform="rotate(-90 16 {MARGIN_TOP + ph / 2})">{escape(chart.y_label)}'
        f"{' (log)' if log_y else ''}</text>"
    )
    for value, label, color in chart.hlines:
        y = py(value)
        if y is None:
            continue
        parts.append(
            f'<line x1="{MARGIN_LEFT}" x2="{MARGIN_LEFT + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="{color}" '
            f'stroke-width="1.5" stroke-dasharray="6 4"/>'
            f'<text x="{MARGIN_LEFT + pw - 4}" y="{y - 5:.1f}" text-anchor="end" font-size="11" '
            f'fill="{color}">{escape(label)}</text>'
        )
    parts.append(
        f'<svg x="{MARGIN_LEFT}" y="{MARGIN_TOP}" width="{pw}" height="{ph}" '
        f'viewBox="{MARGIN_LEFT} {MARGIN_TOP} {pw} {ph}" overflow="hidden">'
    )
    for s in chart.series:
        parts.extend(_series_svg(s, px, py))
    for x, y in chart.highlights:
        cy = py(y)
        if cy is not None:
            parts.append(
                f'<circle cx="{px(x):.1f}" cy="{cy:.1f}" r="5" fill="none" stroke="{FLAG_COLOR}" '
                'stroke-width="2"/>'
            )
    parts.append("</svg>")
    parts.extend(_legend(chart, w))
    parts.append("</svg>")
    return "".join(parts)


def _series_svg(s: Series, px: Callable[[float], float], py: Callable[[float], float | None]) -> list[str]:
    out: list[str] = []
    segment: list[str] = []
    dots: list[str] = []
    dash = ' stroke-dasharray="5 3"' if s.dashed else ""

    def flush() -> None:
        if len(segment) > 1:
            out.append(
                f'<polyline fill="none" stroke="{s.color}" stroke-width="1.8"{dash} '
                f'points="{" ".join(segment)}"/>'
            )
        elif len(segment) == 1:
            x, y = segment[0].split(",")
            out.append(f'<circle cx="{x}" cy="{y}" r="2.5" fill="{s.color}"/>')
        segment.clear()

    for x, y in zip(s.x, s.y, strict=True):
        cy = py(y)
        if cy is None or x is None or not math.isfinite(x):
            flush()
            continue
        point = f"{px(x):.1f},{cy:.1f}"
        segment.append(point)
        if s.points and len(s.x) <= 120:
            dots.append(f'<circle cx="{px(x):.1f}" cy="{cy:.1f}" r="2" fill="{s.color}"/>')
    flush()
    return out + dots


def _legend(chart: Chart, width: int) -> list[str]:
    out: list[str] = []
    x = width - MARGIN_RIGHT
    entries = [(s.name, s.color, "dashed" if s.dashed else "line") for s in chart.series]
    if chart.highlights:
        entries.append(("flagged", FLAG_COLOR, "circle"))
    if chart.spans:
        entries.append(("missing", "#999", "box"))
    for name, color, kind in reversed(entries):
        text_width = 7 * len(name) + 30
        x -= text_width
        if kind == "circle":
            key = f'<circle cx="{x + 10}" cy="16" r="5" fill="none" stroke="{color}" stroke-width="2"/>'
        elif kind == "box":
            key = f'<rect x="{x}" y="10" width="20" height="12" fill="{color}" fill-opacity="0.35"/>'
        else:
            dash = ' stroke-dasharray="5 3"' if kind == "dashed" else ""
            key = f'<line x1="{x}" x2="{x + 20}" y1="16" y2="16" stroke="{color}" stroke-width="2.5"{dash}/>'
        out.append(key + f'<text x="{x + 24}" y="20" font-size="12" fill="#333">{escape(name)}</text>')
    return out


def render_histogram(
    title: str,
    values: Sequence[float],
    *,
    bins: int = 30,
    x_label: str = "",
    width: int = 1080,
    height: int = 230,
) -> str:
    """A histogram of the finite ``values`` as an ``<svg>`` element."""
    finite = _finite(values)
    w, h = width, height
    pw, ph = w - MARGIN_LEFT - MARGIN_RIGHT, h - MARGIN_TOP - MARGIN_BOTTOM
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
        f'role="img" aria-label="{escape(title)}">',
        f'<rect x="0" y="0" width="{w}" height="{h}" fill="#ffffff"/>',
        f'<text x="{MARGIN_LEFT}" y="20" font-size="15" font-weight="600" fill="#222">{escape(title)}</text>',
    ]
    if not finite:
        parts.append(
            f'<text x="{w / 2}" y="{h / 2}" text-anchor="middle" fill="#888">no finite values</text></svg>'
        )
        return "".join(parts)
    lo, hi = min(finite), max(finite)
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    counts = [0] * bins
    for v in finite:
        counts[min(int((v - lo) / (hi - lo) * bins), bins - 1)] += 1
    top = max(counts)
    parts.append(
        f'<rect x="{MARGIN_LEFT}" y="{MARGIN_TOP}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#bbb"/>'
    )
    bar = pw / bins
    for i, c in enumerate(counts):
        bh = ph * c / top
        parts.append(
            f'<rect x="{MARGIN_LEFT + i * bar + 1:.1f}" y="{MARGIN_TOP + ph - bh:.1f}" width="{bar - 2:.1f}" '
            f'height="{bh:.1f}" fill="{PALETTE[0]}"><title>{c}</title></rect>'
        )
    for t in nice_ticks(lo, hi, 8):
        x = MARGIN_LEFT + (t - lo) / (hi - lo) * pw
        parts.append(
            f'<text x="{x:.1f}" y="{MARGIN_TOP + ph + 17}" text-anchor="middle" font-size="11" fill="#444">'
            f"{_format(t)}</text>"
        )
    for t in nice_ticks(0, top, 5):
        y = MARGIN_TOP + ph - ph * t / top
        parts.append(
            f'<text x="{MARGIN_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11" fill="#444">'
            f"{_format(t)}</text>"
        )
    parts.append(
        f'<text x="{MARGIN_LEFT + pw / 2}" y="{h - 8}" text-anchor="middle" font-size="12" fill="#444">'
        f"{escape(x_label)}</text></svg>"
    )
    return "".join(parts)
