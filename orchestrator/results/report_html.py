"""The sweep report as one self-contained HTML file.

Charts are plotly figures: interactive (hover a point to see its trial, zoom a
curve), drawn by plotly.js, which is inlined once so the file opens offline with
no CDN and no server. matplotlib would give static images and lose the hover that
tells which trial a point is; plotly's Python package carries its JS, so there is
nothing else to ship. Tables and the misread-image grid are plain HTML.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Optional

from orchestrator.results.query import describe_versus_baseline
from orchestrator.results.report_data import ReportData, Section, collect
from orchestrator.results.schema import FAILED_OUTCOMES
from trainer.files import atomic_path

ATTENTION_COLOURS = {"causal": "#1f77b4", "prefix": "#ff7f0e", None: "#7f7f7f"}
OUTCOME_SYMBOLS = {"oom": "x", "host_oom": "x-open", "diverged": "triangle-down", "error": "cross",
                   "stopped": "square-open"}
PLOT_CONFIG = {"displaylogo": False, "responsive": True}

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; padding: 0 1em; max-width: 1360px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { padding: 3px 9px; border-bottom: 1px solid #eee; }
th { text-align: left; background: #f6f6f6; } table.sortable th { cursor: pointer; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; } .wide { overflow-x: auto; }
td.error { max-width: 28em; overflow-wrap: anywhere; font-size: 0.9em; }
.note { color: #666; font-style: italic; } .warning { color: #b00020; font-weight: bold; }
.outcome-ok { color: #2a7d2a; }
.outcome-oom, .outcome-error, .outcome-diverged { color: #b22222; font-weight: bold; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 12px; }
.grid figure { margin: 0; border: 1px solid #ddd; padding: 6px; } .grid img { width: 100%; image-rendering: pixelated; }
.grid figcaption { font-family: monospace; font-size: 0.95em; } .wrong { color: #b22222; }
"""

# clicking a header sorts its table by that column (numbers as numbers); a second click reverses
SORT_SCRIPT = """
document.querySelectorAll('table.sortable th').forEach(function (th, col) {
  th.addEventListener('click', function () {
    var body = th.closest('table').tBodies[0], rows = Array.from(body.rows);
    var dir = th.dataset.dir === 'asc' ? -1 : 1; th.dataset.dir = dir === 1 ? 'asc' : 'desc';
    rows.sort(function (a, b) {
      var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v, nx = parseFloat(x), ny = parseFloat(y);
      if (!isNaN(nx) && !isNaN(ny)) return dir * (nx - ny);
      return dir * String(x).localeCompare(String(y));
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
window.addEventListener('load', function () {
  document.body.dataset.plots = document.querySelectorAll('.js-plotly-plot').length;
});
"""


def fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3g}"
    return str(v)


def table_html(rows: list[dict[str, Any]], columns: list[str], sortable: bool = False,
               headers: Optional[dict[str, str]] = None) -> str:
    headers = headers or {}
    head = "".join(f"<th>{html.escape(headers.get(c, c))}</th>" for c in columns)
    body = []
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c)
            cls = "num" if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
            if c == "outcome":
                cls = f"outcome-{v}"
            elif c == "error":
                cls = "error"  # long messages wrap in their column, so the table keeps to the page
            cells.append(f'<td class="{cls}" data-v="{html.escape(str(v if v is not None else ""))}">'
                         f"{html.escape(fmt(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class="wide"><table class="{"sortable" if sortable else ""}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def note_html(section: Section) -> str:
    return f'<p class="note">{html.escape(section.note)}</p>' if section.note else ""


def figure_html(fig: Any, div_id: str) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, config=PLOT_CONFIG)


def default_report_path(results: str, sweep: str) -> Path:
    """Beside the results: RESULTS/report-SWEEP.html."""
    return Path(results) / f"report-{sweep}.html"


def write_report(results: str, sweep: str, out: Path) -> list[str]:
    """Collect, render and write atomically (a browser reloading it never sees half a page); returns the
    warnings the page shows (tables that could not be read)."""
    data = collect(results, sweep)
    page = render(data)
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return data.warnings


def render(data: ReportData) -> str:
    import plotly.offline

    metric = data.metric
    parts = [
        f"<h1>Sweep {html.escape(data.sweep)}</h1>",
        *(f'<p class="warning">Warning: {html.escape(w)}</p>' for w in data.warnings),
        summary_html(data),
        "<h2>Leaderboard</h2>", leaderboard_html(data),
        "<h2>Learning curves</h2>", curves_html(data, metric),
        "<h2>The search</h2>", search_html(data, metric),
        "<h2>Causal vs prefix, paired</h2>", paired_html(data),
        "<h2>Which setting matters</h2>", importance_html(data, metric),
        "<h2>Cost: memory and throughput</h2>", cost_html(data),
        "<h2>Efficiency: how well each trial used its hardware</h2>", efficiency_html(data),
        "<h2>Misread samples (best trial)</h2>", misread_html(data),
    ]
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>mdsweep report: {html.escape(data.sweep)}</title><style>{STYLE}</style>"
            f"<script>{plotly.offline.get_plotlyjs()}</script></head><body>"
            + "\n".join(parts) + f"<script>{SORT_SCRIPT}</script></body></html>")


def summary_html(data: ReportData) -> str:
    s = data.summary
    outcomes = ", ".join(f"{n} {o}" for o, n in s["outcomes"].items()) or "none yet"
    rows = [("status", s["status"]), ("objective", " ; ".join(f"{m} ({mode})" for m, mode in data.objectives)),
            ("space", s["space"]), ("trials", f"{s['trials']}: {outcomes}"),
            ("trial time", f"{s['trial_hours']:.2f} h"), ("started", s["created_at"]),
            ("fixed settings", ", ".join(f"{k}={v}" for k, v in s["fixed"].items())), ("command", s["argv"])]
    best = s["best"]
    if best:
        interval = (f" (95 % interval {best['low']:.3f}–{best['high']:.3f}, n = {best['n']})"
                    if best["low"] is not None and best["high"] is not None else "")
        params = ", ".join(f"{k}={fmt(v)}" for k, v in best["params"].items())
        rows.insert(4, ("best trial", f"{best['trial_id']}: {best['objective']:.4g}{interval}; {params}"))
        if best["test"]:
            t = best["test"]
            test_interval = f"{t['exact_match_low']:.3f}–{t['exact_match_high']:.3f}"
            rows.insert(5, ("held-out test", f"exact match {t['exact_match']:.3f} (95 % interval {test_interval}, "
                                             f"n = {t['n']}), CER {t['cer']:.3f}: the estimate to quote"))
    else:
        rows.insert(4, ("best trial", "none: no trial has ended ok yet"))
    if s.get("warm_start"):
        rows.insert(4, ("warm start", "; ".join(
            f"{w['carried']} trial(s) carried from {w['source']} (told to the search, never this sweep's results)"
            + "".join(f"; {n}" for n in w["notes"]) for w in s["warm_start"])))
    if s.get("vs_baseline"):
        rows.insert(5, ("vs baseline", describe_versus_baseline(s["vs_baseline"]).removeprefix("vs baseline ")))
    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(fmt(v))}</td></tr>"
                               for k, v in rows) + "</table>"


def leaderboard_html(data: ReportData) -> str:
    rows = data.leaderboard.rows
    if not rows:
        return note_html(data.leaderboard)
    columns = [c for c in rows[0] if c != "error"] + (["error"] if any(r.get("error") for r in rows) else [])
    return table_html(rows, columns, sortable=True, headers={"peak_gib": "peak GiB", "low": "95 % low",
                                                             "high": "95 % high", "test": "test exact match"})


def curves_html(data: ReportData, metric: str) -> str:
    from plotly.subplots import make_subplots

    rows, x_title = data.curves.rows, data.curves.x_title
    if not rows:
        return note_html(data.curves)
    fig = make_subplots(rows=1, cols=2, subplot_titles=(f"validation {metric}", "train loss"))
    by_trial: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_trial.setdefault(r["trial_id"], []).append(r)
    shown_legend: set[Any] = set()
    for trial_id, points in sorted(by_trial.items()):
        attention = points[0]["attention"]
        colour = ATTENTION_COLOURS.get(attention, "#7f7f7f")
        for col, key in ((1, "value"), (2, "train_loss")):
            xy = [(p["x"], p[key]) for p in points if p[key] is not None]
            fig.add_scatter(x=[x for x, _ in xy], y=[y for _, y in xy], mode="lines+markers", row=1, col=col,
                            name=str(attention), legendgroup=str(attention), line={"color": colour},
                            showlegend=col == 1 and attention not in shown_legend,
                            hovertemplate=f"{trial_id}<br>{x_title} %{{x}}<br>%{{y:.4g}}<extra>{attention}</extra>")
        shown_legend.add(attention)
    fig.update_xaxes(title_text=x_title)
    fig.update_layout(height=380, margin={"t": 40, "b": 40}, legend_title_text="attention")
    return note_html(data.curves) + figure_html(fig, "curves")


def search_html(data: ReportData, metric: str) -> str:
    import plotly.graph_objects as go

    rows = data.search.rows
    if not rows:
        return note_html(data.search)
    fig = go.Figure()
    ok = [r for r in rows if r["objective"] is not None and r["outcome"] not in FAILED_OUTCOMES]
    accums = sorted({r["grad_accum"] for r in ok if r["grad_accum"] is not None})
    symbols = ["circle", "square", "diamond", "triangle-up", "star", "hexagon"]
    for attention in sorted({r["attention"] for r in ok}, key=str):
        for i, accum in enumerate(accums or [None]):
            pts = [r for r in ok if r["attention"] == attention and (accum is None or r["grad_accum"] == accum)]
            if pts:
                fig.add_scatter(x=[r["lr"] for r in pts], y=[r["objective"] for r in pts], mode="markers",
                                name=f"{attention}, grad_accum {accum}",
                                marker={"color": ATTENTION_COLOURS.get(attention, "#7f7f7f"), "size": 11,
                                        "symbol": symbols[i % len(symbols)]},
                                text=[r["trial_id"] for r in pts],
                                hovertemplate="%{text}<br>lr %{x:.3g}<br>%{y:.4g}<extra></extra>")
    failed = [r for r in rows if r["outcome"] in FAILED_OUTCOMES and r["lr"] is not None]
    floor = min([r["objective"] for r in ok] + [0.0])
    for outcome in sorted({r["outcome"] for r in failed}):
        pts = [r for r in failed if r["outcome"] == outcome]
        fig.add_scatter(x=[r["lr"] for r in pts], y=[floor] * len(pts), mode="markers", name=outcome,
                        marker={"color": "#b22222", "size": 12, "symbol": OUTCOME_SYMBOLS.get(outcome, "x")},
                        text=[r["trial_id"] for r in pts], hovertemplate=f"%{{text}}: {outcome}<extra></extra>")
    fig.update_xaxes(type="log", title_text="learning rate")
    fig.update_yaxes(title_text=f"objective ({metric})")
    fig.update_layout(height=400, margin={"t": 20, "b": 40})
    note = " Failed trials (oom, diverged, error) sit on the floor of the chart, in red." if failed else ""
    return figure_html(fig, "search") + (f'<p class="note">{note.strip()}</p>' if note else "")


def paired_html(data: ReportData) -> str:
    import plotly.graph_objects as go

    rows = data.paired.rows
    if not rows:
        return note_html(data.paired)
    labels = [f"{r['trial_a']} vs {r['trial_b']}" for r in rows]
    fig = go.Figure(go.Scatter(
        x=[r["diff"] for r in rows], y=labels, mode="markers", marker={"size": 11, "color": "#333"},
        error_x={"type": "data", "symmetric": False, "array": [r["ci_high"] - r["diff"] for r in rows],
                 "arrayminus": [r["diff"] - r["ci_low"] for r in rows]},
        text=[f"p = {r['mcnemar_p']:.3g}" for r in rows], hovertemplate="%{y}<br>%{x:.3f}, %{text}<extra></extra>"))
    fig.add_vline(x=0, line_dash="dot", line_color="#999")
    a, b = rows[0]["a"], rows[0]["b"]
    fig.update_xaxes(title_text=f"exact match {a} − {b} (95 % interval)")
    fig.update_layout(height=120 + 40 * len(rows), margin={"t": 20, "b": 40})
    columns = [c for c in rows[0] if c not in ("factor", "a", "b", "trial_a", "trial_b")]  # ids label the chart
    return (figure_html(fig, "paired") + "<p>Each pair: the same proposal trained under both layouts, scored on "
            "the same validation samples; McNemar's exact test on the samples they disagree on.</p>"
            + table_html(rows, columns, headers={"em_a": f"EM {a}", "em_b": f"EM {b}", "diff": f"{a} − {b}",
                                                 "a_only": f"{a} only", "b_only": f"{b} only"}))


def importance_html(data: ReportData, metric: str) -> str:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    parts = []
    rows = data.importance.rows
    if rows:
        fig = go.Figure(go.Bar(x=[r["importance"] for r in rows], y=[r["param"] for r in rows], orientation="h"))
        fig.update_xaxes(title_text=f"importance (Optuna, PED-ANOVA, from {data.importance.rows[0]['proposals']} "
                                    "completed proposals)")
        fig.update_layout(height=100 + 40 * len(rows), margin={"t": 20, "b": 40}, yaxis={"autorange": "reversed"})
        parts.append(figure_html(fig, "importance"))
    parts.append(note_html(data.importance))
    points = [r for r in data.search.rows if r["objective"] is not None]
    params = [p for p in (points[0]["params"] if points else {}) if any(r["params"].get(p) is not None for r in points)]
    if params:
        fig = make_subplots(rows=1, cols=len(params), shared_yaxes=True, subplot_titles=params)
        for i, p in enumerate(params, start=1):
            fig.add_scatter(x=[r["params"].get(p) for r in points], y=[r["objective"] for r in points],
                            mode="markers", row=1, col=i, showlegend=False, text=[r["trial_id"] for r in points],
                            marker={"color": [ATTENTION_COLOURS.get(r["attention"], "#7f7f7f") for r in points]},
                            hovertemplate="%{text}<br>%{x}<br>%{y:.4g}<extra></extra>")
            if p == "lr":
                fig.update_xaxes(type="log", row=1, col=i)
        fig.update_yaxes(title_text=metric, row=1, col=1)
        fig.update_layout(height=320, margin={"t": 40, "b": 40})
        parts.append("<p>Slices: the objective against each searched setting.</p>" + figure_html(fig, "slices"))
    return "".join(parts)


def cost_html(data: ReportData) -> str:
    from plotly.subplots import make_subplots

    rows = [r for r in data.cost.rows if r["peak_gib"] is not None or r["tokens_per_s"] is not None]
    if not rows:
        return note_html(data.cost) or '<p class="note">no trial has reported memory or throughput yet</p>'
    on_gpu = any(r["on_gpu"] for r in rows)
    fig = make_subplots(rows=1, cols=2, subplot_titles=(
        "peak GPU memory (GiB)" if on_gpu else "peak memory: process RSS on CPU (GiB)", "throughput (tokens/s)"))
    for attention in sorted({r["attention"] for r in rows}, key=str):
        pts = [r for r in rows if r["attention"] == attention]
        colour = ATTENTION_COLOURS.get(attention, "#7f7f7f")
        fig.add_bar(x=[r["trial_id"] for r in pts], y=[r["peak_gib"] for r in pts], name=str(attention),
                    marker_color=colour, legendgroup=str(attention), row=1, col=1,
                    customdata=[[fmt(r["cap"]), fmt(r["predicted_gib"])] for r in pts],
                    hovertemplate="%{x}<br>%{y:.2f} GiB<br>cap %{customdata[0]}, predicted %{customdata[1]}"
                                  "<extra></extra>")
        fig.add_bar(x=[r["trial_id"] for r in pts], y=[r["tokens_per_s"] for r in pts], name=str(attention),
                    marker_color=colour, legendgroup=str(attention), showlegend=False, row=1, col=2)
    predicted = [r for r in rows if r["predicted_gib"]]
    if predicted:
        fig.add_scatter(x=[r["trial_id"] for r in predicted], y=[r["predicted_gib"] for r in predicted],
                        mode="markers", name="predicted peak", marker={"symbol": "line-ew-open", "size": 18},
                        row=1, col=1)
    fig.update_layout(height=380, margin={"t": 40, "b": 80}, legend_title_text="attention")
    caps = sorted({fmt(r["cap"]) for r in rows if r["cap"] is not None})
    note = f"Per-trial GPU memory cap: {', '.join(caps)}." if caps else "No per-trial GPU memory cap was set."
    return figure_html(fig, "cost") + f"<p>{html.escape(note)}</p>"


def efficiency_html(data: ReportData) -> str:
    rows = data.efficiency.rows
    if not rows:
        return note_html(data.efficiency)
    shown = [{**r, "mfu": None if r["mfu"] is None else r["mfu"] * 100} for r in rows]
    table = table_html(shown, list(rows[0]), sortable=True, headers={
        "mfu": "MFU %", "tflops": "achieved TFLOP/s", "gflop_per_sample": "GFLOP / sample",
        "kernel": "attention kernel"})
    return (note_html(data.efficiency) + "<p>Training FLOPs counted from the shapes that ran, over the measured "
            "step time; MFU is that over the device's dense peak at the compute precision.</p>"
            + f"<div class='wide'>{table}</div>")


def misread_html(data: ReportData) -> str:
    rows = data.misread.rows
    if not rows:
        return note_html(data.misread) or "<p>The best trial read every validation sample right.</p>"
    cells = []
    for r in rows:
        image = f'<img src="{r["image"]}" alt="{html.escape(r["sample_id"])}">' if r["image"] else ""
        cells.append(f"<figure>{image}<figcaption>target&nbsp;&nbsp;{html.escape(r['target'] or '')}<br>"
                     f"<span class='wrong'>read&nbsp;&nbsp;&nbsp;&nbsp;{html.escape(r['prediction'] or '')}</span>"
                     f"<br><small>{html.escape(r['sample_id'])}, CER {fmt(r['cer'])}</small></figcaption></figure>")
    return note_html(data.misread) + f"<div class='grid'>{''.join(cells)}</div>"

