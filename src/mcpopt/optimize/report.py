"""The analysis report: JSON, and a self-contained HTML page with plots.

`build_report(...)` assembles one dict (the JSON report); `render_html(report)` turns it into a
single HTML file with no external resource (inline CSS, inline SVG plots, a few lines of inline
script for sortable tables): KPIs before/after, latency distributions before/after (histograms
on a log scale), time per scenario, the per-tool table with grades, findings with their
evidence, rules and the loop's log, the efficiency scores, the scaling advice and coverage.
Opened in a browser, the page sets `data-ready="1"` on `<body>` once its script ran (the tests
render it in headless Chromium and check that).
"""

from __future__ import annotations

import html
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

COLORS = ("#8a8f98", "#2f6fde", "#1a9e5f", "#c2410c")
GRADE_COLORS = {"A": "#1a9e5f", "B": "#5aa832", "C": "#c9a400", "D": "#e07b00", "F": "#c62828"}


def build_report(
    *,
    config: str = "",
    suites: Sequence[Any] = (),
    scores: Mapping[str, Any] | None = None,
    analysis: Any = None,
    loop: Any = None,
    rules: Sequence[Mapping[str, Any]] = (),
    history: Sequence[Mapping[str, Any]] = (),
    advice: Sequence[Any] = (),
    coverage: Any = None,
    title: str = "mcpopt analysis",
) -> dict[str, Any]:
    """The JSON report.

    Args:
        suites: `SuiteRun`s in order (e.g. direct baseline, gateway before, gateway after).
        scores: `score.suite_scores(...)`.
        analysis: an `analyzer.Analysis`; loop: a `loop.LoopReport`; advice: `advisor.Advice`s;
        coverage: a `coverage.Coverage`; rules: `rules.rules_summary(...)` rows; history: the rule
        file's change log (newest last).
    """
    return {
        "title": title,
        "generated": time.time(),
        "config": config,
        "kpis": {s.label: s.kpis() for s in suites},
        "latency_ms": {s.label: s.step_latencies() for s in suites},
        "suites": [s.to_dict() for s in suites],
        "scores": dict(scores or {}),
        "analysis": analysis.to_dict() if analysis is not None else None,
        "loop": loop.to_dict() if loop is not None else None,
        "rules": list(rules),
        "history": [{k: v for k, v in h.items() if k != "rules"} for h in history][-50:],
        "advice": [a.to_dict() for a in advice],
        "coverage": coverage.to_dict() if coverage is not None else None,
    }


def write_reports(report: Mapping[str, Any], out_dir: str | Path, stem: str = "report") -> tuple[Path, Path]:
    """Write `<stem>.json` and `<stem>.html` into `out_dir` (created); returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, page = out / f"{stem}.json", out / f"{stem}.html"
    js.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    page.write_text(render_html(report), encoding="utf-8")
    return js, page


# ---- HTML -----------------------------------------------------------------------------------
def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.3g}"
    if isinstance(v, int):
        return f"{v:,}"
    return _e(v)


def _table(rows: Sequence[Mapping[str, Any]], cols: Sequence[str], cls: str = "", render: Any = None) -> str:
    if not rows:
        return '<p class="muted">none</p>'
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    body = []
    for r in rows:
        cells: list[str] = []
        for c in cols:
            v = r.get(c)
            cell = render(c, v, r) if render is not None else None
            cells.append(
                cell
                if cell is not None
                else f'<td data-v="{_e(v if isinstance(v, int | float) else "")}">{_fmt(v)}</td>'
            )
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="sortable {cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _histogram_svg(series: Mapping[str, Sequence[float]], width: int = 640, height: int = 220) -> str:
    """Overlaid histograms of latencies (ms) on log-spaced bins, one color per series."""
    values = [v for vs in series.values() for v in vs if v > 0]
    if not values:
        return '<p class="muted">no latencies</p>'
    lo, hi = math.log10(max(0.05, min(values))), math.log10(max(values) * 1.0001)
    if hi - lo < 0.5:
        hi = lo + 0.5
    nbins = 24
    step = (hi - lo) / nbins
    pad_l, pad_b, pad_t = 40, 30, 10
    plot_w, plot_h = width - pad_l - 10, height - pad_b - pad_t
    counts = {}
    for name, vs in series.items():
        c = [0] * nbins
        for v in vs:
            if v > 0:
                c[min(nbins - 1, max(0, int((math.log10(v) - lo) / step)))] += 1
        counts[name] = c
    top = max(max(c) for c in counts.values()) or 1
    parts = [f'<svg class="plot" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img">']
    parts.append(f'<line x1="{pad_l}" y1="{pad_t + plot_h}" x2="{width - 10}" y2="{pad_t + plot_h}" class="axis"/>')
    bar_w = plot_w / nbins / max(1, len(counts))
    for si, (name, c) in enumerate(counts.items()):
        color = COLORS[si % len(COLORS)]
        for i, n in enumerate(c):
            if not n:
                continue
            h = plot_h * n / top
            x = pad_l + i * plot_w / nbins + si * bar_w
            parts.append(
                f'<rect class="bar" x="{x:.1f}" y="{pad_t + plot_h - h:.1f}" '
                f'width="{bar_w * 0.92:.1f}" height="{h:.1f}" '
                f'fill="{color}"><title>{_e(name)}: {n} call(s) ~{10 ** (lo + (i + 0.5) * step):.1f} ms</title></rect>'
            )
    decade = math.floor(lo)
    while decade <= hi:
        if decade >= lo:
            x = pad_l + (decade - lo) / (hi - lo) * plot_w
            parts.append(f'<line x1="{x:.1f}" y1="{pad_t}" x2="{x:.1f}" y2="{pad_t + plot_h}" class="grid"/>')
            parts.append(f'<text x="{x:.1f}" y="{height - 12}" class="tick">{10**decade:g} ms</text>')
        decade += 1
    parts.append(f'<text x="4" y="{pad_t + 10}" class="tick">{top}</text>')
    legend_x = pad_l + 10
    for si, name in enumerate(counts):
        color = COLORS[si % len(COLORS)]
        parts.append(f'<rect x="{legend_x}" y="{pad_t + 4}" width="10" height="10" fill="{color}"/>')
        parts.append(f'<text x="{legend_x + 14}" y="{pad_t + 13}" class="legend">{_e(name)}</text>')
        legend_x += 24 + 7 * len(name)
    parts.append("</svg>")
    return "".join(parts)


def _bars_svg(rows: Sequence[tuple[str, Sequence[float]]], labels: Sequence[str], unit: str = "ms") -> str:
    """Grouped horizontal bars: one group per row (e.g. a scenario), one bar per series."""
    if not rows:
        return '<p class="muted">no data</p>'
    width, row_h, bar_h, pad_l = 640, 14 * max(1, len(labels)) + 10, 12, 170
    height = row_h * len(rows) + 30
    top = max((v for _, vs in rows for v in vs), default=1.0) or 1.0
    parts = [f'<svg class="plot" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img">']
    for ri, (name, vs) in enumerate(rows):
        y0 = 20 + ri * row_h
        parts.append(
            f'<text x="{pad_l - 6}" y="{y0 + row_h / 2}" class="label" text-anchor="end">{_e(name[:28])}</text>'
        )
        for si, v in enumerate(vs):
            w = (width - pad_l - 70) * v / top
            color = COLORS[si % len(COLORS)]
            y = y0 + si * (bar_h + 2)
            parts.append(
                f'<rect class="bar" x="{pad_l}" y="{y}" width="{max(w, 0.5):.1f}" height="{bar_h}" fill="{color}">'
                f"<title>{_e(labels[si])}: {v:,.1f} {unit}</title></rect>"
            )
            parts.append(f'<text x="{pad_l + w + 4:.1f}" y="{y + bar_h - 2}" class="tick">{v:,.0f}</text>')
    lx = pad_l
    for si, lab in enumerate(labels):
        parts.append(f'<rect x="{lx}" y="4" width="10" height="10" fill="{COLORS[si % len(COLORS)]}"/>')
        parts.append(f'<text x="{lx + 14}" y="13" class="legend">{_e(lab)}</text>')
        lx += 24 + 7 * len(lab)
    parts.append("</svg>")
    return "".join(parts)


def _kpi_cards(kpis: Mapping[str, Mapping[str, Any]], scores: Mapping[str, Any]) -> str:
    cards = []
    suite_scores = scores.get("suites", {}) if scores else {}
    for label, k in kpis.items():
        sc = suite_scores.get(label, {})
        cards.append(
            f'<div class="card"><h3>{_e(label)}</h3>'
            f'<div class="big">{k.get("calls", 0)}</div><div class="muted">tool calls</div>'
            f'<div class="big">{k.get("time_ms", 0):,.0f} ms</div><div class="muted">total time</div>'
            f'<div class="big">{k.get("success_rate", 0):.0%}</div><div class="muted">scenarios passing</div>'
            + (f'<div class="big">{sc["score"]}</div><div class="muted">efficiency score</div>' if sc else "")
            + "</div>"
        )
    return '<div class="cards">' + "".join(cards) + "</div>"


def _grade(col: str, v: Any, row: Mapping[str, Any]) -> str | None:
    if col == "grade":
        color = GRADE_COLORS.get(str(v), "#888")
        return f'<td data-v="{_e(v)}"><span class="grade" style="background:{color}">{_e(v)}</span></td>'
    return None


def _findings(findings: Sequence[Mapping[str, Any]]) -> str:
    if not findings:
        return '<p class="muted">no findings</p>'
    out = []
    for f in findings:
        gain = ", ".join(f"{k.replace('_', ' ')} {v:,.0f}" for k, v in f.get("gain", {}).items() if v)
        props = "".join(
            f"<li><code>{_e(r['id'])}</code> ({_e(r['level'])}): {_e(r['description'])}</li>"
            for r in f.get("proposals", [])
        )
        out.append(
            f'<details class="finding {_e(f["severity"])}"><summary><span class="sev">{_e(f["severity"])}</span> '
            f'<b>{_e(f["kind"])}</b>: {_e(f["title"])} <span class="muted">{_e(gain)}</span></summary>'
            f"<p>{_e(f.get('recommendation', ''))} "
            f'<span class="muted">(confidence {_e(f.get("confidence", ""))})</span></p>'
            + (f"<ul>{props}</ul>" if props else "")
            + f"<pre>{_e(json.dumps(f.get('evidence', {}), indent=2, default=str))}</pre></details>"
        )
    return "".join(out)


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:18px 28px}header h1{margin:0;font-size:22px}
main{padding:10px 28px 40px;max-width:1180px}section{background:#fff;border-radius:8px;padding:14px 18px;margin:14px 0;
box-shadow:0 1px 2px rgba(0,0,0,.08)}h2{font-size:17px;margin:4px 0 10px}.muted{color:#6b7280}
.cards{display:flex;gap:12px;flex-wrap:wrap}
.card{border:1px solid #e3e6ea;border-radius:8px;padding:10px 16px;min-width:150px}
.card h3{margin:0 0 6px;font-size:14px}.big{font-size:20px;font-weight:600}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{padding:4px 8px;border-bottom:1px solid #eceef1;text-align:left}
th{cursor:pointer;background:#f1f3f5;position:sticky;top:0}
td[data-v]:not([data-v=""]){text-align:right;font-variant-numeric:tabular-nums}
.grade{color:#fff;border-radius:4px;padding:1px 7px;font-weight:700}.plot{max-width:100%;height:auto}
.axis{stroke:#444}.grid{stroke:#e5e7eb}.tick{font-size:10px;fill:#555}.legend,.label{font-size:11px;fill:#333}
details.finding{border-left:4px solid #c9a400;padding:4px 10px;margin:6px 0;background:#fafafa}
details.critical{border-color:#c62828}details.info{border-color:#2f6fde}.sev{text-transform:uppercase;font-size:11px;color:#555}
pre{background:#f3f4f6;padding:8px;overflow:auto;max-height:260px;font-size:12px}code{font-size:12px}
.ok{color:#1a9e5f;font-weight:600}.bad{color:#c62828;font-weight:600}
"""

_JS = """
document.querySelectorAll('table.sortable th').forEach(function(th, i){
  th.addEventListener('click', function(){
    var tb = th.closest('table').tBodies[0], rows = Array.prototype.slice.call(tb.rows);
    var dir = th.dataset.dir === 'asc' ? -1 : 1; th.dataset.dir = dir === 1 ? 'asc' : 'desc';
    rows.sort(function(a, b){
      var x = a.cells[th.cellIndex], y = b.cells[th.cellIndex];
      var xv = x.dataset.v, yv = y.dataset.v;
      if (xv && yv && !isNaN(+xv) && !isNaN(+yv)) return dir * (+xv - +yv);
      return dir * x.textContent.localeCompare(y.textContent);
    });
    rows.forEach(function(r){ tb.appendChild(r); });
  });
});
document.body.dataset.ready = '1';
"""


def render_html(report: Mapping[str, Any]) -> str:
    """The self-contained HTML page of a report (see the module doc)."""
    kpis = report.get("kpis") or {}
    scores = report.get("scores") or {}
    analysis = report.get("analysis") or {}
    loop = report.get("loop") or {}
    coverage = report.get("coverage")
    latency = {k: [x for xs in v.values() for x in xs] for k, v in (report.get("latency_ms") or {}).items()}
    suites = report.get("suites") or []
    scen_ids: list[str] = []
    for s in suites:
        for r in s["scenarios"]:
            if r["id"] not in scen_ids and not r.get("skipped"):
                scen_ids.append(r["id"])
    per_scen = [
        (sid, [next((r["total_ms"] for r in s["scenarios"] if r["id"] == sid), 0.0) for s in suites])
        for sid in scen_ids
    ]
    labels = [s["label"] for s in suites]
    sections = []
    if kpis:
        change = loop.get("change") if loop else None
        extra = ""
        if change:
            extra = (
                f"<p>Loop: tool calls <b>{change.get('calls', 0):+.0%}</b>, time <b>{change.get('time', 0):+.0%}</b>, "
                f"success {change.get('success', 0):+.0%}.</p>"
            )
        sections.append(f'<section id="kpis"><h2>KPIs</h2>{_kpi_cards(kpis, scores)}{extra}</section>')
    if latency:
        sections.append(
            '<section id="latency"><h2>Latency distribution (per tool call, log scale)</h2>'
            + _histogram_svg(latency)
            + "<h2>Time per scenario</h2>"
            + _bars_svg(per_scen, labels)
            + "</section>"
        )
    if scores.get("task_types"):
        rows = []
        for label, tasks in scores["task_types"].items():
            for task, sc in tasks.items():
                rows.append({"run": label, "task type": task, **sc})
        sections.append(
            '<section id="scores"><h2>Efficiency score</h2><p class="muted">100 x (0.5 success + 0.3 call efficiency '
            "+ 0.2 time efficiency)</p>"
            + _table(rows, ["run", "task type", "score", "success", "call_efficiency", "time_efficiency"])
            + "</section>"
        )
    if analysis:
        sections.append(
            f'<section id="tools"><h2>Tools</h2><p class="muted">{analysis.get("rows", 0)} calls in '
            f"{analysis.get('sessions', 0)} sessions; calls made {analysis.get('calls_made', 0)}, needed after the "
            f"fixes {analysis.get('calls_needed', 0)}</p>"
            + _table(
                analysis.get("tools", []),
                [
                    "server",
                    "tool",
                    "calls",
                    "errors",
                    "avg_ms",
                    "p50_ms",
                    "p95_ms",
                    "p99_ms",
                    "bytes_avg",
                    "cache_hits",
                    "grade",
                ],
                render=_grade,
            )
            + "</section>"
        )
        sections.append(f'<section id="findings"><h2>Findings</h2>{_findings(analysis.get("findings", []))}</section>')
    if loop:
        events = [
            {"kind": e["kind"], "rule": e.get("rule") or "", "reason": e["reason"]}
            for e in loop.get("events", [])
            if e["kind"] != "measured"
        ]
        sections.append(
            f'<section id="loop"><h2>Optimization loop</h2>{_table(events, ["kind", "rule", "reason"])}</section>'
        )
    if report.get("rules"):
        sections.append(
            '<section id="rules"><h2>Rules</h2>'
            + _table(report["rules"], ["id", "enabled", "level", "priority", "source", "when", "action", "rollout"])
            + "</section>"
        )
    if report.get("advice"):
        sections.append(
            '<section id="advice"><h2>Scaling advice (M/M/c, Erlang C)</h2>'
            + _table(
                report["advice"],
                [
                    "server",
                    "calls",
                    "rate_peak",
                    "service_ms",
                    "replicas",
                    "utilization",
                    "wait_ms",
                    "recommended",
                    "forecast_replicas",
                    "action",
                ],
            )
            + "</section>"
        )
    if coverage:
        unc = coverage.get("uncovered") or []
        sections.append(
            f'<section id="coverage"><h2>Coverage</h2><p>{coverage["covered"]} of {coverage["tools"]} tools exercised '
            f"({coverage['ratio']:.0%}).</p>"
            + (f"<p>Not exercised: {', '.join(f'<code>{_e(u)}</code>' for u in unc)}</p>" if unc else "")
            + _table(
                [
                    {
                        "tool": r["tool"] + (f" ({r['action']})" if r["action"] else ""),
                        "server": r["server"],
                        "scenarios": ", ".join(r["scenarios"]) or "—",
                    }
                    for r in coverage["rows"]
                ],
                ["server", "tool", "scenarios"],
            )
            + "</section>"
        )
    if suites:
        rows = []
        for s in suites:
            for r in s["scenarios"]:
                failed = [c["label"] + ": " + c["detail"] for c in r["criteria"] if not c["ok"]]
                rows.append(
                    {
                        "run": s["label"],
                        "scenario": r["id"],
                        "result": "skipped" if r.get("skipped") else ("pass" if r["ok"] else "FAIL"),
                        "ms": r["total_ms"],
                        "calls": r["upstream_calls"],
                        "why": r.get("skipped") or r.get("error") or "; ".join(failed)[:300],
                    }
                )

        def res(col: str, v: Any, row: Mapping[str, Any]) -> str | None:
            if col == "result":
                return f'<td class="{"ok" if v == "pass" else "bad" if v == "FAIL" else "muted"}">{_e(v)}</td>'
            return None

        sections.append(
            '<section id="scenarios"><h2>Scenario runs</h2>'
            + _table(rows, ["run", "scenario", "result", "ms", "calls", "why"], render=res)
            + "</section>"
        )
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(report.get("generated", time.time())))
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{_e(report.get('title', 'mcpopt'))}</title>"
        f"<style>{_CSS}</style></head><body><header><h1>{_e(report.get('title', 'mcpopt analysis'))}</h1>"
        f'<div class="muted">{_e(report.get("config", ""))} · {when}</div></header><main>{"".join(sections)}</main>'
        f"<script>{_JS}</script></body></html>"
    )
