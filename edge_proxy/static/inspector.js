// The edge inspector's page: renders /_edge/events (Server-Sent Events, one
// update a second) into the pools, workers, WebSockets and recent-requests
// panels. No framework, no build step; every value goes in as text, never HTML.
"use strict";

const MAX_RECORDS = 1000; // what the page keeps (the edge keeps --inspector-requests)
const state = { records: [], lastSeq: 0, selected: null, overview: null, source: null, retry: null, rendered: "" };
const $ = (id) => document.getElementById(id);

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

const NUMERIC = /^[-–0-9.,/ ()now]+$/; // figures (and "3 / 4", "2 (1 now)") are right-aligned

function row(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) tr.appendChild(c instanceof Node ? c : el("td", c, NUMERIC.test(String(c)) ? "num" : ""));
  return tr;
}

function fmt(v, digits = 1) {
  if (v === null || v === undefined) return "–";
  if (typeof v !== "number") return String(v);
  return v >= 100 ? v.toFixed(0) : v.toFixed(digits);
}

function statusClass(status) {
  return status >= 500 ? "s5" : status >= 400 ? "s4" : "s2";
}

function fill(tbody, rows) {
  tbody.replaceChildren(...rows);
}

function windowCells(w) {
  if (!w) return ["–", "–", "–", "–", "–", "–"];
  const c = w.by_class;
  return [fmt(w.rate_rps, 2), c["2xx"] + c["1xx"] + c["3xx"], c["4xx"], el("td", c["5xx"], c["5xx"] ? "num s5" : "num"),
          fmt(w.p50_ms, 2), fmt(w.p99_ms, 2)];
}

function renderPools(pools) {
  fill($("pools").tBodies[0], pools.map((p) => {
    const name = el("td", p.known ? p.name : p.name + " (no such pool)", "text");
    const workers = el("td", `${p.available} / ${p.workers}`, p.workers && p.available === 0 ? "num unhealthy" : "num");
    return row([name, workers, p.capacity, p.effective_capacity, p.in_flight, p.queue,
                `${p.ejections}` + (p.ejected_now ? ` (${p.ejected_now} now)` : ""),
                ...windowCells(p.minute), ...windowCells(p.hour)]);
  }));
}

function renderWorkers(workers) {
  $("no-workers").hidden = workers.length > 0;
  fill($("workers").tBodies[0], workers.map((w) => row([
    el("td", w.kind === "direct" ? `${w.id} (direct ${w.url})` : w.id, "text"), el("td", w.pool, "text"), el("td", w.health, w.health.split(" ")[0]),
    el("td", w.health_detail || "", "why"), el("td", w.last_check_error || "ok", "why"),
    w.capacity, w.effective_capacity, w.in_flight, w.served, w.errors, w.shed, w.ejections,
    fmt(w.tunnel_rtt_ms, 2), fmt(w.ewma_latency_ms, 2),
  ])));
}

function renderSockets(sockets) {
  $("no-sockets").hidden = sockets.length > 0;
  fill($("sockets").tBodies[0], sockets.map((s) => row([
    el("td", s.request_id, "text"), el("td", s.path, "path"), el("td", s.pool, "text"), el("td", s.worker, "text"),
    el("td", s.key, "text"), fmt(s.open_s), fmt(s.to_upstream.rate, 1), fmt(s.to_client.rate, 1),
    `${s.to_upstream.total} / ${s.to_client.total}`,
  ])));
}

function setOptions(select, values) {
  const current = select.value;
  const wanted = ["", ...values];
  const have = Array.from(select.options).map((o) => o.value);
  if (wanted.length === have.length && wanted.every((v, i) => v === have[i])) return;
  select.replaceChildren(...wanted.map((v) => {
    const o = el("option", v || "any");
    o.value = v;
    return o;
  }));
  select.value = wanted.includes(current) ? current : "";
}

function statusMatches(status, wanted) {
  const w = wanted.trim().toLowerCase();
  if (!w) return true;
  if (w === "errors") return status >= 400;
  if (/^[1-5]xx$/.test(w)) return Math.floor(status / 100) === Number(w[0]);
  return String(status) === w;
}

function renderRequests() {
  if ($("f-pause").checked) return;
  const status = $("f-status").value, pool = $("f-pool").value, worker = $("f-worker").value;
  // Unchanged input, unchanged rows: a rebuild under the pointer would swallow a click
  // (the blur of a filter field fires "change" between mousedown and mouseup).
  const key = JSON.stringify([status, pool, worker, state.lastSeq, state.records.length]);
  if (key === state.rendered) return;
  state.rendered = key;
  const shown = [];
  for (let i = state.records.length - 1; i >= 0 && shown.length < 300; i--) {
    const r = state.records[i];
    if ((pool && r.pool !== pool) || (worker && r.worker !== worker) || !statusMatches(r.status, status)) continue;
    shown.push(r);
  }
  $("no-requests").hidden = shown.length > 0;
  $("shown").textContent = `${shown.length} shown of ${state.records.length} received`;
  fill($("requests").tBodies[0], shown.map((r) => {
    const tr = row([
      new Date(r.at * 1000).toLocaleTimeString(), r.method,
      el("td", r.path + (r.query ? "?…" : ""), "path"), el("td", r.pool, "text"), el("td", r.worker || "–", "text"),
      el("td", r.websocket && r.status === 101 ? "101 ws" : r.status, "num " + statusClass(r.status)),
      fmt(r.duration_ms, 2), el("td", r.key || "–", "text"),
    ]);
    tr.dataset.id = r.request_id;
    if (state.selected && state.selected.request_id === r.request_id) tr.classList.add("selected");
    return tr;
  }));
}

// Where each hop of the timing contract sits inside its parent. The network
// legs on either side of a nested hop are not measured apart: the page centres
// the child in its parent (half the difference each side) and says so.
const NESTED = [["tunnel", "agent"], ["agent", "upstream"], ["upstream", "app"]];
const PHASES = ["decode", "preprocess", "queue", "infer", "postprocess"];

function layout(timing, total) {
  const t = Object.fromEntries(timing);
  const bars = [];
  const place = (name, start, depth, cls) => {
    if (t[name] === undefined) return null;
    const b = { name, start, dur: t[name], depth, cls };
    bars.push(b);
    return b;
  };
  place("edge", 0, 0, "edge");
  const lb = place("lb", 0, 1, "lb");
  // A direct worker has no tunnel: the edge's own `upstream` (the VPN leg) takes its place.
  let parent = place("tunnel", lb ? lb.dur : 0, 1, "") || place("upstream", lb ? lb.dur : 0, 1, "");
  for (const [outer, inner] of NESTED) {
    if (!parent) break;
    if (parent.name !== outer) continue;
    if (t[inner] === undefined) break;
    parent = place(inner, parent.start + Math.max(0, parent.dur - t[inner]) / 2, parent.depth + 1, "");
  }
  let at = parent ? parent.start : 0;
  const depth = parent ? parent.depth + 1 : 1;
  for (const p of PHASES) {
    const b = place(p, at, depth, "phase");
    if (b) at += b.dur;
  }
  const placed = new Set(bars.map((b) => b.name));
  for (const [name, dur] of timing) {
    if (!placed.has(name) && name !== "tunnel_rtt") bars.push({ name, start: 0, dur, depth: 1, cls: "unplaced" });
  }
  const span = Math.max(total, ...bars.map((b) => b.start + b.dur), 0.001);
  return { bars, span, rtt: t.tunnel_rtt };
}

function showDetail(r) {
  state.selected = r;
  $("detail").hidden = false;
  $("d-id").textContent = r.request_id;
  const fields = [["method", r.method], ["path", r.path + (r.query ? "  (query string dropped)" : "")],
                  ["pool", r.pool], ["worker", r.worker || "none reached"], ["status", r.status],
                  ["total", `${fmt(r.duration_ms, 3)} ms at the edge`], ["key", r.key || "–"],
                  ["finished", new Date(r.at * 1000).toLocaleString()]];
  $("d-fields").replaceChildren(...fields.flatMap(([k, v]) => [el("dt", k), el("dd", v)]));
  const { bars, span, rtt } = layout(r.timing, r.duration_ms);
  const cells = [];
  for (const b of bars) {
    const name = el("span", b.name, "name");
    name.style.setProperty("--depth", b.depth);
    const track = el("div", null, "track");
    const bar = el("div", null, "bar " + b.cls);
    bar.style.left = `${(100 * b.start) / span}%`;
    bar.style.width = `${(100 * b.dur) / span}%`;
    bar.title = `${b.name}: ${fmt(b.dur, 3)} ms`;
    track.appendChild(bar);
    cells.push(name, track, el("span", fmt(b.dur, 3), "ms"));
  }
  $("d-waterfall").replaceChildren(...cells);
  const notes = [];
  if (!bars.length) notes.push("No Server-Timing: the edge answered this request itself (no worker was reached).");
  else notes.push("Nested hops are centred in their parent: the network legs either side are not measured apart.");
  if (rtt !== undefined) notes.push(`Tunnel RTT from heartbeats: ${fmt(rtt, 2)} ms (a reading of the link, not a part of this request).`);
  $("d-note").textContent = notes.join(" ");
  for (const tr of $("requests").tBodies[0].rows) tr.classList.toggle("selected", tr.dataset.id === r.request_id);
}

function render(data) {
  state.overview = data;
  const e = data.edge;
  $("summary").textContent = `up ${Math.round(e.uptime_s)} s · ${e.in_flight} in flight · ${e.tunnels} tunnel(s)` +
    (e.direct ? ` · ${e.direct} direct worker(s)` : "") +
    (e.draining ? " · DRAINING" : "") +
    // --processes N: this page shows the one process the browser's connection landed on.
    (e.processes > 1 ? ` · edge process ${e.process} of ${e.processes} (this page shows that process only; ` +
      "/_edge/workers and /_edge/metrics show all)" : "");
  $("recorder").textContent = data.recorder.capacity
    ? `(the edge keeps the last ${data.recorder.capacity}; paths without query strings, no bodies, keys by name)`
    : "(off: --inspector-requests 0)";
  renderPools(data.pools);
  renderWorkers(data.workers);
  renderSockets(data.websockets);
  const fresh = data.requests && data.requests.length;
  if (fresh) {
    state.records.push(...data.requests);
    if (state.records.length > MAX_RECORDS) state.records.splice(0, state.records.length - MAX_RECORDS);
  }
  state.lastSeq = data.last_seq || state.lastSeq;
  setOptions($("f-pool"), data.pools.map((p) => p.name));
  const workers = new Set(data.workers.map((w) => w.id));
  for (const r of state.records) if (r.worker) workers.add(r.worker);
  setOptions($("f-worker"), Array.from(workers).sort());
  if (fresh) renderRequests(); // only when something arrived: a row being clicked stays put
}

function live(ok, text) {
  const b = $("live");
  b.textContent = text;
  b.className = ok ? "badge" : "badge off";
}

function connect() {
  const source = new EventSource(`/_edge/events?after=${state.lastSeq}`);
  state.source = source;
  source.addEventListener("update", (ev) => {
    live(true, "live");
    render(JSON.parse(ev.data));
  });
  source.addEventListener("signed-out", () => { window.location.assign("/_edge/login"); });
  source.onerror = () => {
    source.close();
    live(false, "reconnecting");
    clearTimeout(state.retry);
    state.retry = setTimeout(async () => {
      try {
        const r = await fetch("/_edge/api/overview", { credentials: "same-origin" });
        if (r.status === 401) { window.location.assign("/_edge/login"); return; }
      } catch (_) { /* the edge is down: keep trying */ }
      connect();
    }, 2000);
  };
}

document.addEventListener("DOMContentLoaded", () => {
  if (!$("logout").dataset.user) $("logout").hidden = true; // opened with a header key, not a session
  $("requests").tBodies[0].addEventListener("click", (ev) => {
    const tr = ev.target.closest("tr");
    const r = tr && state.records.find((x) => x.request_id === tr.dataset.id);
    if (r) showDetail(r);
  });
  for (const id of ["f-status", "f-pool", "f-worker", "f-pause"]) {
    $(id).addEventListener("input", renderRequests);
    $(id).addEventListener("change", renderRequests);
  }
  connect();
});
