"""``GET /dashboard``: the operators' live page (contract §4), and its data endpoint.

One self-contained page: inline HTML, CSS and JavaScript, charts drawn as SVG by the
page itself, nothing fetched from the internet, no build step. It polls
``/dashboard/data`` once a second.

Cheap at any load and any number of viewers: the data document is computed at most
once per ``CACHE_S`` per ingress process, and concurrent viewers await the same
computation. The chart's history is sampled once a second by the breaker process
(:mod:`orderq.history`); this process keeps a copy and reads only the newest samples
on each refresh, and a page asks only for the samples it has not seen (``?since=``).

Auth: ``Authorization: Bearer $ORDERQ_ADMIN_TOKEN``, or once ``?token=…`` which sets an
HttpOnly, SameSite=Strict cookie and redirects to ``/dashboard`` (the token leaves the
address bar and the history). The cookie holds an HMAC of the admin token, not the
token: it opens the dashboard and nothing else.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from collections import deque
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from ingress import responses
from ingress.routes import Refusal, _bearer, _retry_after
from orderq import deadletters, history, keys, stats
from orderq.client import UNAVAILABLE
from orderq.control import HOLDS_KEY
from orderq.metrics import REASONS_KEY

CACHE_S = 0.5  # one computation per half second per process, however many pages poll
HEAD_READ = 10  # newest samples read per refresh; more new ones than this means a gap: read all
COOKIE = "orderq_dashboard"
COOKIE_MAX_AGE_S = 12 * 3600  # one shift; then the token is asked for again
NO_STORE = {"Cache-Control": "no-store"}


class Dashboard:
    def __init__(self, state: Any) -> None:
        self.s = state  # app.state: settings, redis, auth
        self.meter = stats.RateMeter()
        self.history: deque[dict[str, Any]] = deque(maxlen=keys.HISTORY_LEN)
        self._doc: dict[str, Any] | None = None
        self._at = 0.0
        self._task: asyncio.Task[dict[str, Any]] | None = None
        admin = (state.settings.admin_token or "").encode()
        self._session = hmac.new(admin, b"orderq-dashboard-session", hashlib.sha256).hexdigest()

    # --- auth -----------------------------------------------------------------------
    def _check(self, request: Request) -> None:
        """Admin bearer token or the dashboard cookie; raises :class:`Refusal`."""
        auth = self.s.auth
        if not auth.enabled:
            return
        if _bearer(request) is not None:
            auth.admin_only(request)
            return
        cookie = request.cookies.get(COOKIE)
        if cookie and auth.admin and hmac.compare_digest(cookie.encode(), self._session.encode()):
            return
        raise Refusal(
            401,
            "unauthorized",
            "the dashboard takes the admin token: open /dashboard?token=<ORDERQ_ADMIN_TOKEN> once, "
            "or send Authorization: Bearer <ORDERQ_ADMIN_TOKEN>",
            headers={"WWW-Authenticate": "Bearer"},
        )

    def _set_cookie(self, request: Request, response: Response) -> None:
        if self.s.auth.enabled and self.s.auth.admin:
            response.set_cookie(
                COOKIE,
                self._session,
                max_age=COOKIE_MAX_AGE_S,
                path="/dashboard",
                secure=request.url.scheme == "https",
                httponly=True,
                samesite="strict",
            )

    # --- handlers -------------------------------------------------------------------
    async def page(self, request: Request) -> Response:
        token = request.query_params.get("token")
        if token is not None:
            auth = self.s.auth
            if auth.enabled and not (auth.admin and hmac.compare_digest(token.encode(), auth.admin.encode())):
                return _denied(request, Refusal(401, "unauthorized", "the token in the address is not the admin token"))
            redirect = RedirectResponse("/dashboard", 303, headers=NO_STORE)
            self._set_cookie(request, redirect)
            return redirect
        try:
            self._check(request)
        except Refusal as r:
            return _denied(request, r)
        resp = HTMLResponse(PAGE, headers={**NO_STORE, **PAGE_HEADERS})
        if _bearer(request) is not None:
            self._set_cookie(request, resp)  # the page's own polls carry no header
        return resp

    async def data(self, request: Request) -> Response:
        try:
            self._check(request)
            since = _since(request.query_params.get("since"))
            doc = await self.document()
        except Refusal as r:
            return r.response()
        except UNAVAILABLE as exc:
            return responses.error(503, "unavailable", f"Redis: {exc}", headers=_retry_after())
        samples: list[dict[str, Any]] = []
        for s in reversed(self.history):
            if since is not None and s["ts"] <= since:
                break
            samples.append(s)
        samples.reverse()
        newest = self.history[-1]["ts"] if self.history else None
        return responses.json({**doc, "history": samples, "history_newest": newest}, headers=NO_STORE)

    # --- the shared computation -----------------------------------------------------
    async def document(self) -> dict[str, Any]:
        """The cached document; at most one computation in flight, every caller awaits it."""
        if self._doc is not None and time.monotonic() - self._at < CACHE_S:
            return self._doc
        task = self._task
        if task is None:
            task = self._task = asyncio.create_task(self._refresh())
            task.add_done_callback(_retrieve)
        return await asyncio.shield(task)  # a viewer that goes away does not cancel the others' work

    async def _refresh(self) -> dict[str, Any]:
        try:
            doc = await self._compute()
            self._doc, self._at = doc, time.monotonic()
            return doc
        finally:
            self._task = None

    async def _compute(self) -> dict[str, Any]:
        r = self.s.redis
        doc = await stats.compute(r, self.meter)
        pipe = r.client.pipeline(transaction=False)
        pipe.lrange(keys.HISTORY_KEY, 0, (HEAD_READ if self.history else keys.HISTORY_LEN) - 1)
        pipe.hgetall(REASONS_KEY)
        pipe.hgetall(keys.ALERTS_STATE_KEY)
        pipe.hgetall(HOLDS_KEY)
        raw, reasons, alerts, holds = await pipe.execute()
        dead = await deadletters.summary(r)  # unresolved: count and the oldest few, with their error
        if not self._merge(raw, complete=len(raw) < HEAD_READ or not self.history):
            self._merge(await r.client.lrange(keys.HISTORY_KEY, 0, keys.HISTORY_LEN - 1), complete=True)
        active = []
        for k, v in sorted(alerts.items()):
            if not k.startswith(b"_"):
                active.append({"alert": k.decode(), **msgspec.json.decode(v)})
        settings = self.s.settings
        return {
            "stats": doc,
            "reasons": {k.decode(): int(v) for k, v in sorted(reasons.items(), key=lambda kv: -int(kv[1]))},
            "alerts": active,
            "holds": sorted(
                ({"province": k.decode(), **msgspec.json.decode(v)} for k, v in holds.items()),
                key=lambda h: (str(h.get("since", "")), h["province"]),
            ),
            "dead_letters": dead,
            "thresholds": {
                "open_depth": settings.breaker_open_depth,
                "close_depth": settings.breaker_close_depth,
                "shed_depth": settings.shed_depth,
                "shed_vip_depth": settings.shed_vip_depth,
            },
            "computed_at": time.time(),
        }

    def _merge(self, raw: list[bytes], complete: bool) -> bool:
        """Add the samples of ``raw`` (newest first) not seen yet; False when all must be read.

        ``complete``: ``raw`` is the whole list, so it replaces what is kept.
        """
        if not raw:
            self.history.clear()  # nothing sampled yet, or the keyspace was reset
            return True
        samples = [history.decode(x) for x in reversed(raw)]
        if complete:
            self.history.clear()
            new = samples
        else:
            last = self.history[-1]["ts"]
            if samples[-1]["ts"] < last or samples[0]["ts"] > last:
                return False  # the list went back (reset, another clock) or ran ahead of HEAD_READ
            new = [s for s in samples if s["ts"] > last]
        prev = self.history[-1] if self.history else None
        for s in new:
            self.history.append(history.with_rates(prev, s))
            prev = s
        return True


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a failure as seen: every waiter may have gone before it came."""
    if not task.cancelled():
        task.exception()


def _since(raw: str | None) -> float | None:
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if value != value or value in (float("inf"), float("-inf")):
        raise Refusal(422, "invalid_request", "since must be a sample time in seconds since the epoch")
    return value


def _denied(request: Request, refusal: Refusal) -> Response:
    """HTML for a browser, the contract's JSON error for anything else."""
    if "text/html" not in request.headers.get("accept", ""):
        return refusal.response()
    html = DENIED.replace("{status}", str(refusal.status)).replace("{message}", _escape(refusal.message))
    return HTMLResponse(html, refusal.status, headers={**NO_STORE, **(refusal.headers or {})})


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def routes(state: Any) -> list[Route]:
    d = Dashboard(state)
    return [
        Route("/dashboard", d.page, methods=["GET"]),
        Route("/dashboard/data", d.data, methods=["GET"]),
    ]


DENIED = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>orderq dashboard: {status}</title></head>
<body><h1>orderq dashboard: {status}</h1>
<p>{message}</p>
<p>Open <code>/dashboard?token=&lt;ORDERQ_ADMIN_TOKEN&gt;</code> once: the page keeps a cookie
(HttpOnly, SameSite=Strict) for this browser and takes the token out of the address.
<code>orderq up</code> writes a generated admin token to <code>ORDERQ_DATA_DIR/tokens.env</code>.</p>
</body></html>
"""

STYLE = """
:root { --bg:#f4f5f7; --card:#fff; --ink:#1b1f24; --muted:#5f6b7a; --line:#e3e6ea;
  --green:#1e8e3e; --amber:#e8a000; --red:#d93025; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.4 system-ui, -apple-system, "Segoe UI", "Noto Sans CJK SC", sans-serif;
  background:var(--bg); color:var(--ink); }
header { display:flex; align-items:center; gap:24px; padding:12px 20px; background:var(--card);
  border-bottom:1px solid var(--line); flex-wrap:wrap; }
h1 { font-size:18px; margin:0; }
h2 { font-size:13px; margin:0 0 8px; color:var(--muted); font-weight:600; text-transform:uppercase;
  letter-spacing:.04em; }
.stage { min-width:130px; text-align:center; padding:6px 14px; border-radius:6px; color:#fff;
  font-weight:700; letter-spacing:.06em; background:#888; }
.stage[data-stage="normal"] { background:var(--green); }
.stage[data-stage="degraded"] { background:var(--amber); color:#1b1f24; }
.stage[data-stage="shedding"] { background:var(--red); }
.kv { display:flex; flex-direction:column; }
.label { font-size:11px; color:var(--muted); text-transform:uppercase; letter-spacing:.04em; }
.big { font-size:26px; font-weight:700; font-variant-numeric:tabular-nums; }
.muted { color:var(--muted); }
.big.bad { color:var(--red); }
h2.sub { margin-top:12px; }
.conn.ok::before { content:"\\25CF  "; color:var(--green); }
.conn.bad { color:var(--red); font-weight:600; }
#alerts:empty { display:none; }
#alerts { padding:8px 20px 0; }
.alert { background:#fdecea; border-left:4px solid var(--red); padding:6px 10px; margin-bottom:6px; }
main { display:grid; grid-template-columns:repeat(auto-fit, minmax(300px, 1fr)); gap:14px; padding:14px 20px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:12px 14px; min-width:0; }
.wide { grid-column:1 / -1; }
.nums { display:grid; grid-template-columns:repeat(3, 1fr); gap:8px; }
.nums .big { font-size:22px; }
table { border-collapse:collapse; width:100%; font-variant-numeric:tabular-nums; }
td { padding:3px 4px; border-bottom:1px solid var(--line); }
td.n { text-align:right; font-weight:600; }
td.err { max-width:220px; overflow:hidden; text-overflow:ellipsis; white-space:nowrap; color:var(--red); }
svg.chart { width:100%; height:240px; display:block; }
svg.chart text { font-size:11px; fill:var(--muted); }
svg.chart .grid { stroke:var(--line); }
svg.chart .thr { stroke-dasharray:5 4; stroke-width:1.2; }
.legend { display:flex; flex-wrap:wrap; gap:4px 16px; margin-top:6px; font-size:12px; }
.sw { display:inline-block; width:12px; height:3px; vertical-align:middle; margin-right:5px; }
.bar { height:14px; background:#8ab4f8; border-radius:2px; }
.reason { display:grid; grid-template-columns:minmax(120px, 40%) 1fr auto; gap:8px; align-items:center;
  margin:3px 0; font-size:12px; }
.reason .name { overflow:hidden; text-overflow:ellipsis; white-space:nowrap; }
.chip { display:inline-block; padding:1px 8px; margin:2px 4px 2px 0; border-radius:10px; background:#fce8b2; }
ul { margin:0; padding-left:18px; }
footer { padding:0 20px 16px; color:var(--muted); font-size:12px; }
"""

SCRIPT = """
"use strict";
const WINDOW_S = 600, POLL_MS = 1000, SHANGHAI_MS = 8 * 3600 * 1000;
const DEPTH = [
  ["backlog", "#1b1f24", 2.6, s => s.backlog],
  ["intake", "#1a73e8", 1.4, s => s.depth.intake],
  ["ready vip", "#9334e6", 1.4, s => s.depth.vip],
  ["ready new", "#12b5cb", 1.4, s => s.depth.new],
  ["ready regular", "#e37400", 1.4, s => s.depth.regular],
  ["review", "#d01884", 1.4, s => s.depth.review],
  ["deferred", "#80868b", 1.4, s => s.depth.deferred],
];
const RATES = [
  ["accepted/s", "#1a73e8", 2, s => s.rates.accepted],
  ["validated/s", "#e37400", 2, s => s.rates.validated],
  ["executed/s", "#1e8e3e", 2, s => s.rates.executed],
  ["rejected/s", "#d93025", 1.4, s => s.rates.rejected],
];
const SVGNS = "http://www.w3.org/2000/svg";
let hist = [], lastTs = 0, busy = false;
const $ = id => document.getElementById(id);

// Asia/Shanghai has no daylight saving time: UTC+8 always, no time zone database needed.
function shanghai(ts, date) {
  const iso = new Date(ts * 1000 + SHANGHAI_MS).toISOString();
  return date ? iso.slice(0, 10) + " " + iso.slice(11, 19) : iso.slice(11, 19);
}
function fmt(n) {
  if (n === null || n === undefined) return "\\u2013";
  if (Number.isInteger(n) || Math.abs(n) >= 100) return Math.round(n).toLocaleString("en-US");
  return n.toFixed(1);
}
function short(n) {
  if (n >= 1e6) return (n / 1e6).toFixed(n >= 1e7 ? 0 : 1) + "M";
  if (n >= 1e4) return Math.round(n / 1e3) + "k";
  if (n >= 1e3) return (n / 1e3).toFixed(1) + "k";
  return String(Math.round(n * 10) / 10);
}
function niceMax(v) {
  if (v <= 5) return 5;
  const p = Math.pow(10, Math.floor(Math.log10(v))), m = v / p;
  return (m <= 1 ? 1 : m <= 2 ? 2 : m <= 5 ? 5 : 10) * p;
}
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
function svgEl(tag, attrs) {
  const e = document.createElementNS(SVGNS, tag);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  return e;
}
function setText(id, text) { const e = $(id); if (e.textContent !== text) e.textContent = text; }
function setConn(text, cls) { const c = $("conn"); c.textContent = text; c.className = "conn " + cls; }

function chart(svg, legend, series, samples, lines) {
  const W = Math.max(svg.clientWidth || 800, 300), H = 240, L = 52, R = 10, T = 10, B = 24;
  svg.setAttribute("viewBox", "0 0 " + W + " " + H);
  // The last ten minutes; a younger history is spread over at least one minute, not squeezed right.
  const t1 = samples.length ? samples[samples.length - 1].ts : Date.now() / 1000;
  const span = Math.min(WINDOW_S, Math.max(60, samples.length ? t1 - samples[0].ts : 0)), t0 = t1 - span;
  let top = 0;
  for (const [, , , f] of series) for (const s of samples) top = Math.max(top, f(s) || 0);
  const shown = (lines || []).filter(l => l.value <= Math.max(top * 1.5, 10));
  for (const l of shown) top = Math.max(top, l.value);
  top = niceMax(top * 1.05);
  const x = t => L + (t - t0) / span * (W - L - R), y = v => T + (1 - v / top) * (H - T - B);
  svg.replaceChildren();
  for (let i = 0; i <= 4; i++) {
    const v = top * i / 4;
    svg.append(svgEl("line", {class: "grid", x1: L, x2: W - R, y1: y(v), y2: y(v)}));
    const t = svgEl("text", {x: L - 6, y: y(v) + 4, "text-anchor": "end"});
    t.textContent = short(v);
    svg.append(t);
  }
  const step = [10, 15, 30, 60, 120].find(s => span / s <= 6) || 120;
  for (let t = Math.ceil(t0 / step) * step; x(t) <= W - R - 30; t += step) {
    const lab = svgEl("text", {x: x(t), y: H - 6, "text-anchor": "middle"});
    lab.textContent = step < 60 ? shanghai(t) : shanghai(t).slice(0, 5);
    svg.append(lab);
  }
  shown.forEach((l, i) => {
    svg.append(svgEl("line", {class: "thr", x1: L, x2: W - R, y1: y(l.value), y2: y(l.value), stroke: l.color}));
    // Labels alternate between the right and the middle, so two close lines stay legible.
    const t = svgEl("text", {x: i % 2 ? (L + W - R) / 2 : W - R - 4, y: y(l.value) - 4, "text-anchor": "end"});
    t.textContent = l.label + " " + short(l.value);
    svg.append(t);
  });
  legend.replaceChildren();
  for (const [name, color, width, f] of series) {
    const pts = samples.map(s => x(s.ts).toFixed(1) + "," + y(f(s) || 0).toFixed(1)).join(" ");
    const last = samples.length ? f(samples[samples.length - 1]) || 0 : 0;
    svg.append(svgEl("polyline", {points: pts, fill: "none", stroke: color, "stroke-width": width,
      "stroke-linejoin": "round", "data-series": name, "data-last": last}));
    const item = el("span");
    const sw = el("span", "sw");
    sw.style.background = color;
    item.append(sw, name + " " + fmt(last));
    legend.append(item);
  }
}

function render(doc) {
  const st = doc.stats, stageEl = $("stage");
  if (stageEl.dataset.stage !== st.stage) {
    stageEl.dataset.stage = st.stage;
    stageEl.textContent = st.stage.toUpperCase();
  }
  setText("backlog", fmt(st.backlog));
  setText("r-accepted", fmt(st.rates.accepted_per_s));
  setText("r-validated", fmt(st.rates.validated_per_s));
  setText("r-executed", fmt(st.rates.executed_per_s));
  setText("c-review", fmt(st.depth.review));
  setText("c-dead", fmt(doc.dead_letters.unresolved));
  setText("c-held", fmt(st.held || 0));
  setText("c-rejected", fmt(st.totals.rejected));
  setText("c-executed", fmt(st.totals.executed));
  setText("c-deferred", fmt(st.depth.deferred));
  $("c-dead").classList.toggle("bad", doc.dead_letters.unresolved > 0);
  setText("updated", "updated " + shanghai(doc.computed_at, true));

  const d = st.depth, rows = [["intake", d.intake], ["ready vip", d.ready.vip], ["ready new", d.ready.new],
    ["ready regular", d.ready.regular], ["review", d.review], ["deferred syncs", d.deferred], ["held", st.held || 0]];
  const tb = $("depth");
  tb.replaceChildren();
  for (const [k, v] of rows) {
    const tr = el("tr");
    tr.append(el("td", "", k), el("td", "n", fmt(v)));
    tb.append(tr);
  }

  const th = doc.thresholds;
  chart($("chart-depth"), $("legend-depth"), DEPTH, hist, [
    {value: th.open_depth, label: "degraded at", color: "#e8a000"},
    {value: th.shed_depth, label: "shedding at", color: "#d93025"},
  ]);
  chart($("chart-rates"), $("legend-rates"), RATES, hist.slice(1), []);

  const rs = $("reasons"), entries = Object.entries(doc.reasons).slice(0, 12);
  rs.replaceChildren();
  if (!entries.length) rs.append(el("div", "muted", "none yet"));
  const max = entries.length ? entries[0][1] : 1;
  for (const [name, n] of entries) {
    const row = el("div", "reason"), bar = el("div", "bar");
    bar.style.width = Math.max(2, 100 * n / max) + "%";
    const wrap = el("div");
    wrap.append(bar);
    row.append(el("span", "name", name), wrap, el("span", "n", fmt(n)));
    row.title = name;
    rs.append(row);
  }

  const al = $("alerts");
  al.replaceChildren();
  for (const a of doc.alerts) {
    const since = a.since ? shanghai(Date.parse(a.since) / 1000) + " " : "";
    al.append(el("div", "alert", since + a.kind + ": " + (a.text || a.alert)));
  }

  const dl = doc.dead_letters, dt = $("dead");
  setText("dead-count", fmt(dl.unresolved) + " unresolved \u00b7 " + fmt(st.totals.dead_letters) + " ever");
  dt.replaceChildren();
  for (const d of dl.oldest) {
    const tr = el("tr"), err = el("td", "err", d.error);
    err.title = d.error;
    tr.append(el("td", "", shanghai(Date.parse(d.since) / 1000, true)), el("td", "", d.stage),
              el("td", "", d.order_key + (d.action ? " " + d.action : "")), err);
    tr.title = d.id;
    dt.append(tr);
  }

  const hl = $("holds");
  hl.replaceChildren();
  if (!doc.holds.length) hl.append(el("li", "muted", "none"));
  for (const h of doc.holds) {
    const since = h.since ? " (since " + shanghai(Date.parse(h.since) / 1000, true) + ")" : "";
    hl.append(el("li", "", h.province + (h.reason ? " \\u2013 " + h.reason : "") + since));
  }

  const ws = $("workers"), count = {};
  ws.replaceChildren();
  for (const w of st.workers) (count[w.stage] = count[w.stage] || []).push(w.host + ":" + w.pid);
  if (!st.workers.length) {
    const tr = el("tr");
    tr.append(el("td", "muted", "no live workers"));
    ws.append(tr);
  }
  for (const [stage, list] of Object.entries(count)) {
    const tr = el("tr");
    tr.append(el("td", "", stage), el("td", "n", String(list.length)), el("td", "muted", list.join(", ")));
    ws.append(tr);
  }
  const pz = $("paused");
  pz.replaceChildren();
  if (!st.paused.length) pz.append(el("span", "muted", "none"));
  for (const p of st.paused) pz.append(el("span", "chip", p));
}

async function poll() {
  if (busy) return;
  busy = true;
  try {
    const r = await fetch(lastTs ? "/dashboard/data?since=" + lastTs : "/dashboard/data",
                          {cache: "no-store", credentials: "same-origin"});
    if (r.status === 401 || r.status === 403) {
      setConn("signed out: open /dashboard?token=\\u2026 again", "bad");
      return;
    }
    if (!r.ok) { setConn("server answered " + r.status, "bad"); return; }
    const doc = await r.json();
    // History gone or moved back (keyspace reset, another clock): start over. A second
    // ingress process a sample behind this page is not that: it just brings nothing new.
    if (doc.history_newest === null || doc.history_newest < lastTs - 10) { hist = []; lastTs = 0; }
    for (const s of doc.history) if (s.ts > lastTs) hist.push(s);
    if (hist.length) lastTs = hist[hist.length - 1].ts;
    while (hist.length && hist[0].ts < lastTs - WINDOW_S) hist.shift();
    render(doc);
    setConn("live", "ok");
  } catch (e) {
    setConn("no answer from the server (" + e.message + ")", "bad");
  } finally {
    busy = false;
  }
}
setInterval(poll, POLL_MS);
poll();
"""

BODY = """
<header>
  <h1>orderq</h1>
  <div id="stage" class="stage" data-stage="">&ndash;</div>
  <div class="kv"><span class="label">backlog</span><span id="backlog" class="big">&ndash;</span></div>
  <div class="kv"><span class="label">accepted /s</span><span id="r-accepted" class="big">&ndash;</span></div>
  <div class="kv"><span class="label">validated /s</span><span id="r-validated" class="big">&ndash;</span></div>
  <div class="kv"><span class="label">executed /s</span><span id="r-executed" class="big">&ndash;</span></div>
  <div class="kv"><span class="label">review queue</span><span id="c-review" class="big">&ndash;</span></div>
  <div class="kv"><span class="label">dead letters</span><span id="c-dead" class="big">&ndash;</span></div>
  <div class="kv"><span id="updated" class="muted"></span><span id="conn" class="conn">connecting&hellip;</span></div>
</header>
<section id="alerts"></section>
<main>
  <div class="card wide"><h2>Backlog and depth per stage &middot; last 10 minutes</h2>
    <svg id="chart-depth" class="chart" role="img" aria-label="backlog and depth per stage"></svg>
    <div id="legend-depth" class="legend"></div></div>
  <div class="card wide"><h2>Orders per second</h2>
    <svg id="chart-rates" class="chart" role="img" aria-label="orders per second"></svg>
    <div id="legend-rates" class="legend"></div></div>
  <div class="card"><h2>Depth now</h2><table><tbody id="depth"></tbody></table></div>
  <div class="card"><h2>Totals</h2><table><tbody>
    <tr><td>executed</td><td id="c-executed" class="n"></td></tr>
    <tr><td>rejected</td><td id="c-rejected" class="n"></td></tr>
    <tr><td>held (region holds)</td><td id="c-held" class="n"></td></tr>
    <tr><td>deferred syncs waiting</td><td id="c-deferred" class="n"></td></tr>
  </tbody></table></div>
  <div class="card"><h2>Rejection and review reasons</h2><div id="reasons"></div></div>
  <div class="card"><h2>Dead letters</h2><div id="dead-count" class="muted"></div>
    <table><tbody id="dead"></tbody></table>
    <div class="muted">oldest first; <code>orderq dead-letters list|replay|discard</code></div></div>
  <div class="card"><h2>Region holds</h2><ul id="holds"></ul></div>
  <div class="card"><h2>Workers</h2><table><tbody id="workers"></tbody></table>
    <h2 class="sub">Paused stages</h2><div id="paused"></div></div>
</main>
<footer>Times are Asia/Shanghai (UTC+8). The page asks for new data every second; the
server computes it at most twice a second for every viewer together.</footer>
"""


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


PAGE = (
    '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
    '<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">'
    f"<title>orderq dashboard</title><style>{STYLE}</style></head><body>{BODY}<script>{SCRIPT}</script></body></html>"
)
# Only this page's own script and style run: nothing else, from anywhere.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        f"default-src 'none'; script-src {_csp_hash(SCRIPT)}; style-src {_csp_hash(STYLE)}; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}
