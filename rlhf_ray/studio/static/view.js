"use strict";
const SVG = "http://www.w3.org/2000/svg";
let metrics = [], samples = [], selected = new Set();

function svg(tag, attrs) {
  const n = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) n.setAttribute(k, v);
  return n;
}

function metricKeys() {
  const preferred = ["reward_mean", "kl_to_ref", "entropy", "response_length_mean"];
  const keys = new Set();
  for (const m of metrics) for (const [k, v] of Object.entries(m)) if (typeof v === "number" && k !== "iteration") keys.add(k);
  const rewards = [...keys].filter((k) => k.startsWith("reward/") && k.endsWith("_mean"));
  return [...preferred.filter((k) => keys.has(k)), ...rewards];
}

function chart(key) {
  const W = 260, H = 120, P = 26;
  const pts = metrics.filter((m) => typeof m[key] === "number").map((m) => [m.iteration, m[key]]);
  const box = el("div", { class: "chart", "data-metric": key }, el("div", { class: "title" }, key));
  const s = svg("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}` });
  if (pts.length) {
    const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
    const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
    const X = (x) => 40 + (x1 === x0 ? 0.5 : (x - x0) / (x1 - x0)) * (W - 40 - P / 2);
    const Y = (y) => H - P / 2 - (y1 === y0 ? 0.5 : (y - y0) / (y1 - y0)) * (H - P);
    s.append(svg("polyline", { points: pts.map((p) => `${X(p[0])},${Y(p[1])}`).join(" "), fill: "none", stroke: "#2d5bd0", "stroke-width": 1.5 }));
    for (const [x, y] of pts) {
      const c = svg("circle", { cx: X(x), cy: Y(y), r: 3.5, fill: "#2d5bd0", class: "pt", "data-iteration": x });
      const t = svg("title"); t.textContent = `iteration ${x}: ${y.toFixed(4)}`; c.append(t);
      c.addEventListener("click", () => setIteration(String(x)));
      s.append(c);
    }
    for (const [y, label] of [[y0, y0], [y1, y1]]) {
      const t = svg("text", { x: 2, y: Y(y) + 4, "font-size": 9, fill: "#66707c" }); t.textContent = label.toPrecision(3); s.append(t);
    }
  }
  box.append(s);
  return box;
}

function iterations() { return [...new Set(samples.map((s) => s.iteration))].sort((a, b) => a - b); }
function flagNames() { const f = new Set(); for (const s of samples) for (const [k, v] of Object.entries(s.flags)) if (v) f.add(k); return [...f].sort(); }

function options(sel, values, keep) {
  const old = keep ? sel.value : null;
  sel.replaceChildren(...values.map(([v, label]) => el("option", { value: v }, label)));
  if (old !== null && values.some(([v]) => v === old)) sel.value = old;
}

function setIteration(it) {
  document.getElementById("f-iter").value = it;
  renderTimeline();
  renderTable();
}

function renderTimeline() {
  const cur = document.getElementById("f-iter").value;
  const box = document.getElementById("timeline");
  const byIt = Object.fromEntries(metrics.map((m) => [m.iteration, m]));
  box.replaceChildren(el("button", { type: "button", class: cur === "" ? "on" : "", onclick: () => setIteration("") }, "all"),
    ...iterations().map((it) => el("button", {
      type: "button", class: String(it) === cur ? "on" : "", "data-iteration": it,
      title: byIt[it] ? `reward_mean ${fmt(byIt[it].reward_mean)}, kl ${fmt(byIt[it].kl_to_ref)}` : "",
      onclick: () => setIteration(String(it)),
    }, String(it))));
}

function filtered() {
  const it = document.getElementById("f-iter").value;
  const lo = document.getElementById("f-min").value, hi = document.getElementById("f-max").value;
  const flag = document.getElementById("f-flag").value;
  return samples.filter((s) => (it === "" || String(s.iteration) === it)
    && (lo === "" || s.reward >= Number(lo)) && (hi === "" || s.reward <= Number(hi))
    && (flag === "" || (flag === "(none)" ? !Object.values(s.flags).some(Boolean) : !!s.flags[flag])));
}

function renderTable() {
  const rows = filtered();
  setText("count", `${rows.length} of ${samples.length} samples · ${selected.size} selected`);
  const t = document.getElementById("samples");
  const comps = [...new Set(samples.flatMap((s) => Object.keys(s.components || {})))];
  // The other columns of a prompt's data row (an answer, an id): shown when any sample has them.
  const hasColumns = samples.some((s) => s.columns && Object.keys(s.columns).length);
  t.replaceChildren(el("tr", {}, el("th", {}, ""), el("th", {}, "iter"), el("th", {}, "reward"),
    ...comps.map((c) => el("th", {}, c)), el("th", {}, "kl"), el("th", {}, "flags"), el("th", {}, "prompt"),
    ...(hasColumns ? [el("th", {}, "row")] : []), el("th", {}, "response")));
  for (const s of rows) {
    const box = el("input", { type: "checkbox", "data-id": s.id, "aria-label": `select sample ${s.id}` });
    box.checked = selected.has(s.id);
    box.addEventListener("change", () => { box.checked ? selected.add(s.id) : selected.delete(s.id); setText("count", `${rows.length} of ${samples.length} samples · ${selected.size} selected`); });
    t.append(el("tr", { "data-id": s.id }, el("td", {}, box), el("td", { class: "num" }, s.iteration), el("td", { class: "num" }, fmt(s.reward)),
      ...comps.map((c) => el("td", { class: "num" }, fmt((s.components || {})[c]))),
      el("td", { class: "num" }, fmt(s.kl)),
      el("td", {}, ...Object.entries(s.flags).filter(([, v]) => v).map(([k]) => el("span", { class: "flag" }, k))),
      el("td", { class: "cell" }, s.prompt), ...(hasColumns ? [columnsCell(s)] : []), responseCell(s)));
  }
}

function columnsCell(s) {
  const text = Object.entries(s.columns || {}).map(([k, v]) => `${k}: ${typeof v === "string" ? v : JSON.stringify(v)}`);
  return el("td", { class: "cell columns" }, text.join("\n"));
}

// A multi-turn sample (agent.env) shows each turn as its own block: the policy's messages, each
// tool's result (with the tool's name and any error) and the environment's replies, as text.
function responseCell(s) {
  if (!Array.isArray(s.turns)) return el("td", { class: "cell response" }, s.response);
  return el("td", { class: "cell response" }, ...s.turns.map((t) => el("div", { class: `turn ${t.error ? "failed" : ""}`, "data-role": t.role },
    el("span", { class: "role" }, [t.role, t.tool, t.error].filter(Boolean).join(" · ")), t.text)));
}

function renderCompare() {
  const prompt = document.getElementById("c-prompt").value;
  for (const [side, selId] of [["c-left", "c-a"], ["c-right", "c-b"]]) {
    const it = document.getElementById(selId).value;
    const box = document.getElementById(side);
    const rows = samples.filter((s) => s.prompt === prompt && String(s.iteration) === it);
    box.replaceChildren(el("h2", {}, `iteration ${it}`), ...(rows.length ? rows.map((s) => el("div", { class: "text", style: null },
      `reward ${fmt(s.reward)} · kl ${fmt(s.kl)}\n\n`, s.response)) : [el("p", { class: "muted" }, "no sample of this prompt at this iteration")]));
  }
}

function setupCompare() {
  // A Map, not an object: prompts are user text ("constructor", "__proto__" are prompts too).
  const counts = new Map();
  for (const s of samples) {
    if (!counts.has(s.prompt)) counts.set(s.prompt, new Set());
    counts.get(s.prompt).add(s.iteration);
  }
  const prompts = [...counts.keys()].sort((a, b) => counts.get(b).size - counts.get(a).size);
  options(document.getElementById("c-prompt"), prompts.map((p) => [p, `${p.slice(0, 80)} (${counts.get(p).size} iterations)`]), true);
  const its = iterations().map((i) => [String(i), String(i)]);
  options(document.getElementById("c-a"), its, true);
  options(document.getElementById("c-b"), its, true);
  if (its.length && !document.getElementById("c-b").dataset.touched) document.getElementById("c-b").value = its[its.length - 1][0];
  renderCompare();
}

async function load() {
  try {
    const [m, s] = await Promise.all([api("/api/run/metrics"), api("/api/run/samples")]);
    metrics = m.metrics; samples = s.samples;
    setText("run", m.run_dir);
    document.getElementById("send").disabled = !s.can_send;
    if (!s.can_send) document.getElementById("send").title = "start rlhf-ray view with --db to send samples";
    document.getElementById("charts").replaceChildren(...metricKeys().map(chart));
    options(document.getElementById("f-iter"), [["", "all"], ...iterations().map((i) => [String(i), String(i)])], true);
    options(document.getElementById("f-flag"), [["", "any"], ["(none)", "(none)"], ...flagNames().map((f) => [f, f])], true);
    renderTimeline(); renderTable(); setupCompare();
  } catch (e) {
    const box = document.getElementById("error"); box.textContent = e.message; box.hidden = false;
  }
}

async function send() {
  if (!selected.size) { setText("send-status", "select samples first"); return; }
  try {
    const r = await api("/api/run/send", { ids: [...selected].sort((a, b) => a - b) });
    setText("send-status", `${r.pairs} pairs sent, ${r.added} new in the annotation set` +
      (r.left_alone.length ? `; ${r.left_alone.length} samples had no second response to the same prompt` : ""));
  } catch (e) { setText("send-status", `not sent: ${e.message}`); }
}

for (const id of ["f-iter", "f-min", "f-max", "f-flag"]) document.getElementById(id).addEventListener("input", () => { renderTimeline(); renderTable(); });
for (const id of ["c-prompt", "c-a", "c-b"]) document.getElementById(id).addEventListener("change", (ev) => { ev.target.dataset.touched = "1"; renderCompare(); });
document.getElementById("send").addEventListener("click", send);
document.getElementById("reload").addEventListener("click", load);
if (!TOKEN) { const b = document.getElementById("error"); b.textContent = "This page needs the link with the admin token (…/view?token=…)."; b.hidden = false; }
else load();
