// doppel console: one page, no framework, no build step. Every value
// from the agents goes into the page as text (textContent), never as
// HTML. Live updates come from the server-sent event stream /api/stream.
"use strict";

const S = {
  csrf: "",
  who: "",
  snap: null,        // the last snapshot (servers, jobs)
  route: null,       // {page, job}
  history: {},       // job -> samples
  histJob: null,
  window: 900,       // chart window, seconds
  events: null,      // {job, list, errors}
  eventsTimer: null,
  stream: null,
  lastState: 0,
};

// ---- small helpers ------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function bytes(n) {
  if (n === null || n === undefined || n < 0) return "–";
  const u = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + u[i];
}

function secs(s) {
  if (s === null || s === undefined || s < 0) return "–";
  if (s < 1) return (s * 1000).toFixed(0) + " ms";
  if (s < 90) return s.toFixed(1) + " s";
  if (s < 5400) return Math.round(s / 60) + " min";
  return (s / 3600).toFixed(1) + " h";
}

function headlineClass(level) {
  return "hl hl-" + String(level || "UNKNOWN").toLowerCase().replace(/\s+/g, "-");
}

function timeOf(t) {
  const d = new Date(t);
  return d.toLocaleTimeString([], { hour12: false }) + "." + String(d.getMilliseconds()).padStart(3, "0");
}

function toast(msg, kind) {
  const t = h("div", { class: "toast " + (kind || ""), role: "status", title: "click to dismiss", onclick: () => t.remove() }, msg);
  document.getElementById("toasts").append(t);
  setTimeout(() => t.remove(), kind === "error" ? 15000 : 6000);
}

async function api(method, path, body) {
  const opt = { method, headers: {}, credentials: "same-origin" };
  if (method !== "GET") opt.headers["X-CSRF-Token"] = S.csrf;
  if (body !== undefined) {
    opt.headers["Content-Type"] = "application/json";
    opt.body = JSON.stringify(body);
  }
  const r = await fetch(path, opt);
  if (r.status === 401) { location.href = "/login"; throw new Error("not logged in"); }
  let data = null;
  const text = await r.text();
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = { error: text }; }
  if (!r.ok && !(data && (data.problems || data.created !== undefined))) {
    const err = new Error((data && data.error) || ("HTTP " + r.status));
    err.status = r.status;
    err.data = data;
    throw err;
  }
  return { status: r.status, data };
}

function job(name) {
  return S.snap && S.snap.jobs.find((j) => j.name === name);
}

// ---- routing --------------------------------------------------------------

function parseRoute() {
  const hash = location.hash.replace(/^#/, "") || "/";
  const parts = hash.split("/").filter(Boolean);
  if (parts[0] === "servers") return { page: "servers" };
  if (parts[0] === "create") return { page: "create" };
  if (parts[0] === "job" && parts[1]) return { page: "job", job: decodeURIComponent(parts[1]) };
  return { page: "jobs" };
}

function go() {
  S.route = parseRoute();
  for (const id of ["nav-jobs", "nav-servers", "nav-create"]) document.getElementById(id).classList.remove("active");
  const nav = { jobs: "nav-jobs", job: "nav-jobs", servers: "nav-servers", create: "nav-create" }[S.route.page];
  document.getElementById(nav).classList.add("active");
  clearInterval(S.eventsTimer);
  S.eventsTimer = null;
  const main = document.getElementById("main");
  main.replaceChildren();
  if (S.route.page === "servers") buildServers(main);
  else if (S.route.page === "create") buildCreate(main);
  else if (S.route.page === "job") buildJob(main, S.route.job);
  else buildJobs(main);
  refresh();
}

// refresh redraws the live parts of the current page from the snapshot.
function refresh() {
  if (!S.snap) return;
  const r = S.route;
  if (r.page === "jobs") renderJobs();
  else if (r.page === "servers") renderServers();
  else if (r.page === "create") renderCreateServers();
  else if (r.page === "job") renderJob(r.job);
}

// ---- live updates ---------------------------------------------------------

function connect() {
  if (S.stream) S.stream.close();
  const es = new EventSource("/api/stream");
  S.stream = es;
  es.addEventListener("state", (ev) => {
    const snap = JSON.parse(ev.data);
    S.snap = snap;
    S.lastState = Date.now();
    for (const j of snap.jobs) {
      const hist = S.history[j.name];
      if (hist && j.sample && (!hist.length || hist[hist.length - 1].t < j.sample.t)) {
        hist.push(j.sample);
        const cut = j.sample.t - 3600 * 1000;
        while (hist.length && hist[0].t < cut) hist.shift();
      }
    }
    setLive(true);
    refresh();
  });
  es.onerror = () => {
    setLive(false);
    // EventSource reconnects by itself; a lost session sends us to login.
    fetch("/api/session", { credentials: "same-origin" }).then((r) => { if (r.status === 401) location.href = "/login"; }).catch(() => {});
  };
}

function setLive(ok) {
  const el = document.getElementById("live");
  el.textContent = ok ? "live" : "reconnecting…";
  el.classList.toggle("stale", !ok);
}

setInterval(() => {
  if (S.lastState && Date.now() - S.lastState > 5000) setLive(false);
}, 1000);

// ---- jobs table -------------------------------------------------------------

function buildJobs(main) {
  main.append(
    h("section", { class: "card" },
      h("div", { class: "card-head" }, h("h2", { text: "Jobs" }), h("a", { href: "#/create", class: "button", text: "New job" })),
      h("div", { id: "jobs-table", class: "table-wrap" })),
    h("section", { class: "card" },
      h("div", { class: "card-head" }, h("h2", { text: "Servers" }), h("a", { href: "#/servers", class: "button", text: "Manage" })),
      h("div", { id: "servers-strip", class: "strip" })));
}

function progress(sync) {
  if (!sync) return h("span", { class: "muted", text: "–" });
  const bar = h("span", { class: "bar" }, h("span", { class: "fill" }));
  bar.firstChild.style.width = Math.max(0, Math.min(100, sync.percent)).toFixed(1) + "%";
  let line = sync.what + " " + sync.percent.toFixed(1) + "%, " + bytes(sync.remaining) + " left";
  if (sync.rate > 0) line += ", " + bytes(sync.rate) + "/s";
  if (sync.eta >= 0) line += ", ETA " + secs(sync.eta);
  return h("span", { class: "progress" }, bar, h("span", { class: "small", text: line }));
}

function renderJobs() {
  const wrap = document.getElementById("jobs-table");
  if (!wrap) return;
  const jobs = S.snap.jobs;
  if (!jobs.length) {
    wrap.replaceChildren(h("p", { class: "muted" }, S.snap.servers.length ? "No jobs yet. " : "No servers yet: add the agents first. ",
      h("a", { href: S.snap.servers.length ? "#/create" : "#/servers", text: S.snap.servers.length ? "Create a job" : "Add a server" })));
  } else {
    const head = ["Job", "State", "Source → Target", "Target data", "Mirror", "Replication", "Transmit", "Queue (mem / disk)", "RPO", "Arbiter", "Failover monitor"];
    const table = h("table", { class: "jobs" },
      h("thead", {}, h("tr", {}, head.map((c) => h("th", { text: c })))),
      h("tbody", {}, jobs.map((j) => h("tr", { dataset: { job: j.name }, class: "job-row", onclick: () => { location.hash = "#/job/" + encodeURIComponent(j.name); } },
        h("td", { "data-label": "Job" }, h("a", { href: "#/job/" + encodeURIComponent(j.name), class: "job-name", text: j.name })),
        h("td", { "data-label": "State" }, h("span", { class: headlineClass(j.verdict.headline), text: j.verdict.headline })),
        h("td", { "data-label": "Source → Target", class: "direction", text: j.direction }),
        h("td", { "data-label": "Target data", text: j.target_data }),
        h("td", { "data-label": "Mirror" }, progress(j.sync)),
        h("td", { "data-label": "Replication", class: "replication", text: j.replication }),
        h("td", { "data-label": "Transmit", text: j.mode + ", compression " + j.compression }),
        h("td", { "data-label": "Queue", class: "num", text: bytes(j.queue_memory) + " / " + bytes(j.queue_disk) }),
        h("td", { "data-label": "RPO", class: "num", text: secs(j.rpo) }),
        h("td", { "data-label": "Arbiter", class: "small", text: j.arbiter || "none" }),
        h("td", { "data-label": "Failover monitor", class: "countdown" + (j.countdown ? " alert" : ""), text: j.countdown || ("heard, failover " + (j.failover || "–")) }),
      ))));
    wrap.replaceChildren(table);
  }
  const strip = document.getElementById("servers-strip");
  if (strip) {
    strip.replaceChildren(...S.snap.servers.map((s) => h("span", { class: "chip " + (s.reachable ? "ok" : "down"), title: s.error || s.addr },
      h("span", { class: "dot" }), s.name + " " + (s.reachable ? (s.version || "") : "unreachable"))));
    if (!S.snap.servers.length) strip.append(h("span", { class: "muted", text: "none" }));
  }
}

// ---- servers ----------------------------------------------------------------

function buildServers(main) {
  const out = h("div", { id: "add-result" });
  const fpBox = h("div", { id: "fp-box", hidden: true });
  const name = h("input", { id: "srv-name", placeholder: "vm1", autocomplete: "off", required: true });
  const addr = h("input", { id: "srv-addr", placeholder: "172.17.22.11 or HOST:6320", autocomplete: "off", required: true });
  const token = h("textarea", { id: "srv-token", rows: 2, placeholder: "the agent's STATE/token (one line)", autocomplete: "off" });
  let fingerprint = "";
  const fetchBtn = h("button", { type: "button", id: "srv-fetch", class: "primary", text: "Connect" });
  const addBtn = h("button", { type: "button", id: "srv-add", class: "primary", text: "Trust this certificate and add" });
  fetchBtn.addEventListener("click", async () => {
    out.replaceChildren();
    try {
      const r = await api("POST", "/api/servers/fingerprint", { addr: addr.value });
      fingerprint = r.data.fingerprint;
      fpBox.replaceChildren(
        h("p", {}, "Agent ", h("b", { text: r.data.addr }), " presents the certificate"),
        h("p", { class: "fingerprint", id: "srv-fp", text: fingerprint }),
        h("p", { class: "muted small", text: "Compare it with the agent's log line \"agent ready … fingerprint=…\" before you trust it." }),
        h("label", { for: "srv-token", text: "API token" }), token, addBtn);
      fpBox.hidden = false;
    } catch (e) {
      out.replaceChildren(h("p", { class: "error", text: e.message }));
    }
  });
  addBtn.addEventListener("click", async () => {
    out.replaceChildren();
    try {
      const r = await api("POST", "/api/servers", { name: name.value, addr: addr.value, fingerprint, token: token.value });
      toast("added " + r.data.name + ": " + r.data.addr + " (host " + r.data.hostname + ", agent " + r.data.version + ")");
      name.value = addr.value = token.value = "";
      fpBox.hidden = true;
    } catch (e) {
      out.replaceChildren(h("p", { class: "error", text: e.message }));
    }
  });
  main.append(
    h("section", { class: "card" }, h("h2", { text: "Servers" }), h("div", { id: "servers-table", class: "table-wrap" })),
    h("section", { class: "card narrow" }, h("h2", { text: "Add a server" }),
      h("p", { class: "muted small", text: "The console connects to the agent's control API (port 6320), shows its certificate's fingerprint for you to confirm, and checks its token. The servers are shared with the doppel CLI (its client config)." }),
      h("div", { class: "form" },
        h("label", { for: "srv-name", text: "Name" }), name,
        h("label", { for: "srv-addr", text: "Address" }), addr,
        fetchBtn, fpBox, out)));
}

function renderServers() {
  const wrap = document.getElementById("servers-table");
  if (!wrap) return;
  const servers = S.snap.servers;
  if (!servers.length) {
    wrap.replaceChildren(h("p", { class: "muted", text: "No servers yet." }));
    return;
  }
  const head = ["Name", "Address", "Fingerprint", "Agent", "Host", "Reachable", "Probe", "Paths", ""];
  wrap.replaceChildren(h("table", { class: "servers" },
    h("thead", {}, h("tr", {}, head.map((c) => h("th", { text: c })))),
    h("tbody", {}, servers.map((s) => h("tr", { dataset: { server: s.name } },
      h("td", { "data-label": "Name", class: "job-name", text: s.name }),
      h("td", { "data-label": "Address", text: s.addr }),
      h("td", { "data-label": "Fingerprint", class: "fingerprint small", title: s.fingerprint, text: s.fingerprint.slice(0, 23) + "…" }),
      h("td", { "data-label": "Agent", text: s.version || "–" }),
      h("td", { "data-label": "Host", text: s.hostname || "–" }),
      h("td", { "data-label": "Reachable", class: s.reachable ? "ok-text" : "down-text", text: s.reachable ? "yes" : "no: " + (s.error || "") }),
      h("td", { "data-label": "Probe", text: s.probe || (s.subsystems && s.subsystems.probe) || "–" }),
      h("td", { "data-label": "Paths", class: "small", text: (s.paths || []).join("; ") || "–" }),
      h("td", {}, h("button", { type: "button", class: "link", onclick: () => removeServer(s.name), text: "Remove" })),
    )))));
}

function removeServer(name) {
  openModal({
    title: "Remove server " + name + " from the console?",
    body: [h("p", { text: "The console (and the CLI, which shares the list) forgets " + name + ": its address, pinned certificate and token. The agent and its jobs are not touched." })],
    confirm: "Remove",
    run: async () => {
      await api("DELETE", "/api/servers/" + encodeURIComponent(name));
      toast("removed " + name);
    },
  });
}

// ---- job page ---------------------------------------------------------------

function buildJob(main, name) {
  main.append(
    h("section", { class: "card", id: "job-head" }),
    h("section", { class: "card" }, h("h2", { text: "Actions" }), h("div", { id: "job-actions", class: "actions" })),
    h("section", { class: "card" }, h("h2", { text: "Sides" }), h("div", { id: "job-sides", class: "table-wrap" })),
    h("section", { class: "card" },
      h("div", { class: "card-head" }, h("h2", { text: "Charts" }),
        h("span", { class: "seg", id: "chart-window" }, [[300, "5 min"], [900, "15 min"], [3600, "1 h"]].map(([w, l]) =>
          h("button", { type: "button", class: S.window === w ? "on" : "", onclick: (ev) => { S.window = w; for (const b of ev.target.parentNode.children) b.classList.toggle("on", b === ev.target); renderCharts(name); }, text: l })))),
      h("div", { id: "charts", class: "charts" })),
    h("section", { class: "card", id: "snapshots-card" }, h("div", { class: "card-head" }, h("h2", { text: "Snapshots" }), h("span", { class: "muted small", id: "snapshots-note" })),
      h("div", { id: "job-snapshots", class: "table-wrap" })),
    h("section", { class: "card" }, h("div", { class: "card-head" }, h("h2", { text: "Events" }), h("span", { class: "muted small", id: "events-note" })),
      h("div", { id: "job-events", class: "table-wrap events" })));
  if (S.histJob !== name) {
    S.histJob = name;
    S.history = {};
    api("GET", "/api/jobs/" + encodeURIComponent(name) + "/history").then((r) => {
      S.history[name] = r.data || [];
      renderCharts(name);
    }).catch(() => {});
  }
  loadEvents(name);
  loadSnapshots(name);
  S.eventsTimer = setInterval(() => { loadEvents(name); loadSnapshots(name); }, 3000);
}

async function loadSnapshots(name) {
  const wrap = document.getElementById("job-snapshots");
  const note = document.getElementById("snapshots-note");
  if (!wrap) return;
  let d;
  try {
    d = (await api("GET", "/api/jobs/" + encodeURIComponent(name) + "/snapshots")).data;
  } catch (e) {
    wrap.replaceChildren(e.status === 409
      ? h("p", { class: "muted" }, h("b", { text: "No target answers now; snapshots are listed from the job's target. " }), h("span", { class: "small", text: e.message }))
      : h("p", { class: "muted", text: e.status === 501 ? "The target's agent has no snapshots." : e.message }));
    note.textContent = "";
    return;
  }
  const l = d.list;
  note.textContent = l.unsupported ? "" : "on " + d.server + ": " + (l.describe || l.mechanism) + (l.schedule && l.schedule.every ? ", every " + secs(l.schedule.every / 1e9) + ", keep " + l.schedule.keep : ", no schedule");
  const parts = [];
  if (l.unsupported) parts.push(h("p", { class: "refusal", text: "No snapshots on " + d.server + ": " + l.unsupported }));
  if (l.test_failover) {
    const t = l.test_failover;
    parts.push(h("p", { class: "testfo", id: "test-failover-status" }, h("b", { text: "Test failover running: " }),
      "a clone of " + (t.from || "the consistent image") + " served at " + t.device + " since " + timeOf(t.started) + ((t.clients || []).length ? ", clients: " + t.clients.join(", ") : "")));
  }
  if (!l.snapshots.length) {
    if (!l.unsupported) parts.push(h("p", { class: "muted", text: "No snapshots yet." }));
  } else {
    parts.push(h("table", { class: "snapshots" },
      h("thead", {}, h("tr", {}, ["Name", "Kind", "Taken", "Point", "Size", "Allocated / exclusive", "Note", ""].map((c) => h("th", { text: c })))),
      h("tbody", {}, l.snapshots.slice().reverse().map((x) => h("tr", { dataset: { snapshot: x.name } },
        h("td", { "data-label": "Name", class: "job-name", text: x.name }),
        h("td", { "data-label": "Kind", text: x.kind + (x.point.app_consistent ? ", app-consistent" : "") }),
        h("td", { "data-label": "Taken", class: "nowrap", text: timeOf(x.created) + " (" + secs(x.age / 1e9) + " ago)" }),
        h("td", { "data-label": "Point", class: "small", text: "gen " + x.point.generation + ", stream " + x.point.stream + ", seq " + x.point.seq }),
        h("td", { "data-label": "Size", text: bytes(x.size) }),
        h("td", { "data-label": "Space", text: bytes(x.usage.allocated) + " / " + bytes(x.usage.exclusive) }),
        h("td", { "data-label": "Note", class: "small", text: x.note || "" }),
        h("td", {}, h("button", { type: "button", class: "link", onclick: () => confirmAction(name, "delete-snapshot", { snapshot: x.name }), text: "Delete" })),
      )))));
  }
  wrap.replaceChildren(...parts);
}

async function loadEvents(name) {
  try {
    const r = await api("GET", "/api/jobs/" + encodeURIComponent(name) + "/events");
    S.events = { job: name, list: r.data.events, errors: r.data.errors };
    renderEvents();
  } catch (e) {
    const note = document.getElementById("events-note");
    if (note) note.textContent = e.message;
  }
}

function renderEvents() {
  const wrap = document.getElementById("job-events");
  if (!wrap || !S.events) return;
  const list = S.events.list.slice().reverse();
  document.getElementById("events-note").textContent = (S.events.errors || []).length ? "not shown: " + S.events.errors.join("; ") : list.length + " events, newest first";
  wrap.replaceChildren(h("table", { class: "events" },
    h("thead", {}, h("tr", {}, ["Time", "Server", "Epoch", "Kind", "What happened"].map((c) => h("th", { text: c })))),
    h("tbody", {}, list.map((e) => h("tr", { class: "ev-" + e.kind },
      h("td", { "data-label": "Time", class: "nowrap", text: timeOf(e.time) }),
      h("td", { "data-label": "Server", text: e.server }),
      h("td", { "data-label": "Epoch", text: e.kind === "console" ? "" : e.epoch }),
      h("td", { "data-label": "Kind", text: e.kind }),
      h("td", { "data-label": "What", class: "msg", text: e.msg }))))));
}

function fact(label, value, cls, id) {
  return h("div", { class: "fact" }, h("span", { class: "fact-label", text: label }), h("span", { class: "fact-value " + (cls || ""), id, text: value }));
}

function renderJob(name) {
  const head = document.getElementById("job-head");
  if (!head) return;
  const j = job(name);
  if (!j) {
    head.replaceChildren(h("h2", { text: name }), h("p", { class: "muted", text: "This job is not on any server the console knows (deleted, or its servers are not added)." }), h("a", { href: "#/", text: "All jobs" }));
    document.getElementById("job-actions").replaceChildren();
    return;
  }
  const v = j.verdict;
  head.replaceChildren(...[
    h("div", { class: "job-title" }, h("h2", { text: j.name }), h("span", { class: headlineClass(v.headline), id: "job-headline", text: v.headline })),
    h("p", { class: "reason", id: "job-reason", text: v.reason }),
    j.risk_line ? h("p", { class: "risk", text: j.risk_line }) : null,
    j.countdown ? h("p", { class: "countdown alert", id: "job-countdown", text: j.countdown }) : null,
    h("div", { class: "facts" },
      fact("Source → Target", j.direction, "", "job-direction"),
      fact("Home", j.home),
      fact("Target data", j.target_data),
      fact("Replication", j.replication, "", "job-replication"),
      fact("Transmit", j.mode + ", compression " + j.compression),
      fact("Failover", j.failover),
      fact("Epoch", String(j.epoch)),
      fact("Queue (mem / disk)", bytes(j.queue_memory) + " / " + bytes(j.queue_disk)),
      fact("RPO", secs(j.rpo)),
      fact("Dirty", bytes(j.dirty_bytes)),
      fact("Throughput", j.throughput >= 0 ? bytes(j.throughput) + "/s" : "–"),
      fact("Service IPs", (j.service_ips || []).join(", ") || "none"),
      fact("Arbiter", j.arbiter || "none")),
    j.sync ? h("div", { class: "sync" }, progress(j.sync)) : null,
  ].filter(Boolean));
  const acts = document.getElementById("job-actions");
  acts.replaceChildren(...j.actions.map((a) => h("button", {
    type: "button", id: "action-" + a.name, class: "action " + (["failover", "delete", "stop-test-failover"].includes(a.name) ? "danger" : "primary"),
    disabled: !a.enabled, title: a.hint, onclick: () => confirmAction(j.name, a.name, {}),
  }, h("span", { text: a.label }), h("span", { class: "hint", text: a.hint }))));
  const sides = document.getElementById("job-sides");
  sides.replaceChildren(h("table", { class: "sides" },
    h("thead", {}, h("tr", {}, ["Server", "Role", "State", "Epoch", "Target data", "Volume served at", "Paths", "Probe", "Arbiter", "Notes"].map((c) => h("th", { text: c })))),
    h("tbody", {}, j.sides.map((s) => h("tr", { dataset: { side: s.server } },
      h("td", { "data-label": "Server", class: "job-name", text: s.server }),
      h("td", { "data-label": "Role", text: s.role || "–" }),
      h("td", { "data-label": "State", class: "side-state", text: s.reachable ? s.state : (s.state ? s.state + " (" + secs(s.age) + " ago)" : "unreachable") }),
      h("td", { "data-label": "Epoch", text: s.role ? s.epoch : "–" }),
      h("td", { "data-label": "Target data", text: s.role === "target" ? (s.consistent ? "consistent" : "inconsistent") : "–" }),
      h("td", { "data-label": "Served at", class: "small path", text: s.device || "–" }),
      h("td", { "data-label": "Paths", text: (s.paths || []).join(", ") || "–" }),
      h("td", { "data-label": "Probe", class: "small", text: s.probe || "–" }),
      h("td", { "data-label": "Arbiter", class: "small", text: s.arbiter || "–" }),
      h("td", { "data-label": "Notes", class: "small" + (s.reachable ? "" : " down-text"), text: [s.reachable ? "" : "unreachable: " + s.error, s.reason, s.last_error ? "last error: " + s.last_error : "", (s.users || []).length ? "in use by " + s.users.join(", ") : ""].filter(Boolean).join("; ") || "" }),
    )))));
  renderCharts(name);
  if (S.events && S.events.job === name) renderEvents();
}

// ---- charts (inline SVG) -----------------------------------------------------

const SVGNS = "http://www.w3.org/2000/svg";

function svg(tag, attrs, ...children) {
  const el = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  for (const c of children) if (c) el.append(c);
  return el;
}

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function chart(title, series, fmt, now) {
  const box = h("div", { class: "chart" });
  const width = Math.max(260, Math.floor((document.getElementById("charts").clientWidth || 600) / (window.innerWidth > 1100 ? 3 : 1)) - 16);
  const height = 150, padL = 8, padR = 8, padT = 8, padB = 20;
  // The window, or less while the console has followed the job for less
  // (at least a minute): a young job's history fills the chart.
  let first = now;
  for (const s of series) if (s.points.length) first = Math.min(first, s.points[0].t);
  const span = Math.max(60000, Math.min(S.window * 1000, now - first));
  const t0 = now - span;
  let max = 0;
  for (const s of series) for (const p of s.points) if (p.t >= t0 && p.v >= 0) max = Math.max(max, p.v);
  max = niceMax(max);
  const x = (t) => padL + (width - padL - padR) * (t - t0) / span;
  const y = (v) => padT + (height - padT - padB) * (1 - v / max);
  const g = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, class: "chart-svg", role: "img" });
  for (const f of [0, 0.5, 1]) {
    g.append(svg("line", { x1: padL, x2: width - padR, y1: y(max * f), y2: y(max * f), class: "grid" }));
  }
  const label = svg("text", { x: padL + 2, y: padT + 10, class: "axis" });
  label.textContent = fmt(max);
  g.append(label);
  const l0 = svg("text", { x: padL + 2, y: height - 5, class: "axis" });
  l0.textContent = "-" + (span >= 120000 ? Math.round(span / 60000) + " min" : Math.round(span / 1000) + " s");
  const l1 = svg("text", { x: width - padR - 2, y: height - 5, class: "axis", "text-anchor": "end" });
  l1.textContent = "now";
  g.append(l0, l1);
  const legend = [];
  series.forEach((s, i) => {
    let seg = [];
    const flush = () => {
      if (seg.length > 1) g.append(svg("polyline", { points: seg.join(" "), class: "line line" + i }));
      else if (seg.length === 1) { const [px, py] = seg[0].split(","); g.append(svg("circle", { cx: px, cy: py, r: 1.5, class: "dot" + i })); }
      seg = [];
    };
    let last = null;
    for (const p of s.points) {
      if (p.t < t0) continue;
      if (p.v < 0 || (last && p.t - last > 5000)) flush();
      if (p.v >= 0) seg.push(x(p.t).toFixed(1) + "," + y(p.v).toFixed(1));
      last = p.t;
    }
    flush();
    const cur = s.points.length ? s.points[s.points.length - 1].v : -1;
    legend.push(h("span", { class: "legend legend" + i }, h("span", { class: "swatch" }), s.name + " " + (cur >= 0 ? fmt(cur) : "–")));
  });
  box.append(h("div", { class: "chart-title" }, h("b", { text: title }), " ", ...legend), g);
  return box;
}

function renderCharts(name) {
  const wrap = document.getElementById("charts");
  if (!wrap) return;
  const hist = S.history[name];
  if (!hist) {
    wrap.replaceChildren(h("p", { class: "muted", text: "Loading the last hour…" }));
    return;
  }
  const now = (S.snap && Date.parse(S.snap.time)) || Date.now();
  const pts = (f) => hist.map((s) => ({ t: s.t, v: f(s) }));
  wrap.replaceChildren(
    chart("Throughput", [{ name: "applied on the target", points: pts((s) => s.throughput) }], (v) => bytes(v) + "/s", now),
    chart("Queue", [{ name: "memory", points: pts((s) => s.queue_memory) }, { name: "disk", points: pts((s) => s.queue_disk) }, { name: "dirty", points: pts((s) => s.dirty) }], bytes, now),
    chart("RPO", [{ name: "RPO", points: pts((s) => s.rpo) }], secs, now));
}

// ---- confirmations --------------------------------------------------------------

let modalRun = null;

function openModal({ title, body, confirm, run, danger }) {
  document.getElementById("modal-title").textContent = title;
  document.getElementById("modal-body").replaceChildren(...body);
  const ok = document.getElementById("modal-ok");
  ok.textContent = confirm || "Confirm";
  ok.className = danger === false ? "primary" : "danger";
  ok.disabled = false;
  modalRun = run;
  document.getElementById("modal").hidden = false;
  ok.focus();
}

function closeModal() {
  document.getElementById("modal").hidden = true;
  modalRun = null;
}

async function confirmAction(name, action, opts) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(opts)) if (v) q.set(k, v === true ? "true" : v);
  let plan;
  try {
    plan = (await api("GET", "/api/jobs/" + encodeURIComponent(name) + "/plan/" + action + "?" + q)).data;
  } catch (e) {
    toast(action + ": " + e.message, "error");
    return;
  }
  const body = [];
  if (plan.server) body.push(h("p", { class: "muted" }, "Sent to ", h("b", { text: plan.server }), "."));
  if (plan.consequences && plan.consequences.length) {
    body.push(h("ul", { class: "consequences", id: "plan-consequences" }, plan.consequences.map((c) => h("li", { text: c }))));
  }
  if (plan.loss) body.push(h("p", { class: "loss", id: "plan-loss", text: plan.loss }));
  if (plan.refusal) body.push(h("p", { class: "refusal", id: "plan-refusal", text: plan.refusal + (plan.needs_force ? " — the agent refuses unless you force it." : "") }));
  const inputs = {};
  for (const inp of plan.inputs || []) {
    const el = h("input", { type: "text", id: "in-" + inp.name, placeholder: inp.placeholder || "", value: inp.value || "", autocomplete: "off" });
    el.addEventListener("change", () => confirmAction(name, action, Object.assign({}, opts, { [inp.name]: el.value.trim() })));
    inputs[inp.name] = el;
    body.push(h("label", { class: "field", for: el.id, text: inp.label }), el);
    if (action === "failover" && inp.name === "snapshot") {
      // The choice: the snapshots of the side that fails over, newest first.
      const dl = h("datalist", { id: "snapshot-choices" });
      el.setAttribute("list", dl.id);
      body.push(dl);
      api("GET", "/api/jobs/" + encodeURIComponent(name) + "/snapshots").then((r) => {
        const l = (r.data && r.data.list && r.data.list.snapshots) || [];
        dl.replaceChildren(...l.slice().reverse().map((x) => h("option", { value: x.name, text: x.kind + ", " + timeOf(x.created) })));
      }).catch(() => {});
    }
  }
  for (const o of plan.options || []) {
    const cb = h("input", { type: "checkbox", id: "opt-" + o.name, checked: o.set });
    cb.addEventListener("change", () => {
      const next = Object.assign({}, opts, { [o.name]: cb.checked });
      confirmAction(name, action, next);
    });
    body.push(h("label", { class: "check" }, cb, " " + o.label));
  }
  body.push(h("p", { class: "error", id: "modal-error" }));
  openModal({
    title: plan.title || (action + " " + name),
    body,
    confirm: plan.confirm + (opts.force ? " (forced)" : ""),
    danger: ["failover", "delete", "pause", "stop-test-failover", "delete-snapshot", "reverse", "switchover", "failback"].includes(action),
    run: async () => {
      const sent = Object.assign({}, opts);
      for (const [k, el] of Object.entries(inputs)) sent[k] = el.value.trim();
      const r = await api("POST", "/api/jobs/" + encodeURIComponent(name) + "/actions/" + action, sent);
      toast(r.data.message || (action + " sent"));
      if (action === "delete") location.hash = "#/";
    },
  });
}

// ---- create -----------------------------------------------------------------------

function field(label, input, help) {
  return [h("label", { for: input.id, text: label }), input, help ? h("span", { class: "help", text: help }) : null];
}

function buildCreate(main) {
  const f = {
    name: h("input", { id: "c-name", placeholder: "web", autocomplete: "off" }),
    source: h("select", { id: "c-source" }),
    target: h("select", { id: "c-target" }),
    volume: h("input", { id: "c-volume", placeholder: "/dev/vdb" }),
    target_volume: h("input", { id: "c-target-volume", placeholder: "same as the volume" }),
    size: h("input", { id: "c-size", placeholder: "only to create a missing file, e.g. 1G" }),
    mode: h("select", { id: "c-mode" }, h("option", { value: "sync", text: "sync: acknowledged once the target applied it" }), h("option", { value: "async", text: "async: acknowledged once local, shipped in order" })),
    service_ips: h("textarea", { id: "c-service-ips", rows: 2, placeholder: "172.17.22.187/24@eth0 (one per line)" }),
    map_iface: h("textarea", { id: "c-map-iface", rows: 1, placeholder: "eth0=ens3 (one per line)" }),
    monitor: h("input", { id: "c-monitor", value: "interval=250ms,missed=8" }),
    failover: h("select", { id: "c-failover" }, h("option", { value: "manual", text: "manual: the operator presses Failover" }), h("option", { value: "auto", text: "auto: when every path is silent" })),
    arbiter: h("select", { id: "c-arbiter" }, h("option", { value: "", text: "none" }), h("option", { value: "etcd", text: "etcd (the agents' arbiter)" })),
    lease_ttl: h("input", { id: "c-lease-ttl", placeholder: "5s" }),
    suspend_timeout: h("input", { id: "c-suspend-timeout", placeholder: "30s" }),
    scripts: h("textarea", { id: "c-scripts", rows: 2, placeholder: "post-failover=/etc/doppel/mount.sh (one per line)" }),
  };
  const out = h("div", { id: "create-result" });
  const lines = (t) => t.value.split("\n").map((s) => s.trim()).filter(Boolean);
  const request = (dry) => ({
    name: f.name.value.trim(), source: f.source.value, target: f.target.value, volume: f.volume.value.trim(),
    target_volume: f.target_volume.value.trim(), size: f.size.value.trim(), mode: f.mode.value,
    service_ips: lines(f.service_ips), map_iface: lines(f.map_iface), monitor: f.monitor.value.trim(),
    failover: f.failover.value, arbiter: f.arbiter.value, lease_ttl: f.lease_ttl.value.trim(),
    suspend_timeout: f.suspend_timeout.value.trim(), scripts: lines(f.scripts), dry_run: dry,
  });
  const submit = async (dry, btn) => {
    out.replaceChildren(h("p", { class: "muted", text: dry ? "Running the pre-flight on both agents…" : "Pre-flight, then creating the job on the target and the source…" }));
    btn.disabled = true;
    try {
      const r = await api("POST", "/api/jobs", request(dry));
      const d = r.data;
      const parts = [];
      if (d.problems && d.problems.length) {
        parts.push(h("p", { class: "error", id: "create-problems-title", text: "Not created: " + d.problems.length + " problem(s), nothing was changed:" }),
          h("ul", { class: "problems", id: "create-problems" }, d.problems.map((p) => h("li", {}, h("b", { text: (p.server || "job") + " " }), h("code", { text: p.check }), " " + p.message))));
      }
      for (const w of d.warnings || []) parts.push(h("p", { class: "refusal", text: "warning: " + w }));
      for (const n of d.notices || []) parts.push(h("p", { class: "muted", text: n }));
      if (d.message) parts.push(h("p", { class: d.created ? "ok-text" : "", id: "create-message", text: d.message }));
      if (d.created) parts.push(h("a", { href: "#/job/" + encodeURIComponent(f.name.value.trim()), id: "create-open", text: "Open the job" }));
      out.replaceChildren(...parts);
    } catch (e) {
      out.replaceChildren(h("p", { class: "error", text: e.message }));
    } finally {
      btn.disabled = false;
    }
  };
  const check = h("button", { type: "button", id: "c-check", text: "Check (pre-flight only)" });
  const create = h("button", { type: "button", id: "c-create", class: "primary", text: "Create job" });
  check.addEventListener("click", () => submit(true, check));
  create.addEventListener("click", () => submit(false, create));
  main.append(h("section", { class: "card narrow" }, h("h2", { text: "New protection job" }),
    h("p", { class: "muted small", text: "The same checks as doppel job create: both agents run a pre-flight (volumes, sizes, mounts, other jobs, hook scripts, each side reaching the other) and every problem is shown at once, changing nothing; then the job is created on the target and the source (a failure rolls both back)." }),
    h("div", { class: "form" },
      field("Name", f.name),
      field("Source server", f.source),
      field("Target server", f.target),
      field("Volume", f.volume, "block device or file on the source"),
      field("Target volume", f.target_volume, "when its path differs on the target"),
      field("Size", f.size),
      field("Replication mode", f.mode),
      field("Service IPs", f.service_ips, "CIDR@IFACE: follows the active side"),
      field("Interface map", f.map_iface, "SRCIFACE=TGTIFACE: where the target puts a source interface's IPs"),
      field("Failure detection", f.monitor),
      field("Failover", f.failover),
      field("Arbiter", f.arbiter, "strongly advised with automatic failover"),
      field("Lease TTL", f.lease_ttl, "with the arbiter"),
      field("Suspend timeout", f.suspend_timeout, "with the arbiter"),
      field("Hook scripts", f.scripts, "HOOK=PATH: pre-failover, post-failover, pre-failback, post-failback"),
      h("div", { class: "buttons" }, check, create),
      out)));
}

function renderCreateServers() {
  for (const id of ["c-source", "c-target"]) {
    const sel = document.getElementById(id);
    if (!sel) continue;
    const names = S.snap.servers.map((s) => s.name);
    const have = Array.from(sel.options).map((o) => o.value);
    if (have.join(",") === ["", ...names].join(",")) continue;
    const cur = sel.value;
    sel.replaceChildren(h("option", { value: "", text: "choose…" }), ...names.map((n) => h("option", { value: n, text: n })));
    sel.value = names.includes(cur) ? cur : "";
  }
}

// ---- start ------------------------------------------------------------------------

async function start() {
  document.getElementById("modal-cancel").addEventListener("click", closeModal);
  document.getElementById("modal").addEventListener("click", (ev) => { if (ev.target.id === "modal") closeModal(); });
  document.addEventListener("keydown", (ev) => { if (ev.key === "Escape") closeModal(); });
  document.getElementById("modal-ok").addEventListener("click", async () => {
    if (!modalRun) return;
    const ok = document.getElementById("modal-ok");
    ok.disabled = true;
    try {
      await modalRun();
      closeModal();
    } catch (e) {
      const el = document.getElementById("modal-error");
      if (el) el.textContent = e.message;
      else toast(e.message, "error");
      ok.disabled = false;
    }
  });
  document.getElementById("logout").addEventListener("click", async () => {
    try { await api("POST", "/logout"); } catch (e) { /* gone anyway */ }
    location.href = "/login";
  });
  const r = await api("GET", "/api/session");
  S.csrf = r.data.csrf;
  S.who = r.data.who;
  document.getElementById("who").textContent = S.who;
  document.getElementById("version").textContent = r.data.version || "";
  window.addEventListener("hashchange", go);
  window.addEventListener("resize", () => { if (S.route && S.route.page === "job") renderCharts(S.route.job); });
  go();
  connect();
}

document.addEventListener("DOMContentLoaded", start);
