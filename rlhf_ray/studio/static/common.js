// Shared helpers. Everything from the server is put on the page with textContent: model output is
// text, never markup.
"use strict";
const TOKEN = new URLSearchParams(location.search).get("token") || "";

async function api(path, body) {
  const opt = { headers: { "X-Studio-Token": TOKEN } };
  if (body !== undefined) {
    opt.method = "POST";
    opt.headers["Content-Type"] = "application/json";
    opt.body = JSON.stringify(body);
  }
  const r = await fetch(path, opt);
  let data = {};
  try { data = await r.json(); } catch (e) { /* not JSON */ }
  if (!r.ok) {
    const err = new Error(data.error || r.statusText);
    err.status = r.status;
    throw err;
  }
  return data;
}

// el("div", {class: "x", onclick: f}, "text", childNode, ...): strings become text nodes.
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "class") node.className = v;
    else if (v !== undefined && v !== null && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function setText(id, text) { document.getElementById(id).textContent = text; }

// A small, safe Markdown subset (headings, bullet and numbered lists, paragraphs, **bold**,
// `code`) built as DOM nodes; anything else stays literal text.
function inlineMd(text) {
  const out = [];
  const re = /(\*\*[^*]+\*\*|`[^`]+`)/g;
  let last = 0, m;
  while ((m = re.exec(text)) !== null) {
    if (m.index > last) out.push(text.slice(last, m.index));
    const t = m[0];
    out.push(t.startsWith("**") ? el("strong", {}, t.slice(2, -2)) : el("code", {}, t.slice(1, -1)));
    last = m.index + t.length;
  }
  if (last < text.length) out.push(text.slice(last));
  return out;
}

function renderMarkdown(md, into) {
  into.replaceChildren();
  let list = null, para = [];
  const flush = () => {
    if (para.length) into.append(el("p", {}, ...inlineMd(para.join(" "))));
    para = [];
  };
  for (const raw of md.split(/\r?\n/)) {
    const line = raw.trimEnd();
    const h = /^(#{1,4})\s+(.*)$/.exec(line);
    const li = /^\s*(?:[-*]|\d+[.)])\s+(.*)$/.exec(line);
    if (h) { flush(); list = null; into.append(el("h" + (h[1].length + 1), {}, ...inlineMd(h[2]))); }
    else if (li) {
      flush();
      if (!list) { list = el("ul"); into.append(list); }
      list.append(el("li", {}, ...inlineMd(li[1])));
    } else if (!line.trim()) { flush(); list = null; }
    else { list = null; para.push(line.trim()); }
  }
  flush();
}

function fmt(x, digits = 3) {
  return x === null || x === undefined ? "–" : (typeof x === "number" ? x.toFixed(digits) : String(x));
}
function pct(x) { return x === null || x === undefined ? "–" : (100 * x).toFixed(1) + "%"; }
