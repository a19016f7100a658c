"""The status page itself: one HTML document with inline CSS and JS, no external assets.

It polls ``api/snapshot`` every second and redraws: engine header, counters, throughput over time
as inline SVG, the workers table and the tasks table with prefill progress bars. Every value from
the snapshot goes in through ``textContent`` or SVG attributes, never as HTML.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>tilerun status</title>
<style>
  :root { --bg:#f6f7f9; --card:#fff; --ink:#1d232b; --mute:#66707c; --line:#e1e5ea;
          --pre:#2f6fdf; --dec:#e07a1f; --ok:#2e9d57; --bad:#d13b3b; --run:#2f6fdf; }
  * { box-sizing: border-box; }
  body { margin:0; font:14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
         background:var(--bg); color:var(--ink); }
  header { display:flex; align-items:baseline; gap:16px; flex-wrap:wrap; padding:12px 20px;
           background:#1d232b; color:#fff; }
  header h1 { font-size:18px; margin:0; letter-spacing:.5px; }
  header .meta { color:#b9c2cc; font-size:13px; }
  #live { margin-left:auto; font-size:12px; color:#b9c2cc; }
  #live.ok::before { content:"\\25CF "; color:#4cd17f; }
  #live.stale::before { content:"\\25CF "; color:#e0b31f; }
  #live.err::before { content:"\\25CF "; color:#ff6b6b; }
  main { padding:14px 20px; display:grid; gap:14px; }
  .cards { display:grid; grid-template-columns:repeat(auto-fit, minmax(118px, 1fr)); gap:10px; }
  .card, section { background:var(--card); border:1px solid var(--line); border-radius:8px; }
  .card { padding:8px 10px; }
  .card .k { color:var(--mute); font-size:12px; white-space:nowrap; overflow:hidden;
             text-overflow:ellipsis; }
  .card .v { font-size:20px; font-weight:600; font-variant-numeric:tabular-nums; }
  section { padding:10px 14px; }
  section h2 { font-size:14px; margin:0 0 8px; color:var(--mute); text-transform:uppercase;
               letter-spacing:.6px; }
  table { width:100%; border-collapse:collapse; font-variant-numeric:tabular-nums; }
  th { text-align:left; font-weight:600; color:var(--mute); font-size:12px;
       border-bottom:1px solid var(--line); padding:4px 8px; }
  td { border-bottom:1px solid var(--line); padding:5px 8px; vertical-align:middle; }
  tr:last-child td { border-bottom:none; }
  .bar { position:relative; height:16px; min-width:160px; background:#e8ecf1; border-radius:4px;
         overflow:hidden; }
  .bar .fill { position:absolute; inset:0 auto 0 0; background:#9fbdf3; }
  .bar .fill.full { background:#9ed6b1; }
  .bar .fill.kv { background:#c3ccd8; }
  .bar .txt { position:relative; font-size:11px; line-height:16px; padding-left:6px;
              color:#0c1118; white-space:nowrap; }
  .state { display:inline-block; padding:1px 8px; border-radius:9px; font-size:12px; color:#fff;
           background:var(--mute); }
  .state.running { background:var(--run); } .state.done { background:var(--ok); }
  .state.failed { background:var(--bad); } .state.queued { background:#8a96a3; }
  .state.cancelled { background:#b0b7bf; }
  .err { color:var(--bad); font-size:12px; max-width:360px; overflow-wrap:anywhere; }
  .charts { display:grid; grid-template-columns:1fr 1fr; gap:14px; }
  svg text { font-size:10px; fill:var(--mute); }
  .empty { color:var(--mute); font-style:italic; }
  #banner { display:none; background:#fdecec; color:var(--bad); border:1px solid #f3c2c2;
            border-radius:8px; padding:8px 12px; }
  #banner.show { display:block; }
  #task-text { white-space:pre-wrap; word-break:break-word; max-height:24em; overflow:auto;
               background:#fff; border:1px solid #e1e5ea; border-radius:8px; padding:10px; }
</style>
</head>
<body>
<header>
  <h1>tilerun</h1>
  <span class="meta" id="engine">connecting&hellip;</span>
  <span id="live">waiting for the first snapshot</span>
</header>
<main>
  <div id="banner"></div>
  <div class="cards" id="cards"></div>
  <section>
    <h2>Throughput over time</h2>
    <div class="charts">
      <svg id="chart-prefill" viewBox="0 0 520 170" role="img" aria-label="prefill tokens/s"></svg>
      <svg id="chart-decode" viewBox="0 0 520 170" role="img" aria-label="decode tokens/s"></svg>
    </div>
  </section>
  <section>
    <h2>Workers</h2>
    <table id="workers"><thead><tr><th>rank</th><th>node</th><th>device</th><th>memory</th>
      <th>peak memory</th><th>KV blocks (device)</th><th>KV blocks (host)</th></tr></thead>
      <tbody></tbody></table>
  </section>
  <section>
    <h2>Tasks</h2>
    <table id="tasks"><thead><tr><th>id</th><th>state</th><th>prefill</th><th>generated</th>
      <th>decode tok/s</th><th>TTFT</th><th>context</th><th>attempts</th><th>submitted</th>
      <th></th></tr></thead><tbody></tbody></table>
  </section>
  <section id="task" hidden>
    <h2 id="task-title">Task</h2>
    <div class="meta" id="task-meta"></div>
    <pre id="task-text"></pre>
  </section>
</main>
<noscript>This page needs JavaScript to draw the snapshot; the raw data is at api/snapshot.</noscript>
<script>
"use strict";
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);
let lastOk = 0;

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(String(k)));
  return e;
}
function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
function num(x, digits) {
  if (x === null || x === undefined || Number.isNaN(x)) return "\\u2013";
  const d = digits === undefined ? (Math.abs(x) >= 100 ? 0 : 1) : digits;
  return Number(x).toLocaleString("en-US", {maximumFractionDigits: d, minimumFractionDigits: d});
}
function bytes(b) {
  if (b === null || b === undefined) return "\\u2013";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0; let v = Number(b);
  while (v >= 1024 && i < u.length - 1) { v /= 1024; i++; }
  return (i ? v.toFixed(v >= 100 ? 0 : 1) : v.toFixed(0)) + " " + u[i];
}
function secs(s) {
  if (s === null || s === undefined) return "\\u2013";
  if (s < 1) return (s * 1000).toFixed(0) + " ms";
  if (s < 120) return s.toFixed(s < 10 ? 2 : 1) + " s";
  if (s < 7200) return (s / 60).toFixed(1) + " min";
  return (s / 3600).toFixed(1) + " h";
}
function bar(done, total, cls, label) {
  const frac = total > 0 ? Math.min(1, Math.max(0, done / total)) : 0;
  return el("div", {class: "bar", role: "progressbar", "aria-valuemin": "0",
                    "aria-valuemax": String(total || 0), "aria-valuenow": String(done || 0)},
            el("div", {class: "fill" + (cls ? " " + cls : frac >= 1 ? " full" : ""),
                       style: "width:" + (100 * frac).toFixed(1) + "%"}),
            el("span", {class: "txt"}, label));
}

function renderEngine(s) {
  const e = s.engine || {};
  const up = e.started_at ? Date.now() / 1000 - e.started_at : null;
  $("engine").textContent = [e.model ? "model " + e.model : null,
    e.tp ? "TP " + e.tp : null, e.ray_address ? "Ray " + e.ray_address : null,
    up !== null ? "up " + secs(up) : null, e.ready === false ? "starting" : null,
    e.rebuilds ? "workers rebuilt " + e.rebuilds + "\\u00d7" : null,
    e.restarts ? "engine restarted " + e.restarts + "\\u00d7" +
      (e.last_restart ? " (last: " + e.last_restart + ")" : "") : null,
    e.error ? "error: " + e.error : null,
    e.home ? "home " + e.home : null].filter(Boolean).join("  \\u00b7  ");
}

function renderCards(s) {
  const tasks = s.tasks || [], c = s.counters || {};
  const by = (st) => tasks.filter((t) => t.state === st).length;
  const tp = (s.throughput || []).slice(-1)[0] || {};
  const cards = [["running", by("running")], ["queued", by("queued")], ["done", by("done")],
    ["failed", by("failed")], ["prefill tok/s", num(tp.prefill_tokens_per_s)],
    ["decode tok/s", num(tp.decode_tokens_per_s)], ["KV spilled", bytes(c.bytes_spilled)],
    ["KV prefetched", bytes(c.bytes_prefetched)],
    ["AllReduce wait", secs(c.allreduce_exposed_s)]];
  $("cards").replaceChildren(...cards.map(([k, v]) =>
    el("div", {class: "card"}, el("div", {class: "k"}, k), el("div", {class: "v"}, v))));
}

function renderWorkers(s) {
  const rows = (s.workers || []).map((w) => {
    const kb = w.kv_blocks || {}, ku = w.kv_used || {};
    const kv = (tier) => bar(ku[tier] || 0, kb[tier] || 0, "kv",
                             num(ku[tier] || 0, 0) + " / " + num(kb[tier] || 0, 0) + " used");
    return el("tr", {"data-rank": String(w.rank)}, el("td", {}, w.rank),
              el("td", {}, w.node || "\\u2013"),
              el("td", {}, (w.device || "") + (w.name ? " (" + w.name + ")" : "")),
              el("td", {}, bytes(w.memory_bytes)), el("td", {}, bytes(w.peak_memory_bytes)),
              el("td", {}, kv("device")), el("td", {}, kv("host")));
  });
  if (!rows.length) rows.push(el("tr", {}, el("td", {colspan: "7", class: "empty"}, "no workers")));
  $("workers").tBodies[0].replaceChildren(...rows);
}

function renderTasks(s) {
  const tasks = (s.tasks || []).slice().sort((a, b) => (b.submitted_at || 0) - (a.submitted_at || 0));
  const rows = tasks.map((t) => {
    const pd = t.prefill_done || 0, pt = t.prefill_total || 0;
    const pct = pt ? " (" + (100 * pd / pt).toFixed(0) + "%)" : "";
    return el("tr", {"data-task": String(t.id), "data-state": t.state,
                     "data-prefill-done": String(pd), "data-prefill-total": String(pt)},
      el("td", {}, el("a", {href: "#task=" + encodeURIComponent(String(t.id))}, String(t.id))),
      el("td", {}, el("span", {class: "state " + t.state}, t.state)),
      el("td", {}, bar(pd, pt, "", num(pd, 0) + " / " + num(pt, 0) + pct)),
      el("td", {}, num(t.generated || 0, 0) + " / " + num(t.max_new_tokens || 0, 0)),
      el("td", {}, num(t.decode_tokens_per_s)), el("td", {}, secs(t.ttft_s)),
      el("td", {}, num(t.context_len || 0, 0)), el("td", {}, (t.attempts || 0) + (t.alone ? " alone" : "")),
      el("td", {}, t.submitted_at ? new Date(t.submitted_at * 1000).toLocaleTimeString("en-GB") : ""),
      el("td", {class: "err"}, t.error || ""));
  });
  if (!rows.length) rows.push(el("tr", {}, el("td", {colspan: "10", class: "empty"}, "no tasks")));
  $("tasks").tBodies[0].replaceChildren(...rows);
}

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 4, 6, 8, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function renderChart(id, points, key, color, title) {
  const W = 520, H = 170, L = 52, R = 10, T = 18, B = 22;
  const node = $(id);
  const kids = [svg("text", {x: L, y: 12, "font-weight": "600", fill: color}, title)];
  const pts = points.filter((p) => p[key] !== null && p[key] !== undefined);
  const t0 = pts.length ? pts[0].t : 0, t1 = pts.length ? pts[pts.length - 1].t : 1;
  const span = Math.max(t1 - t0, 1e-9);
  const ymax = niceMax(Math.max(0, ...pts.map((p) => p[key])));
  for (let i = 0; i <= 4; i++) {
    const y = T + (H - T - B) * (1 - i / 4);
    kids.push(svg("line", {x1: L, x2: W - R, y1: y, y2: y, stroke: "#e1e5ea"}));
    kids.push(svg("text", {x: L - 6, y: y + 3, "text-anchor": "end"}, num(ymax * i / 4)));
  }
  kids.push(svg("text", {x: L, y: H - 6}, pts.length ? "-" + secs(span) : ""));
  kids.push(svg("text", {x: W - R, y: H - 6, "text-anchor": "end"}, "now"));
  if (pts.length) {
    const xy = pts.map((p) => [L + (W - L - R) * (pts.length > 1 ? (p.t - t0) / span : 1),
                               T + (H - T - B) * (1 - p[key] / ymax)]);
    const line = xy.map(([x, y]) => x.toFixed(1) + "," + y.toFixed(1)).join(" ");
    const area = L + "," + (H - B) + " " + line + " " + xy[xy.length - 1][0].toFixed(1) + "," + (H - B);
    kids.push(svg("polygon", {points: area, fill: color, "fill-opacity": "0.12"}));
    kids.push(svg("polyline", {points: line, fill: "none", stroke: color, "stroke-width": "2",
                               "class": "series", "data-points": String(pts.length)}));
  } else {
    kids.push(svg("text", {x: W / 2, y: H / 2, "text-anchor": "middle"}, "no samples yet"));
  }
  node.replaceChildren(...kids);
}

// URL#task=ID shows one task's text under the tables (its id in the table links there)
function shownTask() {
  const m = /(?:^#|&)task=([^&]+)/.exec(location.hash);
  return m ? decodeURIComponent(m[1]) : null;
}

async function renderTask() {
  const id = shownTask();
  $("task").hidden = !id;
  if (!id) return;
  const r = await fetch("api/task?id=" + encodeURIComponent(id),
                        {cache: "no-store", credentials: "same-origin"});
  const t = await r.json();
  $("task-title").textContent = "Task " + id;
  if (!r.ok) {
    $("task-meta").textContent = t.error || String(r.status);
    $("task-text").textContent = "";
    return;
  }
  $("task").setAttribute("data-state", t.state);
  $("task-meta").textContent = [t.state, "attempt " + (t.attempts || 0),
    num(t.generated || 0, 0) + " / " + num(t.max_new_tokens || 0, 0) + " tokens",
    t.text_truncated ? "its last " + num(t.text.length, 0) + " characters" : null]
    .filter(Boolean).join("  \u00b7  ");
  $("task-text").textContent = t.text || "";  // text, never markup
}
window.addEventListener("hashchange", () => renderTask().catch(() => {}));

function render(s) {
  renderEngine(s); renderCards(s); renderWorkers(s); renderTasks(s);
  renderTask().catch((e) => { $("task-meta").textContent = "cannot read the task: " + e; });
  const tp = s.throughput || [];
  renderChart("chart-prefill", tp, "prefill_tokens_per_s", "#2f6fdf", "prefill tokens/s");
  renderChart("chart-decode", tp, "decode_tokens_per_s", "#e07a1f", "decode tokens/s");
}

function banner(text) {
  $("banner").textContent = text || "";
  $("banner").className = text ? "show" : "";
}

async function refresh() {
  try {
    const r = await fetch("api/snapshot", {cache: "no-store", credentials: "same-origin"});
    if (r.status === 401) {
      banner("401: this page needs Ray's token again: reopen it as URL?token=<ray get-auth-token>");
    } else {
      const s = await r.json();
      if (!r.ok) { banner("snapshot failed: " + (s.error || r.status)); }
      else { banner(""); render(s); lastOk = Date.now(); }
    }
  } catch (e) {
    banner("cannot reach the engine: " + e);
  }
  const age = (Date.now() - lastOk) / 1000;
  $("live").className = !lastOk ? "err" : age < 5 ? "ok" : "stale";
  $("live").textContent = lastOk ? "updated " + new Date(lastOk).toLocaleTimeString("en-GB") : "no data";
}
refresh();
setInterval(refresh, 1000);
</script>
</body>
</html>
"""
