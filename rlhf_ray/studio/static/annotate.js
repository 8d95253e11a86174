"use strict";
const LABELS = { A: "A is better", B: "B is better", tie: "Tie", bad: "Both bad", skip: "Skipped" };
const KEYS = { a: "A", b: "B", t: "tie", x: "bad", s: "skip", 1: "A", 2: "B" };
let item = null, busy = false, criteria = [];

function showError(msg) {
  const box = document.getElementById("error");
  box.textContent = msg;
  box.hidden = !msg;
}

function showProgress(p) {
  setText("progress", `${p.done} done · ${p.left} left`);
}

function buildCriteria() {
  const box = document.getElementById("criteria");
  box.replaceChildren();
  if (!criteria.length) return;
  box.append(el("span", { class: "muted" }, "Optional ratings, 1 (poor) – 5 (excellent):"));
  for (const c of criteria) {
    const row = el("div", { class: "criterion" }, el("span", { class: "cname" }, c));
    for (const side of ["A", "B"]) {
      const sel = el("select", { "data-criterion": c, "data-side": side, "aria-label": `${c} ${side}` },
        el("option", { value: "" }, `${side}: –`));
      for (let v = 1; v <= 5; v++) sel.append(el("option", { value: String(v) }, `${side}: ${v}`));
      row.append(sel);
    }
    box.append(row);
  }
}

function ratings() {
  const out = {};
  for (const sel of document.querySelectorAll("#criteria select")) {
    if (!sel.value) continue;
    const c = sel.dataset.criterion;
    (out[c] = out[c] || {})[sel.dataset.side] = Number(sel.value);
  }
  return out;
}

function clearInputs() {
  document.getElementById("comment").value = "";
  for (const sel of document.querySelectorAll("#criteria select")) sel.value = "";
}

async function loadNext() {
  const data = await api("/api/next");
  item = data.item;
  showProgress(data.progress);
  document.getElementById("task").hidden = !item;
  document.getElementById("done").hidden = !!item;
  if (item) {
    setText("prompt", item.prompt);
    setText("left", item.left);
    setText("right", item.right);
    document.getElementById("task").dataset.itemId = item.item_id;
  }
}

async function choose(choice) {
  if (!item || busy) return;
  busy = true;
  try {
    await api("/api/judge", { item_id: item.item_id, choice, ratings: ratings(),
                              comment: document.getElementById("comment").value });
    setText("status", `Saved: ${LABELS[choice]} (item ${item.item_id})`);
    clearInputs();
    await loadNext();
    showError("");
  } catch (e) {
    showError(`Not saved: ${e.message}`);
    if (e.status === 409) await loadNext();
  } finally { busy = false; }
}

async function undo() {
  if (busy) return;
  busy = true;
  try {
    const r = await api("/api/undo", {});
    setText("status", r.undone_item === null ? "Nothing to undo" : `Undone: item ${r.undone_item}`);
    await loadNext();
  } catch (e) { showError(e.message); } finally { busy = false; }
}

async function openGuidelines() {
  const dlg = document.getElementById("guidelines");
  try {
    const g = await api("/api/guidelines");
    renderMarkdown(g.text || "No guidelines were given for this set.", document.getElementById("guidelines-text"));
  } catch (e) { setText("guidelines-text", e.message); }
  if (!dlg.open) dlg.showModal();
}

document.getElementById("choices").addEventListener("click", (ev) => {
  const b = ev.target.closest("button[data-choice]");
  if (b) choose(b.dataset.choice);
});
document.getElementById("undo-btn").addEventListener("click", undo);
document.getElementById("guidelines-btn").addEventListener("click", openGuidelines);
document.getElementById("guidelines-close").addEventListener("click", () => document.getElementById("guidelines").close());

document.addEventListener("keydown", (ev) => {
  if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const tag = (ev.target.tagName || "").toLowerCase();
  if (tag === "textarea" || tag === "input" || tag === "select") {
    if (ev.key === "Escape") ev.target.blur();
    return;
  }
  if (document.getElementById("guidelines").open) return;
  const k = ev.key.toLowerCase();
  if (KEYS[k]) { ev.preventDefault(); choose(KEYS[k]); }
  else if (k === "u") { ev.preventDefault(); undo(); }
  else if (k === "g" || k === "?") { ev.preventDefault(); openGuidelines(); }
  else if (k === "c") { ev.preventDefault(); document.getElementById("comment").focus(); }
});

(async () => {
  if (!TOKEN) { showError("This page needs the link with your token (…/?token=…)."); return; }
  try {
    const me = await api("/api/me");
    setText("who", `— ${me.name}`);
    criteria = me.criteria || [];
    buildCriteria();
    await loadNext();
  } catch (e) { showError(e.status === 401 ? "Unknown token: use the link you were given." : e.message); }
})();
