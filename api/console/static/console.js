// The vector-sidecar console: one page, a view per #hash, everything read from the JSON API.
// The token is in an HttpOnly cookie (api/console/session.py); writes send the session's CSRF value.
// Text from the server is only ever set as textContent (never parsed as HTML).
"use strict";

const state = { role: null, csrf: null };
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "on") for (const [ev, fn] of Object.entries(v)) node.addEventListener(ev, fn);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

const fmt = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"));
const age = (s) => (s === null || s === undefined ? "–" : s < 120 ? `${s.toFixed(1)} s` : s < 7200 ? `${(s / 60).toFixed(1)} min` : `${(s / 3600).toFixed(1)} h`);

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function describe(detail) {
  if (Array.isArray(detail)) return detail.map((p) => `${(p.loc || []).slice(1).join(".") || "request"}: ${p.msg}`).join("\n");
  return typeof detail === "string" ? detail : JSON.stringify(detail);
}

async function api(path, options = {}) {
  const headers = { Accept: "application/json", ...(options.headers || {}) };
  if (options.method && options.method !== "GET") headers["X-CSRF-Token"] = state.csrf || "";
  const answer = await fetch(path, { ...options, headers, credentials: "same-origin" });
  if (answer.status === 401 && !path.startsWith("/console/session")) { showSignIn("Signed out: sign in again."); throw new ApiError(401, "signed out"); }
  const body = answer.status === 204 ? null : await answer.json().catch(() => null);
  if (!answer.ok) throw new ApiError(answer.status, body && body.detail ? describe(body.detail) : `HTTP ${answer.status}`);
  return body;
}

// --- charts: grouped vertical bars, drawn as SVG ----------------------------------------------

function barChart(title, labels, series, opts = {}) {
  const W = 560, H = 220, left = 56, bottom = 46, top = 10;
  const plotW = W - left - 10, plotH = H - bottom - top;
  const max = Math.max(1, ...series.flatMap((s) => s.values));
  const group = plotW / Math.max(1, labels.length);
  const barW = Math.max(1, Math.min(28, (group * 0.8) / series.length));
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title });
  for (let i = 0; i <= 4; i++) {
    const y = top + plotH - (plotH * i) / 4;
    chart.append(svg("line", { x1: left, x2: W - 10, y1: y, y2: y, class: "axis" }));
    chart.append(svg("text", { x: left - 4, y: y + 4, "text-anchor": "end" }, fmt(Math.round((max * i) / 4))));
  }
  const every = Math.ceil(labels.length / (opts.maxLabels || 12));
  labels.forEach((label, i) => {
    const x0 = left + i * group + (group - barW * series.length) / 2;
    series.forEach((s, j) => {
      const h = (plotH * (s.values[i] || 0)) / max;
      const bar = svg("rect", { x: x0 + j * barW, y: top + plotH - h, width: Math.max(1, barW - 1), height: h, class: `s${s.color ?? j}` });
      bar.append(svg("title", {}, `${label} · ${s.name}: ${fmt(s.values[i])}`));
      chart.append(bar);
    });
    if (i % every === 0) {
      const text = String(label).length > 14 ? String(label).slice(0, 13) + "…" : String(label);
      chart.append(svg("text", { x: left + i * group + group / 2, y: H - bottom + 14, "text-anchor": "middle" }, opts.short ? opts.short(text) : text));
    }
  });
  const legend = el("div", { class: "legend" }, series.map((s, j) => el("span", {}, el("i", { class: `s${s.color ?? j}` }), s.name)));
  return el("div", { class: "chart", "data-chart": opts.key || title }, el("h3", {}, title), chart, legend);
}

function table(columns, rows, opts = {}) {
  const head = el("tr", {}, columns.map((c) => el("th", { class: c.cls || (c.num ? "n" : null) }, c.label)));
  const body = rows.map((r) => el("tr", opts.rowAttrs ? opts.rowAttrs(r) : {}, columns.map((c) => {
    const value = c.get ? c.get(r) : r[c.key];
    const cell = el("td", { class: c.cls || (c.num ? "n" : null), "data-k": c.key || null, "data-v": c.num ? value ?? "" : null });
    cell.append(c.render ? c.render(value, r) : c.num ? fmt(value) : value ?? "–");
    return cell;
  })));
  if (!rows.length) body.push(el("tr", {}, el("td", { colspan: columns.length, class: "muted" }, opts.empty || "nothing here")));
  return el("table", opts.attrs || {}, el("thead", {}, head), el("tbody", {}, body));
}

function spendCards(total) {
  return [card("Billed tokens", total.tokens, "tokens"), card("Cost (CNY)", total.cost_cny, "cost_cny", total.cost_cny),
    card("Requests", total.requests, "requests"), card("Failed requests", total.failed, "failed"),
    card("Tokens avoided (dedup)", total.tokens_avoided_dedup, "tokens_avoided_dedup"),
    card("Tokens avoided (coalescing)", total.tokens_avoided_coalesced, "tokens_avoided_coalesced")];
}

const card = (label, value, key, shown) => el("div", { class: "card", "data-k": key, "data-v": value ?? "" }, el("div", { class: "label" }, label), el("div", { class: "value" }, shown ?? fmt(value)));

// --- views ---------------------------------------------------------------------------------------

const views = {
  async overview(root) {
    const [status, activity] = await Promise.all([api("/v1/status"), api("/v1/activity?minutes=60")]);
    const b = activity.backlog, r = activity.last_5_min;
    const embedding = status.budget.paused || status.provider_pauses.some((p) => p.state === "paused") ? "paused" : "running";
    root.append(el("div", { class: "cards" },
      card("Backlog (pending documents)", status.documents.pending, "pending"),
      card("Oldest pending", status.oldest_pending_age_s, "oldest_pending_age_s", age(status.oldest_pending_age_s)),
      card("Dead letters", status.documents.dead, "dead"),
      card("Rows embedded / min (last 5 min)", r.rows_per_min, "rows_per_min"),
      card("Requests / min (last 5 min)", r.requests_per_min, "requests_per_min"),
      card("Tokens / min (last 5 min)", r.tokens_per_min, "tokens_per_min"),
      card("Embedding", embedding, "embedding", embedding),
    ));
    const minutes = activity.series.map((m) => m.minute.slice(11, 16));
    root.append(el("h2", {}, "Last hour, per minute"), el("div", { class: "charts" },
      barChart("Rows embedded per minute", minutes, [{ name: "rows", values: activity.series.map((m) => m.rows) }], { key: "rows", maxLabels: 12 }),
      barChart("Provider requests per minute", minutes, [
        { name: "requests", values: activity.series.map((m) => m.requests) },
        { name: "failed", values: activity.series.map((m) => m.failed), color: 2 }], { key: "requests", maxLabels: 12 }),
      barChart("Backlog per minute", activity.backlog_series.map((m) => m.minute.slice(11, 16)), [
        { name: "pending", values: activity.backlog_series.map((m) => m.pending) },
        { name: "dead", values: activity.backlog_series.map((m) => m.dead), color: 2 }], { key: "backlog", maxLabels: 12 }),
    ));
    root.append(el("h2", {}, "Documents"), table(
      Object.keys(status.documents).map((k) => ({ label: k, key: k, num: true })), [status.documents], { attrs: { "data-table": "documents" } }));
    root.append(el("h2", {}, "Provider requests by outcome"), table(
      Object.keys(status.requests).map((k) => ({ label: k, key: k, num: true })), [status.requests], { attrs: { "data-table": "requests" } }));
    root.append(el("h2", {}, "Events accepted per hour"), table(
      [{ label: "hour", key: "hour" }, { label: "accepted", key: "accepted", num: true }, { label: "stale", key: "stale", num: true }, { label: "duplicate", key: "duplicate", num: true }],
      activity.events_accepted_by_hour, { empty: "no events in the last hour" }));
    root.append(el("p", { class: "muted" }, `Backlog ${fmt(b.pending)} pending now, as of ${activity.now}.`));
  },

  async spend(root) {
    // Each grouping is drawn as soon as its answer comes (by collection reads the ledger's items
    // and is the slowest); the cards come with the first answer, by day.
    const days = Number(new URLSearchParams(location.hash.split("?")[1] || "").get("days") ?? 7);
    const since = days ? new Date(Date.now() - (days - 1) * 86400e3).toISOString().slice(0, 10) + "T00:00:00Z" : null;
    const q = since ? `&since=${encodeURIComponent(since)}` : "";
    const range = el("select", { id: "spend-range", on: { change: (e) => { location.hash = `#spend?days=${e.target.value}`; } } },
      [[1, "today"], [7, "last 7 days"], [30, "last 30 days"], [90, "last 90 days"], [0, "all time"]].map(([v, t]) => el("option", { value: v, selected: v === days }, t)));
    root.append(el("form", { class: "filters" }, el("label", {}, "Range", range)));
    const cards = el("div", { class: "cards", id: "spend-cards" }, el("p", { class: "muted" }, "loading…"));
    const charts = el("div", { class: "charts" });
    const tables = el("div", {});
    root.append(cards, el("h2", {}, "Tokens spent and avoided"), charts, tables);
    const groups = ["day", "model", "collection", "lane"];
    const slots = groups.map((g) => {
      const chart = el("div", { class: "chart" }, el("h3", {}, `By ${g}`), el("p", { class: "muted" }, "loading…"));
      const section = el("div", {}, el("h2", {}, `By ${g}`), el("p", { class: "muted" }, "loading…"));
      charts.append(chart);
      tables.append(section);
      return { chart, section };
    });
    await Promise.all(groups.map(async (g, i) => {
      const answer = await api(`/v1/spend?by=${g}${q}`);
      const rows = answer.rows;
      if (g === "day") cards.replaceChildren(...spendCards(answer.total));
      slots[i].chart.replaceWith(barChart(`By ${g}`, rows.map((r) => r[g] ?? "(none)"), [
        { name: "billed tokens", values: rows.map((r) => r.tokens) },
        { name: "tokens avoided", values: rows.map((r) => r.tokens_avoided_dedup + r.tokens_avoided_coalesced), color: 1 }], { key: g, short: g === "day" ? (t) => t.slice(5) : null }));
      slots[i].section.replaceChildren(el("h2", {}, `By ${g}`), table([
        { label: g, key: g }, { label: "requests", key: "requests", num: true }, { label: "failed", key: "failed", num: true },
        { label: "rows", key: "rows", num: true }, { label: "billed tokens", key: "tokens", num: true },
        { label: "avoided (dedup)", key: "tokens_avoided_dedup", num: true }, { label: "avoided (coalescing)", key: "tokens_avoided_coalesced", num: true },
        { label: "CNY", key: "cost_cny", cls: "n" }], rows, { attrs: { "data-table": `spend-${g}` }, empty: "no spend in this range" }));
    }));
  },

  async budgets(root) {
    const [budget, status] = await Promise.all([api("/v1/budget"), api("/v1/status")]);
    root.append(el("div", { class: "cards" },
      card("Embedding", budget.paused ? "paused by a cap" : "not paused", "paused", budget.paused ? "paused by a cap" : "not paused"),
      card("Documents waiting on a cap", budget.waiting_documents, "waiting_documents")));
    root.append(el("h2", {}, "Caps"), table([
      { label: "scope", get: (c) => c.collection || "all collections" }, { label: "period", key: "period" }, { label: "set by", key: "source" },
      { label: "spent (CNY)", key: "spent_cny", cls: "n" }, { label: "cap (CNY)", key: "limit_cny", cls: "n" },
      { label: "how close", key: "ratio", get: (c) => (c.limit_nano_cny ? c.spent_nano_cny / c.limit_nano_cny : 1), render: (v, c) => {
        const pct = Math.min(100, v * 100);
        const bar = el("div", { class: `bar ${c.reached ? "reached" : v >= 0.8 ? "near" : ""}`, title: `${pct.toFixed(1)} %` }, el("div", {}));
        bar.firstChild.style.width = `${pct}%`;
        return el("div", {}, bar, `${pct.toFixed(1)} %`);
      } },
      { label: "resets", key: "resets_at" }, { label: "reached", key: "reached", render: (v) => el("span", { class: `pill ${v ? "bad" : "good"}` }, v ? "reached" : "no") }],
      budget.caps, { attrs: { "data-table": "caps" }, empty: "no caps: set SIDECAR_BUDGET_* or PUT /v1/budget/caps" }));
    if (budget.reasons.length) root.append(el("h2", {}, "Why paused"), el("ul", {}, budget.reasons.map((r) => el("li", {}, r))));
    root.append(el("h2", {}, "Provider pauses"), table([{ label: "name", key: "name" }, { label: "state", key: "state" }, { label: "reason", key: "reason", cls: "wrap" },
      { label: "since", key: "since" }, { label: "until", key: "until" }], status.provider_pauses, { empty: "no provider pause" }));
  },

  async sources(root) {
    let items = [], answer = null;
    try {
      answer = await api("/v1/sources");
      items = Array.isArray(answer) ? answer : answer.items || answer.sources || [];
    } catch (e) {
      if (e.status !== 404) throw e;
    }
    if (!items.length) { root.append(el("p", { id: "no-sources" }, "no sources")); return; }
    const notReady = (answer && answer.not_ready) || [];
    if (notReady.length) root.append(el("p", { class: "error", id: "sources-not-ready" }, `not ready: ${notReady.map((n) => (typeof n === "string" ? n : JSON.stringify(n))).join("; ")}`));
    const keys = [...new Set(items.flatMap((s) => Object.keys(s)))];
    root.append(table(keys.map((k) => ({ label: k, key: k, get: (s) => (typeof s[k] === "object" && s[k] !== null ? JSON.stringify(s[k]) : s[k]), cls: "wrap" })), items, { attrs: { "data-table": "sources" } }));
  },

  async deadletters(root) {
    const answer = await api("/v1/deadletters?limit=200");
    const canWrite = state.role === "write";
    if (!canWrite) root.append(el("p", { class: "muted" }, "Retrying needs a write token (SIDECAR_API_TOKENS)."));
    const retry = (id) => async (e) => {
      e.target.disabled = true;
      try {
        const done = await api(id === null ? "/v1/deadletters/retry" : `/v1/deadletters/${id}/retry`, { method: "POST" });
        flash(`${done.retried} sent back to pending`);
        render();
      } catch (err) { $("error").textContent = err.message; e.target.disabled = false; }
    };
    if (answer.items.length) root.append(el("p", {}, el("button", { type: "button", id: "retry-all", disabled: !canWrite, on: { click: retry(null) } }, `Retry all ${answer.items.length}`)));
    root.append(table([
      { label: "id", key: "id", num: true }, { label: "collection", key: "collection" }, { label: "doc_id", key: "doc_id", cls: "wrap" },
      { label: "version", key: "version", num: true }, { label: "attempts", key: "attempts", num: true },
      { label: "reason", key: "last_error", cls: "wrap" }, { label: "since", key: "updated_at" },
      { label: "", key: "retry", get: (d) => d.id, render: (id) => el("button", { type: "button", "data-retry": id, disabled: !canWrite, title: canWrite ? "send it back to pending" : "needs a write token", on: { click: retry(id) } }, "Retry") }],
      answer.items, { attrs: { "data-table": "deadletters" }, empty: "no dead letters", rowAttrs: (d) => ({ "data-id": d.id }) }));
  },

  async ledger(root) {
    const params = new URLSearchParams(location.hash.split("?")[1] || "");
    const field = (name, label, input) => el("label", {}, label, input || el("input", { name, value: params.get(name) || "", size: name === "provider_request_id" ? 28 : 14 }));
    const statusSel = el("select", { name: "status" }, ["", "sent", "succeeded", "failed", "unknown"].map((s) => el("option", { value: s, selected: s === (params.get("status") || "") }, s || "any")));
    const form = el("form", { class: "filters", id: "ledger-filters" },
      field("model", "model"), field("collection", "collection"), field("status", "status", statusSel),
      field("provider_request_id", "provider request id"), field("since", "since (ISO)"), field("until", "until (ISO)"),
      el("button", { type: "submit" }, "Filter"));
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      const chosen = new URLSearchParams([...new FormData(form)].filter(([, v]) => v));
      location.hash = `#ledger?${chosen}`;
    });
    root.append(form);
    const query = new URLSearchParams([...params].filter(([k, v]) => v && k !== "cursor"));
    query.set("limit", "100");
    const columns = [
      { label: "created", key: "created_at" }, { label: "provider request id", key: "provider_request_id", cls: "wrap" },
      { label: "status", key: "status" }, { label: "lane", key: "lane" }, { label: "model", key: "model" },
      { label: "collections", key: "collections", get: (r) => r.collections.join(", ") },
      { label: "rows", key: "rows", num: true }, { label: "billed tokens", key: "billed_tokens", num: true },
      { label: "CNY", key: "cost_cny", cls: "n" }, { label: "ms", key: "latency_ms", get: (r) => (r.latency_ms === null ? null : Math.round(r.latency_ms)), num: true },
      { label: "error", key: "error_code", cls: "wrap" }];
    const holder = el("div", { id: "ledger-rows" });
    root.append(holder);
    const page = async (cursor) => {
      if (cursor) query.set("cursor", cursor);
      const answer = await api(`/v1/requests?${query}`);
      holder.append(table(columns, answer.items, { attrs: { "data-table": "ledger" }, empty: "no ledger rows match" }));
      if (answer.next_cursor) {
        const more = el("button", { type: "button", id: "ledger-more", on: { click: () => { more.remove(); page(answer.next_cursor).catch(showError); } } }, "Older rows");
        holder.append(more);
      }
    };
    await page(null);
  },

  async search(root) {
    const params = new URLSearchParams(location.hash.split("?")[1] || "");
    const form = el("form", { class: "filters", id: "search-form" },
      el("label", {}, "collection", el("input", { name: "collection", value: params.get("collection") || "documents", required: true, size: 14 })),
      el("label", {}, "query", el("input", { name: "q", value: params.get("q") || "", required: true, size: 40 })),
      el("label", {}, "tenant", el("input", { name: "tenant", value: params.get("tenant") || "", size: 10 })),
      el("label", {}, "limit", el("input", { name: "limit", type: "number", min: 1, max: 100, value: params.get("limit") || 10 })),
      el("button", { type: "submit" }, "Search"));
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      location.hash = `#search?${new URLSearchParams([...new FormData(form)].filter(([, v]) => v))}`;
    });
    root.append(form);
    if (!params.get("q")) return;
    const answer = await api(`/v1/search?${params}`);
    root.append(el("p", { class: "muted", id: "search-meta" }, answer.cached ? "from the query cache (no provider call)" : `embedded by one provider call: ledger row ${answer.request_id || "–"}`));
    root.append(table([
      { label: "#", get: (h) => answer.hits.indexOf(h) + 1, num: true, key: "rank" }, { label: "score", key: "score", get: (h) => h.score.toFixed(3), cls: "n" },
      { label: "doc_id", key: "doc_id" }, { label: "chunk", key: "chunk_index", num: true }, { label: "version", key: "version", num: true },
      { label: "text", key: "text", cls: "wrap" }], answer.hits, { attrs: { "data-table": "hits" }, empty: "no hits" }));
  },
};

const TITLES = { overview: "Overview", spend: "Spend", budgets: "Budgets and pauses", sources: "Sources and their lag", deadletters: "Dead letters", ledger: "Ledger", search: "Search" };

function flash(text) { $("error").textContent = ""; const note = el("p", { class: "muted", id: "flash" }, text); $("content").before(note); setTimeout(() => note.remove(), 4000); }
function showError(e) { if (e.status !== 401) $("error").textContent = e.message; }

async function render() {
  if (!state.role) return;
  const name = (location.hash.slice(1).split("?")[0] || "overview");
  const view = views[name] ? name : "overview";
  document.querySelectorAll("#nav a").forEach((a) => a.classList.toggle("active", a.getAttribute("href") === `#${view}`));
  $("title").textContent = TITLES[view];
  $("error").textContent = "";
  const root = el("div", { id: "content", "data-view": view, "data-loading": "" });
  $("content").replaceWith(root);
  try { await views[view](root); } catch (e) { showError(e); }
  root.removeAttribute("data-loading");
}

function showSignIn(message) {
  state.role = state.csrf = null;
  $("view").hidden = $("nav").hidden = $("signout").hidden = true;
  $("who").textContent = "";
  $("signin").hidden = false;
  $("signin-error").textContent = message || "";
}

function signedIn(session) {
  state.role = session.role;
  state.csrf = session.csrf;
  $("signin").hidden = true;
  $("view").hidden = $("nav").hidden = $("signout").hidden = false;
  $("who").textContent = session.role === "write" ? "signed in: read and write" : "signed in: read only";
  $("who").dataset.role = session.role;
  render();
}

document.addEventListener("DOMContentLoaded", () => {
  $("signin-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      signedIn(await api("/console/session", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ token: $("token").value }) }));
      $("token").value = "";
    } catch (err) { $("signin-error").textContent = err.message; }
  });
  $("signout").addEventListener("click", async () => { await api("/console/session", { method: "DELETE" }).catch(() => null); showSignIn("Signed out."); });
  window.addEventListener("hashchange", render);
  api("/console/session").then(signedIn, () => showSignIn());
});
