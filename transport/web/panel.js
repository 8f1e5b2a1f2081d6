/* Central's operator panel: live over GET /api/events (docs/api.md, "Event stream").
 *
 * Why fetch and not EventSource: the stream needs `Authorization: Bearer TOKEN`, which
 * EventSource cannot send, so the page reads the body with a ReadableStream and parses
 * SSE itself; it reconnects with a growing, jittered delay and says so in the header.
 *
 * Why it stays fast with 1,000 CPs: every CP has one tile element, created once and kept
 * in a Map by cp_id; a `cps` event marks only the changed CPs dirty, and one
 * requestAnimationFrame callback per frame applies everything that arrived since the last
 * one (text nodes are written only when their text changed). Tiles live in one container
 * per state, most urgent first, kept in id order: a state change moves one element.
 *
 * Safety: all data reaches the page as textContent or attribute values, never as HTML.
 * The token is kept only in this tab's sessionStorage and sent only to this origin.
 * URLs are relative to the page, so it also works behind a proxy under a path prefix.
 */
"use strict";

(() => {
  const TOKEN_KEY = "evcharging.panel.token";
  /** Most urgent first: the tiles that need an operator come first. */
  const GROUPS = ["BROKEN", "DISCONNECTED", "STOPPED", "SUPPLYING", "ACTIVE", "OTHER"];
  const STATES = ["BROKEN", "DISCONNECTED", "STOPPED", "SUPPLYING", "ACTIVE"];
  const LABEL = { ACTIVE: "ACTIVE", SUPPLYING: "SUPPLYING", STOPPED: "Out of Order", BROKEN: "BROKEN",
    DISCONNECTED: "DISCONNECTED" };
  const MAX_MESSAGES = 200;        // newest first; older ones drop off the end
  const MAX_REQUESTS = 200;        // rows of the requests table (the newest)
  const MAX_ALERT_ROWS = 50;       // per kind in the alerts area
  const MAX_FAULT_ALERTS = 10;     // the newest fault messages repeated among the alerts
  const BACKOFF_MIN_MS = 1000;
  const BACKOFF_MAX_MS = 30000;
  const STALL_MS = 45000;          // Central sends a keepalive every 15 s: 45 s of silence is a dead link
  const MAX_EVENT_CHARS = 32 * 1024 * 1024;  // one event (a snapshot of many CPs) is far below this
  const TOKEN_RE = /^[\x21-\x7e]{1,512}$/;

  const collator = new Intl.Collator(undefined, { numeric: true, sensitivity: "base" });
  const byId = (a, b) => collator.compare(a, b) || (a < b ? -1 : a > b ? 1 : 0);

  // ------------------------------------------------------------------ DOM helpers
  const q = (sel) => document.querySelector(sel);
  function make(tag, cls, text) {
    const n = document.createElement(tag);
    if (cls) n.className = cls;
    if (text !== undefined) n.textContent = text;
    return n;
  }
  function setText(node, text) {
    if (node.textContent !== text) node.textContent = text;
  }
  function setAttr(node, name, value) {
    if (node.getAttribute(name) !== value) node.setAttribute(name, value);
  }
  function show(node, visible) {
    if (node.hidden === visible) node.hidden = !visible;
  }
  const str = (v) => (v === null || v === undefined ? "" : String(v));
  function num(v, digits) {
    const n = Number(v);
    return v === null || v === undefined || !Number.isFinite(n) ? "–" : n.toFixed(digits);
  }
  const pad = (n) => String(n).padStart(2, "0");
  function clock(at) {
    const n = Number(at);
    if (!at || !Number.isFinite(n)) return "";
    const d = new Date(n * 1000);
    return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }
  function day(at) {
    const n = Number(at);
    if (!at || !Number.isFinite(n)) return "";
    const d = new Date(n * 1000);
    return `${pad(d.getDate())}/${pad(d.getMonth() + 1)}/${pad(d.getFullYear() % 100)}`;
  }
  function isoOf(at) {
    const n = Number(at);
    return at && Number.isFinite(n) ? new Date(n * 1000).toISOString() : "";
  }
  const temp = (t) => (t === null || t === undefined || !Number.isFinite(Number(t)) ? "?" : `${num(t, 1)} °C`);

  const ui = {
    conn: q('[data-testid="conn"]'),
    counts: q('[data-testid="counts"]'),
    total: q('[data-testid="count-total"]'),
    forget: q('[data-testid="forget-token"]'),
    form: q('[data-testid="token-form"]'),
    tokenInput: q('[data-testid="token-input"]'),
    status: q('[data-testid="status"]'),
    filter: q('[data-testid="filter"]'),
    filterCount: q('[data-testid="filter-count"]'),
    noCps: q('[data-testid="no-cps"]'),
    tiles: q('[data-testid="tiles"]'),
    alerts: q('[data-testid="alerts"]'),
    weatherBody: q('[data-testid="weather"] tbody'),
    noWeather: q('[data-testid="no-weather"]'),
    requestsBody: q('[data-testid="requests"] tbody'),
    requestsNote: q('[data-testid="requests-note"]'),
    messages: q('[data-testid="messages"]'),
  };
  const groupEl = {};
  for (const g of GROUPS) groupEl[g] = ui.tiles.querySelector(`[data-group="${g}"]`);
  const countBtn = {};
  for (const s of STATES) {
    const b = make("button", "", "");
    b.type = "button";
    b.dataset.state = s;
    b.setAttribute("data-testid", `count-${s}`);
    b.setAttribute("aria-pressed", "false");
    b.title = `Show only the ${LABEL[s]} CPs`;
    ui.counts.appendChild(b);
    countBtn[s] = b;
  }

  // ------------------------------------------------------------------ status line and header
  /** The status line: the latest answer or problem, with the time it came (it stays until the next one). */
  function setStatus(kind, sentence, http) {
    ui.status.dataset.kind = kind;
    if (http === undefined) delete ui.status.dataset.http;
    else ui.status.dataset.http = String(http);
    const now = new Date();
    const at = make("time", "", `${pad(now.getHours())}:${pad(now.getMinutes())}:${pad(now.getSeconds())}`);
    at.dateTime = now.toISOString();
    ui.status.replaceChildren(at, document.createTextNode(` ${sentence}`));
  }
  function setConn(kind, text) {
    ui.conn.dataset.conn = kind;
    setText(ui.conn, text);
    ui.tiles.classList.toggle("stale", kind !== "live");
  }

  // ------------------------------------------------------------------ token
  let memoryToken = null;  // when sessionStorage is unavailable (a locked-down browser)
  function loadToken() {
    try { return sessionStorage.getItem(TOKEN_KEY); } catch (_) { return memoryToken; }
  }
  function saveToken(t) {
    memoryToken = t;
    try {
      if (t === null) sessionStorage.removeItem(TOKEN_KEY);
      else sessionStorage.setItem(TOKEN_KEY, t);
    } catch (_) { /* memoryToken holds it for this page's life */ }
  }
  /** `/#token=...` fills the token in; the fragment is then removed from the address bar and history. */
  function takeTokenFromFragment() {
    if (!location.hash || location.hash.length < 2) return false;
    const params = new URLSearchParams(location.hash.slice(1));
    if (!params.has("token")) return false;
    const t = (params.get("token") || "").trim();
    history.replaceState(history.state, "", location.pathname + location.search);
    if (!TOKEN_RE.test(t)) {
      askToken("The token in the address is not a valid token (1 to 512 visible ASCII characters).");
      return true;
    }
    saveToken(t);
    return true;
  }
  function askToken(sentence) {
    show(ui.form, true);
    show(ui.forget, false);
    if (sentence) setStatus("error", sentence);
    ui.tokenInput.value = "";
    ui.tokenInput.focus();
  }
  ui.form.addEventListener("submit", (e) => {
    e.preventDefault();
    const t = ui.tokenInput.value.trim();
    if (!TOKEN_RE.test(t)) {
      setStatus("error", "A token is 1 to 512 visible ASCII characters, without spaces.");
      return;
    }
    saveToken(t);
    ui.tokenInput.value = "";
    show(ui.form, false);
    setStatus("info", "Connecting to Central with the token…");
    backoff = BACKOFF_MIN_MS;
    connect();
  });
  ui.forget.addEventListener("click", () => {
    saveToken(null);
    disconnect();
    setConn("idle", "not connected");
    askToken("");
    setStatus("info", "The token was removed from this tab.");
  });
  window.addEventListener("hashchange", () => {
    if (takeTokenFromFragment() && loadToken()) {
      show(ui.form, false);
      backoff = BACKOFF_MIN_MS;
      connect();
    }
  });

  // ------------------------------------------------------------------ the model and the frame
  /** cp_id → {id, data, node, parts, group, visible, key} */
  const cps = new Map();
  const groupIds = {};
  for (const g of GROUPS) groupIds[g] = [];
  const counts = {};
  for (const s of STATES) counts[s] = 0;
  const dirty = new Set();
  const broken = new Set();
  const disconnected = new Set();
  let requests = [];
  let requestsDirty = true;
  let messages = [];            // newest first, at most MAX_MESSAGES
  let pendingMessages = [];     // arrived since the last frame (oldest first)
  let messagesRebuild = true;
  let maxSeq = -Infinity;
  const weather = new Map();    // location → {data, row, cells}
  let weatherDirty = true;
  let alertsDirty = true;
  let countsDirty = true;
  let filterText = "";
  let filterDirty = false;
  let frame = 0;

  function schedule() {
    if (!frame) frame = requestAnimationFrame(flush);
  }

  function groupOf(state) {
    return STATES.includes(state) ? state : "OTHER";
  }
  function labelOf(d) {
    return LABEL[d.state] || str(d.state) || "unknown";
  }
  function reasonsOf(d) {
    return Array.isArray(d.stop_reasons) ? d.stop_reasons.map(str) : [];
  }

  function upsertCp(d) {
    if (!d || typeof d !== "object" || d.cp_id === undefined || d.cp_id === null) return;
    const id = str(d.cp_id);
    let rec = cps.get(id);
    if (!rec) {
      rec = { id, data: d, node: null, parts: null, group: null, visible: true, key: "" };
      cps.set(id, rec);
    } else if (rec.data.state === d.state) {
      rec.data = d;
      markCp(rec);
      return;
    } else if (STATES.includes(rec.data.state)) {
      counts[rec.data.state] -= 1;
    }
    rec.data = d;
    if (STATES.includes(d.state)) counts[d.state] += 1;
    countsDirty = true;
    markCp(rec);
  }
  function markCp(rec) {
    const d = rec.data;
    const listed = broken.has(rec.id) || disconnected.has(rec.id);  // in the alerts area before this change
    if (d.state === "BROKEN") broken.add(rec.id); else broken.delete(rec.id);
    if (d.state === "DISCONNECTED") disconnected.add(rec.id); else disconnected.delete(rec.id);
    if (listed || d.state === "BROKEN" || d.state === "DISCONNECTED") alertsDirty = true;
    dirty.add(rec.id);
    schedule();
  }
  function removeCp(id) {
    const rec = cps.get(str(id));
    if (!rec) return;
    cps.delete(rec.id);
    if (STATES.includes(rec.data.state)) counts[rec.data.state] -= 1;
    broken.delete(rec.id);
    disconnected.delete(rec.id);
    if (rec.group) {
      const ids = groupIds[rec.group];
      const i = lowerBound(ids, rec.id);
      if (ids[i] === rec.id) ids.splice(i, 1);
    }
    if (rec.node) rec.node.remove();
    dirty.delete(rec.id);
    countsDirty = alertsDirty = true;
    schedule();
  }

  function lowerBound(ids, id) {
    let lo = 0;
    let hi = ids.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (byId(ids[mid], id) < 0) lo = mid + 1; else hi = mid;
    }
    return lo;
  }

  function buildTile(rec) {
    const node = make("article", "tile");
    node.setAttribute("data-testid", "cp-tile");
    node.setAttribute("data-cp", rec.id);
    const head = make("header");
    const title = make("h3", "cp-id", rec.id);
    const badge = make("span", "badge");
    badge.setAttribute("data-testid", "cp-state");
    head.append(title, badge);
    const loc = make("p", "loc");
    loc.setAttribute("data-testid", "cp-location");
    const supply = make("div", "supply");
    supply.setAttribute("data-testid", "cp-supply");
    const kw = make("span"); kw.setAttribute("data-testid", "cp-kw");
    const kwh = make("span"); kwh.setAttribute("data-testid", "cp-kwh");
    const eur = make("span"); eur.setAttribute("data-testid", "cp-eur");
    const driver = make("span"); driver.setAttribute("data-testid", "cp-driver");
    supply.append(kw, kwh, eur, driver);
    const reasons = make("p", "reasons");
    reasons.setAttribute("data-testid", "cp-reasons");
    const fault = make("p", "fault");
    fault.setAttribute("data-testid", "cp-fault");
    const key = make("p", "key");
    key.setAttribute("data-testid", "cp-key");
    const actions = make("div", "actions");
    const stop = actionButton("stop", "Stop", `Stop ${rec.id} (out of service)`);
    const resume = actionButton("resume", "Resume", `Resume ${rec.id} (back in service)`);
    const revoke = actionButton("revoke", "Revoke key", `Revoke the keys of ${rec.id}`);
    actions.append(stop, resume, revoke);
    node.append(head, loc, supply, reasons, fault, key, actions);
    rec.node = node;
    rec.parts = { badge, loc, supply, kw, kwh, eur, driver, reasons, fault, key, stop, resume, revoke };
  }
  function actionButton(action, text, label) {
    const b = make("button", action, text);
    b.type = "button";
    b.dataset.action = action;
    b.setAttribute("data-testid", `cp-${action}`);
    b.setAttribute("aria-label", label);
    return b;
  }

  function renderTile(rec) {
    if (!rec.node) buildTile(rec);
    const d = rec.data;
    const p = rec.parts;
    const state = str(d.state);
    const label = labelOf(d);
    const reasons = reasonsOf(d);
    setAttr(rec.node, "data-state", state);
    setAttr(rec.node, "aria-label", `${rec.id}: ${label}`);
    setText(p.badge, label);
    setText(p.loc, `${str(d.location)} · ${num(d.price_eur_kwh, 2)} €/kWh`);
    const supplying = state === "SUPPLYING";
    show(p.supply, supplying);
    if (supplying) {
      setText(p.kw, `${num(d.power_kw, 1)} kW`);
      setText(p.kwh, `${num(d.energy_kwh, 3)} kWh`);
      setText(p.eur, `${num(d.cost_eur, 2)} €`);
      setText(p.driver, `driver ${str(d.driver_id) || "?"}`);
    }
    show(p.reasons, reasons.length > 0);
    if (reasons.length) {
      const lead = state === "STOPPED" ? "Stopped" : state === "SUPPLYING" ? "Stopping" : "Held out of service";
      setText(p.reasons, `${lead}: ${reasons.join(", ")}`);
    }
    const fault = str(d.fault);
    show(p.fault, fault !== "");
    if (fault) setText(p.fault, `Fault: ${fault}`);
    const keyStatus = d.key && typeof d.key === "object" ? str(d.key.status) : "";
    show(p.key, keyStatus === "revoked" || keyStatus === "replaced");
    if (keyStatus === "revoked" || keyStatus === "replaced") setText(p.key, `Key ${keyStatus}`);
    p.stop.disabled = reasons.includes("operator");
    p.resume.disabled = state !== "STOPPED" && reasons.length === 0;
    p.revoke.disabled = keyStatus === "revoked" || keyStatus === "none";
    rec.key = [rec.id, d.location, state, label, reasons.join(" "), fault, d.driver_id].map(str).join("\n")
      .toLowerCase();
    place(rec, groupOf(state));
    applyFilter(rec);
  }

  /** Put the tile in its state's container, in id order (moves one element, keeps the focus). */
  function place(rec, group) {
    if (rec.group === group) return;
    if (rec.group) {
      const old = groupIds[rec.group];
      const i = lowerBound(old, rec.id);
      if (old[i] === rec.id) old.splice(i, 1);
    }
    const ids = groupIds[group];
    const i = lowerBound(ids, rec.id);
    ids.splice(i, 0, rec.id);
    const next = i + 1 < ids.length ? cps.get(ids[i + 1]) : null;
    const focused = rec.node.contains(document.activeElement) ? document.activeElement : null;
    groupEl[group].insertBefore(rec.node, next && next.node ? next.node : null);
    if (focused) focused.focus();
    rec.group = group;
  }

  function applyFilter(rec) {
    const visible = filterText === "" || rec.key.includes(filterText);
    rec.visible = visible;
    show(rec.node, visible);
  }

  function flush() {
    frame = 0;
    if (filterDirty) {
      filterDirty = false;
      for (const rec of cps.values()) if (rec.node && !dirty.has(rec.id)) applyFilter(rec);
    }
    if (dirty.size) {
      for (const id of dirty) {
        const rec = cps.get(id);
        if (rec) renderTile(rec);
      }
      dirty.clear();
      countsDirty = true;
    }
    if (countsDirty) renderCounts();
    if (requestsDirty) renderRequests();
    if (messagesRebuild || pendingMessages.length) renderMessages();
    if (weatherDirty) renderWeather();
    if (alertsDirty) renderAlerts();
  }

  function renderCounts() {
    countsDirty = false;
    const total = cps.size;
    setText(ui.total, `${total} CP${total === 1 ? "" : "s"}`);
    for (const s of STATES) {
      setText(countBtn[s], `${LABEL[s]} ${counts[s]}`);
      setAttr(countBtn[s], "aria-pressed", filterText === s.toLowerCase() ? "true" : "false");
    }
    show(ui.noCps, total === 0);
    if (filterText) {
      let n = 0;
      for (const rec of cps.values()) if (rec.visible) n += 1;
      setText(ui.filterCount, `showing ${n} of ${total}`);
    } else {
      setText(ui.filterCount, "");
    }
  }

  function renderRequests() {
    requestsDirty = false;
    const rows = requests.slice().sort((a, b) => (Number(b.started_at) || 0) - (Number(a.started_at) || 0));
    const shown = rows.slice(0, MAX_REQUESTS);
    const frag = document.createDocumentFragment();
    for (const r of shown) {
      const tr = make("tr");
      tr.setAttribute("data-testid", "request-row");
      tr.setAttribute("data-cp", str(r.cp_id));
      tr.setAttribute("data-driver", str(r.driver_id));
      for (const v of [day(r.started_at), clock(r.started_at), str(r.driver_id), str(r.cp_id), str(r.status)]) {
        tr.appendChild(make("td", "", v));
      }
      frag.appendChild(tr);
    }
    ui.requestsBody.replaceChildren(frag);
    show(ui.requestsNote, rows.length === 0 || rows.length > shown.length);
    setText(ui.requestsNote, rows.length === 0 ? "None." : `The newest ${shown.length} of ${rows.length}.`);
  }

  function messageItem(m) {
    const li = make("li", m.fault ? "fault" : "");
    li.setAttribute("data-testid", "message");
    li.setAttribute("data-fault", m.fault ? "true" : "false");
    const t = make("time", "", clock(m.at));
    const iso = isoOf(m.at);
    if (iso) t.dateTime = iso;
    li.appendChild(t);
    if (m.fault) li.appendChild(make("span", "tag", "FAULT"));
    li.appendChild(document.createTextNode(str(m.text)));
    return li;
  }
  function renderMessages() {
    if (messagesRebuild) {
      messagesRebuild = false;
      pendingMessages = [];
      const frag = document.createDocumentFragment();
      for (const m of messages) frag.appendChild(messageItem(m));
      ui.messages.replaceChildren(frag);
    } else {
      const placeholder = ui.messages.querySelector('[data-testid="no-messages"]');
      if (placeholder) placeholder.remove();
      const frag = document.createDocumentFragment();
      for (let i = pendingMessages.length - 1; i >= 0; i -= 1) frag.appendChild(messageItem(pendingMessages[i]));
      pendingMessages = [];
      ui.messages.insertBefore(frag, ui.messages.firstChild);
      while (ui.messages.childElementCount > MAX_MESSAGES) ui.messages.lastElementChild.remove();
    }
    if (!ui.messages.firstChild) {
      const li = make("li", "", "No messages yet.");
      li.setAttribute("data-testid", "no-messages");
      ui.messages.appendChild(li);
    }
  }

  function renderWeather() {
    weatherDirty = false;
    const rows = [...weather.values()].sort((a, b) => byId(str(a.data.location), str(b.data.location)));
    for (const w of rows) {
      if (!w.row) {
        const tr = make("tr");
        tr.setAttribute("data-testid", "weather-row");
        tr.setAttribute("data-location", str(w.data.location));
        const cells = { loc: make("td", "w-loc"), temp: make("td", "w-temp"), status: make("td", "w-status"),
          cps: make("td", "w-cps"), at: make("td", "w-at") };
        cells.status.setAttribute("data-testid", "weather-status");
        tr.append(cells.loc, cells.temp, cells.status, cells.cps, cells.at);
        w.row = tr;
        w.cells = cells;
      }
      const d = w.data;
      const ids = Array.isArray(d.cp_ids) ? d.cp_ids.map(str).sort(byId) : [];
      setAttr(w.row, "data-alert", d.alert ? "true" : "false");
      setText(w.cells.loc, str(d.location));
      setText(w.cells.temp, temp(d.temperature_c));
      let status = d.alert ? `ALERT: ${ids.length} CP${ids.length === 1 ? "" : "s"} out of service` : "no alert";
      if (d.error) status += ` (provider error: ${str(d.error)})`;
      if (d.watched === false) status += " (not watched)";
      setText(w.cells.status, status);
      w.cells.status.classList.toggle("w-error", Boolean(d.error));
      setText(w.cells.cps, ids.length > 6 ? `${ids.slice(0, 6).join(", ")} +${ids.length - 6}` : ids.join(", "));
      setText(w.cells.at, clock(d.updated_at));
      ui.weatherBody.appendChild(w.row);  // in order (appending an existing row moves it)
    }
    show(ui.noWeather, weather.size === 0);
  }

  function alertItem(kind, text, testid) {
    const li = make("li", "", text);
    li.setAttribute("data-kind", kind);
    li.setAttribute("data-testid", testid || `alert-${kind}`);
    return li;
  }
  function renderAlerts() {
    alertsDirty = false;
    const frag = document.createDocumentFragment();
    const ws = [...weather.values()].map((w) => w.data).sort((a, b) => byId(str(a.location), str(b.location)));
    for (const d of ws.filter((w) => w.alert).slice(0, MAX_ALERT_ROWS)) {
      const ids = Array.isArray(d.cp_ids) ? d.cp_ids.map(str).sort(byId) : [];
      const li = alertItem("weather", `Weather alert in ${str(d.location)} (${temp(d.temperature_c)}): `
        + (ids.length ? `${ids.slice(0, 10).join(", ")}${ids.length > 10 ? ` and ${ids.length - 10} more` : ""} `
          + "out of service." : "no CP there."));
      li.setAttribute("data-location", str(d.location));
      frag.appendChild(li);
    }
    for (const d of ws.filter((w) => w.error).slice(0, MAX_ALERT_ROWS)) {
      frag.appendChild(alertItem("weather-error", `Weather provider error for ${str(d.location)}: ${str(d.error)}`));
    }
    const brokenIds = [...broken].sort(byId);
    for (const id of brokenIds.slice(0, MAX_ALERT_ROWS)) {
      const rec = cps.get(id);
      const fault = rec ? str(rec.data.fault) : "";
      const li = alertItem("broken", `${id} BROKEN${fault ? `: ${fault}` : ""}`);
      li.setAttribute("data-cp", id);
      frag.appendChild(li);
    }
    if (brokenIds.length > MAX_ALERT_ROWS) {
      frag.appendChild(alertItem("more", `and ${brokenIds.length - MAX_ALERT_ROWS} more BROKEN CPs (filter: broken)`));
    }
    if (disconnected.size) {
      const ids = [...disconnected].sort(byId);
      frag.appendChild(alertItem("disconnected", `${ids.length} CP${ids.length === 1 ? "" : "s"} DISCONNECTED: `
        + `${ids.slice(0, 10).join(", ")}${ids.length > 10 ? ` and ${ids.length - 10} more` : ""}`));
    }
    const faults = messages.filter((m) => m.fault).slice(0, MAX_FAULT_ALERTS);
    for (const m of faults) {
      frag.appendChild(alertItem("fault", `${clock(m.at)} ${str(m.text)}`));
    }
    if (!frag.firstChild) {
      frag.appendChild(alertItem("none", "No alerts: no weather alert and no module reports a fault."));
    }
    ui.alerts.replaceChildren(frag);
  }

  // ------------------------------------------------------------------ events from Central
  function addMessage(m) {
    if (!m || typeof m !== "object") return;
    const seq = Number(m.seq);
    if (Number.isFinite(seq)) {
      if (seq <= maxSeq) return;  // already shown (the snapshot had it)
      maxSeq = seq;
    }
    messages.unshift(m);
    if (messages.length > MAX_MESSAGES) messages.length = MAX_MESSAGES;
    pendingMessages.push(m);
    if (pendingMessages.length > MAX_MESSAGES) { pendingMessages = []; messagesRebuild = true; }
    if (m.fault) alertsDirty = true;
    schedule();
  }
  function setWeather(d) {
    if (!d || typeof d !== "object" || d.location === undefined || d.location === null) return;
    const loc = str(d.location);
    const w = weather.get(loc);
    if (w) w.data = d; else weather.set(loc, { data: d, row: null, cells: null });
    weatherDirty = alertsDirty = true;
    schedule();
  }

  const handlers = {
    snapshot(data) {
      const seen = new Set();
      for (const d of Array.isArray(data.cps) ? data.cps : []) {
        upsertCp(d);
        if (d && d.cp_id !== undefined) seen.add(str(d.cp_id));
      }
      for (const id of [...cps.keys()]) if (!seen.has(id)) removeCp(id);
      requests = Array.isArray(data.requests) ? data.requests : [];
      requestsDirty = true;
      const ms = Array.isArray(data.messages) ? data.messages : [];  // oldest first
      messages = ms.slice(-MAX_MESSAGES).reverse();
      maxSeq = -Infinity;
      for (const m of ms) if (Number.isFinite(Number(m && m.seq))) maxSeq = Math.max(maxSeq, Number(m.seq));
      messagesRebuild = true;
      const ws = Array.isArray(data.weather) ? data.weather : [];
      const locs = new Set(ws.map((w) => str(w && w.location)));
      for (const [loc, w] of weather) {
        if (!locs.has(loc)) { if (w.row) w.row.remove(); weather.delete(loc); }
      }
      for (const w of ws) setWeather(w);
      weatherDirty = alertsDirty = countsDirty = true;
      backoff = BACKOFF_MIN_MS;
      setConn("live", "live");
      if (ui.status.dataset.kind === "info") setStatus("ok", `Connected: ${cps.size} CPs.`);
      schedule();
    },
    cps(data) {
      for (const d of Array.isArray(data.changed) ? data.changed : []) upsertCp(d);
      for (const id of Array.isArray(data.removed) ? data.removed : []) removeCp(id);
    },
    requests(data) {
      requests = Array.isArray(data.requests) ? data.requests : [];
      requestsDirty = true;
      schedule();
    },
    message(data) { addMessage(data); },
    weather(data) { setWeather(data); },
  };

  // ------------------------------------------------------------------ the stream
  let backoff = BACKOFF_MIN_MS;
  let controller = null;
  let generation = 0;       // a newer connect() or disconnect() makes older readers quiet
  let retryTimer = 0;
  let stallTimer = 0;
  let stalled = false;

  function disconnect() {
    generation += 1;
    clearTimeout(retryTimer);
    clearTimeout(stallTimer);
    if (controller) controller.abort();
    controller = null;
  }

  function retry(reason, delayMs) {
    clearTimeout(stallTimer);
    const wait = delayMs !== undefined ? delayMs : Math.round(backoff * (0.8 + Math.random() * 0.4));
    if (delayMs === undefined) backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
    setConn("retrying", `disconnected — retrying in ${Math.max(1, Math.round(wait / 1000))} s (${reason})`);
    retryTimer = setTimeout(connect, wait);
  }

  function refused(sentence, http) {
    disconnect();
    saveToken(null);
    setConn("refused", "token refused");
    askToken("");
    setStatus("error", `Central refused the token: ${sentence} Enter the operator token again.`, http);
  }

  async function detailOf(resp) {
    let body = null;
    try { body = await resp.json(); } catch (_) { body = null; }
    let sentence = "";
    if (body && typeof body === "object") {
      if (typeof body.detail === "string") sentence = body.detail;
      else if (typeof body.message === "string") sentence = body.message;
      else if (Array.isArray(body.detail)) sentence = body.detail.map((d) => str(d && d.msg)).join("; ");
    }
    if (!sentence) sentence = `Central answered HTTP ${resp.status}${resp.statusText ? ` ${resp.statusText}` : ""}.`;
    return sentence.length > 500 ? `${sentence.slice(0, 500)}…` : sentence;
  }

  function armStall(myController) {
    clearTimeout(stallTimer);
    stallTimer = setTimeout(() => {
      stalled = true;
      myController.abort();
    }, STALL_MS);
  }

  async function connect() {
    disconnect();
    const token = loadToken();
    if (!token) {
      setConn("idle", "not connected");
      askToken("");
      setStatus("info", "Enter the operator token to see the panel.");
      return;
    }
    show(ui.form, false);
    show(ui.forget, true);
    const mine = generation;
    const ctrl = new AbortController();
    controller = ctrl;
    stalled = false;
    setConn("connecting", "connecting…");
    let resp;
    try {
      resp = await fetch("api/events", {
        headers: { Authorization: `Bearer ${token}`, Accept: "text/event-stream" },
        cache: "no-store", credentials: "omit", signal: ctrl.signal,
      });
    } catch (err) {
      if (mine === generation) retry("Central cannot be reached");
      return;
    }
    if (mine !== generation) return;
    if (resp.status === 401 || resp.status === 403) {
      refused(await detailOf(resp), resp.status);
      return;
    }
    if (resp.status === 429) {
      const sentence = await detailOf(resp);
      const after = Number(resp.headers.get("Retry-After"));
      setStatus("error", sentence, 429);
      retry("too many attempts", (Number.isFinite(after) && after > 0 ? Math.min(after, 3600) : 30) * 1000);
      return;
    }
    const type = resp.headers.get("Content-Type") || "";
    if (!resp.ok || !resp.body || !type.startsWith("text/event-stream")) {
      const sentence = resp.ok ? "Central's answer is not an event stream." : await detailOf(resp);
      setStatus("error", sentence, resp.status);
      retry(`HTTP ${resp.status}`);
      return;
    }
    let reason = "the event stream ended";
    try {
      await readEvents(resp.body.getReader(), ctrl, mine);
    } catch (err) {
      reason = stalled ? "no data from Central for 45 s"
        : err && err.name === "AbortError" ? "the connection was closed" : `the stream broke (${str(err && err.message)})`;
    }
    if (mine === generation) retry(reason);
  }

  /** Parse text/event-stream (WHATWG HTML §9.2) from a byte stream and dispatch each event. */
  async function readEvents(reader, ctrl, mine) {
    const decoder = new TextDecoder("utf-8");
    let buf = "";
    let event = "";
    let data = [];
    let size = 0;
    armStall(ctrl);
    for (;;) {
      const { value, done } = await reader.read();
      if (mine !== generation) { reader.cancel().catch(() => {}); return; }
      if (done) return;
      armStall(ctrl);
      buf += decoder.decode(value, { stream: true });
      let pos = 0;
      for (;;) {
        const n = buf.indexOf("\n", pos);
        const r = buf.indexOf("\r", pos);
        let end;
        let next;
        if (r !== -1 && (n === -1 || r < n)) {
          if (r === buf.length - 1) break;  // a "\n" may follow in the next chunk
          end = r;
          next = buf[r + 1] === "\n" ? r + 2 : r + 1;
        } else if (n !== -1) {
          end = n;
          next = n + 1;
        } else {
          break;
        }
        const line = buf.slice(pos, end);
        pos = next;
        if (line === "") {
          if (data.length) dispatch(event || "message", data.join("\n"));
          event = "";
          data = [];
          size = 0;
          continue;
        }
        if (line[0] === ":") continue;  // a comment: the keepalive
        const colon = line.indexOf(":");
        const field = colon === -1 ? line : line.slice(0, colon);
        let val = colon === -1 ? "" : line.slice(colon + 1);
        if (val[0] === " ") val = val.slice(1);
        if (field === "event") event = val;
        else if (field === "data") {
          data.push(val);
          size += val.length;
          if (size > MAX_EVENT_CHARS) throw new Error("an event is too large");
        }
        // "id" and "retry" are not needed: a reconnection always starts with a fresh snapshot
      }
      buf = buf.slice(pos);
      if (buf.length > MAX_EVENT_CHARS) throw new Error("a line of the stream is too long");
    }
  }

  function dispatch(name, text) {
    const handler = Object.prototype.hasOwnProperty.call(handlers, name) ? handlers[name] : null;
    if (!handler) return;  // an event this page does not know: a newer Central; ignored
    let data;
    try {
      data = JSON.parse(text);
    } catch (_) {
      setStatus("error", `Central sent a ${name} event that is not JSON; it was ignored.`);
      return;
    }
    if (data && typeof data === "object") handler(data);
  }

  // ------------------------------------------------------------------ commands
  async function command(path, body, what) {
    const token = loadToken();
    if (!token) {
      askToken("Enter the operator token first.");
      return;
    }
    setStatus("info", `${what}…`);
    let resp;
    try {
      resp = await fetch(path, {
        method: "POST", cache: "no-store", credentials: "omit",
        headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify(body || {}),
      });
    } catch (err) {
      setStatus("error", `${what}: Central cannot be reached.`);
      return;
    }
    const sentence = await detailOf(resp);
    if (resp.status === 401 || resp.status === 403) {
      refused(sentence, resp.status);
      return;
    }
    setStatus(resp.ok ? "ok" : resp.status === 409 ? "warn" : "error", sentence, resp.status);
  }
  const cpPath = (id, action) => `api/cps/${encodeURIComponent(id)}/${action}`;

  ui.tiles.addEventListener("click", (e) => {
    const button = e.target instanceof Element ? e.target.closest("button[data-action]") : null;
    const tile = button ? button.closest("[data-cp]") : null;
    if (!button || !tile) return;
    const id = tile.getAttribute("data-cp");
    const action = button.dataset.action;
    if (action === "stop") command(cpPath(id, "stop"), {}, `Stopping ${id}`);
    else if (action === "resume") command(cpPath(id, "resume"), {}, `Resuming ${id}`);
    else if (action === "revoke") {
      if (window.confirm(`Revoke every key of ${id}? Its link closes and it cannot log in until it is `
        + "registered again.")) {
        command(cpPath(id, "revoke"), { reason: "revoked by the operator from the web panel" },
          `Revoking the keys of ${id}`);
      } else {
        setStatus("info", `The keys of ${id} were not revoked.`);
      }
    }
  });
  q('[data-testid="stop-all"]').addEventListener("click", () => {
    if (window.confirm(`Stop all ${cps.size} CPs? Running supplies end and are billed.`)) {
      command("api/cps/stop", {}, "Stopping every CP");
    }
  });
  q('[data-testid="resume-all"]').addEventListener("click", () => {
    command("api/cps/resume", {}, "Resuming every CP");
  });

  // ------------------------------------------------------------------ filter
  let filterTimer = 0;
  function setFilter(text) {
    filterText = text.trim().toLowerCase();
    filterDirty = countsDirty = true;
    schedule();
  }
  ui.filter.addEventListener("input", () => {
    clearTimeout(filterTimer);
    filterTimer = setTimeout(() => setFilter(ui.filter.value), 120);
  });
  ui.counts.addEventListener("click", (e) => {
    const b = e.target instanceof Element ? e.target.closest("button[data-state]") : null;
    if (!b) return;
    const s = b.dataset.state.toLowerCase();
    ui.filter.value = filterText === s ? "" : b.dataset.state;
    setFilter(ui.filter.value);
  });

  // ------------------------------------------------------------------ start
  takeTokenFromFragment();
  renderCounts();
  renderAlerts();
  renderMessages();
  connect();
})();
