// PIBL dashboard: polls /api/status every second and updates the page in place.
// No libraries, no network access beyond this admin listener (see the page's CSP).
"use strict";

(function () {
  const POLL_MS = 1000;
  const HISTORY = 120; // chart points: two minutes at one poll per second
  const TOKEN_KEY = "pibl-admin-token";

  // The token comes from ?token= (then leaves the address bar and history) or a prompt
  // after a 401, and lives in sessionStorage for this tab only.
  let token = null;
  const params = new URLSearchParams(window.location.search);
  if (params.has("token")) {
    token = params.get("token");
    sessionStorage.setItem(TOKEN_KEY, token);
    params.delete("token");
    const rest = params.toString();
    window.history.replaceState(null, "", window.location.pathname + (rest ? "?" + rest : ""));
  } else {
    token = sessionStorage.getItem(TOKEN_KEY);
  }

  let previous = null; // the last status and when it arrived, for rates
  const history = [];
  const $ = (id) => document.getElementById(id);

  async function api(method, path, body) {
    for (let attempt = 0; attempt < 2; attempt++) {
      const headers = { Accept: "application/json" };
      if (token) headers.Authorization = "Bearer " + token;
      if (body !== undefined) headers["Content-Type"] = "application/json";
      const response = await fetch(path, {
        method,
        headers,
        cache: "no-store",
        body: body === undefined ? undefined : JSON.stringify(body),
      });
      if (response.status === 401 && attempt === 0) {
        const entered = window.prompt("Admin token for this PIBL:");
        if (!entered) throw new Error("the admin API needs a token");
        token = entered.trim();
        sessionStorage.setItem(TOKEN_KEY, token);
        continue;
      }
      const data = await response.json().catch(() => ({}));
      if (!response.ok) throw new Error(data.error || response.status + " " + response.statusText);
      return data;
    }
    throw new Error("wrong admin token");
  }

  // -- formatting -------------------------------------------------------------------------------
  function ms(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    const value = seconds * 1000;
    return (value < 10 ? value.toFixed(2) : value < 100 ? value.toFixed(1) : value.toFixed(0)) + " ms";
  }
  function rate(value) {
    if (value === null || !isFinite(value)) return "–";
    return value < 10 ? value.toFixed(1) : value.toFixed(0);
  }
  function percent(value) {
    if (value === null || value === undefined || !isFinite(value)) return "–";
    return (value * 100).toFixed(value < 0.1 && value > 0 ? 2 : 1) + " %";
  }
  function bytes(value) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (value >= 1024 && i < units.length - 1) { value /= 1024; i++; }
    return (i ? value.toFixed(1) : value) + " " + units[i];
  }
  function duration(seconds) {
    seconds = Math.floor(seconds);
    const d = Math.floor(seconds / 86400), h = Math.floor(seconds / 3600) % 24;
    const m = Math.floor(seconds / 60) % 60, s = seconds % 60;
    if (d) return d + "d " + h + "h";
    if (h) return h + "h " + m + "m";
    return m ? m + "m " + s + "s" : s + "s";
  }
  function set(element, text) {
    if (element.textContent !== text) element.textContent = text;
  }

  // -- rates from counter deltas ------------------------------------------------------------------
  function serverKey(pool, server) { return pool + "\u0000" + server; }

  function previousServers() {
    const map = new Map();
    if (!previous) return map;
    for (const pool of previous.status.pools)
      for (const server of pool.servers) map.set(serverKey(pool.name, server.address), server);
    return map;
  }

  function fiveXX(server) { return (server.responses && server.responses["5xx"]) || 0; }

  // -- rendering --------------------------------------------------------------------------------
  function poolElement(pool) {
    const id = "pool-" + pool.name;
    let article = document.getElementById(id);
    if (!article) {
      article = $("pool-template").content.firstElementChild.cloneNode(true);
      article.id = id;
      article.dataset.pool = pool.name;
      article.querySelector(".pool-name").textContent = pool.name;
      $("pools").appendChild(article);
    }
    return article;
  }

  function serverRow(tbody, pool, server) {
    for (const row of tbody.rows) if (row.dataset.server === server.address) return row;
    const row = tbody.insertRow();
    row.dataset.pool = pool;
    row.dataset.server = server.address;
    const names = ["address", "state", "weight num", "rps num", "errors num", "p50 num",
      "p99 num", "inflight num", "conns num", "requests num", "actions"];
    for (const name of names) row.insertCell().className = name;
    row.cells[0].textContent = server.address;
    const button = document.createElement("button");
    button.type = "button";
    button.addEventListener("click", () => toggleDrain(pool, row, button));
    row.cells[10].appendChild(button);
    return row;
  }

  function renderState(row, server) {
    const cells = row.cells;
    set(cells[1], server.state);
    cells[1].className = "state state-" + server.state;
    row.dataset.state = server.state;
    row.classList.toggle("is-drained", server.drained);
    set(cells[2], String(server.weight));
    const button = cells[10].firstElementChild;
    if (!button.disabled) {
      set(button, server.drained ? "Enable" : "Drain");
      button.className = server.drained ? "enable" : "drain";
      button.title = server.drained ? "send new requests to this server again"
        : "stop sending new requests to this server";
    }
  }

  function renderServer(row, server, before, seconds) {
    const cells = row.cells;
    renderState(row, server);
    let rps = null, errorRate = null;
    if (before && seconds > 0) {
      const requests = server.requests - before.requests;
      const failed = server.errors - before.errors + fiveXX(server) - fiveXX(before);
      rps = Math.max(0, requests) / seconds;
      errorRate = requests > 0 ? Math.min(1, Math.max(0, failed) / requests) : null;
    }
    set(cells[3], rate(rps));
    set(cells[4], errorRate === null ? "–" : percent(errorRate));
    set(cells[5], ms(server.latency.p50));
    set(cells[6], ms(server.latency.p99));
    set(cells[7], String(server.in_flight));
    set(cells[8], server.connections.active + " / " + server.connections.idle);
    set(cells[9], String(server.requests));
    return rps;
  }

  function render(status, now) {
    const seconds = previous ? (now - previous.at) / 1000 : 0;
    const before = previousServers();
    set($("version"), "v" + status.version + (status.workers > 1 ? " · " + status.workers + " workers" : ""));
    set($("uptime"), duration(status.uptime));
    set($("total-inflight"), String(status.in_flight));
    set($("total-connections"), String(status.connections));
    let totalRps = null, totalErrors = null;
    if (previous && seconds > 0) {
      const done = status.requests - previous.status.requests;
      totalRps = Math.max(0, done) / seconds;
      totalErrors = done > 0 ? Math.max(0, status.errors - previous.status.errors) / done : null;
    }
    set($("total-rps"), rate(totalRps));
    set($("total-errors"), totalErrors === null ? "–" : percent(totalErrors));

    const seen = new Set();
    for (const pool of status.pools) {
      const article = poolElement(pool);
      seen.add(article.id);
      set(article.querySelector(".pool-balance"), pool.balance + (pool.queued ? " · " + pool.queued + " queued" : ""));
      article.querySelector(".pool-panic").hidden = !pool.panic;
      const tbody = article.querySelector("tbody");
      for (const server of pool.servers) {
        const row = serverRow(tbody, pool.name, server);
        renderServer(row, server, before.get(serverKey(pool.name, server.address)), seconds);
      }
    }
    for (const article of Array.from($("pools").children)) if (!seen.has(article.id)) article.remove();

    const cache = status.cache;
    $("cache").hidden = !cache;
    if (cache) {
      set($("cache-ratio"), percent(cache.hit_ratio));
      set($("cache-storage"), cache.storage);
      set($("cache-entries"), String(cache.entries));
      set($("cache-bytes"), bytes(cache.bytes));
      set($("cache-counts"), cache.hits + " / " + cache.stale + " / " + cache.misses);
      set($("cache-revalidations"), String(cache.revalidations));
    } else {
      set($("cache-ratio"), "off");
    }

    if (totalRps !== null) {
      history.push(totalRps);
      if (history.length > HISTORY) history.shift();
      drawChart();
    }
  }

  function drawChart() {
    const width = 600, top = 20, bottom = 130;
    const peak = Math.max(1, ...history);
    const step = width / (HISTORY - 1);
    const offset = (HISTORY - history.length) * step;
    const points = history.map((value, i) => {
      const x = offset + i * step;
      const y = bottom - (value / peak) * (bottom - top);
      return x.toFixed(1) + "," + y.toFixed(1);
    });
    const line = points.length ? "M" + points.join(" L") : "";
    $("chart-line").setAttribute("d", line);
    $("chart-area").setAttribute("d", points.length > 1
      ? line + " L" + (width).toFixed(1) + "," + bottom + " L" + offset.toFixed(1) + "," + bottom + " Z" : "");
    set($("chart-max"), "peak " + rate(peak) + " req/s");
  }

  // -- actions ----------------------------------------------------------------------------------
  async function toggleDrain(pool, row, button) {
    const server = row.dataset.server;
    const action = row.dataset.state === "drained" ? "enable" : "drain";
    button.disabled = true;
    try {
      const path = "/api/upstreams/" + encodeURIComponent(pool) + "/servers/" +
        encodeURIComponent(server) + "/" + action;
      const updated = await api("POST", path);
      showMessage(null);
      button.disabled = false;
      renderState(row, updated);  // rates wait for the next poll
    } catch (error) {
      button.disabled = false;
      showMessage(action + " " + server + ": " + error.message);
    }
  }

  function showMessage(text) {
    const box = $("message");
    box.hidden = !text;
    set(box, text || "");
  }

  // -- polling ----------------------------------------------------------------------------------
  async function poll() {
    try {
      const status = await api("GET", "/api/status");
      const now = performance.now();
      render(status, now);
      previous = { status, at: now };
      const badge = $("connection");
      set(badge, "live");
      badge.className = "badge badge-ok";
      set($("updated"), "updated " + new Date().toLocaleTimeString());
    } catch (error) {
      const badge = $("connection");
      set(badge, "unreachable: " + error.message);
      badge.className = "badge badge-bad";
    } finally {
      window.setTimeout(poll, POLL_MS);
    }
  }

  poll();
})();
