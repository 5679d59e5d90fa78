// flexgw dashboard: polls the admin listener's own /status (JSON) and /metrics (Prometheus text)
// and draws what they say. No framework, no build step, nothing fetched from elsewhere.
"use strict";

const POLL_MS = Number(new URLSearchParams(location.search).get("interval")) || 1000;
const POINTS = 120;
const COLORS = ["#2e8540", "#4a7bd0", "#d98c00", "#c0392b", "#7d4cc2", "#13858a", "#6b7280"];
const CLASS_COLORS = { "2xx": "#2e8540", "3xx": "#4a7bd0", "4xx": "#d98c00", "5xx": "#c0392b", "none": "#6b7280" };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key === "color") node.style.background = value; // CSSOM: allowed by the page's CSP
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// -- /metrics ---------------------------------------------------------------------------------

function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line[0] === "#") continue;
    const match = line.match(/^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/);
    if (!match) continue;
    const labels = {};
    const pairs = /([a-zA-Z_]\w*)="((?:[^"\\]|\\.)*)"/g;
    let pair;
    while ((pair = pairs.exec(match[2] || ""))) {
      labels[pair[1]] = pair[2].replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
    }
    samples.push({ name: match[1], labels, value: parseFloat(match[3]) });
  }
  return samples;
}

function sumBy(samples, name, key, filter) {
  const out = {};
  for (const s of samples) {
    if (s.name !== name || (filter && !filter(s.labels))) continue;
    const k = key ? key(s.labels) : "";
    out[k] = (out[k] || 0) + s.value;
  }
  return out;
}

function deltas(now, before) {
  const out = {};
  for (const [k, v] of Object.entries(now)) {
    const d = v - (before[k] || 0);
    out[k] = d >= 0 ? d : v; // a counter that went back: the process restarted
  }
  return out;
}

function quantile(buckets, q) {
  // buckets: {le: count} cumulative (deltas over the interval); linear inside the bucket
  const bounds = Object.keys(buckets).map((b) => (b === "+Inf" ? Infinity : parseFloat(b))).sort((a, b) => a - b);
  const count = (b) => buckets[b === Infinity ? "+Inf" : Object.keys(buckets).find((k) => parseFloat(k) === b)];
  const total = bounds.length ? count(bounds[bounds.length - 1]) : 0;
  if (!total) return null;
  const rank = q * total;
  let prevBound = 0, prevCount = 0;
  for (const bound of bounds) {
    const c = count(bound);
    if (c >= rank) {
      if (bound === Infinity) return prevBound;
      return prevBound + (bound - prevBound) * ((rank - prevCount) / Math.max(c - prevCount, 1e-9));
    }
    prevBound = bound; prevCount = c;
  }
  return prevBound;
}

// -- charts -----------------------------------------------------------------------------------

class Chart {
  constructor(id, unit, colors) {
    this.canvas = document.getElementById("chart-" + id);
    this.legend = document.getElementById("legend-" + id);
    this.unit = unit;
    this.colors = colors || {};
    this.series = {}; // name -> [values]
    this.length = 0;
  }

  push(values) {
    for (const name of Object.keys(values)) {
      if (!this.series[name]) this.series[name] = new Array(this.length).fill(null);
    }
    for (const [name, list] of Object.entries(this.series)) {
      list.push(name in values ? values[name] : 0);
      if (list.length > POINTS) list.shift();
    }
    this.length = Math.min(this.length + 1, POINTS);
    this.draw(values);
  }

  color(name, index) {
    return this.colors[name] || COLORS[index % COLORS.length];
  }

  draw(latest) {
    const { canvas } = this;
    const ctx = canvas.getContext("2d");
    const w = canvas.width, h = canvas.height, pad = 4;
    ctx.clearRect(0, 0, w, h);
    const names = Object.keys(this.series).sort();
    let max = 0;
    for (const name of names) for (const v of this.series[name]) if (v !== null && v > max) max = v;
    max = max > 0 ? max * 1.15 : 1;
    ctx.strokeStyle = "#e1e4e8";
    ctx.fillStyle = "#8a94a6";
    ctx.font = "10px sans-serif";
    ctx.beginPath(); ctx.moveTo(0, h / 2); ctx.lineTo(w, h / 2); ctx.stroke();
    ctx.fillText(formatNumber(max) + " " + this.unit, 4, 11);
    names.forEach((name, i) => {
      const list = this.series[name];
      ctx.strokeStyle = this.color(name, i);
      ctx.lineWidth = 2;
      ctx.beginPath();
      let started = false;
      list.forEach((v, x) => {
        if (v === null) return;
        const px = w - (list.length - 1 - x) * (w / (POINTS - 1));
        const py = h - pad - (v / max) * (h - 2 * pad);
        if (started) ctx.lineTo(px, py); else { ctx.moveTo(px, py); started = true; }
      });
      ctx.stroke();
    });
    if (!names.length) { this.legend.replaceChildren(el("span", { class: "muted" }, "none so far")); return; }
    this.legend.replaceChildren(...names.map((name, i) => el("span", { "data-series": name },
      el("i", { color: this.color(name, i) }),
      `${name} ${latest[name] === null || latest[name] === undefined ? "–" : formatNumber(latest[name])} ${this.unit}`)));
  }
}

function formatNumber(v) {
  if (v === null || v === undefined) return "–";
  return v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2);
}

const charts = {};
let previous = null;

async function pollMetrics() {
  const response = await fetch("/metrics", { cache: "no-store" });
  const samples = parseMetrics(await response.text());
  const now = performance.now() / 1000;
  const snapshot = {
    classes: sumBy(samples, "flexgw_requests_total", (l) => l.status_class),
    upstream: sumBy(samples, "flexgw_requests_total", (l) => l.cause, (l) => /^(upstream_|dns_)/.test(l.cause || "")),
    buckets: sumBy(samples, "flexgw_request_duration_seconds_bucket", (l) => l.le),
    limited: sumBy(samples, "flexgw_rate_limit_rejections_total", () => "429 rate limited"),
  };
  if (previous) {
    const dt = Math.max(now - previous.time, 0.001);
    const perSecond = (a, b) => Object.fromEntries(Object.entries(deltas(a, b)).map(([k, v]) => [k, v / dt]));
    const classes = perSecond(snapshot.classes, previous.snapshot.classes);
    for (const k of ["2xx", "4xx", "5xx"]) if (!(k in classes)) classes[k] = 0;
    charts.rps.push(classes);
    const window = deltas(snapshot.buckets, previous.snapshot.buckets);
    const p50 = quantile(window, 0.5), p99 = quantile(window, 0.99);
    charts.latency.push({ p50: p50 === null ? null : p50 * 1000, p99: p99 === null ? null : p99 * 1000 });
    charts.upstream.push(perSecond(snapshot.upstream, previous.snapshot.upstream));
    const limited = perSecond(snapshot.limited, previous.snapshot.limited);
    if (!("429 rate limited" in limited)) limited["429 rate limited"] = 0;
    charts.ratelimit.push(limited);
  }
  previous = { time: now, snapshot };
}

// -- /status ----------------------------------------------------------------------------------

function where(p) {
  if (!p.file) return "";
  return p.file + (p.line ? `:${p.line}` + (p.column ? `:${p.column}` : "") : "");
}

function policyList(policies) {
  if (!policies || !policies.length) return el("div", { class: "muted" }, "no policies");
  return el("ol", { class: "chain" }, ...policies.map((p) =>
    el("li", {}, `${p.kind} `, el("span", { class: "muted" }, `${p.name} (order ${p.order ?? "–"})`), " ",
      el("span", { class: "file" }, p.file || ""))));
}

function renderUpstream(u) {
  return el("li", {}, `→ ${u.address} (${u.upstream}, weight ${u.weight})`,
    u.policies && u.policies.length ? policyList(u.policies) : null);
}

function renderRoute(route) {
  return el("li", {}, route.name, el("ul", {}, ...(route.upstreams || []).map(renderUpstream)));
}

function renderApi(api) {
  return el("div", { class: "api", "data-api": api.key },
    el("h3", {}, api.key, " ", el("span", { class: "muted" }, api.basePath || "/"), " ",
      el("span", { class: "file" }, api.file || "")),
    el("div", {}, "policies, in chain order:"), policyList(api.policies),
    el("div", {}, "routes:"), el("ul", {}, ...(api.routes || []).map(renderRoute)));
}

function renderListener(listener) {
  return el("div", { class: "listener" },
    el("h3", {}, listener.address, listener.bound ? "" : " (not bound)"),
    ...(listener.apis || []).map(renderApi));
}

function renderCluster(c) {
  const budget = c.retryBudget
    ? `retry budget: ${c.retryBudget.active} active, exhausted ${c.retryBudget.exhausted} times`
    : "no retry policy";
  const notes = [c.algorithm, c.resolved ? "addresses from DNS" : "listed addresses",
    c.healthChecked ? "health-checked" : "not health-checked",
    c.outlierDetection ? "outlier detection" : null, c.panic ? "PANIC: every address in use" : null];
  const head = ["address", "state", "health check", "ejected", "ejections", "requests", "failures",
    "retries", "active", "idle"];
  return el("div", { class: "upstream", "data-upstream": c.upstream },
    el("h3", {}, c.upstream, " ", el("span", { class: "muted" }, notes.filter(Boolean).join(", "))),
    el("div", { class: c.retryBudget && c.retryBudget.exhausted ? "bad" : "muted", "data-budget": "" }, budget),
    el("table", {}, el("thead", {}, el("tr", {}, ...head.map((h) => el("th", {}, h)))),
      el("tbody", {}, ...(c.addresses || []).map((a) => el("tr", { "data-address": a.address },
        el("td", {}, a.address), el("td", { class: "state-" + a.state, "data-state": "" }, a.state),
        el("td", {}, a.health ?? "–"), el("td", {}, a.ejected ? "yes" : "no"), el("td", {}, a.ejections),
        el("td", {}, a.requests), el("td", {}, a.failures), el("td", {}, a.retries),
        el("td", {}, a.active), el("td", {}, a.idle))))));
}

function renderStatus(status) {
  const ready = document.getElementById("ready");
  ready.textContent = status.ready ? "ready" : "not ready";
  ready.className = "badge " + (status.ready ? "ready" : "not-ready");
  document.getElementById("generation").textContent = `configuration generation ${status.generation}`;
  document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  document.getElementById("reasons").replaceChildren(...(status.notReadyReasons || []).map((r) => el("li", { class: "error" }, r)));

  const reloads = (status.recentReloads || []).slice().reverse();
  document.querySelector("#reloads tbody").replaceChildren(...reloads.map((r) => el("tr", {},
    el("td", {}, new Date(r.time * 1000).toLocaleTimeString()),
    el("td", { class: r.ok ? "" : "bad" }, r.ok ? "applied" : "with errors"),
    el("td", {}, r.generation), el("td", {}, r.errors))));

  const apis = document.getElementById("apis");
  apis.replaceChildren(...(status.listeners || []).map(renderListener));
  if (!(status.listeners || []).length) apis.replaceChildren(el("div", { class: "muted" }, "no listener"));

  const clusters = status.upstreamClusters || [];
  document.getElementById("upstreams").replaceChildren(...(clusters.length ? clusters.map(renderCluster)
    : [el("div", { class: "muted" }, "no Service of several addresses, health checks, retries or outlier detection")]));

  const problems = status.problems || [];
  document.getElementById("problems").replaceChildren(...(problems.length ? problems.map((p) =>
    el("li", { class: p.severity }, `${p.severity}: `, el("span", { class: "file" }, where(p)), " ",
      p.resource ? `${p.resource}: ` : "", p.message)) : [el("li", { class: "muted" }, "none")]));

  document.querySelector("#resources tbody").replaceChildren(...(status.resources || []).map((r) => el("tr", {},
    el("td", {}, r.kind), el("td", {}, `${r.namespace}/${r.name}`), el("td", { class: "file" }, r.file || ""),
    el("td", { class: r.problems.length ? "bad" : "" }, r.problems.length ? r.problems.map((p) => p.message).join("; ") : "–"))));

  const workers = document.getElementById("workers");
  if (status.workers) {
    workers.replaceChildren(el("table", {}, el("thead", {}, el("tr", {}, ...["worker", "pid", "ready", "restarts", "status"].map((h) => el("th", {}, h)))),
      el("tbody", {}, ...status.workers.map((w) => el("tr", {}, el("td", {}, w.index), el("td", {}, w.pid ?? "–"),
        el("td", {}, w.ready ? "yes" : "no"), el("td", {}, w.restarts), el("td", {}, w.status || ""))))));
  } else {
    workers.replaceChildren(el("div", { class: "muted" }, "one process (no --workers)"));
  }
}

async function pollStatus() {
  const response = await fetch("/status", { cache: "no-store" });
  renderStatus(await response.json());
}

function loop(task, every) {
  const run = () => task().catch((error) => {
    document.getElementById("updated").textContent = "admin listener unreachable: " + error;
  }).finally(() => setTimeout(run, every));
  run();
}

document.addEventListener("DOMContentLoaded", () => {
  charts.rps = new Chart("rps", "req/s", CLASS_COLORS);
  charts.latency = new Chart("latency", "ms", { p50: "#4a7bd0", p99: "#c0392b" });
  charts.upstream = new Chart("upstream", "/s");
  charts.ratelimit = new Chart("ratelimit", "/s", { "429 rate limited": "#d98c00" });
  loop(pollMetrics, POLL_MS);
  loop(pollStatus, Math.max(POLL_MS, 1000));
});
