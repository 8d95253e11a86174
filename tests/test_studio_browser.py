"""The studio in a real browser: Debian's Chromium driven by Playwright (no browser download).

Skips, saying why, when the ``playwright`` package or a Chromium binary is missing. CI installs
both: ``apt-get install -y chromium`` and ``pip install playwright`` (never ``playwright install``).
Screenshots go to a temp folder, or to $RLHF_RAY_SCREENSHOTS (docs/screenshots/ for the docs).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from test_studio import start_server  # tests/ is on sys.path under pytest

from rlhf_ray.studio.db import Store
from rlhf_ray.studio.pairs import Pair
from rlhf_ray.studio.server import StudioApp, make_server, serve_in_thread, url_of
from rlhf_ray.studio.stats import compute_stats, export_preferences
from rlhf_ray.tracking import read_metrics

# Screenshots land in a temp folder; RLHF_RAY_SCREENSHOTS=docs/screenshots refreshes the docs' copies.
REPO = Path(__file__).resolve().parents[1]
SHOTS = Path(os.environ.get("RLHF_RAY_SCREENSHOTS") or tempfile.mkdtemp(prefix="studio-shots-")).resolve()
CHROMIUM = os.environ.get("CHROMIUM") or next(
    (p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium")
     if p and os.path.exists(p)), None)

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed "
                               "(pip install playwright; the browser comes from apt-get install chromium)")
if CHROMIUM is None:
    pytest.skip("no Chromium binary (apt-get install -y chromium; or set CHROMIUM=/path)", allow_module_level=True)

INJECTION = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1280, "height": 860})
    pg = ctx.new_page()
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.errors = errors
    yield pg
    ctx.close()


def done(page, n: int) -> None:
    """Waits for the progress counter (no wait_for_function: the page's CSP forbids eval)."""
    sync_api.expect(page.locator("#progress")).to_have_text(re.compile(rf"^{n} done"))


def serve(app: StudioApp):
    server = make_server(app, "127.0.0.1", 0)
    serve_in_thread(server)
    return server


def test_label_with_mouse_and_keyboard_undo_and_reload(page, tmp_path):
    store = Store(tmp_path / "a.db")
    store.add_items([Pair(f"Explain item {i} briefly.", f"Answer one to {i}: short and right.",
                          f"Answer two to {i}: long, rambling\nand partly wrong.") for i in range(6)])
    token = store.add_annotator("alice")
    guidelines = "# Guidelines\n\nPrefer the **more helpful** answer.\n\n- honest\n- harmless\n"
    server = serve(StudioApp(store=store, guidelines=guidelines))
    try:
        page.goto(url_of(server, "/", "bad-token"))
        page.wait_for_selector("#error:not([hidden])")
        assert "Unknown token" in page.inner_text("#error")

        page.goto(url_of(server, "/", token))
        page.wait_for_selector("#task:not([hidden])")
        assert page.inner_text("#progress") == "0 done · 6 left"
        page.select_option('select[data-criterion="helpfulness"][data-side="A"]', "4")
        page.fill("#comment", "first one")
        page.screenshot(path=str(SHOTS / "annotate.png"))
        first = page.get_attribute("#task", "data-item-id")
        page.click('button[data-choice="A"]')  # mouse
        done(page, 1)
        second = page.get_attribute("#task", "data-item-id")
        assert second != first
        page.keyboard.press("b")  # keyboard
        done(page, 2)
        page.keyboard.press("t")
        done(page, 3)
        page.keyboard.press("u")  # undo the tie
        done(page, 2)
        page.keyboard.press("x")
        done(page, 3)
        page.keyboard.press("s")
        done(page, 4)
        page.keyboard.press("g")
        page.wait_for_selector("#guidelines[open]")
        assert page.inner_text("#guidelines-text strong") == "more helpful"
        page.screenshot(path=str(SHOTS / "annotate_guidelines.png"))
        page.keyboard.press("Escape")

        page.reload()
        page.wait_for_selector("#task:not([hidden])")
        assert page.inner_text("#progress") == "4 done · 2 left"  # persisted
        js = store.judgements()
        assert [j["shown_choice"] for j in js] == ["A", "B", "bad", "skip"]
        assert js[0]["comment"] == "first one" and json.loads(js[0]["ratings"])["helpfulness"] \
            in ({"r1": 4}, {"r2": 4})
        assert len(store.judgements(include_undone=True)) == 5
        assert page.errors == []
    finally:
        server.shutdown()
        server.server_close()


def test_model_output_is_shown_as_text_and_runs_nothing(page, tmp_path):
    store = Store(tmp_path / "a.db")
    store.add_items([Pair("<b>bold?</b> Say something", INJECTION, 'fine <svg onload="window.__pwned=3">')])
    token = store.add_annotator("mallory")
    server = serve(StudioApp(store=store))
    try:
        page.goto(url_of(server, "/", token))
        page.wait_for_selector("#task:not([hidden])")
        page.wait_for_timeout(300)
        shown = page.inner_text("#left") + page.inner_text("#right")
        assert INJECTION in shown and "<b>bold?</b>" in page.inner_text("#prompt")
        assert page.evaluate("window.__pwned") is None
        assert page.locator("#task img, #task script, #task svg, #prompt b").count() == 0
        page.screenshot(path=str(SHOTS / "annotate_injection.png"))
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_run_viewer_on_a_real_ppo_run(page, short_ppo_run, tmp_path):
    """The run directory of the session's short PPO run: curves, timeline, filters, one prompt at two
    iterations, and samples sent to an annotation set that ``annotate serve`` then serves."""
    trainer, _ = short_ppo_run
    run = trainer.run_dir
    metrics = read_metrics(run)
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [1, 2] and {s["iteration"] for s in samples} == {1, 2}
    db = tmp_path / "from_run.db"
    app = StudioApp(store=Store(db), run_dir=str(run))
    server = serve(app)
    try:
        page.goto(url_of(server, "/view", app.admin_token))
        page.wait_for_selector("#samples tr[data-id]")
        rows = page.locator("#samples tr[data-id]")
        assert rows.count() == len(samples) == 64  # 8 prompts x 4 samples x 2 iterations
        curves = [k for k in ("reward_mean", "kl_to_ref", "entropy", "response_length_mean") if k in metrics[0]]
        curves += [k for k in metrics[0] if k.startswith("reward/") and k.endswith("_mean")]
        assert "reward/digit_fraction_mean" in curves
        assert page.eval_on_selector_all(".chart", "cs => cs.map(c => c.dataset.metric)") == curves
        point = page.locator('.chart[data-metric="reward_mean"] circle[data-iteration="2"]')
        assert f"{metrics[1]['reward_mean']:.4f}" in point.locator("title").text_content()
        point.click()  # timeline filter
        assert rows.count() == sum(s["iteration"] == 2 for s in samples)
        assert set(page.eval_on_selector_all("#samples tr[data-id] td:nth-child(2)", "ts => ts.map(t => t.textContent)")) \
            == {"2"}
        page.click('#timeline button:text-is("all")')

        threshold = sorted(s["reward"] for s in samples)[len(samples) // 2]
        page.fill("#f-min", repr(threshold))
        assert rows.count() == sum(s["reward"] >= threshold for s in samples)
        page.fill("#f-min", "")
        # Flags: truncated rollouts, and every sample of an iteration whose flag/* metric was raised.
        raised = {m["iteration"]: {k.removeprefix("flag/") for k, v in m.items() if k.startswith("flag/") and v}
                  for m in metrics}
        flags = [raised[s["iteration"]] | ({"truncated"} if s["truncated"] else set()) for s in samples]
        names = sorted(set().union(*flags))
        assert page.eval_on_selector_all("#f-flag option", "os => os.map(o => o.value)") == ["", "(none)", *names]
        for name in names:
            page.select_option("#f-flag", name)
            assert rows.count() == sum(name in f for f in flags)
        page.select_option("#f-flag", "(none)")
        assert rows.count() == sum(not f for f in flags)
        page.select_option("#f-flag", "")

        # One prompt at iterations 1 and 2, side by side.
        prompt = samples[0]["prompt"]
        at = {it: [s for s in samples if s["prompt"] == prompt and s["iteration"] == it] for it in (1, 2)}
        assert at[1] and at[2]
        page.select_option("#c-prompt", prompt)
        page.select_option("#c-a", "1")
        page.select_option("#c-b", "2")
        for side, it in (("#c-left", 1), ("#c-right", 2)):
            shown = page.text_content(side)
            assert shown.startswith(f"iteration {it}") and all(s["response"] in shown for s in at[it])
        page.screenshot(path=str(SHOTS / "view.png"))  # the top: curves, timeline, first rows

        # Send one response of that prompt from each iteration to the annotation set ...
        first = next(s for s in at[1] if s["response"].strip())
        second = next(s for s in at[2] if s["response"].strip() != first["response"].strip())
        for s in (first, second):
            page.check(f'input[data-id="{samples.index(s)}"]')
        page.click("#send")
        sync_api.expect(page.locator("#send-status")).to_contain_text("sent")
        assert page.inner_text("#send-status").startswith("1 pairs sent, 1 new")
        assert page.errors == []
    finally:
        server.shutdown()
        server.server_close()
    # ... which `rlhf-ray annotate serve` loads and puts on an annotator's screen.
    proc, base, tokens = start_server(db, annotators="carol")
    token = tokens["carol"]
    try:
        page.goto(f"{base}/?token={token}")
        page.wait_for_selector("#task:not([hidden])")
        assert page.text_content("#prompt") == prompt
        assert {page.text_content("#left"), page.text_content("#right")} == {first["response"], second["response"]}
        assert page.inner_text("#progress") == "0 done · 1 left"
    finally:
        proc.terminate()
        proc.wait()


def test_run_viewer_shows_hostile_output_as_text(page, tmp_path):
    """A policy that learnt to emit markup: its samples are shown literally; per-sample flags filter."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"iteration": 1, "reward_mean": 0.5}) + "\n")
    (run / "samples.jsonl").write_text("".join(json.dumps(
        {"iteration": 1, "prompt": "What is 3*4?", "response": response, "reward": 0.5, "components": {},
         "kl": 0.0, "truncated": False, "flags": {"repetition": k == 1}}) + "\n"
        for k, response in enumerate([INJECTION, "12 12 12 12"])) + "".join(json.dumps(
        {"iteration": 1, "prompt": prompt, "response": "x", "reward": 0.0, "components": {}, "kl": 0.0,
         "truncated": False, "flags": {}}) + "\n" for prompt in ("constructor", "__proto__", "toString")))
    app = StudioApp(store=None, run_dir=str(run))
    server = serve(app)
    try:
        page.goto(url_of(server, "/view", app.admin_token))
        page.wait_for_selector("#samples tr[data-id]")
        assert INJECTION in page.text_content("#samples")
        assert page.evaluate("window.__pwned") is None
        assert page.locator("#samples img, #samples script, #c-left img").count() == 0
        # Prompts named like JavaScript object members are ordinary prompts in the compare panel.
        choices = page.eval_on_selector_all("#c-prompt option", "os => os.map(o => o.value)")
        assert {"constructor", "__proto__", "toString", "What is 3*4?"} <= set(choices), choices
        page.select_option("#c-prompt", "__proto__")
        assert "x" in page.text_content("#c-left")
        page.select_option("#f-flag", "repetition")
        assert page.locator("#samples tr[data-id]").count() == 1
        assert page.is_disabled("#send")  # no --db: nowhere to send
        assert page.errors == []
    finally:
        server.shutdown()
        server.server_close()


def test_run_viewer_shows_each_turn_of_a_multi_turn_sample(page, tmp_path):
    """agent.env samples: each turn its own block with its role, tool and error; tool calls and
    results shown as text, never as markup."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"iteration": 1, "reward_mean": 1.0}) + "\n")
    call = '<tool_call>{"name": "calc", "arguments": {"expr": "37*58"}}</tool_call>'
    turns = [{"role": "assistant", "text": call}, {"role": "tool", "text": "<tool_response>2146</tool_response>",
                                                   "tool": "calc"},
             {"role": "assistant", "text": call}, {"role": "tool", "text": "error: did not answer", "tool": "calc",
                                                   "error": "timeout"},
             {"role": "assistant", "text": "2146"}]
    (run / "samples.jsonl").write_text(json.dumps(
        {"iteration": 1, "prompt": "37*58=", "response": "...", "reward": 1.0, "components": {}, "kl": 0.0,
         "truncated": False, "turns": turns, "finish": "done"}) + "\n")
    app = StudioApp(store=None, run_dir=str(run))
    server = serve(app)
    try:
        page.goto(url_of(server, "/view", app.admin_token))
        page.wait_for_selector("#samples .turn")
        roles = page.eval_on_selector_all("#samples .turn", "ts => ts.map(t => t.dataset.role)")
        assert roles == ["assistant", "tool", "assistant", "tool", "assistant"]
        assert page.locator("#samples .turn.failed").count() == 1
        assert "tool · calc · timeout" in page.text_content("#samples .turn.failed .role")
        text = page.text_content("#samples")
        assert call in text and "<tool_response>2146</tool_response>" in text
        assert page.locator("#samples tool_call, #samples tool_response").count() == 0
        assert page.errors == []
    finally:
        server.shutdown()
        server.server_close()


def load_script(name: str):
    """A module of scripts/ (not a package), e.g. the walkthrough's stand-in annotators."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_two_annotators_agree_and_their_export_trains_a_reward_model(page, ray_session, tiny_model_dir, tmp_path):
    """The middle of the human loop (scripts/human_loop_demo.sh runs all of it, collect and PPO too):
    answers in the format `rlhf-ray collect` writes -> `annotate serve` -> alice labels through the
    API, bob in the browser with the keyboard (the walkthrough's stand-ins) -> agreement -> export ->
    `rlhf-ray rm` trains on the export as it is."""
    from rlhf_ray.config import load_config
    from rlhf_ray.stages.rm import run_rm

    people = load_script("human_loop_label")
    # 12 sums answered right, off by one and not at all (two decisive adjacent pairs each), and two
    # answered by letters only (both bad): 26 items, each shown to both annotators.
    rows = [{"prompt": f"{a}+{a + 3}=", "responses": [str(2 * a + 3), str(2 * a + 4), "xyz"]} for a in range(12)]
    rows += [{"prompt": f"{a}+1=", "responses": ["ab", "cd"]} for a in (5, 6)]
    collected = tmp_path / "responses.jsonl"
    collected.write_text("".join(json.dumps(r) + "\n" for r in rows))
    db = tmp_path / "labels.db"
    proc, base, tokens = start_server(db, "--pairs", str(collected), "--overlap", "1", "--overlap-k", "2",
                                      annotators="alice,bob")
    try:
        store = Store(db)
        alice, bob = (f"{base}/?token={tokens[name]}" for name in ("alice", "bob"))
        assert people.label_through_api(alice) == 26
        assert people.label_in_page(page, bob) == 26
        page.reload()
        page.wait_for_selector("#done:not([hidden])")
        assert page.errors == []
    finally:
        proc.terminate()
        proc.wait()

    # alice: response 1 better on all 24 decisive items, both bad on 2; bob the same except response
    # 2 on every fifth decisive item (4 of 24). Cohen's kappa: po = 22/26, pe = (24*20 + 2*2)/26^2,
    # (po - pe)/(1 - pe) = 88/192. Krippendorff's alpha (nominal): 52 values (r1 44, r2 4, bad 4),
    # Do = 8/52, De = 2*(44*4 + 44*4 + 4*4)/(52*51), 1 - Do/De = 533/1196.
    s = compute_stats(store)
    (pair,) = s["pairs"]
    assert pair["items"] == 26 and pair["raw_agreement"] == pytest.approx(22 / 26)
    assert pair["cohen_kappa"] == pytest.approx(88 / 192)
    assert s["krippendorff_alpha"] == pytest.approx(533 / 1196)
    prefs = tmp_path / "human_prefs.jsonl"
    r = export_preferences(store, prefs, min_agreement=1.0)
    assert r["written"] == 20 and r["left_out"] == {"no majority": 4, "both bad": 2}

    # rm.init names the starting model (model.policy stays the built-in tiny one, never built);
    # two ensemble members, seeded apart; scores left unnormalised.
    cfg = load_config(None, [f"run_dir={tmp_path / 'rm'}", f"rm.init={tiny_model_dir}", "rm.ensemble_size=2",
                             "rm.normalize=false", f"data.preferences={prefs}", "data.eval_fraction=0.2",
                             "rm.epochs=1", "rm.batch_size=8", "critic.num_ranks=1", "logging.trackers=[]"])
    summary = run_rm(cfg)
    assert summary["train_pairs"] + summary["held_out_pairs"] == 20 and summary["held_out_pairs"] >= 4
    assert 0.0 <= summary["held_out_accuracy"] <= 1.0
    assert not (tmp_path / "rm" / "base_model").exists()
    assert [Path(p).name for p in summary["models"]] == ["reward_model-0", "reward_model-1"]
    for path in summary["models"]:
        assert json.loads((Path(path) / "reward_norm.json").read_text()) == {"mean": 0.0, "std": 1.0}
    rows = read_metrics(tmp_path / "rm")
    losses = {m: [r["rm_loss"] for r in rows if "rm_loss" in r and r["member"] == m] for m in (0, 1)}
    assert all(len(v) == summary["train_pairs"] // 8 and all(map(math.isfinite, v)) for v in losses.values())
    assert losses[0] != losses[1]  # the members' heads start from different seeds


def test_stats_page(page, tmp_path):
    store = Store(tmp_path / "a.db")
    store.add_items([Pair(f"p{i}", f"a{i}", f"b{i}") for i in range(6)], overlap=1.0, overlap_k=2)
    for name, choices in (("ann", "AABBAt"), ("bob", "ABBBAt")):
        who = store.annotator_by_token(store.add_annotator(name))
        for c in choices:
            store.judge(who, store.current(who)["item_id"], {"t": "tie"}.get(c, c))
    with store.lock:  # as if made by people, 40 s apart (items per hour)
        store.conn.execute("UPDATE judgements SET created_at = created_at + id * 40")
    app = StudioApp(store=store)
    server = serve(app)
    try:
        page.goto(url_of(server, "/stats", "nope"))
        page.wait_for_selector("#error:not([hidden])")
        page.goto(url_of(server, "/stats", app.admin_token))
        page.wait_for_selector("#pairs td")
        assert page.locator("#annotators tr").count() == 3
        assert page.inner_text("#alpha") not in ("", "–")
        page.screenshot(path=str(SHOTS / "stats.png"), full_page=True)
    finally:
        server.shutdown()
        server.server_close()
