"""``orderq bench --html FILE``: the bench's JSON report as one self-contained HTML page
with plots (inline SVG drawn here; no script, no font, no URL fetched):

- backlog (and deferred syncs) over the run, each load phase shaded and named;
- the breaker stage over the run;
- answers per second by HTTP status;
- ack latency distribution per customer class, one plot per load phase;
- end-to-end latency distribution per priority, one plot per phase that measured it.

The series come from the report's ``series`` (:mod:`loadtest.series`) and, for end-to-end
latency, the ``hist`` of each priority in a phase's ``e2e_ms``. A plot without data is left
out and said so. ``python -m loadtest.report_html REPORT.json OUT.html`` renders a saved report.
"""

from __future__ import annotations

import html
import json
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

W, H = 860, 260  # plot size (SVG user units)
ML, MR, MT, MB = 80, 30, 14, 40  # margins: left, right, top, bottom
STAGES = ("normal", "degraded", "shedding")
STAGE_COLOURS = {"normal": "rgb(30, 142, 62)", "degraded": "rgb(232, 160, 0)", "shedding": "rgb(217, 48, 37)"}
CLASS_COLOURS = {"vip": "#8e24aa", "new": "#1e88e5", "regular": "#43a047", "batch": "#00897b"}
STATUS_COLOURS = {"202": "#1e8e3e", "200": "#1e88e5", "422": "#8e24aa", "429": "#f57c00", "503": "#d93025", "0": "#222"}
OTHER = ("#6d4c41", "#546e7a", "#c2185b", "#7cb342", "#5e35b1")
STATUS_NAMES = {
    "0": "no answer",
    "200": "200 duplicate",
    "202": "202 accepted",
    "429": "429 rate",
    "503": "503 refused",
}

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 900px; color: #222; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 28px 0 6px; }
.meta { color: #555; margin: 2px 0; }
table { border-collapse: collapse; margin: 6px 0; } td, th { padding: 2px 10px 2px 0; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.ok { color: #1e8e3e; font-weight: 600; } .miss { color: #d93025; font-weight: 600; } .na { color: #888; }
figure.plot { margin: 10px 0 18px; } figcaption { font-weight: 600; margin-bottom: 2px; }
svg.chart { width: 100%; height: auto; display: block; }
svg.chart text { font-size: 11px; fill: #555; }
svg.chart .grid { stroke: #e4e4e4; } svg.chart .axis { stroke: #999; }
svg.chart .series { fill: none; stroke-width: 1.6; }
svg.chart .band { fill: #f1f3f4; } svg.chart .band-label { fill: #777; }
.legend { display: flex; flex-wrap: wrap; gap: 4px 14px; font-size: 12px; color: #444; }
.legend span::before { content: ""; display: inline-block; width: 14px; height: 3px; margin: 0 5px 3px 0;
  background: var(--c); vertical-align: middle; }
.note { color: #666; font-style: italic; }
"""


def _e(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        v = f"{v:,.1f}" if abs(v) < 1e6 else f"{v:,.0f}"
    elif isinstance(v, int):
        v = f"{v:,}"
    return f"{v}{unit}"


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def _tick_label(v: float) -> str:
    return f"{v:g}" if abs(v) < 1e5 else f"{v:.2g}"


def _latency_label(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.3g} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.3g} s"


class Plot:
    """One SVG line plot; x and y ranges fixed at creation, ``log_x`` in decades."""

    def __init__(self, x0: float, x1: float, y0: float, y1: float, log_x: bool = False) -> None:
        self.log_x = log_x
        self.x0, self.x1 = (math.log10(x0), math.log10(x1)) if log_x else (x0, x1)
        if self.x1 <= self.x0:
            self.x1 = self.x0 + 1
        self.y0, self.y1 = y0, (y1 if y1 > y0 else y0 + 1)
        self.parts: list[str] = []
        self.legend: list[tuple[str, str]] = []

    def sx(self, x: float) -> float:
        v = math.log10(x) if self.log_x else x
        return ML + (v - self.x0) / (self.x1 - self.x0) * (W - ML - MR)

    def sy(self, y: float) -> float:
        return H - MB - (y - self.y0) / (self.y1 - self.y0) * (H - MT - MB)

    def axes(self, x_label: str, y_label: str, y_ticks: Sequence[tuple[float, str]] | None = None) -> None:
        """Grid, ticks and labels; ``y_ticks``: (value, label) instead of round numbers."""
        p = self.parts
        for y, label in y_ticks or [(y, _tick_label(y)) for y in _nice_ticks(self.y0, self.y1, 4)]:
            yy = self.sy(y)
            p.append(f'<line class="grid" x1="{ML}" x2="{W - MR}" y1="{yy:.1f}" y2="{yy:.1f}"/>')
            p.append(f'<text x="{ML - 6}" y="{yy + 4:.1f}" text-anchor="end">{_e(label)}</text>')
        if self.log_x:
            xs = [10.0**k for k in range(math.ceil(self.x0), math.floor(self.x1) + 1)]
            labels = [_latency_label(x) for x in xs]
        else:
            xs = _nice_ticks(self.x0, self.x1, 8)
            labels = [_tick_label(x) for x in xs]
        for x, label in zip(xs, labels, strict=True):
            xx = self.sx(x)
            p.append(f'<line class="grid" x1="{xx:.1f}" x2="{xx:.1f}" y1="{MT}" y2="{H - MB}"/>')
            p.append(f'<text x="{xx:.1f}" y="{H - MB + 15}" text-anchor="middle">{_e(label)}</text>')
        p.append(f'<line class="axis" x1="{ML}" x2="{W - MR}" y1="{H - MB}" y2="{H - MB}"/>')
        p.append(f'<line class="axis" x1="{ML}" x2="{ML}" y1="{MT}" y2="{H - MB}"/>')
        p.append(f'<text x="{(ML + W - MR) / 2:.0f}" y="{H - 6}" text-anchor="middle">{_e(x_label)}</text>')
        p.append(
            f'<text x="12" y="{(MT + H - MB) / 2:.0f}" text-anchor="middle" '
            f'transform="rotate(-90 12 {(MT + H - MB) / 2:.0f})">{_e(y_label)}</text>'
        )

    def band(self, x0: float, x1: float, label: str) -> None:
        a, b = self.sx(x0), self.sx(max(x1, x0))
        self.parts.append(
            f'<rect class="band" x="{a:.1f}" y="{MT}" width="{max(b - a, 1.0):.1f}" height="{H - MT - MB}"/>'
            f'<text class="band-label" x="{a + 3:.1f}" y="{MT + 11}">{_e(label)}</text>'
        )

    def rect(self, x0: float, x1: float, y0: float, y1: float, colour: str, cls: str, title: str) -> None:
        a, b = self.sx(x0), self.sx(x1)
        top, bottom = self.sy(y1), self.sy(y0)
        self.parts.append(
            f'<rect class="{cls}" x="{a:.1f}" y="{top:.1f}" width="{max(b - a, 0.5):.1f}" '
            f'height="{bottom - top:.1f}" fill="{colour}"><title>{_e(title)}</title></rect>'
        )

    def line(self, name: str, points: Sequence[tuple[float, float]], colour: str, step: bool = False) -> None:
        if not points:
            return
        coords: list[tuple[float, float]] = []
        for i, (x, y) in enumerate(points):
            if step and i:
                coords.append((self.sx(x), self.sy(points[i - 1][1])))
            coords.append((self.sx(x), self.sy(y)))
        if len(coords) == 1:  # one point still draws: a short tick
            coords.append((coords[0][0] + 2, coords[0][1]))
        d = "M" + " L".join(f"{x:.1f},{y:.1f}" for x, y in coords)
        self.parts.append(
            f'<path class="series" data-series="{_e(name)}" data-points="{len(points)}" d="{d}" stroke="{colour}"/>'
        )
        self.legend.append((name, colour))

    def svg(self, label: str) -> str:
        return (
            f'<svg class="chart" viewBox="0 0 {W} {H}" role="img" aria-label="{_e(label)}">'
            + "".join(self.parts)
            + "</svg>"
        )


def _figure(plot_id: str, title: str, plot: Plot, caption: str = "") -> str:
    legend = "".join(f'<span style="--c:{c}">{_e(n)}</span>' for n, c in plot.legend)
    note = f'<div class="note">{_e(caption)}</div>' if caption else ""
    return (
        f'<figure class="plot" id="plot-{_e(plot_id)}"><figcaption>{_e(title)}</figcaption>'
        f'{plot.svg(title)}<div class="legend">{legend}</div>{note}</figure>'
    )


def _colour(table: dict[str, str], key: str, i: int) -> str:
    return table.get(key) or OTHER[i % len(OTHER)]


# --- naming the loads ------------------------------------------------------------------


def load_names(report: dict[str, Any], loads: list[dict[str, Any]]) -> list[str]:
    """Name each load of ``series.loads`` after the report's phase with the same request count
    and batch size (phases in the order the bench runs them); a burst queued by the bench
    itself has no phase entry of its own."""
    ph = report.get("phases") or {}
    ref = ph.get("reference") or {}
    candidates: list[tuple[str, dict[str, Any]]] = []
    for name in report.get("phases_run") or list(ph):
        if name == "reference":
            candidates += [(f"reference {k}", ref[k]) for k in ("single", "batch") if isinstance(ref.get(k), dict)]
        elif isinstance(ph.get(name), dict):
            candidates.append((name, ph[name]))
    used: set[str] = set()
    names = []
    for i, ld in enumerate(loads):
        found = None
        for name, d in candidates:
            if name in used or "requests" not in d:
                continue
            if d["requests"] == ld["requests"] and d.get("batch_size", 1) == ld["per_request"]:
                found = name
                break
        if found is None:
            found = "burst (queued)" if ld["per_request"] > 1 and "burst" in ph else f"load {i + 1}"
        used.add(found)
        names.append(found)
    return names


# --- the plots -------------------------------------------------------------------------


def _timeline_plots(series: dict[str, Any], names: list[str], loads: list[dict[str, Any]]) -> list[str]:
    tl = series.get("timeline") or {}
    t, backlog, deferred, stage = (tl.get(k) or [] for k in ("t", "backlog", "deferred", "stage"))
    if not t:
        return ['<p class="note">No backlog samples in this report: backlog and breaker stage not plotted.</p>']
    end = max(t[-1] + float(series.get("sample_s", 0.25)), max((ld["end"] for ld in loads), default=0.0))
    out = []
    p = Plot(0, end, 0, max(max(backlog), max(deferred or [0]), 1) * 1.1)
    for name, ld in zip(names, loads, strict=True):
        p.band(ld["start"], ld["end"], name)
    p.axes("seconds since the start of the run", "orders")
    p.line("backlog", list(zip(t, backlog, strict=True)), "#1a73e8")
    if any(deferred):
        p.line("deferred syncs", list(zip(t, deferred, strict=True)), "#e8a000")
    out.append(_figure("backlog", "Backlog over time", p, "Shaded: the load phases."))

    levels = {s: i for i, s in enumerate(STAGES)}
    p = Plot(0, end, -0.5, len(STAGES) - 0.5)
    seg_start = 0
    for i in range(1, len(t) + 1):
        if i == len(t) or stage[i] != stage[seg_start]:
            s = stage[seg_start]
            lv = levels.get(s, 0)
            x1 = t[i] if i < len(t) else end
            p.rect(t[seg_start], x1, lv - 0.35, lv + 0.35, STAGE_COLOURS.get(s, "#888"), "stage-seg", s)
            seg_start = i
    p.axes("seconds since the start of the run", "stage", [(lv, s) for s, lv in levels.items()])
    p.line("stage", [(x, levels.get(s, 0)) for x, s in zip(t, stage, strict=True)], "#333", step=True)
    p.legend = [(s, STAGE_COLOURS[s]) for s in STAGES]
    out.append(_figure("stage", "Breaker stage over time", p))
    return out


def _answers_plot(series: dict[str, Any]) -> str:
    per_s: dict[str, list[int]] = series.get("answers_per_s") or {}
    if not any(any(v) for v in per_s.values()):
        return '<p class="note">No answers recorded: answers per second not plotted.</p>'
    n = max(len(v) for v in per_s.values())
    p = Plot(0, n, 0, max(max(v) for v in per_s.values()) * 1.1)
    p.axes("seconds since the start of the run", "answers / s")
    for i, (status, counts) in enumerate(sorted(per_s.items())):
        pts = [(sec + 0.5, c) for sec, c in enumerate(counts)]
        label = f"{STATUS_NAMES.get(status, status)} ({sum(counts):,})"
        p.line(label, pts, _colour(STATUS_COLOURS, status, i))
    return _figure("answers", "Answers per second by status", p)


def _cdf(hist: dict[str, int], per_decade: int) -> tuple[list[tuple[float, float]], int]:
    bins = sorted((int(k), n) for k, n in hist.items() if n)
    total = sum(n for _k, n in bins)
    if not total:
        return [], 0
    pts = [(10 ** (bins[0][0] / per_decade), 0.0)]
    cum = 0
    for k, n in bins:
        cum += n
        pts.append((10 ** ((k + 1) / per_decade), cum / total))
    return pts, total


def _quantile(pts: list[tuple[float, float]], q: float) -> float:
    return next((x for x, share in pts if share >= q), pts[-1][0])


def _distribution(
    plot_id: str, title: str, hists: dict[str, dict[str, int]], per_decade: int, colours: dict[str, str], note: str
) -> str | None:
    curves = {}
    for name, h in hists.items():
        pts, total = _cdf(h, per_decade)
        if total:
            curves[name] = (pts, total)
    if not curves:
        return None
    xs = [x for pts, _n in curves.values() for x, _s in pts]
    lo = 10 ** math.floor(math.log10(min(xs)))
    hi = 10 ** math.ceil(math.log10(max(xs)))
    if hi <= lo:
        hi = lo * 10
    p = Plot(lo, hi, 0, 1, log_x=True)
    p.axes("latency (log scale)", "share at or below", [(q / 4, f"{q * 25} %") for q in range(5)])
    for i, (name, (pts, total)) in enumerate(curves.items()):
        label = (
            f"{name} (n={total:,}, p50 ≈ {_latency_label(_quantile(pts, 0.5))}, "
            f"p99 ≈ {_latency_label(_quantile(pts, 0.99))})"
        )
        p.line(label, pts, _colour(colours, name, i))
    return _figure(plot_id, title, p, note)


def _latency_plots(report: dict[str, Any], series: dict[str, Any], names: list[str]) -> list[str]:
    per_decade = int(series.get("bins_per_decade") or 20)
    out = []
    for name, ld in zip(names, series.get("loads") or [], strict=True):
        fig = _distribution(
            f"ack-{name.replace(' ', '-')}",
            f"Ack latency per customer class: {name}",
            ld.get("ack_hist") or {},
            per_decade,
            CLASS_COLOURS,
            "Class as sent: vip tier, a new customer, a returning one (batch: a batch request).",
        )
        if fig:
            out.append(fig)
    for phase, d in (report.get("phases") or {}).items():
        e2e = d.get("e2e_ms") if isinstance(d, dict) else None
        if not e2e:
            continue
        hists = {prio: v["hist"] for prio, v in e2e.items() if isinstance(v, dict) and v.get("hist")}
        fig = _distribution(
            f"e2e-{phase}",
            f"End-to-end latency per priority: {phase}",
            hists,
            per_decade,
            CLASS_COLOURS,
            "Accepted to executed, from the status records of the sampled orders.",
        )
        if fig:
            out.append(fig)
    if not out:
        out.append('<p class="note">No latency histograms in this report.</p>')
    return out


# --- the page --------------------------------------------------------------------------


def _rows(rows: Iterable[tuple[str, str]]) -> str:
    return "".join(f'<tr><th>{_e(k)}</th><td class="num">{_e(v)}</td></tr>' for k, v in rows)


def _summary(report: dict[str, Any]) -> str:
    s = report.get("summary") or {}
    rows = [
        ("accepted orders/s, single", _fmt((s.get("accepted_per_s") or {}).get("single"))),
        ("accepted orders/s, batch", _fmt((s.get("accepted_per_s") or {}).get("batch"))),
        ("executed orders/s, capacity", _fmt((s.get("executed_per_s") or {}).get("capacity"))),
        ("executed orders/s, sustained", _fmt((s.get("executed_per_s") or {}).get("sustained"))),
    ]
    for phase, q in (s.get("ack_ms") or {}).items():
        rows.append((f"ack {phase} p50 / p99", f"{_fmt(q.get('p50'))} / {_fmt(q.get('p99'))} ms"))
    for phase, v in (s.get("drain_s") or {}).items():
        rows.append((f"drain {phase}", _fmt(v, " s")))
    for phase, v in (s.get("peak_backlog") or {}).items():
        rows.append((f"peak backlog {phase}", _fmt(v)))
    rows.append(("Redis memory per queued order", _fmt(s.get("redis_memory_per_queued_order_bytes"), " B")))
    rows.append(("lost / duplicate effects", f"{_fmt(s.get('lost'))} / {_fmt(s.get('duplicate_effects'))}"))
    return f"<table>{_rows(rows)}</table>"


def _targets(report: dict[str, Any]) -> str:
    out = []
    for t in report.get("targets") or []:
        cls, word = {True: ("ok", "ok"), False: ("miss", "MISS"), None: ("na", "-")}[t.get("ok")]
        out.append(
            f'<tr><td class="{cls}">{word}</td><td>{_e(t.get("name"))}</td><td>{_e(t.get("target"))}</td>'
            f'<td class="num">{_e(_fmt(t.get("value")))}</td></tr>'
        )
    return f"<table>{''.join(out)}</table>" if out else ""


def render(report: dict[str, Any]) -> str:
    """The HTML page of a bench report (the dict ``orderq bench --json`` writes)."""
    series = report.get("series") or {}
    loads = series.get("loads") or []
    names = load_names(report, loads)
    m = report.get("machine") or {}
    inst = report.get("instance") or {}
    head = (
        f"<h1>orderq bench · run {_e(report.get('run_id', '?'))}</h1>"
        f'<p class="meta">{_e(report.get("started_at", ""))} · {_e(report.get("elapsed_s", "?"))} s · '
        f"phases {_e(', '.join(report.get('phases_run') or []))}</p>"
        f'<p class="meta">{_e(m.get("cpu_model", "?"))}, {_e(m.get("cores_usable", "?"))}/{_e(m.get("cores", "?"))} '
        f"cores, {_e(m.get('memory_gb', '?'))} GB · {_e(m.get('python', ''))} · "
        f"{_e(m.get('server', ''))} {_e(m.get('server_version', ''))}</p>"
        f'<p class="meta">instance {_e(inst.get("mode", "?"))} · durability {_e(inst.get("durability", "?"))} · '
        f"{_e(inst.get('partitions', '?'))} partitions · processes {_e(inst.get('processes', ''))}</p>"
    )
    body = [
        head,
        "<h2>Summary</h2>",
        _summary(report),
        "<h2>Targets</h2>",
        _targets(report),
        "<h2>Backlog and breaker stage</h2>",
        *_timeline_plots(series, names, loads),
        "<h2>Answers</h2>",
        _answers_plot(series),
        "<h2>Latency distributions</h2>",
        *_latency_plots(report, series, names),
    ]
    notes = report.get("notes") or []
    if notes:
        body.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>orderq bench {_e(report.get('run_id', ''))}</title><style>{STYLE}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )


def write(report: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(render(report), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m loadtest.report_html REPORT.json OUT.html", file=sys.stderr)
        return 2
    write(json.loads(Path(args[0]).read_text(encoding="utf-8")), args[1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
