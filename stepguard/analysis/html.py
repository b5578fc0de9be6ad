"""The analysis as one self-contained HTML page: inline SVG plots and tables, nothing fetched.

Plots: the normalized step r per transition against the r = 1 line (flagged transitions
circled, missing ones shaded), step length τ and radius ρ_a, loss and accuracy per
checkpoint, the softmax-collapse fraction, negative flips and CLD scores when computed.
Tables: the run's settings, the flagged transitions (r ≥ 1, a non-finite number, SC rising)
with their binding samples, the missing transitions and the skipped checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from html import escape

from stepguard.analysis.replay import FLAG_NON_FINITE, FLAG_R, FLAG_SC_RISING, AnalysisResult, Transition
from stepguard.analysis.svg import FLAG_COLOR, PALETTE, Chart, Series, render_chart, render_histogram

FLAG_TEXT = {
    FLAG_R: "r ≥ 1: the step went past the radius ρ_a",
    FLAG_NON_FINITE: "a non-finite τ, ρ_a, r or loss",
    FLAG_SC_RISING: "the softmax-collapse fraction rose",
}

STYLE = """
body { font-family: -apple-system, 'Segoe UI', Roboto, 'DejaVu Sans', Arial, sans-serif; margin: 24px;
       color: #222; background: #fff; max-width: 1120px; }
h1 { font-size: 24px; margin: 0 0 4px 0; } h2 { font-size: 18px; margin: 28px 0 8px 0; }
p.lead { color: #555; margin: 0 0 16px 0; }
table { border-collapse: collapse; font-size: 13px; margin: 6px 0 12px 0; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: right; }
th { background: #f2f2f2; } td.text, th.text { text-align: left; }
table.settings td:first-child { text-align: left; color: #555; }
.flag { color: #d62728; font-weight: 600; } .ok { color: #2c9c4a; font-weight: 600; }
.note { background: #fff7e0; border-left: 4px solid #e0a800; padding: 6px 10px; margin: 6px 0; }
figure { margin: 10px 0 18px 0; } svg { display: block; }
"""


def _num(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, float) and math.isinf(value):
        return "∞" if value > 0 else "−∞"
    return f"{value:.{digits}g}"


def _table(head: Sequence[str], rows: Iterable[Sequence[str]], text_columns: Sequence[int] = ()) -> str:
    def cell(tag: str, i: int, value: str) -> str:
        cls = ' class="text"' if i in text_columns else ""
        return f"<{tag}{cls}>{value}</{tag}>"

    out = [
        "<table><thead><tr>",
        *(cell("th", i, escape(h)) for i, h in enumerate(head)),
        "</tr></thead><tbody>",
    ]
    for row in rows:
        out.append("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _x(t: Transition) -> float:
    return float(t.step_from)


def _charts(result: AnalysisResult) -> list[str]:
    ts = result.transitions
    x = [_x(t) for t in ts]
    spans = [
        (float(m.step_from), float(m.step_to), f"missing {m.step_from} → {m.step_to}: {m.reason}")
        for m in result.missing
    ]
    flagged = [(_x(t), t.report.r) for t in ts if t.flags]
    r_limit = float(result.settings.get("r_limit", 1.0))
    figures = [
        render_chart(
            Chart(
                title="Normalized step r = τ/ρ_a per transition",
                series=[Series("r", x, [t.report.r for t in ts], PALETTE[0])],
                y_label="r",
                x_label="transition (step from)",
                hlines=[(r_limit, f"r = {r_limit:g}", FLAG_COLOR)],
                highlights=flagged,
                spans=spans,
            )
        ),
        render_chart(
            Chart(
                title="Step length τ and radius ρ_a",
                series=[
                    Series("τ", x, [t.report.tau for t in ts], PALETTE[0]),
                    Series("ρ_a", x, [t.report.rho_a for t in ts], PALETTE[1], dashed=True),
                ],
                y_label="parameter distance",
                x_label="transition (step from)",
                spans=spans,
            )
        ),
    ]
    ok = [c for c in result.checkpoints if c.ok]
    cx = [float(c.step) for c in ok]
    if any(c.loss is not None for c in ok):
        loss = [Series("probe loss", cx, [_f(c.loss) for c in ok], PALETTE[0])]
        if any(c.val_loss is not None for c in ok):
            loss.append(Series("validation loss", cx, [_f(c.val_loss) for c in ok], PALETTE[1], dashed=True))
        acc = [Series("probe accuracy", cx, [_f(c.accuracy) for c in ok], PALETTE[2])]
        if any(c.val_accuracy is not None for c in ok):
            acc.append(
                Series("validation accuracy", cx, [_f(c.val_accuracy) for c in ok], PALETTE[3], dashed=True)
            )
        figures.append(
            render_chart(Chart("Loss per checkpoint", loss, y_label="loss", x_label="checkpoint step"))
        )
        figures.append(
            render_chart(
                Chart(
                    "Accuracy per checkpoint",
                    acc,
                    y_label="accuracy",
                    x_label="checkpoint step",
                    y_range=(0.0, 1.0),
                    log_y=False,
                )
            )
        )
    if any(t.report.sc_fraction is not None for t in ts):
        sc = [Series("SC fraction", x, [_f(t.report.sc_fraction) for t in ts], PALETTE[4])]
        if any(t.report.sc_zero_loss_fraction is not None for t in ts):
            sc.append(
                Series(
                    "SC with zero loss",
                    x,
                    [_f(t.report.sc_zero_loss_fraction) for t in ts],
                    PALETTE[5],
                    dashed=True,
                )
            )
        rising = [(_x(t), _f(t.report.sc_fraction)) for t in ts if FLAG_SC_RISING in t.flags]
        figures.append(
            render_chart(
                Chart(
                    "Softmax collapse: fraction of samples whose softmax is exactly one-hot",
                    sc,
                    y_label="fraction",
                    x_label="transition (step from)",
                    highlights=rising,
                    log_y=False,
                    spans=spans,
                )
            )
        )
    if any("negative_flip_rate" in t.report.extras for t in ts):
        nfr = [_f(t.report.extras.get("negative_flip_rate")) for t in ts]
        figures.append(
            render_chart(
                Chart(
                    "Negative flips: correct at t, wrong at t+1 (fraction of the probe)",
                    [Series("negative-flip rate", x, nfr, PALETTE[3])],
                    y_label="rate",
                    x_label="transition (step from)",
                    log_y=False,
                    spans=spans,
                )
            )
        )
    if result.cld is not None:
        figures.append(
            render_histogram(
                f"CLD scores of the {len(result.cld.scores)} probe samples "
                f"({result.cld.checkpoints} checkpoints)",
                result.cld.scores,
                x_label="Pearson r of the sample's loss differences with its class's validation "
                "loss differences",
            )
        )
    return figures


def _f(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _flag_rows(result: AnalysisResult) -> list[list[str]]:
    rows = []
    for t in result.flagged:
        rep = t.report
        binding = ", ".join(
            f"{b} ({_num(rad, 3)})" for b, rad in zip(rep.binding, t.binding_radii, strict=False)
        ) or ", ".join(str(b) for b in rep.binding)
        rows.append(
            [
                f"{t.step_from} → {t.step_to}" + (" (bridged)" if t.bridged else ""),
                _num(rep.tau),
                _num(rep.rho_a),
                f'<span class="flag">{_num(rep.r)}</span>' if FLAG_R in t.flags else _num(rep.r),
                _num(rep.loss),
                _num(rep.extras.get("accuracy"), 3),
                _num(rep.sc_fraction, 3),
                escape("; ".join(FLAG_TEXT.get(f, f) for f in t.flags)),
                escape(binding),
            ]
        )
    return rows


def render_html(result: AnalysisResult, *, title: str = "StepGuard analysis") -> str:
    """The report page (UTF-8 text, no external resources)."""
    s = result.settings
    rs = [t.report.r for t in result.transitions if not math.isnan(t.report.r)]
    max_r = max(rs) if rs else math.nan
    n_flag = len(result.flagged)
    status = (
        f'<span class="flag">{n_flag} flagged</span>' if n_flag else '<span class="ok">none flagged</span>'
    )
    settings = [
        ("checkpoints", f"{s.get('usable_checkpoints')} usable of {s.get('checkpoints')}"),
        ("transitions measured", f"{len(result.transitions)} ({status}, {len(result.missing)} missing)"),
        ("largest r", _num(max_r)),
        ("model", escape(str(s.get("model")))),
        ("probe", f"{escape(str(s.get('probe')))} ({s.get('probe_size')} samples)"),
        ("validation probe", escape(str(s.get("validation") or "–"))),
        (
            "mode",
            f"{escape(str(s.get('mode')))} (direction θ<sub>t+1</sub> − θ<sub>t</sub>, "
            "measured at θ<sub>t</sub>)",
        ),
        ("device", escape(str(s.get("device")))),
        ("time", f"{result.seconds:.2f} s"),
    ]
    body = [
        f"<h1>{escape(title)}</h1>",
        '<p class="lead">Every transition between consecutive checkpoints, measured against the softmax\'s '
        "safe-step radius ρ<sub>a</sub> = π/Δ<sub>a</sub>. Models did not fail for r &lt; 1; collapse "
        "appeared once r ≥ 1.</p>",
        '<table class="settings"><tbody>'
        + "".join(f"<tr><td>{k}</td><td class='text'>{v}</td></tr>" for k, v in settings)
        + "</tbody></table>",
    ]
    body.extend(f'<div class="note">{escape(n)}</div>' for n in result.notes)
    body.append("<h2>Plots</h2>")
    body.extend(f"<figure>{svg}</figure>" for svg in _charts(result))
    body.append(f"<h2>Flagged transitions ({n_flag})</h2>")
    if n_flag:
        body.append(
            _table(
                [
                    "transition",
                    "τ",
                    "ρ_a",
                    "r",
                    "loss",
                    "accuracy",
                    "SC",
                    "why",
                    "binding samples (top-2 radius)",
                ],
                _flag_rows(result),
                text_columns=(0, 7, 8),
            )
        )
    else:
        body.append(
            "<p>No transition reached r ≥ 1, had a non-finite number, or raised softmax collapse.</p>"
        )
    body.append(f"<h2>Missing transitions ({len(result.missing)})</h2>")
    if result.missing:
        body.append(
            _table(
                ["transition", "files", "reason"],
                [
                    [
                        f"{m.step_from} → {m.step_to}",
                        escape(f"{m.checkpoint_from} → {m.checkpoint_to}"),
                        escape(m.reason),
                    ]
                    for m in result.missing
                ],
                text_columns=(0, 1, 2),
            )
        )
    else:
        body.append("<p>Every transition between consecutive checkpoints was measured.</p>")
    skipped = [c for c in result.checkpoints if not c.ok]
    if skipped:
        body.append(f"<h2>Skipped checkpoints ({len(skipped)})</h2>")
        body.append(
            _table(
                ["step", "file", "problem"],
                [[str(c.step), escape(c.path), escape(c.error or "")] for c in skipped],
                text_columns=(1, 2),
            )
        )
    if result.cld is not None and result.cld.coreset is not None:
        body.append(
            f"<h2>CLD coreset</h2><p>{len(result.cld.coreset)} of {len(result.cld.scores)} samples kept "
            "(the highest-scoring fraction of each class); indices in <code>cld.json</code>.</p>"
        )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )
