// The shipyard dashboard: every section arrives as a server-sent event from the Deployer
// (no polling); clicks POST to /api/actions with the session's CSRF token.  The DOM is
// built with textContent only: names and messages are never parsed as HTML.
"use strict";

const SECTIONS = ["nodes", "deployments", "runs", "traffic", "events", "flows"];
const COLORS = ["#0969da", "#cf222e", "#1a7f37", "#8250df", "#bf8700", "#1b7c83"];
const SVG = "http://www.w3.org/2000/svg";
const state = {};
let session = null;

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "onclick") el.addEventListener("click", v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  for (const c of children) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

function badge(text) { return h("span", { class: `badge ${text}` }, text); }
function ago(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  if (seconds < 60) return `${seconds.toFixed(1)} s ago`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  return `${Math.round(seconds / 3600)} h ago`;
}
function when(ts) { return ts ? new Date(ts * 1000).toLocaleTimeString() : "-"; }
function secs(v) { return v === null || v === undefined ? "-" : `${Number(v).toFixed(2)} s`; }

function notice(text, bad) {
  const el = document.getElementById("notice");
  el.hidden = !text;
  el.textContent = text || "";
  el.className = bad ? "bad" : "";
}

// -- fleet ---------------------------------------------------------------------------

function renderNodes() {
  const nodes = state.nodes || [];
  const body = document.querySelector("#nodes tbody");
  const online = nodes.filter((n) => n.status === "online").length;
  document.getElementById("fleet-count").textContent =
    `${online} online, ${nodes.length - online} lost`;
  body.replaceChildren(...nodes.map((n) => {
    const cpu = n.cpu_pct ?? n.cpu_percent ?? n.cpu;
    const mem = n.rss_bytes || n.memory_bytes;
    return h("tr", { "data-node": n.name, "data-status": n.status },
      h("td", {}, n.name), h("td", {}, n.role), h("td", {}, n.infra),
      h("td", { class: "status" }, badge(n.status)),
      h("td", {}, ago(n.last_seen_s)), h("td", {}, `${n.host} / ${n.pid}`),
      h("td", {}, n.version),
      h("td", {}, cpu === undefined ? "-" : `${Number(cpu).toFixed(0)} %`),
      h("td", {}, mem === undefined ? (n.rss_mb !== undefined ? `${n.rss_mb} MB` : "-")
        : `${(mem / 1048576).toFixed(0)} MB`));
  }));
}

// -- deployments ---------------------------------------------------------------------

async function act(body, button) {
  button.disabled = true;
  notice("");
  try {
    const reply = await fetch("/api/actions", {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": session.csrf },
      body: JSON.stringify(body),
    });
    const data = await reply.json();
    if (!reply.ok) {
      notice(`${body.action} refused: ${data.error ? data.error.message : reply.status}`, true);
    } else {
      notice(`${body.action} of ${body.name} on ${body.infra} sent: it now wants ` +
             `${data.deployment.desired}`);
    }
  } catch (err) {
    notice(`${body.action} failed: ${err}`, true);
  } finally {
    button.disabled = false;
  }
}

function actionButton(label, body, title) {
  const can = session && session.can_act;
  const button = h("button", {
    "data-action": body.action, "data-name": body.name, "data-infra": body.infra,
    "data-target": body.target || null, disabled: !can,
    title: can ? title : (session ? session.why_not : "not logged in"),
  }, label);
  button.addEventListener("click", () => act(body, button));
  return button;
}

function renderDeployments() {
  const list = document.getElementById("deployment-list");
  const deployments = state.deployments || [];
  if (!deployments.length) {
    list.replaceChildren(h("p", { class: "meta" }, "Nothing deployed yet."));
    return;
  }
  list.replaceChildren(...deployments.map((d) => {
    const base = { kind: d.kind, infra: d.infra, name: d.project };
    const rows = (d.history || []).map((u) => h("tr", {},
      h("td", {}, when(u.at)), h("td", {}, u.action), h("td", {}, u.from_bundle || "-"),
      h("td", {}, u.to_bundle), h("td", {}, u.by), h("td", {}, badge(u.result)),
      h("td", {}, u.detail || (u.warnings || []).join("; ")),
      h("td", {}, u.redeploy && u.to_bundle !== d.desired
        ? actionButton("redeploy", { ...base, action: "deploy", target: u.redeploy,
                                      revision: d.revision },
                       `deploy ${u.to_bundle} again`)
        : null)));
    return h("div", { class: "card", "data-deployment": `${d.kind}:${d.infra}:${d.project}` },
      h("h3", {}, `${d.project}`, h("span", { class: "meta" }, `${d.kind} on ${d.infra}`),
        badge(d.health), badge(d.state)),
      h("div", {}, "desired ", h("b", { class: "desired" }, d.desired),
        d.previous ? ` · previous ${d.previous}` : "",
        d.updated_by ? ` · by ${d.updated_by} at ${when(d.updated_at)}` : "", " ",
        d.can_rollback ? actionButton("rollback", { ...base, action: "rollback" },
                                      `go back to ${d.previous}`) : null),
      d.reasons.length ? h("ul", { class: "reasons" }, d.reasons.map((r) => h("li", {}, r)))
        : null,
      h("div", { class: "meta" }, (d.nodes || []).map((n) =>
        `${n.node}: ${n.running || "nothing"}${n.status !== "online" ? " (lost)" : ""}`)
        .join(" · ")),
      rows.length ? h("table", { class: "history" },
        h("thead", {}, h("tr", {}, ["When", "Action", "From", "To", "By", "Result", "Detail",
                                    ""].map((t) => h("th", {}, t)))),
        h("tbody", {}, rows)) : null);
  }));
}

// -- traffic -------------------------------------------------------------------------

function chart(title, series, pick, unit) {
  const W = 420, H = 140, P = 30;
  const points = series.flatMap((g) => g.points);
  if (!points.length) return null;
  const t0 = Math.min(...points.map((p) => p[0])), t1 = Math.max(...points.map((p) => p[0]));
  const vmax = Math.max(1e-9, ...points.map((p) => pick(p) || 0));
  const x = (t) => P + (t1 > t0 ? (t - t0) / (t1 - t0) : 1) * (W - P - 10);
  const y = (v) => H - 20 - (v / vmax) * (H - 40);
  const svg = s("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img" });
  svg.append(s("text", { x: P, y: 12 }, `${title} (max ${vmax.toFixed(2)} ${unit})`));
  svg.append(s("line", { class: "axis", x1: P, y1: H - 20, x2: W - 10, y2: H - 20 }));
  series.forEach((g, i) => {
    const pts = g.points.filter((p) => pick(p) !== null)
      .map((p) => `${x(p[0]).toFixed(1)},${y(pick(p)).toFixed(1)}`);
    if (pts.length) {
      svg.append(s("polyline", { points: pts.join(" "), fill: "none",
                                 stroke: COLORS[i % COLORS.length], "stroke-width": 1.6 }));
    }
  });
  svg.append(s("text", { x: P, y: H - 5, class: "small" }, when(t0)));
  svg.append(s("text", { x: W - 70, y: H - 5, class: "small" }, when(t1)));
  return h("div", { class: "chart" }, svg);
}

function renderTraffic() {
  const box = document.getElementById("charts");
  const byService = {};
  for (const g of state.traffic || []) (byService[g.service] ||= []).push(g);
  const services = Object.keys(byService).sort();
  if (!services.length) {
    box.replaceChildren(h("p", { class: "meta" }, "No API traffic reported yet."));
    return;
  }
  box.replaceChildren(...services.map((name) => {
    const series = byService[name];
    return h("div", { class: "card", "data-service": name },
      h("h3", {}, name),
      h("div", { class: "legend" }, series.map((g, i) => {
        const last = g.points[g.points.length - 1] || [];
        const swatch = h("b", {}, "■ ");
        swatch.style.color = COLORS[i % COLORS.length];
        const errors = last[2] === null || last[2] === undefined ? "-"
          : (last[2] * 100).toFixed(1);
        return h("span", {}, swatch, `${g.generation}: ${last[1] ?? 0} req/s, ` +
          `${errors} % errors, p95 ${last[3] ?? "-"} ms`);
      })),
      chart("requests/s", series, (p) => p[1], "req/s"),
      chart("error rate", series, (p) => p[2], ""),
      chart("p95 latency", series, (p) => p[3], "ms"));
  }));
}

// -- runs ----------------------------------------------------------------------------

async function showLog(run) {
  const box = document.getElementById("run-log");
  box.hidden = false;
  document.getElementById("run-log-title").textContent =
    `log of ${run.run_id} (${run.project}/${run.scenario})`;
  const pre = box.querySelector("pre");
  pre.textContent = "loading ...";
  const reply = await fetch(`/api/runs/${encodeURIComponent(run.run_id)}/log`,
                            { credentials: "same-origin" });
  const data = await reply.json();
  pre.textContent = reply.ok ? (data.truncated ? "[... cut ...]\n" : "") + data.text
    : `no log: ${data.error ? data.error.message : reply.status}`;
}

function renderRuns() {
  const body = document.querySelector("#run-table tbody");
  body.replaceChildren(...(state.runs || []).map((r) => {
    const button = h("button", {}, "log");
    button.addEventListener("click", () => showLog(r));
    return h("tr", { "data-run": r.run_id },
      h("td", {}, r.run_id), h("td", {}, `${r.project} / ${r.scenario}`),
      h("td", {}, r.infra), h("td", {}, r.node), h("td", {}, r.trigger),
      h("td", {}, badge(r.outcome), r.error ? h("div", { class: "meta" }, r.error) : null,
        (r.steps || []).length ? h("div", { class: "meta" }, r.steps.map((st) =>
          `${st.index + 1}. ${st.name}: ${st.outcome}`).join(" · ")) : null),
      h("td", {}, secs(r.duration_s)), h("td", {}, when(r.started_at)), h("td", {}, button));
  }));
}

// -- flows ---------------------------------------------------------------------------

function flowPicture(g) {
  const svg = s("svg", { width: g.width, height: g.height, viewBox: `0 0 ${g.width} ${g.height}`,
                         role: "img" });
  for (const e of g.edges) {
    const [x1, y1] = [e.from[0] + g.box_w, e.from[1] + g.box_h / 2];
    const [x2, y2] = [e.to[0], e.to[1] + g.box_h / 2];
    const mid = (x1 + x2) / 2;
    svg.append(s("path", { class: "edge", d: `M${x1},${y1} C${mid},${y1} ${mid},${y2} ${x2},${y2}` }));
  }
  for (const b of g.boxes) {
    const built = b.build ? b.build.outcome : "";
    const group = s("g", { "data-box": `${b.kind}:${b.name}` });
    group.append(s("rect", { x: b.x, y: b.y, width: g.box_w, height: g.box_h, rx: b.kind === "recipe" ? 14 : 3,
                             class: `${b.kind} ${built}` }));
    group.append(s("text", { x: b.x + 8, y: b.y + 14 }, b.name));
    if (b.kind === "dataset") {
      const parts = [];
      if (b.build) parts.push(`build ${b.build.outcome}`);
      if (b.check) parts.push(`check ${b.check.outcome}`);
      group.append(s("text", { x: b.x + 8, y: b.y + 28, class: "small" },
                     parts.length ? parts.join(" · ") : "never built here"));
      const tip = s("title", {}, [b.build ? `last build: ${b.build.outcome} in run ${b.build.run}` +
        (b.build.message ? ` (${b.build.message})` : "") : "no build recorded",
        b.check ? `last check: ${b.check.outcome} in run ${b.check.run}` +
        (b.check.message ? ` (${b.check.message})` : "") : "no check recorded"].join("\n"));
      group.append(tip);
    } else {
      group.append(s("text", { x: b.x + 8, y: b.y + 28, class: "small" }, "recipe"));
    }
    svg.append(group);
  }
  return svg;
}

function renderFlows() {
  const list = document.getElementById("flow-list");
  const flows = state.flows || [];
  if (!flows.length) {
    list.replaceChildren(h("p", { class: "meta" }, "No project deployed yet."));
    return;
  }
  list.replaceChildren(...flows.map((f) => h("div", { class: "card", "data-flow": f.project },
    h("h3", {}, f.project, h("span", { class: "meta" }, `bundle ${f.bundle} on ${f.infra}`)),
    f.graph ? flowPicture(f.graph)
      : h("p", { class: "meta" }, f.error || "reading the bundle's manifest ..."))));
}

// -- events --------------------------------------------------------------------------

function renderEvents() {
  const list = document.getElementById("event-list");
  list.replaceChildren(...(state.events || []).slice().reverse().map((e) =>
    h("li", { "data-type": e.type }, h("time", {}, when(e.ts)), e.summary)));
}

const RENDER = { nodes: renderNodes, deployments: renderDeployments, runs: renderRuns,
                 traffic: renderTraffic, events: renderEvents, flows: renderFlows };

// -- the feed ------------------------------------------------------------------------

function follow() {
  const live = document.getElementById("live");
  const feed = new EventSource("/api/events");
  feed.onopen = () => { live.dataset.state = "live"; live.textContent = "live"; };
  feed.onerror = () => {
    live.dataset.state = "reconnecting";
    live.textContent = "reconnecting";  // EventSource retries by itself after a network
    // error, but gives up on an error status: a session that ended (expired, or the
    // logins changed) or too many pages open.
    if (feed.readyState === EventSource.CLOSED) setTimeout(resume, 2000);
  };
  for (const name of SECTIONS) {
    feed.addEventListener(name, (ev) => {
      state[name] = JSON.parse(ev.data);
      RENDER[name]();
    });
  }
}

async function resume() {
  let reply;
  try {
    reply = await fetch("/api/session", { credentials: "same-origin" });
  } catch (err) {
    setTimeout(resume, 2000);  // the Deployer is still down
    return;
  }
  if (reply.status === 401) { window.location = "/login?ended=1"; return; }
  if (!reply.ok) { setTimeout(resume, 5000); return; }
  session = await reply.json();
  follow();
}

async function start() {
  const reply = await fetch("/api/session", { credentials: "same-origin" });
  if (reply.status === 401) { window.location = "/login"; return; }
  session = await reply.json();
  document.getElementById("who").textContent =
    `${session.user}` + (session.acts_as ? ` (acts as ${session.acts_as})` : "");
  if (!session.can_act) notice(session.why_not);
  follow();
}

document.addEventListener("DOMContentLoaded", start);
