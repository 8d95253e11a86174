"use strict";
function table(id, head, rows) {
  const t = document.getElementById(id);
  t.replaceChildren(el("tr", {}, ...head.map((h) => el("th", {}, h))));
  for (const r of rows) t.append(el("tr", {}, ...r.map((c) => el("td", { class: typeof c === "number" ? "num" : "" }, c))));
}

async function load() {
  try {
    const s = await api("/api/stats");
    const cards = document.getElementById("cards");
    const pb = s.position_bias;
    cards.replaceChildren(
      el("div", { class: "card" }, el("div", { class: "big", id: "alpha" }, fmt(s.krippendorff_alpha)), "Krippendorff's α (nominal)"),
      el("div", { class: "card" }, el("div", { class: "big" }, String(s.judgements)), `judgements on ${s.items_judged} of ${s.items} items`),
      el("div", { class: "card" }, el("div", { class: "big" }, String(s.items_multi)), "items with 2+ annotators"),
      el("div", { class: "card" }, el("div", { class: "big" }, pct(pb.left_rate)), `left chosen (${pb.decisive} decisive, p=${fmt(pb.p_value)})`));
    table("annotators", ["annotator", "judged", "skips", "vs majority", "gold accuracy", "left rate", "p", "items/hour"],
      Object.entries(s.annotators).map(([n, a]) => [n, a.judgements, a.skips,
        `${pct(a.majority_agreement)} (${a.majority_items})`, `${pct(a.gold_accuracy)} (${a.gold_items})`,
        pct(a.left_rate), fmt(a.left_rate_p), a.items_per_hour === null ? "–" : Math.round(a.items_per_hour)]));
    table("pairs", ["annotators", "common items", "raw agreement", "Cohen's κ"],
      s.pairs.map((p) => [p.annotators.join(" / "), p.items, pct(p.raw_agreement), fmt(p.cohen_kappa)]));
  } catch (e) {
    const box = document.getElementById("error");
    box.textContent = e.message;
    box.hidden = false;
  }
}
document.getElementById("refresh").addEventListener("click", load);
load();
