// emsfl dashboard page: plain JavaScript and SVG, no build step, no third-party code.
// The server sends a snapshot, then deltas, over Server-Sent Events (/api/stream); the page keeps the state
// and re-renders what a delta touched, batched in one task. `window.emsfl` exposes measurement hooks that the
// browser test and the benchmark read (render times of link states, first render).
"use strict";

(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#86bcb6", "#8cd17d", "#d37295", "#a0cbe8", "#ffbe7d", "#499894", "#f1ce63"];
  const TIMELINE_PAST_S = 2 * 3600;
  const TIMELINE_FUTURE_S = 4 * 3600;
  const MAX_SHOWN_EVENTS = 300;

  const S = {
    operator: false, clock: null, orbitOnline: false, orbitOfflineWall: null, clusters: [], links: {}, windows: {}, ground: {},
    satellites: null, sites: {}, satellite: null, accuracy: [], events: [],
  };
  const hooks = { rendered: {}, firstRenderMs: null, snapshots: 0, errors: [] };
  window.emsfl = hooks;
  const dirty = new Set();
  let flushQueued = false;
  const rows = {};

  const $ = (id) => document.getElementById(id);
  function el(tag, attrs, parent) {
    const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") node.textContent = v; else node.setAttribute(k, v);
    }
    if (parent) parent.appendChild(node);
    return node;
  }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }
  function fmtBytes(n) {
    if (n === null || n === undefined) return "--";
    const units = ["B", "kB", "MB", "GB", "TB"];
    let i = 0; let v = Number(n);
    while (v >= 1000 && i < units.length - 1) { v /= 1000; i++; }
    return (i ? v.toFixed(1) : String(v)) + " " + units[i];
  }
  function fmtRate(bps) { return bps === null || bps === undefined ? "--" : (bps / 1e6).toFixed(1) + " Mbit/s"; }
  function fmtMem(mb) { return mb === null || mb === undefined ? "--" : Math.round(mb) + " MB"; }
  function iso(ms) { return new Date(ms).toISOString().replace(".000Z", "Z"); }
  function clusterColor(c) { const i = S.clusters.indexOf(c); return PALETTE[(i < 0 ? 0 : i) % PALETTE.length]; }

  // -- the emulated clock ------------------------------------------------------------------------------
  function emulatedNowMs() {
    const c = S.clock;
    if (!c) return null;
    const epoch = Date.parse(c.epoch_utc);
    // the orbit service went offline (the run ended): emulated time stopped with it
    const wall = S.orbitOfflineWall === null ? Date.now() / 1000 : Math.min(Date.now() / 1000, S.orbitOfflineWall);
    return c.paused ? epoch : epoch + Math.max(0, wall - c.wall_ref_unix) * c.scale * 1000;
  }
  function linkUp(cluster) {
    const l = S.links[cluster];
    if (!l || l.state !== "up" || !S.orbitOnline) return false;
    const now = emulatedNowMs();
    return !(l.until && now !== null && now >= Date.parse(l.until));
  }

  // -- state updates -----------------------------------------------------------------------------------
  function addCluster(c) {
    if (!S.clusters.includes(c)) { S.clusters.push(c); S.clusters.sort(); dirty.add("clusters"); }
  }
  function apply(d) {
    switch (d.type) {
      case "snapshot":
        S.operator = d.operator; S.clock = d.clock; S.orbitOnline = d.orbit_online; S.links = d.links || {};
        S.orbitOfflineWall = d.orbit_offline_wall;
        S.windows = d.windows || {}; S.ground = d.ground || {}; S.satellites = d.satellites; S.sites = d.sites || {};
        S.satellite = d.satellite; S.accuracy = d.accuracy || []; S.events = d.events || [];
        S.clusters = (d.clusters || []).slice().sort();
        hooks.snapshots += 1;
        ["all"].forEach((k) => dirty.add(k));
        break;
      case "clock": S.clock = d.clock; dirty.add("clock"); dirty.add("timeline"); break;
      case "orbit_status":
        S.orbitOnline = d.online; S.orbitOfflineWall = d.offline_wall; dirty.add("clock"); dirty.add("links"); break;
      case "link":
        addCluster(d.cluster); S.links[d.cluster] = d.link; dirty.add("link:" + d.cluster); dirty.add("map"); break;
      // the timeline redraws with the clock (tick), four times a second
      case "windows": addCluster(d.cluster); S.windows[d.cluster] = d.windows; break;
      case "satellites": S.satellites = d; dirty.add("map"); break;
      case "sites": S.sites = d.sites; Object.keys(d.sites).forEach(addCluster); dirty.add("sites"); break;
      case "ground": {
        addCluster(d.cluster);
        const g = Object.assign({}, d); delete g.type; delete g.cluster;
        S.ground[d.cluster] = g; dirty.add("ground:" + d.cluster); break;
      }
      case "satellite": S.satellite = d.satellite; dirty.add("satellite"); break;
      case "accuracy": S.accuracy = d.points; dirty.add("accuracy"); break;
      case "event":
        S.events.push(d.event);
        if (S.events.length > 1000) S.events.splice(0, S.events.length - 1000);
        dirty.add("events"); break;
      default: break;
    }
    queueFlush();
  }

  // -- rendering ---------------------------------------------------------------------------------------
  const EVENTS_EVERY_MS = 300; // the event log redraws at most this often: link states go first
  let eventsDrawnAt = 0;
  let eventsTimer = null;
  function queueFlush() { if (!flushQueued) { flushQueued = true; setTimeout(flush, 0); } }
  function flush() {
    flushQueued = false;
    const all = dirty.has("all");
    let later = false;
    if (all || dirty.has("clusters")) renderClusterRows();
    for (const c of S.clusters) {
      if (all || dirty.has("clusters") || dirty.has("links") || dirty.has("link:" + c)) renderLink(c);
      if (all || dirty.has("clusters") || dirty.has("ground:" + c)) renderGround(c);
    }
    if (all || dirty.has("clock")) renderClock();
    if (all || dirty.has("sites") || dirty.has("clusters")) renderSites();
    if (all || dirty.has("map") || dirty.has("sites") || dirty.has("links")) renderMap();
    if (all || dirty.has("timeline") || dirty.has("clusters")) renderTimeline();
    if (all || dirty.has("satellite") || dirty.has("clusters")) renderSatellite();
    if (all || dirty.has("accuracy")) renderAccuracy();
    if (all || dirty.has("events") || dirty.has("clusters")) {
      if (all || performance.now() - eventsDrawnAt >= EVENTS_EVERY_MS) {
        renderEvents(); eventsDrawnAt = performance.now();
      } else {
        later = true;
      }
    }
    if (all) renderOperator();
    dirty.clear();
    if (later && eventsTimer === null) {
      eventsTimer = setTimeout(() => { eventsTimer = null; dirty.add("events"); queueFlush(); }, EVENTS_EVERY_MS);
    }
    if (hooks.firstRenderMs === null && S.clock) hooks.firstRenderMs = performance.now();
  }

  function renderClock() {
    const c = S.clock;
    $("clock-scale").textContent = c ? "x" + c.scale : "--";
    const p = $("clock-paused");
    const stopped = c && !S.orbitOnline;
    p.textContent = !c ? "no clock" : stopped ? "stopped" : c.paused ? "paused" : "running";
    p.className = "item badge " + (!c ? "" : c.paused || stopped ? "warn" : "ok");
    const o = $("orbit-online");
    o.textContent = S.orbitOnline ? "orbit online" : "orbit offline";
    o.className = "item badge " + (S.orbitOnline ? "ok" : "warn");
    $("mode").textContent = S.operator ? "operator" : "read-only";
  }
  function tick() {
    const now = emulatedNowMs();
    $("clock-now").textContent = now === null ? "--" : iso(Math.floor(now / 1000) * 1000);
    renderTimeline();
  }

  function renderClusterRows() {
    const body = document.querySelector("#clusters tbody");
    for (const c of S.clusters) {
      if (rows[c]) continue;
      const tr = el("tr", { "data-cluster": c });
      const cells = {};
      for (const name of ["name", "link", "sat", "rate", "steps", "staged", "acked", "up", "down", "assignment",
        "memory", "devices"]) {
        const numeric = ["rate", "steps", "staged", "acked", "up", "down", "memory"].includes(name);
        cells[name] = el("td", { class: name + (numeric ? " num" : "") }, tr);
      }
      cells.name.textContent = c;
      rows[c] = cells;
      const next = S.clusters.slice(S.clusters.indexOf(c) + 1).find((x) => rows[x]);
      body.insertBefore(tr, next ? rows[next].name.parentNode : null);
      el("option", { value: c, text: c }, $("op-cluster"));
      el("option", { value: c, text: c }, $("ev-cluster"));
    }
  }
  function renderLink(c) {
    const cells = rows[c];
    if (!cells) return;
    const l = S.links[c];
    const up = linkUp(c);
    cells.link.textContent = l ? (up ? "up" : "down") + (l.forced ? " (forced)" : "") : "--";
    cells.link.setAttribute("data-state", l ? (up ? "up" : "down") : "unknown");
    cells.link.setAttribute("data-seq", l ? String(l.seq) : "");
    cells.sat.textContent = up && l.satellite ? l.satellite : "--";
    cells.rate.textContent = up ? fmtRate(l.rate_bps) : "--";
    if (l) {
      const key = c + ":" + l.seq;
      if (!(key in hooks.rendered)) hooks.rendered[key] = { wall: Date.now() / 1000, state: up ? "up" : "down" };
    }
  }
  function renderGround(c) {
    const cells = rows[c];
    const g = S.ground[c];
    if (!cells || !g) return;
    cells.steps.textContent = String(g.steps ?? "--");
    cells.staged.textContent = String(g.uploads_staged ?? "--");
    cells.acked.textContent = String(g.uploads_acked ?? "--");
    cells.up.textContent = fmtBytes(g.bytes_uplinked);
    cells.down.textContent = fmtBytes(g.bytes_downlinked);
    cells.assignment.textContent = g.experts
      ? "v" + (g.assignment_version ?? "?") + " " + g.experts.map(([l, e]) => "L" + l + ":" + e.join(",")).join("  ")
      : g.assignment_version !== null && g.assignment_version !== undefined ? "v" + g.assignment_version : "--";
    cells.memory.textContent = fmtMem(g.peak_gpu_memory_mb ?? g.peak_rss_mb);
    const devices = Object.entries(g.devices || {});
    cells.devices.textContent = devices.length
      ? devices.map(([d, f]) => d + ": " + (f.steps ?? 0) + " steps" + (f.peak_rss_mb ? ", " + fmtMem(f.peak_rss_mb) : ""))
        .join("; ")
      : "1";
  }

  // -- map ---------------------------------------------------------------------------------------------
  function xy(lat, lon) { return [lon + 180, 90 - lat]; }
  function renderSites() {
    const g = $("sites");
    clear(g);
    for (const [c, s] of Object.entries(S.sites)) {
      const [x, y] = xy(s.lat_deg, s.lon_deg);
      el("svg:circle", { class: "site", cx: x.toFixed(2), cy: y.toFixed(2), r: 1.6, "data-cluster": c }, g);
      el("svg:text", { class: "site-label", x: (x + 2).toFixed(2), y: (y - 1.5).toFixed(2), text: c + " " + (s.name || "") }, g);
    }
  }
  function renderMap() {
    const satsG = $("sats");
    const linksG = $("links");
    clear(satsG); clear(linksG);
    const pos = {};
    for (const s of (S.satellites && S.satellites.satellites) || []) pos[s.id] = xy(s.lat_deg, s.lon_deg);
    const serving = new Set();
    for (const c of S.clusters) {
      const l = S.links[c]; const site = S.sites[c];
      if (!linkUp(c) || !l.satellite || !site || !pos[l.satellite]) continue;
      serving.add(l.satellite);
      const [x1, y1] = xy(site.lat_deg, site.lon_deg); const [x2, y2] = pos[l.satellite];
      if (Math.abs(x2 - x1) > 180) continue; // across the antimeridian: no line through the whole map
      el("svg:line", { class: "serving-link", x1: x1.toFixed(2), y1: y1.toFixed(2), x2: x2.toFixed(2), y2: y2.toFixed(2),
        "data-cluster": c, "data-satellite": l.satellite }, linksG);
    }
    for (const [id, [x, y]] of Object.entries(pos)) {
      const dot = el("svg:circle", { class: "sat" + (serving.has(id) ? " serving" : ""), cx: x.toFixed(2), cy: y.toFixed(2),
        r: 1.2, "data-sat": id }, satsG);
      el("svg:title", { text: id }, dot);
    }
  }

  // -- contact timeline --------------------------------------------------------------------------------
  function renderTimeline() {
    const svg = $("timeline");
    const now = emulatedNowMs();
    const rowH = S.clusters.length > 20 ? 8 : 18;
    const h = Math.max(40, 20 + rowH * S.clusters.length);
    svg.setAttribute("viewBox", "0 0 1000 " + h);
    svg.setAttribute("height", String(h));
    clear(svg);
    if (now === null) return;
    const t0 = now - TIMELINE_PAST_S * 1000; const t1 = now + TIMELINE_FUTURE_S * 1000;
    const x0 = 60; const w = 1000 - x0;
    const X = (t) => x0 + ((t - t0) / (t1 - t0)) * w;
    $("timeline-span").textContent = "emulated, " + TIMELINE_PAST_S / 3600 + " h past to " + TIMELINE_FUTURE_S / 3600 +
      " h ahead; " + (S.clock ? "scale x" + S.clock.scale + (S.clock.paused ? ", paused" : "") : "");
    for (let h0 = Math.ceil(t0 / 3600e3) * 3600e3; h0 < t1; h0 += 3600e3) {
      el("svg:text", { class: "tl-tick", x: X(h0).toFixed(1), y: 10, text: iso(h0).slice(11, 16) }, svg);
    }
    S.clusters.forEach((c, i) => {
      const y = 14 + i * rowH;
      if (rowH >= 12) el("svg:text", { class: "tl-label", x: 2, y: y + rowH * 0.7, text: c }, svg);
      for (const win of S.windows[c] || []) {
        const a = Date.parse(win.start); const b = Date.parse(win.end);
        if (b < t0 || a > t1) continue;
        const cls = b <= now ? "win past" : a <= now ? "win current" : "win";
        const r = el("svg:rect", { class: cls, x: X(Math.max(a, t0)).toFixed(1), y: y + 1,
          width: Math.max(1, X(Math.min(b, t1)) - X(Math.max(a, t0))).toFixed(1), height: rowH - 3 }, svg);
        el("svg:title", { text: c + " " + win.satellite + " " + win.start + " - " + win.end }, r);
      }
    });
    el("svg:line", { class: "nowline", id: "nowline", x1: X(now).toFixed(1), x2: X(now).toFixed(1), y1: 12, y2: h }, svg);
  }

  // -- satellite panel ---------------------------------------------------------------------------------
  function renderSatellite() {
    const s = S.satellite;
    if (!s) return;
    $("strategy").textContent = s.strategy;
    $("global-version").textContent = String(s.global_version);
    $("commits").textContent = String(s.commits);
    $("assignment-version").textContent = String(s.assignment_version ?? "--");
    const owner = {}; let layers = 0; let experts = 0;
    for (const [c, perLayer] of Object.entries(s.assignment || {})) {
      addCluster(c);
      for (const [layer, held] of perLayer) {
        for (const e of held) { owner[layer + ":" + e] = c; experts = Math.max(experts, e + 1); }
        layers = Math.max(layers, layer + 1);
      }
    }
    const version = {};
    for (const e of s.experts || []) {
      version[e.layer + ":" + e.expert] = e.version;
      layers = Math.max(layers, e.layer + 1); experts = Math.max(experts, e.expert + 1);
    }
    const svg = $("heatmap");
    clear(svg);
    const cell = 8; const left = 12; const top = 6;
    svg.setAttribute("viewBox", "0 0 " + (left + experts * cell + 2) + " " + (top + layers * cell + 2));
    for (let e = 0; e < experts; e++) {
      el("svg:text", { class: "hm-axis", x: left + e * cell + cell / 2 - 1, y: top - 1.5, text: String(e) }, svg);
    }
    for (let l = 0; l < layers; l++) {
      el("svg:text", { class: "hm-axis", x: 1, y: top + l * cell + cell / 2 + 1, text: "L" + l }, svg);
      for (let e = 0; e < experts; e++) {
        const c = owner[l + ":" + e]; const v = version[l + ":" + e];
        const r = el("svg:rect", { x: left + e * cell, y: top + l * cell, width: cell - 0.6, height: cell - 0.6,
          fill: c ? clusterColor(c) : "#d5dbe3", "data-layer": l, "data-expert": e, "data-owner": c || "" }, svg);
        el("svg:title", { text: "layer " + l + " expert " + e + ": " + (c || "unassigned") + ", version " + (v ?? 0) }, r);
        if (v !== undefined) {
          el("svg:text", { class: "hm-text", x: left + e * cell + cell / 2 - 0.3, y: top + l * cell + cell / 2 - 0.3,
            text: String(v) }, svg);
        }
      }
    }
    const legend = $("legend");
    clear(legend);
    for (const c of Object.keys(s.assignment || {}).sort()) {
      const item = el("span", {}, legend);
      el("i", { class: "swatch" }, item).style.background = clusterColor(c);
      item.appendChild(document.createTextNode(c));
    }
  }

  // -- accuracy ----------------------------------------------------------------------------------------
  function renderAccuracy() {
    const svg = $("accuracy");
    clear(svg);
    const pts = S.accuracy;
    $("accuracy-note").classList.toggle("hidden", pts.length > 0);
    const x0 = 40; const x1 = 390; const y0 = 140; const y1 = 10;
    el("svg:line", { class: "axis", x1: x0, y1: y0, x2: x1, y2: y0 }, svg);
    el("svg:line", { class: "axis", x1: x0, y1: y0, x2: x0, y2: y1 }, svg);
    if (!pts.length) return;
    const ts = pts.map((p) => Date.parse(p.t));
    const tMin = Math.min(...ts); const tMax = Math.max(...ts, tMin + 1);
    const aMax = Math.max(0.05, ...pts.map((p) => p.accuracy));
    const X = (t) => x0 + ((t - tMin) / (tMax - tMin)) * (x1 - x0);
    const Y = (a) => y0 - (a / aMax) * (y0 - y1);
    el("svg:polyline", { class: "acc-line", id: "accuracy-line",
      points: pts.map((p, i) => X(ts[i]).toFixed(1) + "," + Y(p.accuracy).toFixed(1)).join(" ") }, svg);
    pts.forEach((p, i) => {
      const dot = el("svg:circle", { class: "acc-dot", cx: X(ts[i]).toFixed(1), cy: Y(p.accuracy).toFixed(1), r: 2.5 }, svg);
      el("svg:title", { text: p.t + ": " + p.accuracy.toFixed(3) }, dot);
    });
    el("svg:text", { class: "axis-label", x: 2, y: y1 + 8, text: aMax.toFixed(2) }, svg);
    el("svg:text", { class: "axis-label", x: 2, y: y0, text: "0" }, svg);
    el("svg:text", { class: "axis-label", x: x0, y: 155, text: iso(tMin).slice(11, 16) }, svg);
    el("svg:text", { class: "axis-label", x: x1 - 30, y: 155, text: iso(tMax).slice(11, 16) }, svg);
  }

  // -- events ------------------------------------------------------------------------------------------
  function eventCluster(e) {
    if (e.cluster) return e.cluster;
    if (e.role === "ground" && e.id) return String(e.id).split("/")[0];
    return "";
  }
  function renderEvents() {
    const roleSel = $("ev-role");
    const known = new Set(Array.from(roleSel.options).map((o) => o.value));
    for (const e of S.events) {
      if (e.role && !known.has(e.role)) { known.add(e.role); el("option", { value: e.role, text: e.role }, roleSel); }
    }
    const role = roleSel.value; const cluster = $("ev-cluster").value;
    const list = $("events");
    clear(list);
    let shown = 0;
    for (let i = S.events.length - 1; i >= 0 && shown < MAX_SHOWN_EVENTS; i--) {
      const e = S.events[i];
      if (role && e.role !== role) continue;
      if (cluster && eventCluster(e) !== cluster) continue;
      const extra = Object.entries(e).filter(([k]) => !["t", "wall", "role", "id", "event"].includes(k))
        .map(([k, v]) => k + "=" + (typeof v === "object" ? JSON.stringify(v) : v)).join(" ");
      const li = el("li", { "data-role": e.role || "", "data-cluster": eventCluster(e), "data-event": e.event }, list);
      el("span", { class: "t", text: (e.t || "--").slice(0, 19) + " " }, li);
      el("span", { class: "role", text: (e.role || "") + "/" + (e.id || "") }, li);
      li.appendChild(document.createTextNode(" " + e.event + " " + extra.slice(0, 200)));
      shown++;
    }
  }

  // -- operator ----------------------------------------------------------------------------------------
  function renderOperator() {
    $("operator-panel").classList.toggle("hidden", !S.operator);
    const m = /(?:^|[#&])token=([^&]+)/.exec(location.hash);
    if (m && !$("op-token").value) $("op-token").value = decodeURIComponent(m[1]);
  }
  async function command(verb, body) {
    const out = $("op-result");
    out.textContent = verb + " ...";
    try {
      const r = await fetch("/api/cmd/" + verb, {
        method: "POST", headers: { "Content-Type": "application/json", "X-Emsfl-Token": $("op-token").value },
        body: JSON.stringify(body || {}),
      });
      const reply = await r.json();
      out.textContent = verb + ": " + (reply.ok ? "done" : "refused: " + reply.error);
    } catch (err) {
      out.textContent = verb + ": " + err;
    }
  }
  function wireOperator() {
    $("op-link").addEventListener("click", () => {
      const state = $("op-state").value;
      const body = { cluster: $("op-cluster").value, state: state };
      if (state !== "auto") body.duration_s = Number($("op-duration").value);
      command("link", body);
    });
    $("op-pause").addEventListener("click", () => command("pause"));
    $("op-resume").addEventListener("click", () => command("resume"));
    $("op-set-scale").addEventListener("click", () => command("scale", { scale: Number($("op-scale").value) }));
  }

  // -- start -------------------------------------------------------------------------------------------
  async function loadLand() {
    const r = await fetch("/static/vendor/land-110m.json");
    $("land").setAttribute("d", (await r.json()).d);
  }
  function connect() {
    const source = new EventSource("/api/stream");
    source.onopen = () => { const s = $("stream-state"); s.textContent = "live"; s.className = "item badge ok"; };
    source.onerror = () => { const s = $("stream-state"); s.textContent = "reconnecting"; s.className = "item badge warn"; };
    source.onmessage = (m) => apply(JSON.parse(m.data));
  }
  document.addEventListener("DOMContentLoaded", () => {
    wireOperator();
    $("ev-role").addEventListener("change", renderEvents);
    $("ev-cluster").addEventListener("change", renderEvents);
    loadLand().catch((err) => hooks.errors.push(String(err)));
    connect();
    setInterval(tick, 250);
    // a link counts as down once its predicted end passes, even before the down message arrives
    setInterval(() => { dirty.add("links"); dirty.add("map"); queueFlush(); }, 1000);
  });
})();
