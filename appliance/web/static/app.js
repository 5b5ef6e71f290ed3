"use strict";
// The admin page: one document, views switched by the hash, data from /api, live status
// from /api/events (server-sent events). Text only ever goes in through textContent:
// study attributes come from modalities and are not trusted as HTML.

const $ = (id) => document.getElementById(id);
let csrf = null;

function el(tag, text, attrs = {}) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

function row(cells) {
  const tr = el("tr");
  for (const c of cells) {
    const td = el("td");
    if (c instanceof Node) td.appendChild(c); else td.textContent = c === null || c === undefined ? "" : String(c);
    tr.appendChild(td);
  }
  return tr;
}

function fill(tbody, rows) { tbody.replaceChildren(...rows); }

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function duration(s) {
  if (s === null || s === undefined) return "–";
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
  return h ? `${h} h ${m} min` : m ? `${m} min ${s % 60} s` : `${s} s`;
}

function ago(t) { return t ? duration(Date.now() / 1000 - t) + " ago" : "never"; }

async function api(method, path, body) {
  const opts = { method, credentials: "same-origin", headers: {} };
  if (method !== "GET") {
    opts.headers["Content-Type"] = "application/json";
    opts.headers["X-CSRF-Token"] = csrf;
    opts.body = JSON.stringify(body || {});
  }
  const res = await fetch(path, opts);
  if (res.status === 401) { location.replace("/login"); throw new Error("login required"); }
  let data = {};
  try { data = await res.json(); } catch (e) { /* not JSON */ }
  return { ok: res.ok, status: res.status, data };
}

function problem(r) {
  return (r.data.errors && r.data.errors.join("; ")) || r.data.error || `failed (${r.status})`;
}

// -- dashboard -------------------------------------------------------------------------------

function progressBar(done, total) {
  const wrap = el("div", null, { class: "bar" });
  const share = total ? done / total : 0;
  const inner = el("div", null, { role: "progressbar", "aria-valuenow": Math.round(share * 100) });
  inner.style.width = `${(share * 100).toFixed(1)}%`;
  wrap.appendChild(inner);
  wrap.appendChild(el("span", `${(share * 100).toFixed(0)}% of ${bytes(total)}`));
  return wrap;
}

function showStatus(s) {
  $("gw-name").textContent = s.mesh ? `${s.mesh.name} (${s.mesh.role})` : "";
  $("version").textContent = s.version;
  $("uptime").textContent = duration(s.uptime_s);
  if (s.dicom) {
    $("dicom-node").textContent = `${s.dicom.ae_title} on ${s.dicom.listen}:${s.dicom.port}`;
    const c = s.dicom.counters;
    $("dicom-stores").textContent = `${c.stores_ok} (${bytes(c.bytes_stored)}), ${c.stores_duplicate} duplicate`;
    $("dicom-failed").textContent = c.stores_failed;
    $("dicom-assocs").textContent = `${c.associations_accepted} accepted, ${c.associations_rejected} rejected, ${s.dicom.active_associations} open`;
  }
  if (s.store) {
    const quota = s.store.quota_bytes;
    const limit = quota || s.store.used_bytes + s.store.disk_free_bytes;
    $("store-used").textContent = `${bytes(s.store.used_bytes)} of ${bytes(limit)}${quota ? " quota" : " (disk)"}`;
    $("store-bar").style.width = `${limit ? (100 * s.store.used_bytes / limit).toFixed(1) : 0}%`;
    $("store-studies").textContent = s.store.studies;
    $("store-instances").textContent = s.store.instances;
    $("store-chunks").textContent = s.store.chunks;
  }
  fill($("transfers"), s.transfers.map((t) => row([
    t.study, progressBar(t.bytes_done, t.bytes_total),
    t.finished ? "–" : `${bytes(t.rate_bps / 8)}/s`, t.finished ? "–" : duration(t.eta_s),
    t.error ? `failed: ${t.error}` : t.finished ? "done" : "running",
  ])));
  fill($("dash-peers"), s.peers.map((p) => row([
    p.name, p.online ? "online" : "offline", ago(p.last_seen), bytes(p.bytes_in), bytes(p.bytes_out),
  ])));
  const links = (s.uplinks && s.uplinks.uplinks) || [];
  $("uplinks-none").hidden = links.length > 0;
  fill($("uplinks"), links.map((u) => row([
    u.name, u.interface, u.state, u.rtt_ms === null ? "–" : `${u.rtt_ms} ms`,
    u.loss === null ? "–" : `${(u.loss * 100).toFixed(1)} %`,
    u.down_bps === null || u.down_bps === undefined ? "–" : `${bytes(u.down_bps / 8)}/s`,
    u.up_bps === null || u.up_bps === undefined ? "–" : `${bytes(u.up_bps / 8)}/s`,
    `${u.down_kbps}/${u.up_kbps} kbit/s`,
  ])));
  fill($("dash-sends"), (s.sends || []).map((j) => sendRow(j, false)));
  $("errors").replaceChildren(...s.errors.slice().reverse().map((l) =>
    el("li", `${new Date(l.time * 1000).toLocaleTimeString()} ${l.level} ${l.logger}: ${l.message}`)));
  const restart = s.restart_needed || [];
  $("restart-banner").hidden = restart.length === 0;
  $("restart-banner").textContent = `Restart needed to apply: ${restart.join(", ")}`;
}

function live() {
  const source = new EventSource("/api/events");
  source.addEventListener("status", (ev) => {
    $("live").textContent = "live";
    $("live").className = "badge on";
    showStatus(JSON.parse(ev.data));
  });
  source.onerror = async () => {
    $("live").textContent = "reconnecting";
    $("live").className = "badge";
    const r = await fetch("/api/session", { credentials: "same-origin" });
    const s = await r.json();
    if (!s.authenticated) { source.close(); location.replace("/login"); }
  };
}

// -- studies ---------------------------------------------------------------------------------

async function search(ev) {
  if (ev) ev.preventDefault();
  const params = new URLSearchParams();
  for (const [k, v] of new FormData($("search-form"))) if (v) params.set(k, v);
  const r = await api("GET", `/api/studies?${params}`);
  if (!r.ok) { $("search-message").textContent = problem(r); return; }
  $("search-message").textContent = `${r.data.studies.length} stud${r.data.studies.length === 1 ? "y" : "ies"}`;
  fill($("studies"), r.data.studies.map((s) => {
    const here = s.complete_here ? "here" : s.held_here ? "here (partly)" : null;
    const where = [here, ...s.holders].filter(Boolean).join(", ");
    const fetchButton = el("button", "Fetch", { type: "button" });
    fetchButton.disabled = s.complete_here;
    fetchButton.addEventListener("click", async () => {
      const f = await api("POST", "/api/transfers", { study: s.study_uid });
      fetchButton.textContent = f.ok ? "Requested" : problem(f);
      fetchButton.disabled = true;
    });
    const sendButton = el("button", "Send", { type: "button" });
    sendButton.disabled = !$("send-destination").value;
    sendButton.addEventListener("click", () => sendStudy(s.study_uid, sendButton));
    const actions = el("span");
    actions.append(fetchButton, sendButton);
    return row([s.PatientName, s.PatientID, s.StudyDate, s.StudyDescription,
      (s.ModalitiesInStudy || []).join ? (s.ModalitiesInStudy || []).join(" ") : s.ModalitiesInStudy,
      s.NumberOfStudyRelatedInstances, where, actions]);
  }));
}

function sendState(j) {
  if (j.error) return `failed: ${j.error}`;
  if (!j.finished) return "running";
  if (j.cancelled) return "cancelled";
  return j.failed ? `done, ${j.failed} failed` : "done";
}

function sendRow(j, withCancel) {
  const done = j.completed + j.warning + j.failed;
  const bar = progressBar(done, j.total);
  bar.querySelector("span").textContent = `${done} of ${j.total} instances`;
  const cells = [j.study, j.destination, bar, j.finished ? "–" : `${bytes(j.rate_bps / 8)}/s`,
    j.finished ? "–" : duration(j.eta_s), sendState(j)];
  if (withCancel) {
    const cancel = el("button", "Cancel", { type: "button" });
    cancel.disabled = j.finished;
    cancel.addEventListener("click", async () => { await api("DELETE", `/api/sends/${j.id}`); loadSends(); });
    cells.push(cancel);
  }
  return row(cells);
}

let sendTimer = null;

async function loadSends() {
  const r = await api("GET", "/api/sends");
  if (!r.ok) return;
  fill($("sends"), r.data.sends.slice().reverse().map((j) => sendRow(j, true)));
  clearTimeout(sendTimer);
  if (r.data.sends.some((j) => !j.finished) && location.hash === "#studies") sendTimer = setTimeout(loadSends, 1000);
}

async function loadDestinations() {
  const r = await api("GET", "/api/settings/dicom");
  if (!r.ok) return;
  const select = $("send-destination");
  const current = select.value;
  select.replaceChildren(...r.data.settings.nodes.map((n) => el("option", n.ae_title, { value: n.ae_title })));
  if (current) select.value = current;
}

async function sendStudy(study, button) {
  const destination = $("send-destination").value;
  const r = await api("POST", "/api/sends", { study, destination });
  $("send-message").textContent = r.ok ? `Sending to ${destination}` : problem(r);
  if (r.ok) { button.textContent = "Sending"; loadSends(); }
}

async function loadStudiesView() { await loadDestinations(); loadSends(); }

// -- peers -----------------------------------------------------------------------------------

async function loadPeers() {
  const r = await api("GET", "/api/peers");
  if (!r.ok) return;
  fill($("peers"), r.data.peers.map((p) => {
    const revoke = el("button", "Revoke", { type: "button", "data-peer": p.name });
    revoke.addEventListener("click", async () => {
      if (!confirm(`Revoke ${p.name}? It loses access at once.`)) return;
      const d = await api("DELETE", `/api/peers/${encodeURIComponent(p.name)}`);
      if (!d.ok) alert(problem(d));
      loadPeers();
    });
    return row([p.name, p.role, p.addresses.join(", "), p.public_key.slice(0, 12) + "…",
      p.admin ? "yes" : "no", p.online ? "online" : "offline", revoke]);
  }));
  fill($("candidates"), r.data.candidates.map((c) => {
    const use = el("button", "Fill in", { type: "button" });
    use.addEventListener("click", () => {
      const f = $("admit-form");
      f.name.value = c.name; f.role.value = c.role || "clinic";
      f.addresses.value = c.overlay_address; f.public_key.value = c.public_keys[0] || "";
      f.port.value = c.mesh_port || 7480;
    });
    return row([c.name, c.role, c.overlay_address, c.lan_addresses.join(", "), use]);
  }));
}

async function admit(ev) {
  ev.preventDefault();
  const f = $("admit-form");
  const body = {
    name: f.name.value.trim(), public_key: f.public_key.value.trim(),
    addresses: f.addresses.value.split(",").map((a) => a.trim()).filter(Boolean),
    role: f.role.value, port: Number(f.port.value), admin: f.admin.checked,
  };
  const r = await api("POST", "/api/peers", body);
  $("admit-message").textContent = r.ok ? `${body.name} admitted` : problem(r);
  if (r.ok) { f.reset(); loadPeers(); }
}

// -- settings --------------------------------------------------------------------------------

// Node inputs are named node_*: inside #dicom-form a second `ae_title` or `port` would turn
// form.ae_title into a list and the node's own fields would be read as empty.
function nodeRow(n) {
  const tr = el("tr", null, { class: "node" });
  for (const [k, type] of [["ae_title", "text"], ["host", "text"], ["port", "number"]]) {
    const td = el("td");
    const input = el("input", null, { name: `node_${k}`, type, "aria-label": `node ${k}` });
    input.value = n[k] === undefined ? "" : n[k];
    td.appendChild(input);
    tr.appendChild(td);
  }
  const td = el("td");
  const echo = el("button", "C-ECHO", { type: "button" });
  echo.addEventListener("click", () => cEcho(tr.querySelector("[name=node_ae_title]").value));
  const remove = el("button", "Remove", { type: "button" });
  remove.addEventListener("click", () => tr.remove());
  td.append(echo, remove);
  tr.appendChild(td);
  return tr;
}

let dicomSettings = null;

async function loadSettings() {
  const r = await api("GET", "/api/settings/dicom");
  if (!r.ok) return;
  dicomSettings = r.data.settings;
  $("config-file").textContent = r.data.file;
  const f = $("dicom-form");
  f.ae_title.value = dicomSettings.ae_title;
  f.port.value = dicomSettings.port;
  f.listen.value = dicomSettings.listen;
  f.allowed_calling.value = dicomSettings.allowed_calling.join(", ");
  f.strict_called_ae.checked = dicomSettings.strict_called_ae;
  fill($("nodes"), dicomSettings.nodes.map(nodeRow));
}

async function saveSettings(ev) {
  ev.preventDefault();
  const f = $("dicom-form");
  const body = Object.assign({}, dicomSettings, {
    ae_title: f.ae_title.value, port: Number(f.port.value), listen: f.listen.value.trim(),
    allowed_calling: f.allowed_calling.value.split(",").map((a) => a.trim()).filter(Boolean),
    strict_called_ae: f.strict_called_ae.checked,
    nodes: [...$("nodes").querySelectorAll("tr.node")].map((tr) => ({
      ae_title: tr.querySelector("[name=node_ae_title]").value,
      host: tr.querySelector("[name=node_host]").value,
      port: Number(tr.querySelector("[name=node_port]").value),
    })),
  });
  const r = await api("PUT", "/api/settings/dicom", body);
  if (!r.ok) { $("dicom-message").textContent = problem(r); return; }
  const restart = r.data.restart_needed;
  $("dicom-message").textContent = restart.length ? `Saved; restart needed for ${restart.join(", ")}` : "Saved and applied";
  dicomSettings = r.data.settings;
}

async function cEcho(aeTitle) {
  $("dicom-message").textContent = `C-ECHO ${aeTitle}…`;
  const r = await api("POST", "/api/dicom/echo", { ae_title: aeTitle });
  $("dicom-message").textContent = r.ok
    ? `C-ECHO ${r.data.ae_title}: ${r.data.ok ? "success" : "failed"} ${r.data.status || r.data.error || ""} (${r.data.ms} ms)`
    : problem(r);
}

let storeSettings = null;
let netSettings = null;

async function loadStore() {
  const r = await api("GET", "/api/settings/store");
  if (!r.ok) return;
  storeSettings = r.data.settings;
  $("store-note").textContent = r.data.note;
  const f = $("store-form");
  for (const k of ["max_bytes", "min_free_bytes", "compression", "commit_timeout_s"]) f[k].value = storeSettings[k];
}

function sizeValue(text) {
  const t = text.trim();
  return /^\d+$/.test(t) ? Number(t) : t;
}

async function saveStore(ev) {
  ev.preventDefault();
  const f = $("store-form");
  const body = Object.assign({}, storeSettings, {
    max_bytes: sizeValue(f.max_bytes.value), min_free_bytes: sizeValue(f.min_free_bytes.value),
    compression: f.compression.value, commit_timeout_s: Number(f.commit_timeout_s.value),
  });
  const r = await api("PUT", "/api/settings/store", body);
  $("store-message").textContent = r.ok ? "Saved and applied" : problem(r);
  if (r.ok) loadStore();
}

let evictSettings = null;
const EVICT_SIZES = ["max_bytes", "min_free_bytes", "slack_bytes"];
const EVICT_NUMBERS = ["max_idle_days", "min_idle_s", "half_life_days", "min_holders", "interval_s", "check_after_store_s"];

async function loadEvict() {
  const r = await api("GET", "/api/settings/evict");
  if (!r.ok) return;
  evictSettings = r.data.settings;
  $("evict-note").textContent = r.data.note;
  const f = $("evict-form");
  f.enabled.checked = evictSettings.enabled;
  f.dry_run.checked = evictSettings.dry_run;
  for (const k of [...EVICT_SIZES, ...EVICT_NUMBERS]) f[k].value = evictSettings[k];
}

async function saveEvict(ev) {
  ev.preventDefault();
  const f = $("evict-form");
  const body = Object.assign({}, evictSettings, { enabled: f.enabled.checked, dry_run: f.dry_run.checked });
  for (const k of EVICT_SIZES) body[k] = sizeValue(f[k].value);
  for (const k of EVICT_NUMBERS) body[k] = Number(f[k].value);
  const r = await api("PUT", "/api/settings/evict", body);
  $("evict-message").textContent = r.ok ? "Saved and applied" : problem(r);
  if (r.ok) loadEvict();
}

// -- firmware update ---------------------------------------------------------------------------

async function loadUpdate() {
  const r = await api("GET", "/api/system/update");
  if (!r.ok) return;
  $("fw-version").textContent = r.data.version;
  const last = r.data.last_result;
  $("fw-last").textContent = r.data.pending ? "an update is being installed"
    : last ? `last update: ${JSON.stringify(last)}` : "no update installed yet";
  const pull = r.data.pull;
  if (pull) {
    const mb = (n) => (n / 1e6).toFixed(1);
    $("update-message").textContent = pull.error ? `Pull from ${pull.peer}: ${pull.error}`
      : pull.queued ? `Version ${pull.version} from ${pull.peer} verified; installing`
      : `Pulling version ${pull.version} from ${pull.peer}: ${mb(pull.received)} of ${mb(pull.size || 0)} MB`;
    if (!pull.finished) setTimeout(loadUpdate, 1000);
  }
  const peers = await api("GET", "/api/peers");
  if (peers.ok) {
    const select = $("pull-form").peer, chosen = select.value;
    fill(select, peers.data.peers.map((p) => el("option", p.name, { value: p.name })));
    if (chosen) select.value = chosen;
  }
}

async function pullUpdate(ev) {
  ev.preventDefault();
  const f = $("pull-form");
  $("update-message").textContent = `Asking ${f.peer.value} for its version…`;
  const r = await api("POST", "/api/system/update/pull", { peer: f.peer.value, force: f.force.checked });
  $("update-message").textContent = r.ok ? `Pulling version ${r.data.version} from ${r.data.peer}…` : problem(r);
  if (r.ok) loadUpdate();
}

async function uploadUpdate(ev) {
  ev.preventDefault();
  const file = $("update-form").bundle.files[0];
  if (!file) return;
  $("update-message").textContent = "Uploading and checking the signature…";
  // The bundle itself is the body (not JSON): the server streams it to disk.
  const res = await fetch("/api/system/update", {
    method: "POST", credentials: "same-origin", body: file,
    headers: { "Content-Type": "application/octet-stream", "X-CSRF-Token": csrf },
  });
  let data = {};
  try { data = await res.json(); } catch (e) { /* not JSON */ }
  $("update-message").textContent = res.ok
    ? `Version ${data.version} verified; installing (the gateway restarts into it, or rolls back)`
    : problem({ data, status: res.status });
  loadUpdate();
}

async function evictPlan() {
  $("evict-plan").textContent = "…";
  const r = await api("GET", "/api/evict/plan");
  $("evict-plan").textContent = r.ok ? r.data.text : problem(r);
}

const UPLINK_FIELDS = [["name", "text"], ["interface", "text"], ["gateway", "text"], ["up_kbps", "number"],
  ["down_kbps", "number"], ["overlay_address", "text"]];

function uplinkRow(u) {
  const tr = el("tr", null, { class: "uplink" });
  tr.uplink = u;
  for (const [k, type] of UPLINK_FIELDS) {
    const td = el("td");
    const input = el("input", null, { name: k, type, size: type === "number" ? 6 : 12 });
    input.value = u[k] === undefined || u[k] === null ? "" : u[k];
    td.appendChild(input);
    tr.appendChild(td);
  }
  const shape = el("input", null, { name: "shape", type: "checkbox" });
  shape.checked = Boolean(u.shape && u.shape.enabled);
  const td = el("td"); td.appendChild(shape); tr.appendChild(td);
  const remove = el("button", "Remove", { type: "button" });
  remove.addEventListener("click", () => tr.remove());
  const td2 = el("td"); td2.appendChild(remove); tr.appendChild(td2);
  return tr;
}

async function loadNet() {
  const r = await api("GET", "/api/settings/net");
  if (!r.ok) return;
  netSettings = r.data.settings;
  $("net-note").textContent = r.data.note;
  fill($("uplink-rows"), netSettings.uplinks.map(uplinkRow));
}

async function saveNet(ev) {
  ev.preventDefault();
  const uplinks = [...$("uplink-rows").querySelectorAll("tr.uplink")].map((tr) => {
    const u = Object.assign({}, tr.uplink);
    for (const [k, type] of UPLINK_FIELDS) {
      const v = tr.querySelector(`[name=${k}]`).value.trim();
      if (k === "overlay_address" && !v) delete u[k];
      else u[k] = type === "number" ? Number(v) : v;
    }
    u.shape = Object.assign({}, u.shape || {}, { enabled: tr.querySelector("[name=shape]").checked });
    return u;
  });
  const r = await api("PUT", "/api/settings/net", Object.assign({}, netSettings, { uplinks }));
  $("net-message").textContent = r.ok ? "Saved; applied at the next restart" : problem(r);
  if (r.ok) loadNet();
}

async function loadAllSettings() { await Promise.all([loadSettings(), loadStore(), loadEvict(), loadNet()]); }

// -- QoS -------------------------------------------------------------------------------------

let qosTimer = null;

function flowSummary(run) {
  return Object.entries(run.flows).map(([name, f]) => {
    const loss = f.loss_ratio === null || f.loss_ratio === undefined ? "–" : `${(f.loss_ratio * 100).toFixed(2)} %`;
    const delay = f.delay_mean_ms === null || f.delay_mean_ms === undefined ? "" : `, delay ${f.delay_mean_ms.toFixed(1)} ms`;
    const rate = f.throughput_kbps === null || f.throughput_kbps === undefined ? "–" : f.throughput_kbps.toFixed(1);
    return `${name}: loss ${loss}, ${rate} kbit/s${delay}`;
  }).join("; ");
}

function updateReportLink() {
  const l = $("report-left").value, r = $("report-right").value;
  $("report-link").href = l && r ? `/api/qos/report?left=${encodeURIComponent(l)}&right=${encodeURIComponent(r)}` : "#";
}

async function loadQos() {
  const [r, p] = await Promise.all([api("GET", "/api/qos/runs"), api("GET", "/api/peers")]);
  if (!r.ok) return;
  $("qos-presets").textContent = r.data.presets.join(", ");
  fill($("qos-runs"), r.data.runs.map((run) => row([run.id, run.kind, run.label,
    run.error ? `failed: ${run.error}${run.errors.length ? " (" + run.errors.join("; ") + ")" : ""}` : run.state,
    flowSummary(run)])));
  const done = r.data.runs.filter((run) => run.state === "done");
  for (const [id, pick] of [["report-left", 1], ["report-right", 0]]) {
    const select = $(id);
    const current = select.value;
    select.replaceChildren(...done.map((run) => el("option", `${run.id} ${run.kind} ${run.label}`, { value: run.id })));
    if (current) select.value = current; else if (done[pick]) select.value = done[pick].id;
  }
  updateReportLink();
  if (p.ok) {
    const select = $("measure-form").peer;
    const current = select.value;
    select.replaceChildren(...p.data.peers.map((x) => el("option", x.name, { value: x.name })));
    if (current) select.value = current;
  }
  clearTimeout(qosTimer);
  if (r.data.busy && location.hash === "#qos") qosTimer = setTimeout(loadQos, 1000);
}

async function simulate(ev) {
  ev.preventDefault();
  const f = $("simulate-form");
  const r = await api("POST", "/api/qos/simulate", { toml: f.toml.value, label: f.label.value, samples: f.samples.checked });
  $("simulate-message").textContent = r.ok ? `Simulation ${r.data.id} started` : problem(r);
  loadQos();
}

async function measurePath(ev) {
  ev.preventDefault();
  const f = $("measure-form");
  const body = { peer: f.peer.value, duration_s: Number(f.duration_s.value),
    flows: f.flows.value.split(",").map((x) => x.trim()).filter(Boolean) };
  if (f.port.value) body.port = Number(f.port.value);
  const r = await api("POST", "/api/qos/measure", body);
  $("measure-message").textContent = r.ok ? `Measurement ${r.data.id} started` : problem(r);
  loadQos();
}

async function changePassword(ev) {
  ev.preventDefault();
  const r = await api("POST", "/api/password", { current: $("pw-current").value, new: $("pw-new").value });
  if (r.ok) csrf = r.data.csrf;
  $("password-message").textContent = r.ok ? "Password changed; other sessions ended" : problem(r);
}

// -- system ----------------------------------------------------------------------------------

async function loadLogs(ev) {
  if (ev) ev.preventDefault();
  const params = new URLSearchParams(new FormData($("log-form")));
  const r = await api("GET", `/api/logs?${params}`);
  if (!r.ok) return;
  $("logs").replaceChildren(...r.data.lines.reverse().map((l) =>
    el("li", `${new Date(l.time * 1000).toLocaleString()} ${l.level} ${l.logger}: ${l.message}`)));
}

// -- navigation ------------------------------------------------------------------------------

const loaders = { studies: loadStudiesView, peers: loadPeers, settings: loadAllSettings, qos: loadQos, system: () => { loadLogs(); loadUpdate(); } };

function route() {
  const view = (location.hash || "#dashboard").slice(1);
  for (const section of document.querySelectorAll(".view")) section.hidden = section.id !== `view-${view}`;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.view === view);
  if (loaders[view]) loaders[view]();
}

async function init() {
  const r = await fetch("/api/session", { credentials: "same-origin" });
  const s = await r.json();
  if (!s.authenticated) { location.replace("/login"); return; }
  csrf = s.csrf;
  window.addEventListener("hashchange", route);
  $("logout").addEventListener("click", async () => { await api("POST", "/api/logout"); location.replace("/login"); });
  $("search-form").addEventListener("submit", search);
  $("admit-form").addEventListener("submit", admit);
  $("dicom-form").addEventListener("submit", saveSettings);
  $("add-node").addEventListener("click", () => $("nodes").appendChild(nodeRow({ port: 104 })));
  $("echo-self").addEventListener("click", () => cEcho($("dicom-form").ae_title.value));
  $("password-form").addEventListener("submit", changePassword);
  $("store-form").addEventListener("submit", saveStore);
  $("net-form").addEventListener("submit", saveNet);
  $("evict-form").addEventListener("submit", saveEvict);
  $("update-form").addEventListener("submit", uploadUpdate);
  $("pull-form").addEventListener("submit", pullUpdate);
  $("evict-plan-button").addEventListener("click", evictPlan);
  $("add-uplink").addEventListener("click", () => $("uplink-rows").appendChild(uplinkRow({ gateway: "dhcp", up_kbps: 800, down_kbps: 3000 })));
  $("simulate-form").addEventListener("submit", simulate);
  $("measure-form").addEventListener("submit", measurePath);
  $("report-left").addEventListener("change", updateReportLink);
  $("report-right").addEventListener("change", updateReportLink);
  $("log-form").addEventListener("submit", loadLogs);
  route();
  live();
}

init();
