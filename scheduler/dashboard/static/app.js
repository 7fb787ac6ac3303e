// aviato dashboard: one page, hash routes (#/cluster, #/sandboxes, #/sandbox/ID), live
// by server-sent events (/api/events: the whole view twice a second, when it changed;
// /api/logs/ID: a sandbox's output as it grows). No framework, no build step.
"use strict";

let view = null;          // the latest snapshot: {cluster, sandboxes}
let logStream = null;     // the detail page's EventSource
let logSandbox = "";
let execStream = null;    // the detail page's exec results (/api/execs/ID)
const $ = (sel) => document.querySelector(sel);

function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, (c) =>
    ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function secs(s) {
  if (s === null || s === undefined) return "—";
  if (s < 60) return `${s.toFixed(1)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.floor(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

function route() {
  const hash = location.hash || "#/cluster";
  const [path, query] = hash.slice(1).split("?");
  return { path, params: new URLSearchParams(query || "") };
}

function chart(lines, label) {
  // lines: [[name, points, css class], ...]; one axis for them all.
  const w = 560, h = 140, pad = 28;
  const all = lines.flatMap(([, pts]) => pts);
  if (all.length < 2) return `<p class="muted">collecting rates…</p>`;
  const t0 = Math.min(...all.map((p) => p[0])), t1 = Math.max(...all.map((p) => p[0]));
  const top = Math.max(1, ...all.map((p) => p[1]));
  const x = (t) => pad + ((t - t0) / Math.max(1, t1 - t0)) * (w - 2 * pad);
  const y = (v) => h - pad + 8 - (v / top) * (h - 2 * pad);
  const line = (pts) => pts.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ");
  const key = lines.map(([name, , cls]) => `${cls === "placements" ? "- -" : "—"} ${name}`).join("  ");
  return `<svg class="chart" width="${w}" height="${h}" role="img" aria-label="${esc(label)}">
    <text x="${pad}" y="14">${top.toFixed(1)}/s</text>
    <text x="${pad}" y="${h - 4}">−${Math.round(t1 - t0)} s</text>
    <text x="${w - 8}" y="14" text-anchor="end">${esc(key)}</text>
    ${lines.map(([, pts, cls]) => `<polyline class="${cls}" points="${line(pts)}"/>`).join("")}</svg>`;
}

function ms(v) {
  // Round trips come from newer clients only: an older one's show "—".
  return typeof v === "number" ? `${v.toFixed(2)} ms` : "—";
}

function tunnels(t) {
  // A sandbox's published ports, as its agent reports them (null: not asked yet).
  if (t === null || t === undefined) return '<span class="muted">…</span>';
  if (!t.length) return '<span class="muted">—</span>';
  return t.map((x) => `<span class="tunnel" data-port="${x.port}">${x.port} → <span class="mono">${esc(x.address)}</span></span>`).join(" ");
}

function processes(p) {
  // Its spawned processes: how many run, and the first few (the running first).
  if (p === null || p === undefined) return '<span class="muted">…</span>';
  if (p.unknown) return '<span class="muted">?</span>';
  if (!p.running && !p.ended) return '<span class="muted">—</span>';
  const few = p.list.map((x) => `<span class="proc ${x.running ? "on" : "off"}" title="${esc(x.id)}">${esc(x.argv)}${x.running ? "" : ` (${x.exit_code ?? "?"})`}</span>`);
  return `<span class="procs-running">${p.running}</span> running${p.ended ? `, ${p.ended} ended` : ""}<br>${few.join("<br>")}`;
}

function pools(s) {
  // A session's functions, as its client reports them on each keepalive.
  if (!s.pools || !s.pools.length) return "";
  return `<tr class="pools"><td colspan="4"><table class="inner"><thead><tr><th>function</th>
    <th>calls/s</th><th>calls</th><th>round trip p50</th><th>round trip p99</th><th>run p50</th><th>run p99</th><th>workers</th><th>queued</th>
    <th>retries</th><th>workers lost</th></tr></thead><tbody>${s.pools.map((p) => `<tr data-function="${esc(p.name)}">
      <td class="mono">${esc(p.name)}</td><td>${p.calls_per_second.toFixed(1)}</td><td>${p.calls}</td>
      <td class="rt-p50">${ms(p.round_trip_p50_ms)}</td><td class="rt-p99">${ms(p.round_trip_p99_ms)}</td>
      <td>${p.run_p50_ms.toFixed(2)} ms</td><td>${p.run_p99_ms.toFixed(2)} ms</td><td>${p.workers}</td>
      <td>${p.queued}</td><td>${p.retries}</td><td>${p.workers_lost}</td></tr>`).join("")}</tbody></table></td></tr>`;
}

function renderCluster() {
  const c = view.cluster;
  const used = c.agents.reduce((n, a) => n + (a.state === "alive" ? a.used : 0), 0);
  const cards = [
    ["agents alive", `${c.alive} / ${c.agents.length}`],
    ["slots used", `${used} / ${used + c.free_slots}`],
    ["queued creates", c.queue],
    ["running", c.counts.running],
    ["creating", c.counts.creating],
    ["sessions", c.sessions],
  ].map(([l, n]) => `<div class="card"><div class="n">${esc(n)}</div><div class="l">${l}</div></div>`);
  const rows = c.agents.map((a) => {
    const pct = a.slots ? Math.round((100 * a.used) / a.slots) : 0;
    const labels = Object.entries(a.labels).map(([k, v]) => `<span class="label">${esc(k)}=${esc(v)}</span>`);
    return `<tr data-agent="${esc(a.id)}">
      <td class="mono">${esc(a.id)}</td><td>${esc(a.host)}</td><td>${esc(a.runtime)}</td>
      <td><span class="bar"><span style="width:${pct}%"></span></span>${a.used} / ${a.slots}</td>
      <td>${a.free}</td><td>${a.spares}</td>
      <td class="resources">${esc(a.resources) || '<span class="muted">—</span>'}</td><td>${secs(a.heartbeat_age)}</td>
      <td>${labels.join("") || '<span class="muted">—</span>'}</td>
      <td class="state ${a.state}">${a.state}</td></tr>`;
  });
  const problem = c.problem ? `<p class="problem" id="problem">${esc(c.problem)}</p>` : "";
  $("#view").innerHTML = `${problem}<div class="cards">${cards.join("")}</div>
    <h2>Agents</h2>
    <table id="agents"><thead><tr><th>agent</th><th>host</th><th>runtime</th><th>slots used</th>
    <th>free</th><th>spares</th><th>cpu · mem · gpu held</th><th>heartbeat</th><th>labels</th><th>state</th></tr></thead>
    <tbody>${rows.join("") || '<tr><td colspan="10" class="muted">no agents registered</td></tr>'}</tbody></table>
    <h2>Creates per second</h2>${chart([["creates/s", c.rates.creates, "creates"], ["placements/s", c.rates.placements, "placements"]], "creates per second")}
    <h2>Function calls per second</h2>${chart([["calls/s", c.rates.calls, "calls"]], "function calls per second")}
    <h2>Sessions</h2>
    <table id="sessions"><thead><tr><th>session</th><th>lease left</th><th>sandboxes</th>
    <th>function workers</th></tr></thead><tbody>${c.session_rows.map((s) => `<tr data-session="${esc(s.id)}">
      <td class="mono"><a href="#/sandboxes?session=${esc(s.id)}">${esc(s.id)}</a></td>
      <td>${secs(s.lease_left)}</td><td>${s.sandboxes}</td><td>${s.workers}</td></tr>${pools(s)}`).join("")
      || '<tr><td colspan="4" class="muted">no sessions</td></tr>'}</tbody></table>`;
}

function renderSandboxes(params) {
  const state = params.get("state") || "", tag = params.get("tag") || "", session = params.get("session") || "";
  const shown = view.sandboxes.filter((s) =>
    (!state || s.state === state) && (!tag || s.tags.includes(tag)) &&
    (!session || s.session.startsWith(session)));
  const rows = shown.map((s) => `<tr data-sandbox="${esc(s.id)}">
    <td class="mono"><a href="#/sandbox/${esc(s.id)}">${esc(s.id)}</a></td>
    <td class="state ${esc(s.state)}">${esc(s.state)}</td><td>${esc(s.image)}</td>
    <td>${esc(s.kind)}</td><td class="mono">${esc(s.agent)}</td><td>${secs(s.age)}</td>
    <td>${secs(s.lifetime_left)}</td>
    <td>${s.tags.map((t) => `<span class="label">${esc(t)}</span>`).join("")}</td>
    <td class="mono">${esc(s.session.slice(0, 12))}</td>
    <td class="tunnels">${tunnels(s.tunnels)}</td><td class="processes">${processes(s.processes)}</td></tr>`);
  const options = ["", "creating", "running", "completed", "failed", "terminated"]
    .map((o) => `<option value="${o}" ${o === state ? "selected" : ""}>${o || "any state"}</option>`);
  const focused = document.activeElement && document.activeElement.id;
  $("#view").innerHTML = `<div class="filters">
      <select id="f-state">${options.join("")}</select>
      <input id="f-tag" placeholder="tag" value="${esc(tag)}">
      <input id="f-session" placeholder="session" value="${esc(session)}">
      <span class="muted">${shown.length} shown</span></div>
    <table id="sandboxes"><thead><tr><th>sandbox</th><th>state</th><th>image</th><th>kind</th>
    <th>agent</th><th>age</th><th>lifetime left</th><th>tags</th><th>session</th><th>tunnels</th><th>processes</th></tr></thead>
    <tbody>${rows.join("") || '<tr><td colspan="11" class="muted">no sandboxes</td></tr>'}</tbody></table>`;
  for (const id of ["f-state", "f-tag", "f-session"]) {
    $(`#${id}`).addEventListener("change", applyFilters);
  }
  if (focused && $(`#${focused}`)) $(`#${focused}`).focus();
}

function applyFilters() {
  const p = new URLSearchParams();
  for (const [k, id] of [["state", "f-state"], ["tag", "f-tag"], ["session", "f-session"]]) {
    if ($(`#${id}`).value) p.set(k, $(`#${id}`).value);
  }
  location.hash = `#/sandboxes${p.toString() ? "?" + p : ""}`;
}

function renderSandbox(id) {
  const s = view.sandboxes.find((x) => x.id === id);
  let info = $("#info");
  if (!info) {
    $("#view").innerHTML = `<h2>Sandbox <span class="mono">${esc(id)}</span></h2>
      <div id="info"></div><h2>Logs <span class="muted">(live)</span></h2>
      <div id="log-error" class="err"></div><pre id="logs"></pre>
      <h2>Last exec results</h2><div id="exec-error" class="err"></div>
      <div id="execs"><p class="muted">no execs yet</p></div>`;
    info = $("#info");
  }
  info.innerHTML = s ? `<div class="cards">
      <div class="card"><div class="n state ${esc(s.state)}" id="sb-state">${esc(s.state)}</div><div class="l">state</div></div>
      <div class="card"><div class="n">${esc(s.image)}</div><div class="l">image</div></div>
      <div class="card"><div class="n mono">${esc(s.agent)}</div><div class="l">agent</div></div>
      <div class="card"><div class="n">${secs(s.age)}</div><div class="l">age</div></div>
      <div class="card"><div class="n">${s.exit_code ?? "—"}</div><div class="l">exit code</div></div></div>
      ${s.reason ? `<p class="muted">${esc(s.reason)}</p>` : ""}
      <p>tunnels: <span id="sb-tunnels">${tunnels(s.tunnels)}</span></p>
      <p>processes: <span id="sb-processes">${processes(s.processes)}</span></p>`
    : `<p class="muted">not in the live list (ended a while ago?)</p>`;
  if (logSandbox !== id) openLogs(id);
}

function openLogs(id) {
  closeLogs();
  logSandbox = id;
  logStream = new EventSource(`/api/logs/${encodeURIComponent(id)}`);
  openExecs(id);
  logStream.addEventListener("logs", (e) => {
    const d = JSON.parse(e.data), pre = $("#logs");
    if (!pre) return;
    const follow = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    if (d.reset) pre.textContent = "";
    pre.textContent += d.text;
    $("#log-error").textContent = "";
    if (follow) pre.scrollTop = pre.scrollHeight;
  });
  logStream.addEventListener("error", (e) => {
    if (e.data && $("#log-error")) $("#log-error").textContent = JSON.parse(e.data).message;
  });
}

function closeLogs() {
  if (logStream) logStream.close();
  if (execStream) execStream.close();
  logStream = execStream = null;
  logSandbox = "";
}

function renderExecs(list) {
  // The sandbox's last execs (its agent keeps a few), the latest first.
  const box = $("#execs");
  if (!box) return;
  if (!list.length) { box.innerHTML = '<p class="muted">no execs yet</p>'; return; }
  box.innerHTML = `<table id="exec-results"><thead><tr><th>argv</th><th>exit code</th><th>duration</th>
    <th>stdout (tail)</th><th>stderr (tail)</th></tr></thead><tbody>${list.slice().reverse().map((x) => `<tr class="exec">
    <td class="mono argv">${esc(x.argv.join(" "))}</td>
    <td class="exit">${x.running ? "running" : esc(x.exit_code ?? (x.error || "—"))}${x.timed_out ? " (timed out)" : ""}</td>
    <td>${x.seconds === null ? "—" : `${(x.seconds * 1000).toFixed(1)} ms`}</td>
    <td><pre class="stdout">${esc(x.stdout)}</pre></td><td><pre class="stderr">${esc(x.stderr)}</pre></td></tr>`).join("")}</tbody></table>`;
}

function openExecs(id) {
  execStream = new EventSource(`/api/execs/${encodeURIComponent(id)}`);
  execStream.addEventListener("execs", (e) => {
    renderExecs(JSON.parse(e.data));
    if ($("#exec-error")) $("#exec-error").textContent = "";
  });
  execStream.addEventListener("error", (e) => {
    if (e.data && $("#exec-error")) $("#exec-error").textContent = JSON.parse(e.data).message;
  });
}

function render() {
  const { path, params } = route();
  for (const a of document.querySelectorAll("nav a")) {
    const section = path.startsWith("/sandbox/") ? "/sandboxes" : path;
    a.classList.toggle("active", section.startsWith(a.getAttribute("href").slice(1)));
  }
  if (!path.startsWith("/sandbox/")) closeLogs();
  if (!view) return;
  if (path.startsWith("/sandbox/")) renderSandbox(decodeURIComponent(path.slice(9)));
  else if (path.startsWith("/sandboxes")) {
    // Keep typing undisturbed: a filter box being edited is not redrawn under the cursor.
    const a = document.activeElement;
    if (a && (a.id === "f-tag" || a.id === "f-session") && a.value !== (params.get(a.id.slice(2)) || "")) return;
    renderSandboxes(params);
  } else renderCluster();
}

function connect() {
  const events = new EventSource("/api/events");
  events.addEventListener("open", () => { $("#live").className = "live on"; $("#live").textContent = "live"; });
  events.addEventListener("error", () => { $("#live").className = "live off"; $("#live").textContent = "reconnecting"; });
  events.addEventListener("snapshot", (e) => { view = JSON.parse(e.data); render(); });
}

window.addEventListener("hashchange", () => {
  if (!route().path.startsWith("/sandbox/")) closeLogs();
  if (route().path.startsWith("/sandbox/")) $("#view").innerHTML = "";
  render();
});
connect();
