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
  if (n === null || n === undefined) return "\u2013";
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
function ago(s) {
  if (s < 120) return Math.round(s) + " s";
  if (s < 7200) return Math.round(s / 60) + " min";
  return (s / 3600).toFixed(1) + " h";
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

  const lc = doc.lifecycle || {}, lt = $("lifecycle");
  lt.replaceChildren();
  for (const [label, name] of [["cancelled", "cancelled"], ["intercepts in flight", "intercepts_in_flight"],
    ["shipped", "shipped"], ["delivered", "delivered"], ["returned", "returned"],
    ["source conflicts", "source_conflicts"]]) {
    const tr = el("tr");
    tr.append(el("td", "", label), el("td", "n", fmt(lc[name] || 0)));
    lt.append(tr);
  }

  const dl = doc.dead_letters, dt = $("dead");
  setText("dead-count", fmt(dl.unresolved) + " unresolved · " + fmt(st.totals.dead_letters) + " ever");
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
    hl.append(el("li", "", h.province + (h.reason ? " \u2013 " + h.reason : "") + since));
  }

  const cn = $("connectors");
  cn.replaceChildren();
  if (!doc.connectors.length) {
    const tr = el("tr");
    tr.append(el("td", "muted", "none configured"));
    cn.append(tr);
  }
  for (const c of doc.connectors) {
    const tr = el("tr"), state = el("td", c.failing ? "err" : "muted", c.failing ? c.last_error || "failing" : "ok");
    state.title = c.last_error ? c.last_error + " (" + c.last_error_at + ")" : "";
    tr.append(el("td", "", c.name), el("td", "n", c.lag_s === null ? "\u2013" : ago(c.lag_s)),
              el("td", "n", fmt(c.counts.accepted)), state);
    tr.title = c.platform + " \u2192 " + c.channel + (c.owner ? " \u00b7 polled by " + c.owner : " \u00b7 no process");
    cn.append(tr);
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
      setConn("signed out: open /dashboard?token=\u2026 again", "bad");
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
