// The Chorus dashboard: runs, curves and rollouts read from the ledger's JSON API. No library:
// charts are SVG drawn here, so the page works on machines without internet access.
"use strict";

const COLORS = ["#3461e0", "#d93025", "#188038", "#e37400", "#8430ce", "#00838f", "#5f6368"];
const state = { runs: [], selected: null, overlay: new Set(), curves: {}, zoom: {} };
const $ = (sel) => document.querySelector(sel);

function el(tag, attrs = {}, ...children) {
  const ns = ["svg", "line", "polyline", "rect", "text", "g", "circle"].includes(tag)
    ? "http://www.w3.org/2000/svg" : null;
  const e = ns ? document.createElementNS(ns, tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "onclick") e.addEventListener("click", v); else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

async function api(path) {
  const r = await fetch(path);
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
  return r.json();
}

const pct = (x) => (x === null || x === undefined) ? "-" : `${(100 * x).toFixed(1)}%`;
const num = (x) => (x === null || x === undefined) ? "-"
  : Math.abs(x) >= 1000 || (Math.abs(x) < 0.01 && x !== 0) ? x.toExponential(2) : x.toFixed(4).replace(/\.?0+$/, "");
const secs = (s) => s === null || s === undefined ? "-" : s < 120 ? `${s.toFixed(0)} s` : `${(s / 60).toFixed(1)} min`;

// ---------------------------------------------------------------- runs

async function loadRuns() {
  state.runs = await api("/api/runs");
  $("#db-status").textContent = `${state.runs.length} run(s)`;
  const want = new URLSearchParams(location.hash.slice(1)).get("run");
  if (!state.selected || !state.runs.some((r) => r.id === state.selected)) {
    state.selected = (state.runs.find((r) => r.id === want) || state.runs[0] || {}).id || null;
  }
  const body = $("#runs tbody");
  body.replaceChildren();
  for (const r of state.runs) {
    const overlay = el("input", { type: "checkbox" });
    overlay.checked = state.overlay.has(r.id);
    overlay.addEventListener("click", (ev) => {
      ev.stopPropagation();
      if (overlay.checked) state.overlay.add(r.id); else state.overlay.delete(r.id);
      refreshCurves();
    });
    const row = el("tr", { "data-run": r.id, onclick: () => selectRun(r.id) },
      el("td", {}, overlay), el("td", {}, r.id),
      el("td", { class: `status-${r.status}` }, r.status),
      el("td", {}, r.stages.map((s) => s.name).join(" → ")), el("td", {}, secs(r.wall_seconds)));
    if (r.id === state.selected) row.classList.add("selected");
    body.append(row);
  }
  renderRun();
}

function selectRun(id) {
  state.selected = id;
  location.hash = `run=${encodeURIComponent(id)}`;
  for (const tr of document.querySelectorAll("#runs tbody tr")) {
    tr.classList.toggle("selected", tr.dataset.run === id);
  }
  renderRun();
  refreshCurves();
  loadRollouts();
}

function renderRun() {
  const r = state.runs.find((x) => x.id === state.selected);
  for (const s of ["#run-section", "#curves-section", "#rollouts-section"]) $(s).hidden = !r;
  if (!r) return;
  $("#run-title").textContent = r.id;
  const body = $("#stages tbody");
  body.replaceChildren();
  for (const s of r.stages) {
    const steps = !s.moved_policy ? "-"
      : s.last_step === null ? `${s.first_step + 1}-` : `${s.first_step + 1}-${s.last_step}`;
    // A reward model's mean score is a score; the other metrics are rates.
    const metric = (x) => s.metric === "heldout_rm_score" ? num(x) : pct(x);
    body.append(el("tr", {}, el("td", {}, s.index), el("td", {}, s.name), el("td", {}, s.kind),
      el("td", { class: `status-${s.status}` }, s.status), el("td", {}, steps),
      el("td", {}, s.metric || "-"), el("td", {}, metric(s.start)), el("td", {}, metric(s.end)),
      el("td", {}, s.trajectories ?? "-"), el("td", {}, secs(s.wall_seconds))));
  }
  $("#config").textContent = r.config_toml;
}

// ---------------------------------------------------------------- curves

// Each chart: a title, and how to read its series out of one run's curves.
const CHARTS = [
  ["reward", "mean reward (scored rollouts, by the step their prompts were dispatched at)", (c) => Object.entries(c.reward).map(([env, pts]) => [env, pts])],
  ["accuracy", "held-out accuracy (by version)", (c) => Object.entries(c.accuracy).map(([env, pts]) => [env, pts.map((p) => [p[0], p[1]])])],
  ...["loss", "kl", "entropy", "grad_norm", "learning_rate", "clip_fraction", "mismatch",
    "trajectories_per_second", "tokens_per_second"].map((k) => [k, {
      loss: "loss", kl: "KL", entropy: "entropy", grad_norm: "gradient norm (before clipping)",
      learning_rate: "learning rate", clip_fraction: "clip fraction",
      mismatch: "sampling mismatch |log π_learner − log π_worker|",
      trajectories_per_second: "trajectories / s", tokens_per_second: "trained tokens / s",
    }[k], (c) => [[k, c.steps.filter((s) => s[k] !== null && s[k] !== undefined).map((s) => [s.step, s[k]])]]]),
  ["weight_sync", "weight sync seconds (by version)", (c) => [
    ["mean transfer", c.weight_sync.map((w) => [w[0], w[1]])],
    ["to the last worker", c.weight_sync.map((w) => [w[0], w[3]])]]],
  ["lag", "staleness of trained rollouts (versions behind; count)", (c) => [["rollouts", c.lag]]],
  ["faults", "failed rollouts per environment", (c) => [["failed", Object.values(c.faults).map((v, i) => [i, v])]]],
];

async function refreshCurves() {
  const ids = [state.selected, ...[...state.overlay].filter((id) => id !== state.selected)].filter(Boolean);
  for (const id of ids) state.curves[id] = await api(`/api/runs/${encodeURIComponent(id)}/curves`);
  const charts = $("#charts");
  charts.replaceChildren();
  const first = state.curves[state.selected];
  if (first) {
    const last = first.steps[first.steps.length - 1];
    $("#run-summary").textContent = last
      ? `${first.steps.length} learner steps · version ${last.version} · last loss ${num(last.loss)} · ${first.rollouts} rollouts`
      : `no learner step yet · ${first.rollouts} rollouts`;
  }
  for (const [key, title, read] of CHARTS) {
    const series = [];
    for (const id of ids) {
      for (const [name, pts] of read(state.curves[id])) {
        if (pts.length) series.push({ name: ids.length > 1 ? `${id.slice(-8)} ${name}` : name, pts });
      }
    }
    charts.append(chart(key, title, series));
  }
}

function chart(key, title, series) {
  const W = 440, H = 200, L = 52, R = 8, T = 8, B = 22;
  const box = el("div", { class: "chart-box" }, el("h3", {}, title));
  const all = series.flatMap((s) => s.pts);
  const points = all.length;
  const last = series.length ? series[0].pts[series[0].pts.length - 1] : null;
  const svg = el("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, "data-metric": key,
    "data-points": points, "data-last": last ? last[1] : "" });
  box.append(svg);
  if (!points) {
    svg.append(el("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no data yet"));
    return box;
  }
  const zoom = state.zoom[key];
  let x0 = Math.min(...all.map((p) => p[0])), x1 = Math.max(...all.map((p) => p[0]));
  if (zoom) [x0, x1] = zoom;
  const shown = all.filter((p) => p[0] >= x0 && p[0] <= x1);
  let y0 = Math.min(...shown.map((p) => p[1])), y1 = Math.max(...shown.map((p) => p[1]));
  if (y0 === y1) { y0 -= Math.abs(y0) * 0.1 + 1e-9; y1 += Math.abs(y1) * 0.1 + 1e-9; }
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  const sx = (x) => L + (x - x0) / (x1 - x0) * (W - L - R);
  const sy = (y) => H - B - (y - y0) / (y1 - y0) * (H - T - B);
  svg.append(el("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }),
    el("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }),
    el("text", { x: L - 4, y: T + 8, "text-anchor": "end" }, num(y1)),
    el("text", { x: L - 4, y: H - B, "text-anchor": "end" }, num(y0)),
    el("text", { x: L, y: H - 6 }, num(x0)),
    el("text", { x: W - R, y: H - 6, "text-anchor": "end" }, num(x1)));
  series.forEach((s, i) => {
    const pts = s.pts.filter((p) => p[0] >= x0 && p[0] <= x1);
    const color = COLORS[i % COLORS.length];
    if (key === "lag" || key === "faults") {
      const w = Math.max(2, (W - L - R) / Math.max(pts.length, 1) * 0.6);
      for (const p of pts) {
        svg.append(el("rect", { x: sx(p[0]) - w / 2, y: sy(p[1]), width: w,
          height: Math.max(1, H - B - sy(p[1])), fill: color }));
      }
    } else {
      svg.append(el("polyline", { class: "series", stroke: color,
        points: pts.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ") }));
    }
  });
  const legend = el("div", { class: "legend" });
  series.forEach((s, i) => legend.append(el("span", { style: `color:${COLORS[i % COLORS.length]}` }, `■ ${s.name}`)));
  box.append(legend);
  interact(svg, key, series, sx, sy, { W, H, L, R, T, B, x0, x1 });
  return box;
}

// Hover shows the values nearest the pointer; a drag zooms into the x range it covers.
function interact(svg, key, series, sx, sy, g) {
  const tip = $("#tooltip");
  const cursor = el("line", { class: "cursor", y1: g.T, y2: g.H - g.B, visibility: "hidden" });
  const band = el("rect", { class: "zoom", y: g.T, height: g.H - g.T - g.B, width: 0, visibility: "hidden" });
  svg.append(cursor, band);
  const toX = (ev) => {
    const r = svg.getBoundingClientRect();
    const px = (ev.clientX - r.left) / r.width * g.W;
    return g.x0 + (px - g.L) / (g.W - g.L - g.R) * (g.x1 - g.x0);
  };
  let dragFrom = null;
  svg.addEventListener("mousemove", (ev) => {
    const x = toX(ev);
    const lines = [];
    for (const s of series) {
      let best = null;
      for (const p of s.pts) if (!best || Math.abs(p[0] - x) < Math.abs(best[0] - x)) best = p;
      if (best) lines.push(`${s.name}: x=${num(best[0])} y=${num(best[1])}`);
    }
    cursor.setAttribute("x1", sx(Math.min(Math.max(x, g.x0), g.x1)));
    cursor.setAttribute("x2", cursor.getAttribute("x1"));
    cursor.setAttribute("visibility", "visible");
    tip.textContent = lines.join("\n");
    tip.style.left = `${ev.clientX + 12}px`;
    tip.style.top = `${ev.clientY + 12}px`;
    tip.hidden = false;
    if (dragFrom !== null) {
      const a = sx(Math.max(Math.min(dragFrom, x), g.x0)), b = sx(Math.min(Math.max(dragFrom, x), g.x1));
      band.setAttribute("x", a); band.setAttribute("width", Math.max(0, b - a));
      band.setAttribute("visibility", "visible");
    }
  });
  svg.addEventListener("mouseleave", () => { tip.hidden = true; cursor.setAttribute("visibility", "hidden"); });
  svg.addEventListener("mousedown", (ev) => { dragFrom = toX(ev); });
  svg.addEventListener("mouseup", (ev) => {
    const to = toX(ev);
    if (dragFrom !== null && Math.abs(to - dragFrom) > (g.x1 - g.x0) / 100) {
      state.zoom[key] = [Math.min(dragFrom, to), Math.max(dragFrom, to)];
      refreshCurves();
    }
    dragFrom = null;
    band.setAttribute("visibility", "hidden");
  });
  svg.addEventListener("dblclick", () => { delete state.zoom[key]; refreshCurves(); });
}

// ---------------------------------------------------------------- rollouts

async function loadRollouts() {
  if (!state.selected) return;
  const params = new URLSearchParams({ run: state.selected });
  for (const [k, v] of new FormData($("#filters"))) if (v !== "") params.set(k, v);
  const rows = await api(`/api/rollouts?${params}`);
  const body = $("#rollouts tbody");
  body.replaceChildren();
  for (const r of rows) {
    const versions = r.min_version === r.max_version ? r.min_version ?? "-" : `${r.min_version}-${r.max_version}`;
    body.append(el("tr", { "data-id": r.id, onclick: () => showTrajectory(r.id) },
      el("td", { title: r.id }, r.id), el("td", {}, r.environment), el("td", {}, r.worker),
      el("td", {}, r.reward === null ? "-" : r.reward.toFixed(3)), el("td", {}, r.tokens),
      el("td", {}, versions), el("td", {}, r.step ?? "-"),
      el("td", {}, r.status === "ok" ? r.finish : `failed: ${r.failure}`)));
  }
}

async function showTrajectory(id) {
  const t = await api(`/api/trajectories/${encodeURIComponent(id)}`);
  const pane = $("#trajectory");
  pane.replaceChildren(el("h3", {}, t.id),
    el("p", {}, `${t.environment} · worker ${t.worker} · stage ${t.stage ?? "-"} · trained at step ${t.step ?? "-"} · ${t.finish}`),
    el("div", { class: "turn" }, el("div", { class: "who" }, "prompt"), el("pre", {}, t.prompt)));
  // Turns: a special token (<|tool|>, <|assistant|>, …) starts a new one; observations are the
  // environment's, the rest the policy's. Each token is shaded by how unlikely it was and
  // marked where the sampling version changes.
  let turn = null, prevVersion = null;
  const newTurn = (who) => {
    turn = el("div", { class: `turn${who === "observation" ? " observation" : ""}` }, el("div", { class: "who" }, who));
    pane.append(turn);
  };
  newTurn("policy");
  for (const tok of t.tokens) {
    if (tok.text.startsWith("<|") && turn.childNodes.length > 1) {
      newTurn(tok.text.startsWith("<|tool|>") ? "observation" : "policy");
    }
    const p = tok.logprob === null ? 1 : Math.exp(tok.logprob);
    const span = el("span", { class: "tok", title: `token ${tok.id} · logprob ${num(tok.logprob)} · version ${tok.version}`,
      style: `background: rgba(217, 48, 37, ${(0.6 * (1 - p)).toFixed(3)})`, "data-version": tok.version }, tok.text);
    if (prevVersion !== null && tok.version !== prevVersion) span.classList.add("new-version");
    prevVersion = tok.version;
    turn.append(span);
  }
  const comps = Object.entries(t.components || {}).map(([k, v]) => `${k} ${num(v)}`).join(" · ");
  pane.append(el("p", {}, `reward ${t.reward === null ? "-" : t.reward.toFixed(3)}${comps ? ` (${comps})` : ""}`));
  if (t.reason) pane.append(el("p", {}, `verifier: ${t.reason}`));
  if (t.failure) pane.append(el("p", { class: "status-failed" }, `failed: ${t.failure}`));
}

$("#filters").addEventListener("submit", (ev) => { ev.preventDefault(); loadRollouts(); });

async function tick() {
  try {
    await loadRuns();
    await refreshCurves();
  } catch (e) {
    $("#db-status").textContent = `error: ${e.message}`;
  }
}

(async () => {
  await tick();
  await loadRollouts();
  // A link may open one trajectory: #run=RUN&trajectory=ID.
  const opened = new URLSearchParams(location.hash.slice(1)).get("trajectory");
  if (opened) await showTrajectory(opened);
  setInterval(() => { if ($("#live").checked) tick(); }, 5000);
})();
