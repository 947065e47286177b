// The streamlme dashboard: polls the API and draws the page. No framework, no outside assets.
// Every piece of data reaches the page through textContent, never through innerHTML.
"use strict";

(function () {
  const TOKEN_KEY = "streamlme.token";
  const STATUS_EVERY_MS = 3000;
  const PLOTS_EVERY_MS = 60000;
  const Z95 = 1.959963984540054;

  const state = { version: null, plotsAt: 0, plotUrls: {}, model: null, lookup: null };

  // -- the token: ?token= once, then localStorage --------------------------------------------

  function takeTokenFromUrl() {
    const url = new URL(window.location.href);
    const token = url.searchParams.get("token");
    if (token !== null) {
      saveToken(token);
      url.searchParams.delete("token");
      window.history.replaceState(null, "", url.pathname + url.search + url.hash);
    }
  }

  function getToken() {
    try { return window.localStorage.getItem(TOKEN_KEY) || ""; } catch (e) { return ""; }
  }

  function saveToken(token) {
    try {
      if (token) window.localStorage.setItem(TOKEN_KEY, token);
      else window.localStorage.removeItem(TOKEN_KEY);
    } catch (e) { /* storage disabled: the token lives for this page only */ }
    memoryToken = token;
  }
  let memoryToken = "";

  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  async function api(path, asBlob) {
    const headers = {};
    const token = getToken() || memoryToken;
    if (token) headers.Authorization = "Bearer " + token;
    const res = await fetch(path, { headers: headers, cache: "no-store" });
    if (!res.ok) {
      let message = res.status + " " + res.statusText;
      try { const body = await res.json(); if (body && body.message) message = body.message; } catch (e) { /* not JSON */ }
      throw new ApiError(res.status, message);
    }
    return asBlob ? res.blob() : res.json();
  }

  // -- small DOM helpers ---------------------------------------------------------------------

  function $(id) { return document.getElementById(id); }

  function el(tag, props, children) {
    const node = document.createElement(tag);
    if (props) {
      for (const [k, v] of Object.entries(props)) {
        if (k === "text") node.textContent = v;
        else if (k === "className") node.className = v;
        else node.setAttribute(k, v);
      }
    }
    for (const child of children || []) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function setText(id, text) { $(id).textContent = text; }

  function fill(tbody, rows) { tbody.replaceChildren(...rows); }

  function row(cells, className) {
    return el("tr", className ? { className: className } : null,
      cells.map((c, i) => el(i === 0 ? "th" : "td", i === 0 ? { scope: "row" } : null, [c])));
  }

  // -- number formatting ---------------------------------------------------------------------

  function num(x, digits) {
    if (x === null || x === undefined || !Number.isFinite(x)) return "–";
    const d = digits || 4;
    const a = Math.abs(x);
    if (a !== 0 && (a >= 1e6 || a < 1e-3)) return x.toExponential(d - 1);
    return Number(x.toPrecision(d)).toLocaleString("en-US", { maximumFractionDigits: 6 });
  }

  function count(x) {
    if (x === null || x === undefined || !Number.isFinite(x)) return "–";
    return Math.round(x).toLocaleString("en-US");
  }

  function ago(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    if (seconds < 60) return Math.round(seconds) + " s ago";
    if (seconds < 3600) return Math.round(seconds / 60) + " min ago";
    if (seconds < 86400) return (seconds / 3600).toFixed(1) + " h ago";
    return (seconds / 86400).toFixed(1) + " d ago";
  }

  function when(unix) {
    return new Date(unix * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
  }

  function interval(est, se) {
    if (!Number.isFinite(se)) return "–";
    return "[" + num(est - Z95 * se) + ", " + num(est + Z95 * se) + "]";
  }

  // -- connection state ----------------------------------------------------------------------

  function connection(ok, text) {
    const pill = $("conn");
    pill.textContent = text;
    pill.className = "pill " + (ok ? "pill-ok" : "pill-bad");
  }

  function message(text) {
    const box = $("message");
    box.textContent = text || "";
    box.hidden = !text;
  }

  function failed(err) {
    if (err instanceof ApiError && err.status === 401) {
      connection(false, "token needed");
      message("This server needs an API token: open the Token box at the top right, or load the page as /?token=…");
      $("token-box").open = true;
    } else if (err instanceof ApiError && err.status === 503) {
      connection(false, "not ready");
      message(err.message);
    } else {
      connection(false, "offline");
      message("Cannot reach the API: " + err.message);
    }
  }

  // -- status, model, plots ------------------------------------------------------------------

  async function refresh() {
    let status;
    try {
      status = await api("v1/status");
    } catch (err) {
      failed(err);
      return;
    }
    const ns = status.namespace || {};
    if (status.ready === false) {
      connection(false, ns.flag === "rebuilding" ? "rebuilding" : "state lost");
      message("The namespace is flagged " + ns.flag + (ns.since ? " since " + ns.since : "") +
              (ns.reason ? ": " + ns.reason : "") + ". Its statistics are not served or fitted until this clears.");
    } else {
      connection(true, "live");
      message(status.model_version === null
        ? "No model has been estimated yet: run `streamlme refresh --config FILE --once` once events have arrived."
        : (ns.gaps && ns.gaps.length ? gapText(ns.gaps) : ""));
    }
    showStatus(status);
    setText("updated", "updated " + new Date().toLocaleTimeString("en-GB"));
    const changed = status.model_version !== state.version;
    if (changed && status.model_version !== null) {
      try {
        state.model = await api("v1/model");
        showModel(state.model);
        showStatus(status); // its figures that compare with the model's
        state.version = status.model_version;
        if (state.lookup !== null) lookup(state.lookup);
      } catch (err) { failed(err); return; }
    }
    if (status.model_version !== null && (changed || Date.now() - state.plotsAt > PLOTS_EVERY_MS)) {
      state.plotsAt = Date.now();
      loadPlot("shrinkage");
      loadPlot("caterpillar");
    }
  }

  function gapText(gaps) {
    const lost = gaps.reduce((sum, g) => sum + g.events, 0);
    return "The model does not cover " + count(lost) + " offsets that retention deleted before the store saw them: " +
      gaps.slice(0, 3).map((g) => g.topic + "[" + g.partition + "] " + g.from + "–" + g.to).join(", ") +
      (gaps.length > 3 ? ", …" : "") + ".";
  }

  function showStatus(s) {
    const pinned = s.pinned_version !== null && s.pinned_version !== undefined;
    setText("k-version", s.model_version === null ? "none"
      : "v" + s.model_version + (pinned && s.pinned_version === s.model_version ? " (pinned)" : ""));
    $("k-version").dataset.pinned = pinned ? String(s.pinned_version) : "";
    setText("k-version-sub", (s.model_age_s === null ? "no refresh yet" : "fit " + ago(s.model_age_s)) +
      (pinned ? " · pinned by model --rollback; unpin with model --unpin" : ""));
    setText("k-groups", count(s.groups));
    setText("k-groups-sub", state.model ? count(state.model.n_groups) + " in the model" : "");
    setText("k-events", count(s.events_total));
    setText("k-events-sub", count(s.events_rejected_total) + " dead-lettered");
    setText("k-rate", num(s.ingest_rate, 3) + " /s");
    setText("k-rate-sub", s.consumers.length + (s.consumers.length === 1 ? " consumer" : " consumers") + " live");
    setText("k-lag", s.lag === null ? "–" : count(s.lag));
    setText("k-lag-sub", s.lag !== null ? "messages behind"
      : (s.consumers.length ? "unknown (consumers read no Kafka topic)" : "unknown (no live consumer)"));
    const rows = s.consumers.map((c) => row([
      c.consumer, count(c.events_applied), count(c.events_rejected), num(c.rate, 3),
      c.lag === null ? "–" : count(c.lag), ago(c.age_s)]));
    // a consumer reports after each batch and, while idle, as a heartbeat
    if (!rows.length) rows.push(el("tr", null, [el("td", { colspan: "6", className: "muted" }, ["no consumer in the last minute"])]));
    fill($("consumers-table").tBodies[0], rows);
  }

  function showModel(m) {
    const spec = m.spec || {};
    setText("formula", formula(spec));
    const facts = [
      ["version", "v" + m.version + (m.pinned ? " (pinned)" : "")],
      ["created", when(m.created_at)],
      ["covers", m.complete === false ? "not every event: " + m.gaps.length + " offset gap(s)" : "every event consumed"],
      ["method", m.method + (m.converged ? ", converged" : ", NOT converged")],
      [m.method === "REML" ? "REML criterion" : "deviance", num(m.criterion, 8)],
      ["log-likelihood", num(m.loglik, 8)],
      ["events covered", count(m.n_obs)],
      ["groups covered", count(m.n_groups)],
      ["fit time", num(m.fit_seconds, 3) + " s"],
    ];
    $("model-facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })]));

    fill($("fixed-table").tBodies[0], m.fixed.map((name) => {
      const b = m.beta[name];
      const se = m.beta_se ? m.beta_se[name] : NaN;
      return row([name, num(b), num(se), interval(b, se)]);
    }));

    const G = m.G;
    const sd = G.map((r, i) => Math.sqrt(Math.max(r[i], 0)));
    const vc = m.random.map((name, i) => {
      const corr = [];
      for (let j = 0; j < i; j++) {
        const c = sd[i] > 0 && sd[j] > 0 ? G[i][j] / (sd[i] * sd[j]) : NaN;
        corr.push(num(c, 3));
      }
      return row([(spec.group ? spec.group + ": " : "") + name, num(G[i][i]), num(sd[i]),
                  corr.length ? corr.join("  ") : ""]);
    });
    vc.push(row(["residual σ²", num(m.sigma2), num(Math.sqrt(m.sigma2)), ""], "residual"));
    fill($("vc-table").tBodies[0], vc);
  }

  function formula(spec) {
    if (!spec.response) return "";
    const bar = spec.covariance === "unstructured" ? " | " : " || ";
    return spec.response + " ~ " + spec.fixed.join(" + ") + " + (" + spec.random.join(" + ") + bar + spec.group + ")";
  }

  async function loadPlot(kind) {
    const img = $("plot-" + kind);
    const caption = $("plot-" + kind + "-msg");
    try {
      const blob = await api("v1/plots/" + kind + ".png", true);
      const url = URL.createObjectURL(blob);
      img.onload = () => { if (state.plotUrls[kind]) URL.revokeObjectURL(state.plotUrls[kind]); state.plotUrls[kind] = url; };
      img.src = url;
      img.hidden = false;
      caption.textContent = "";
    } catch (err) {
      img.hidden = true;
      caption.textContent = err.message;
    }
  }

  // -- group lookup ---------------------------------------------------------------------------

  async function lookup(group) {
    state.lookup = group;
    const box = $("effect");
    let e;
    try {
      e = await api("v1/groups/" + encodeURIComponent(group) + "/effect");
    } catch (err) {
      box.replaceChildren(el("p", { className: "error", text: err.message }));
      if (err.status === 401) failed(err);
      return;
    }
    if (state.lookup !== group) return; // a newer search was typed meanwhile
    const head = el("div", { className: "effect-head" }, [
      el("span", { className: "effect-group", text: e.group }),
      el("span", { className: "pill " + (e.known ? "pill-ok" : "pill-wait"), text: e.known ? "known" : "never seen" }),
    ]);
    const meta = el("p", { className: "muted effect-meta" }, [
      e.known ? "n = " + num(e.n, 6) + " · shrinkage " + num(e.shrinkage, 3) + " · model v" + e.model_version
              : "No event of this group yet: its effect is the prior (zero, with the model's variance). Model v" + e.model_version,
    ]);
    const names = Object.keys(e.effect);
    const table = el("table", { className: "num", id: "effect-table" }, [
      el("thead", null, [el("tr", null, ["term", "effect", "SE", "95% interval"].map((h) => el("th", { text: h })))]),
      el("tbody", null, names.map((name, i) => {
        const b = e.effect[name];
        const se = Math.sqrt(Math.max(e.cov[i][i], 0));
        const r = row([name, num(b), num(se), interval(b, se)]);
        r.dataset.term = name;
        r.dataset.effect = String(b);
        return r;
      })),
    ]);
    box.replaceChildren(head, meta, table);
  }

  // -- wiring ---------------------------------------------------------------------------------

  function init() {
    takeTokenFromUrl();
    $("token-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      saveToken($("token-input").value.trim());
      $("token-input").value = "";
      $("token-box").open = false;
      state.version = null;
      refresh();
    });
    $("token-clear").addEventListener("click", () => { saveToken(""); refresh(); });
    $("lookup-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const group = $("group-input").value;
      if (group.length) lookup(group);
    });
    refresh();
    window.setInterval(refresh, STATUS_EVERY_MS);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
