"""The studio in a real browser: Debian's Chromium driven by Playwright (no browser download).

Skips, saying why, when the ``playwright`` package or a Chromium binary is missing. CI installs
both: ``apt-get install -y chromium`` and ``pip install playwright`` (never ``playwright install``).
Screenshots go to a temp folder, or to $RLHF_RAY_SCREENSHOTS (docs/screenshots/ for the docs).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from rlhf_ray.studio.db import Store
from rlhf_ray.studio.pairs import Pair
from rlhf_ray.studio.server import StudioApp, make_server, serve_in_thread, url_of

# Screenshots land in a temp folder; RLHF_RAY_SCREENSHOTS=docs/screenshots refreshes the docs' copies.
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


def write_run(run: Path) -> None:
    """A small run directory in the format rlhf_ray.stages.ppo writes."""
    run.mkdir()
    with (run / "metrics.jsonl").open("w") as f:
        for it in range(1, 5):
            f.write(json.dumps({"iteration": it, "reward_mean": 0.2 * it, "kl_to_ref": 0.01 * it * it,
                                "entropy": 2.0 - 0.1 * it, "response_length_mean": 20 + it,
                                "reward/correct_mean": 0.15 * it, "reward/format_mean": 0.05 * it}) + "\n")
    with (run / "samples.jsonl").open("w") as f:
        for it in range(1, 5):
            for k, prompt in enumerate(["What is 12+7?", "What is 3*4?"]):
                row = {"iteration": it, "prompt": prompt,
                       "response": f"iteration {it} answer {k}" + (" <script>window.__pwned=1</script>" if it == 2 else ""),
                       "reward": round(0.25 * it - 0.1 * k, 3), "components": {"correct": 0.2 * it, "format": 0.1},
                       "kl": 0.01 * it, "truncated": it == 3 and k == 1}
                if it == 4:
                    row["flags"] = {"repetition": k == 0}
                f.write(json.dumps(row) + "\n")


def test_run_viewer_shows_samples_filters_compares_and_sends(page, tmp_path):
    run = tmp_path / "run"
    write_run(run)
    store = Store(tmp_path / "a.db")
    app = StudioApp(store=store, run_dir=str(run))
    server = serve(app)
    try:
        page.goto(url_of(server, "/view", app.admin_token))
        page.wait_for_selector("#samples tr[data-id]")
        assert page.locator("#samples tr[data-id]").count() == 8
        assert page.locator(".chart").count() == 6  # 4 metrics + 2 reward components
        assert page.evaluate("window.__pwned") is None
        assert "<script>" in page.inner_text("#samples")
        page.click('.chart[data-metric="reward_mean"] circle[data-iteration="2"]')  # timeline filter
        assert page.locator("#samples tr[data-id]").count() == 2
        page.click('#timeline button:text-is("all")')
        page.fill("#f-min", "0.5")
        assert page.locator("#samples tr[data-id]").count() == 5  # rewards >= 0.5
        page.fill("#f-min", "")
        page.select_option("#f-flag", "truncated")
        assert page.locator("#samples tr[data-id]").count() == 1
        page.select_option("#f-flag", "repetition")
        assert page.locator("#samples tr[data-id]").count() == 1
        page.select_option("#f-flag", "")
        page.select_option("#c-prompt", "What is 12+7?")
        page.select_option("#c-a", "1")
        page.select_option("#c-b", "4")
        assert "iteration 1 answer 0" in page.inner_text("#c-left")
        assert "iteration 4 answer 0" in page.inner_text("#c-right")
        for sid in (0, 2, 6):  # prompt "What is 12+7?" at iterations 1, 2, 4
            page.check(f'input[data-id="{sid}"]')
        page.screenshot(path=str(SHOTS / "view.png"), full_page=True)
        page.click("#send")
        sync_api.expect(page.locator("#send-status")).to_contain_text("sent")
        assert page.inner_text("#send-status").startswith("2 pairs sent, 2 new")
        assert [it["source"] for it in store.items()] == [f"run:{run}"] * 2
        assert page.errors == []
    finally:
        server.shutdown()
        server.server_close()


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
