// shoal's dashboard: polls /dashboard/api/snapshot and draws it. No libraries, no build step.
// The page's charts keep the points they were sent (the server sends only newer ones after the
// first poll) for WINDOW_S; everything else is redrawn from each snapshot.
"use strict";

const POLL_MS = 1500;
const WINDOW_S = 600;
const SVG = "http://www.w3.org/2000/svg";

const state = { since: 0, series: {}, open: new Set(), failures: 0, first: Infinity };

// --- DOM helpers (text only: log lines and messages never become markup) ---------------------------
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}
function s(tag, attrs) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  return el;
}
const pill = (status) => h("span", { class: `pill ${status}` }, status);

// --- formatting ------------------------------------------------------------------------------------
function fmtNum(v, digits = 1) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  const a = Math.abs(v);
  if (a >= 1e6) return (v / 1e6).toFixed(1) + "M";
  if (a >= 1e4) return (v / 1e3).toFixed(1) + "k";
  if (a >= 100) return v.toFixed(0);
  return v.toFixed(digits).replace(/\.0+$/, "");
}
const fmtMs = (v) => (v === null || v === undefined ? "–"
  : v >= 1000 ? fmtNum(v / 1000, 2) + " s" : fmtNum(v, 1) + " ms");
const fmtPct = (v) => (v === null || v === undefined ? "–" : fmtNum(v * 100, 1) + "%");
function fmtBytes(b) {
  if (b === null || b === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (b >= 1024 && i < units.length - 1) { b /= 1024; i++; }
  return b.toFixed(i ? 1 : 0) + " " + units[i];
}
function fmtAge(sec) {
  if (sec < 60) return Math.floor(sec) + "s";
  if (sec < 3600) return Math.floor(sec / 60) + "m " + Math.floor(sec % 60) + "s";
  if (sec < 86400) return Math.floor(sec / 3600) + "h " + Math.floor((sec % 3600) / 60) + "m";
  return Math.floor(sec / 86400) + "d " + Math.floor((sec % 86400) / 3600) + "h";
}
const fmtTime = (t) => new Date(t * 1000).toLocaleTimeString();

// --- charts: inline SVG ----------------------------------------------------------------------------
// `lines`: [[label, [[t, v|null], ...]], ...]; one or two lines share the y axis (from 0).
function chart(title, lines, fmt, now) {
  const W = 300, H = 70, L = 0, R = 0, T = 4, B = 1;
  // Every chart spans the same time: the page's oldest point (at least a minute), up to WINDOW_S.
  const span = Math.min(WINDOW_S, Math.max(60, Math.ceil((now - state.first) / 60) * 60));
  const t0 = now - span;
  const x = (t) => L + ((t - t0) / span) * (W - L - R);
  let max = 0, count = 0;
  for (const [, pts] of lines) for (const [, v] of pts) if (v !== null) { max = Math.max(max, v); count++; }
  const top = max > 0 ? max * 1.15 : 1;
  const y = (v) => T + (1 - v / top) * (H - T - B);
  const svg = s("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none",
                         "data-points": count, role: "img", "aria-label": title });
  for (const f of [0, 0.5, 1]) {
    svg.append(s("line", { class: "grid", x1: L, x2: W - R, y1: y(top * f), y2: y(top * f) }));
  }
  // Text lives outside the SVG, which stretches to the box's width.
  const axisY = h("div", { class: "axis-y" }, fmt(top));
  const axisX = h("div", { class: "axis-x" }, h("span", {}, `-${fmtNum(span / 60, 1)}m`),
                  h("span", {}, `-${fmtNum(span / 120, 1)}m`), h("span", {}, "now"));
  if (!count) axisY.textContent = "no requests yet";
  lines.forEach(([, pts], i) => {
    // A null (no requests: no latency) breaks the line rather than drawing it at 0.
    const segments = [];
    let seg = null;
    for (const [t, v] of pts) {
      if (t < t0 || v === null) { seg = null; continue; }
      if (!seg) segments.push((seg = []));
      seg.push([x(t).toFixed(1), y(v).toFixed(1)]);
    }
    for (const sg of segments) {
      const d = sg.map(([px, py], j) => (j ? "L" : "M") + px + "," + py).join("");
      if (sg.length === 1) {  // a lone value between gaps: a dot, or it would not show
        svg.append(s("circle", { class: `s${i} dot`, cx: sg[0][0], cy: sg[0][1], r: 1.8 }));
        continue;
      }
      if (lines.length === 1) {  // the area under a lone line
        svg.append(s("path", { class: "area", d: `${d}L${sg[sg.length - 1][0]},${y(0)}L${sg[0][0]},${y(0)}Z` }));
      }
      svg.append(s("path", { class: `s${i} line`, d }));
    }
  });
  const latest = lines.map(([label, pts]) => {
    const p = [...pts].reverse().find(([, v]) => v !== null);
    return lines.length > 1 ? `${label} ${p ? fmt(p[1]) : "–"}` : p ? fmt(p[1]) : "–";
  });
  const box = h("div", { class: "chart-box" },
    h("div", { class: "chart-title" }, h("span", {}, title), h("span", { class: "now" }, latest.join(" · "))),
    h("div", { class: "plot" }, axisY, svg), axisX);
  hover(box, svg, lines, fmt, x, W);
  return box;
}

function hover(box, svg, lines, fmt, x, W) {
  const tip = h("div", { class: "tooltip", hidden: true });
  const cursor = s("line", { class: "cursor", y1: 0, y2: 70, x1: -10, x2: -10 });
  svg.append(cursor);
  box.append(tip);
  svg.addEventListener("mousemove", (ev) => {
    const r = svg.getBoundingClientRect();
    const px = ((ev.clientX - r.left) / r.width) * W;
    const pts = lines[0][1];
    if (!pts.length) return;
    let best = pts[0];
    for (const p of pts) if (Math.abs(x(p[0]) - px) < Math.abs(x(best[0]) - px)) best = p;
    const at = best[0];
    const vals = lines.map(([label, ps]) => {
      const q = ps.find((p) => p[0] === at);
      return (lines.length > 1 ? label + " " : "") + (q ? fmt(q[1]) : "–");
    });
    cursor.setAttribute("x1", x(at)); cursor.setAttribute("x2", x(at));
    tip.textContent = `${fmtTime(at)}  ${vals.join(" · ")}`;
    tip.hidden = false;
    const left = ev.clientX - box.getBoundingClientRect().left + 8;
    tip.style.left = Math.max(0, Math.min(left, box.clientWidth - 160)) + "px";
    tip.style.top = "18px";
  });
  svg.addEventListener("mouseleave", () => {
    tip.hidden = true;
    cursor.setAttribute("x1", -10);
    cursor.setAttribute("x2", -10);
  });
}

// --- the page ----------------------------------------------------------------------------------------
function keepSeries(key, points, now) {
  const have = state.series[key] || [];
  const last = have.length ? have[have.length - 1].t : 0;
  for (const p of points) if (p.t > last) have.push(p);
  while (have.length && have[0].t < now - WINDOW_S) have.shift();
  state.series[key] = have;
  return have;
}

function deploymentView(app, dep, now) {
  const key = `${app.name}/${dep.name}`;
  const pts = keepSeries(key, dep.series, now);
  const col = (f) => pts.map((p) => [p.t, p[f] === undefined ? null : p[f]]);
  const running = dep.replica_states.RUNNING || 0;
  const auto = dep.autoscaling;
  const charts = [
    chart("requests/s", [["req/s", col("rps")]], (v) => fmtNum(v, 1), now),
    chart("latency", [["p50", col("p50_ms")], ["p99", col("p99_ms")]], fmtMs, now),
    chart("error rate", [["errors", col("error_rate")]], fmtPct, now),
  ];
  if (dep.llm) {
    charts.push(chart("tokens/s", [["tok/s", col("tokens_per_s")]], (v) => fmtNum(v, 1), now));
    charts.push(chart("time to first token (p50)", [["TTFT", col("ttft_p50_ms")]], fmtMs, now));
    charts.push(chart("queue (waiting in engine)", [["queued", col("queue")]], (v) => fmtNum(v, 0), now));
  }
  const rows = dep.replicas.map((r) => {
    const logKey = `${key}/${r.id}`;
    const toggled = (ev) => (ev.target.open ? state.open.add(logKey) : state.open.delete(logKey));
    const logs = h("details", { class: "logs", open: state.open.has(logKey), ontoggle: toggled },
      h("summary", {}, `${r.log_tail.length} lines`),
      h("pre", { class: "log" }, r.log_tail.length ? r.log_tail.join("\n") : "(no output yet)"));
    return h("tr", { class: "replica", "data-replica": r.id },
        h("td", {}, r.id), h("td", {}, pill(r.state)), h("td", { class: "num" }, r.pid ?? "–"), h("td", {}, r.node),
        h("td", { class: "num" }, fmtAge(r.age_s)), h("td", { class: "num" }, r.ongoing_requests ?? "–"),
        h("td", { class: "num" }, fmtBytes(r.rss_bytes)),
        dep.llm ? h("td", { class: "num" }, `${fmtNum(r.llm_running ?? 0, 0)} / ${fmtNum(r.llm_waiting ?? 0, 0)}`)
          : null,
        h("td", {}, logs));
  });
  return h("div", { class: "deployment", "data-deployment": dep.name },
    h("div", { class: "dep-head" },
      h("span", { class: "dep-name" }, dep.name), pill(dep.status),
      h("span", { class: "replica-count kv", "data-running": running, "data-target": dep.target_replicas },
        h("b", {}, `${running}/${dep.target_replicas}`), " replicas running"),
      auto ? h("span", { class: "kv" }, "autoscaling ", h("b", {}, `${auto.min_replicas}–${auto.max_replicas}`),
               `, target ${fmtNum(auto.target_ongoing_requests, 1)} ongoing/replica`) : null,
      h("span", { class: "kv" }, "max ongoing ", h("b", {}, dep.max_ongoing_requests)),
      dep.llm ? h("span", { class: "kv" }, "engine ",
                  h("b", {}, `${dep.llm.running} running, ${dep.llm.waiting} waiting`)) : null),
    dep.message ? h("div", { class: "message" }, dep.message) : null,
    h("div", { class: "charts" }, charts),
    dep.replicas.length ? h("table", { class: "replicas-table" },
      h("thead", {}, h("tr", {}, ["replica", "state", "pid", "node", "age", "ongoing", "RSS"].map((c, i) =>
        h("th", { class: i >= 2 && i !== 3 ? "num" : "" }, c)),
        dep.llm ? h("th", { class: "num" }, "engine run/wait") : null,
        h("th", {}, "log"))),
      h("tbody", {}, rows)) : h("div", { class: "muted" }, "no replicas"));
}

function appView(app, now) {
  return h("div", { class: "app", "data-app": app.name },
    h("div", { class: "head" },
      h("span", { class: "app-name" }, app.name), pill(app.status),
      app.route_prefix ? h("span", { class: "kv" }, "route ", h("b", {}, app.route_prefix))
        : h("span", { class: "kv" }, "no HTTP route"),
      h("span", { class: "kv" }, "ingress ", h("b", {}, app.ingress)),
      h("span", { class: "kv" }, "deployed ", h("b", {}, fmtTime(app.last_deployed_time_s)))),
    app.message ? h("div", { class: "message" }, app.message) : null,
    app.deployments.map((d) => deploymentView(app, d, now)));
}

function render(snap) {
  const now = snap.time;
  const inst = snap.instance;
  document.getElementById("instance").replaceChildren(
    inst.http_url ? h("span", {}, "HTTP ", h("a", { href: inst.http_url }, inst.http_url)) : h("span", {}, "HTTP off"),
    inst.metrics_url ? h("span", {}, "metrics ", h("a", { href: inst.metrics_url }, inst.metrics_url)) : null,
    h("span", {}, "proxies ", Object.entries(inst.proxies).map(([k, v]) => h("span", { title: k }, pill(v), " "))),
    h("span", { class: "muted" }, `controller pid ${inst.controller_pid}`));
  const deps = snap.applications.flatMap((a) => a.deployments);
  const replicas = deps.flatMap((d) => d.replicas);
  const lastOf = (d) => {
    const p = state.series[`${d.app}/${d.name}`];
    return p && p.length ? p[p.length - 1] : null;
  };
  snap.applications.forEach((a) => a.deployments.forEach((d) => { d.app = a.name; }));
  for (const d of deps) if (d.series.length) state.first = Math.min(state.first, d.series[0].t);
  if (state.first === Infinity || state.first < now - WINDOW_S) {
    state.first = Math.max(now - WINDOW_S, Math.min(state.first, now));
  }
  const apps = document.getElementById("apps");
  apps.replaceChildren(...(snap.applications.length ? snap.applications.map((a) => appView(a, now))
    : [h("p", { class: "muted" }, "No applications. Deploy one with `shoal deploy config.yaml`.")]));
  const totalRps = deps.reduce((sum, d) => sum + ((lastOf(d) || {}).rps || 0), 0);
  const stat = (value, label) => h("div", { class: "stat" },
    h("div", { class: "value" }, value), h("div", { class: "label" }, label));
  document.getElementById("summary").replaceChildren(
    stat(snap.applications.length, "applications"),
    stat(deps.length, "deployments"),
    stat(`${replicas.filter((r) => r.state === "RUNNING").length}/${replicas.length}`, "replicas running"),
    stat(fmtNum(totalRps, 1), "requests/s (all deployments)"),
    stat(replicas.reduce((n, r) => n + (r.ongoing_requests || 0), 0), "requests in replicas now"));
  const dec = snap.autoscaling_decisions;
  document.getElementById("decisions").replaceChildren(dec.length ? h("table", { class: "decisions" },
    h("thead", {}, h("tr", {}, ["time", "deployment", "replicas", "why"].map((c) => h("th", {}, c)))),
    h("tbody", {}, dec.map((e) => h("tr", {},
      h("td", {}, fmtTime(e.time)), h("td", {}, `${e.application}/${e.deployment}`),
      h("td", { class: e.to > e.from ? "up" : "down" }, `${e.from} → ${e.to}`),
      h("td", { class: "reason" }, e.reason)))))
    : h("p", { class: "muted" }, "None yet."));
}

async function poll() {
  const conn = document.getElementById("connection");
  try {
    const r = await fetch(`/dashboard/api/snapshot?since=${state.since}`,
                          { cache: "no-store", credentials: "same-origin" });
    if (r.status === 401 || r.status === 403) {
      const banner = document.getElementById("banner");
      banner.textContent = "Your dashboard session has ended (or the instance was restarted with a new token): "
        + "run `shoal dashboard` again.";
      banner.hidden = false;
      conn.textContent = "logged out"; conn.className = "connection down";
      return;  // no more polling: a new login link is needed
    }
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    const snap = await r.json();
    render(snap);
    let newest = state.since;
    for (const a of snap.applications) {
      for (const d of a.deployments) for (const p of d.series) newest = Math.max(newest, p.t);
    }
    state.since = newest;
    state.failures = 0;
    conn.textContent = `live · ${fmtTime(snap.time)}`; conn.className = "connection live";
  } catch (e) {
    state.failures++;
    conn.textContent = `cannot reach the instance (${e.message}); retrying`; conn.className = "connection down";
  }
  setTimeout(poll, POLL_MS);
}

poll();
