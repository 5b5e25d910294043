// The live dashboard. One EventSource on /events keeps a copy of the fleet:
// a snapshot ("snapshot" events, then "snapshot_end") replaces it, "changed"
// and "removed" events update it. Reconnects resume from the last revision seen
// (Last-Event-ID, or ?since= after a reconnect of our own); a database that
// changed, or history that moved on, means listing again from a snapshot.
"use strict";

const HOUR_MS = 60 * 60 * 1000;
const MIN_SPAN_MS = 5 * 60 * 1000;
// A stream silent this long is treated as down: the server sends a
// BOOKMARK at least every 10 s.
const SILENCE_MS = 25 * 1000;
const RETRY_MS = 1000;

const fleet = {
  nodes: new Map(),
  pending: null,
  revision: 0,
  databaseId: null,
  samples: [],
};
let source = null;
let silenceTimer = null;
let retryTimer = null;

function $(id) { return document.getElementById(id); }

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function setConnection(live, text) {
  const badge = $("connection");
  badge.className = "connection " + (live ? "live" : "stale");
  badge.dataset.state = live ? "live" : "stale";
  badge.textContent = text;
}

function connect(since) {
  clearTimeout(retryTimer);
  if (source) source.close();
  source = new EventSource(since > 0 ? "/events?since=" + since : "/events");
  fleet.pending = null;
  source.onopen = () => { fleet.pending = null; setConnection(true, "live"); watchSilence(); };
  source.onerror = () => {
    setConnection(false, "stale: reconnecting…");
    if (source.readyState === EventSource.CLOSED) retryLater();
  };
  source.addEventListener("node", (message) => {
    watchSilence();
    apply(JSON.parse(message.data));
  });
  source.addEventListener("reset", () => {
    // History no longer reaches our revision: a snapshot follows.
    watchSilence();
    fleet.pending = null;
  });
}

// The browser gives up on a stream that answered with an error: ask why,
// and either log in again or retry from where we were.
function retryLater() {
  clearTimeout(retryTimer);
  retryTimer = setTimeout(() => {
    fetch("/api/nodes", { credentials: "same-origin" })
      .then((response) => {
        if (response.status === 401) window.location.assign("/login");
        else connect(fleet.revision);
      })
      .catch(() => retryLater());
  }, RETRY_MS);
}

function watchSilence() {
  clearTimeout(silenceTimer);
  silenceTimer = setTimeout(() => {
    setConnection(false, "stale: no news from the coordinator");
    connect(fleet.revision);
  }, SILENCE_MS);
}

function apply(event) {
  if (event.database_id && fleet.databaseId && event.database_id !== fleet.databaseId) {
    // Another database: its revisions mean nothing to us. List again.
    fleet.databaseId = event.database_id;
    fleet.nodes = new Map();
    fleet.revision = 0;
    loadSamples();
    connect(0);
    return;
  }
  if (event.database_id && !fleet.databaseId) {
    fleet.databaseId = event.database_id;
    loadSamples();
  }
  switch (event.kind) {
    case "snapshot":
      if (!fleet.pending) fleet.pending = new Map();
      fleet.pending.set(event.node.node_id, event.node);
      return;
    case "snapshot_end":
      fleet.nodes = fleet.pending || new Map();
      fleet.pending = null;
      break;
    case "changed":
      fleet.nodes.set(event.node.node_id, event.node);
      break;
    case "removed":
      fleet.nodes.delete(event.node.node_id);
      break;
    default:
      break;
  }
  if (event.revision) fleet.revision = event.revision;
  render();
}

function counts() {
  const result = { total: 0, ONLINE: 0, OFFLINE: 0, UNKNOWN: 0, LEFT: 0, drained: 0, gpus: 0, mibUsed: 0, mibTotal: 0 };
  for (const node of fleet.nodes.values()) {
    result.total += 1;
    result[node.state] = (result[node.state] || 0) + 1;
    if (node.drained) result.drained += 1;
    for (const gpu of gpusOf(node)) {
      result.gpus += 1;
      result.mibUsed += gpu.memory_used_mib || 0;
      result.mibTotal += gpu.memory_total_mib || 0;
    }
  }
  return result;
}

// Inventory is optional: coordinators and agents without it send none.
function gpusOf(node) {
  return Array.isArray(node.gpus) ? node.gpus : [];
}

function relative(iso) {
  if (!iso) return "never";
  const seconds = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
  if (seconds < 2) return "now";
  if (seconds < 90) return seconds + " s ago";
  if (seconds < 90 * 60) return Math.round(seconds / 60) + " min ago";
  if (seconds < 36 * 3600) return Math.round(seconds / 3600) + " h ago";
  return Math.round(seconds / 86400) + " d ago";
}

function gib(mib) { return (mib / 1024).toFixed(mib >= 10240 ? 0 : 1) + " GiB"; }

function render() {
  const c = counts();
  $("count-total").textContent = c.total;
  $("count-online").textContent = c.ONLINE;
  $("count-offline").textContent = c.OFFLINE;
  $("count-unknown").textContent = c.UNKNOWN;
  $("count-left").textContent = c.LEFT;
  $("count-drained").textContent = c.drained;
  $("gpu-tile").hidden = c.gpus === 0;
  $("count-gpus").textContent = c.gpus;
  $("gpu-memory").textContent = c.mibTotal ? "GPUs, " + gib(c.mibUsed) + " of " + gib(c.mibTotal) + " used" : "GPUs";
  $("revision").textContent = fleet.revision ? "revision " + fleet.revision : "";
  renderTable();
  record(c.ONLINE);
  renderChart();
}

function renderTable() {
  const body = document.querySelector("#nodes tbody");
  const rows = [];
  const ids = Array.from(fleet.nodes.keys()).sort();
  for (const id of ids) rows.push(row(fleet.nodes.get(id)));
  body.replaceChildren(...rows);
  $("empty").hidden = rows.length > 0;
}

function row(node) {
  const tr = el("tr");
  tr.dataset.nodeId = node.node_id;
  tr.dataset.state = node.state;
  const name = el("td", "node-id", node.node_id);
  if (node.hostname && node.hostname !== node.node_id) name.append(el("div", "agent", node.hostname));
  const state = el("td");
  state.append(el("span", "badge state " + node.state, node.state));
  const seen = el("td", "last-seen", node.state === "ONLINE" ? "now" : relative(node.last_seen));
  seen.dataset.lastSeen = node.last_seen || "";
  if (node.last_seen) seen.title = node.last_seen;
  const labels = el("td");
  for (const [key, value] of Object.entries(node.labels || {})) {
    labels.append(el("span", "label-chip", value ? key + "=" + value : key));
  }
  const drain = el("td", "drain");
  if (node.drained) {
    drain.append(el("span", "badge drained", "DRAINED"));
    drain.append(el("div", "drain-reason", node.drain_reason || ""));
  }
  const gpus = el("td", "gpus");
  for (const gpu of gpusOf(node)) gpus.append(gpuCell(gpu));
  const agent = el("td", "agent", node.agent_url + (node.version ? " · " + node.version : ""));
  tr.append(name, state, seen, labels, drain, gpus, agent);
  return tr;
}

function gpuCell(gpu) {
  const box = el("div", gpu.healthy === false ? "gpu unhealthy" : "gpu");
  const total = gpu.memory_total_mib || 0;
  const used = Math.min(gpu.memory_used_mib || 0, total);
  let text = "#" + (gpu.index || 0) + " " + (gpu.name || "GPU");
  if (total) text += " · " + gib(used) + " / " + gib(total);
  if (gpu.healthy === false) text += " · unhealthy" + (gpu.unhealthy_reason ? ": " + gpu.unhealthy_reason : "");
  box.append(el("div", "", text));
  if (total) {
    const bar = el("div", "vram");
    const fill = el("span");
    fill.style.width = Math.round((100 * used) / total) + "%";
    bar.append(fill);
    box.append(bar);
  }
  return box;
}

// The chart's samples: [time in ms, ONLINE nodes], one per change, kept for
// an hour in the tab's session storage so a reload keeps the line.
function storageKey() { return "muster-online:" + (fleet.databaseId || "?"); }

function loadSamples() {
  try {
    const stored = JSON.parse(sessionStorage.getItem(storageKey()) || "[]");
    fleet.samples = Array.isArray(stored) ? stored : [];
  } catch (_) {
    fleet.samples = [];
  }
}

function record(online) {
  const now = Date.now();
  const last = fleet.samples[fleet.samples.length - 1];
  if (!last || last[1] !== online) fleet.samples.push([now, online]);
  while (fleet.samples.length > 1 && fleet.samples[1][0] < now - HOUR_MS) fleet.samples.shift();
  try { sessionStorage.setItem(storageKey(), JSON.stringify(fleet.samples)); } catch (_) { /* full or disabled */ }
}

function renderChart() {
  const svg = $("chart");
  const ns = "http://www.w3.org/2000/svg";
  const width = 600, height = 120, now = Date.now();
  const samples = fleet.samples;
  // The last hour, or less while the page has watched for less: at least
  // five minutes, so the first changes are not squeezed into one edge.
  const watched = samples.length ? now - samples[0][0] : 0;
  const span = Math.min(HOUR_MS, Math.max(MIN_SPAN_MS, watched));
  const start = now - span;
  const max = Math.max(1, fleet.nodes.size, ...samples.map((s) => s[1]));
  const x = (t) => ((Math.max(t, start) - start) / span) * width;
  const y = (v) => height - 4 - (v / max) * (height - 8);
  const shapes = [];
  for (const fraction of [0.25, 0.5, 0.75]) {
    const grid = document.createElementNS(ns, "line");
    grid.setAttribute("class", "grid");
    grid.setAttribute("x1", 0); grid.setAttribute("x2", width);
    grid.setAttribute("y1", y(max * fraction)); grid.setAttribute("y2", y(max * fraction));
    shapes.push(grid);
  }
  if (samples.length) {
    const points = [];
    samples.forEach(([t, v], i) => {
      if (i > 0) points.push([x(t), y(samples[i - 1][1])]);
      points.push([x(t), y(v)]);
    });
    points.push([width, y(samples[samples.length - 1][1])]);
    const line = points.map(([px, py]) => px.toFixed(1) + "," + py.toFixed(1)).join(" ");
    const area = document.createElementNS(ns, "polygon");
    area.setAttribute("class", "area");
    area.setAttribute("points", points[0][0].toFixed(1) + "," + height + " " + line + " " + width + "," + height);
    const polyline = document.createElementNS(ns, "polyline");
    polyline.setAttribute("class", "line");
    polyline.setAttribute("points", line);
    shapes.push(area, polyline);
  }
  svg.replaceChildren(...shapes);
  $("chart-max").textContent = "max " + max;
  $("chart-start").textContent = Math.round(span / 60000) + " min ago";
}

function tick() {
  for (const cell of document.querySelectorAll("#nodes td.last-seen")) {
    const tr = cell.parentElement;
    if (tr.dataset.state !== "ONLINE") cell.textContent = relative(cell.dataset.lastSeen);
  }
  renderChart();
}

document.addEventListener("DOMContentLoaded", () => {
  connect(0);
  setInterval(tick, 1000);
});
