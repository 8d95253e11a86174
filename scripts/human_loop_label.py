"""Stands in for the two people of the human-in-the-loop walkthrough (scripts/human_loop_demo.sh,
docs/studio.md): alice labels through the HTTP API, bob in Chromium with the keyboard, both on the
links that ``rlhf-ray annotate serve`` printed. Both prefer the answer the arithmetic task's gold
scorer rates higher (equal: tie, or both bad when neither is right at all); bob decides the other
way on every fifth decisive item, as people sometimes do. Also takes the pages' screenshots.

    python scripts/human_loop_label.py label SERVE_LOG [--shots DIR]
    python scripts/human_loop_label.py view VIEW_LOG --out docs/screenshots/human_loop_view.png
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import time
import urllib.request
from pathlib import Path

from rlhf_ray.tasks.arithmetic import ArithmeticTask


def links(log: str, *names: str, timeout: float = 120) -> dict[str, str]:
    """The links a studio server printed (``  alice: http://...``), waiting for it to start."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = Path(log).read_text() if Path(log).exists() else ""
        if error := re.search(r"^rlhf-ray: .*$", text, re.MULTILINE):
            raise SystemExit(f"{log}: the server did not start: {error.group(0)}")
        found = dict(re.findall(r"^\s*([\w ]+): (http://\S+)$", text, re.MULTILINE))
        if all(n in found for n in names):
            return found
        time.sleep(0.5)
    raise TimeoutError(f"{log}: no links for {names} after {timeout:.0f} s")


def decide(prompt: str, left: str, right: str) -> str:
    a, b = ArithmeticTask.gold_score(prompt, left), ArithmeticTask.gold_score(prompt, right)
    return "A" if a > b else "B" if b > a else "tie" if a > 0 else "bad"


def contrary(choice: str, decisive_seen: int) -> str:
    """bob: the other answer on every fifth decisive item."""
    if choice in ("A", "B") and decisive_seen % 5 == 4:
        return "B" if choice == "A" else "A"
    return choice


def call(url: str, token: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"X-Studio-Token": token, "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def label_through_api(link: str) -> int:
    base, token = link.split("/?token=")
    n = 0
    while (item := call(f"{base}/api/next", token)["item"]) is not None:
        call(f"{base}/api/judge", token, {"item_id": item["item_id"],
                                          "choice": decide(item["prompt"], item["left"], item["right"])})
        n += 1
    return n


def browser(p):
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    return p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])


def label_in_page(page, link: str, shots: Path | None = None) -> int:
    """bob: labels every item on the page with the keyboard; returns how many."""
    from playwright.sync_api import expect

    page.goto(link)
    page.wait_for_selector("#task:not([hidden]), #done:not([hidden])")
    n = decisive = 0
    while page.is_visible("#task"):
        if n == 0 and shots:
            page.screenshot(path=str(shots / "human_loop_annotate.png"))
        choice = decide(page.text_content("#prompt"), page.text_content("#left"), page.text_content("#right"))
        page.keyboard.press({"A": "a", "B": "b", "tie": "t", "bad": "x"}[contrary(choice, decisive)])
        decisive += choice in ("A", "B")
        n += 1
        expect(page.locator("#progress")).to_have_text(re.compile(rf"^{n} done"))
    return n


def label_in_browser(link: str, shots: Path | None) -> int:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = browser(p)
        n = label_in_page(b.new_page(viewport={"width": 1280, "height": 860}), link, shots)
        b.close()
    return n


def label(args) -> None:
    found = links(args.log, "alice", "bob", "stats")
    print(f"alice (API): {label_through_api(found['alice'])} judgements")
    print(f"bob (browser): {label_in_browser(found['bob'], args.shots)} judgements")
    if args.shots:
        screenshot(found["stats"], "#pairs td", args.shots / "human_loop_stats.png")


def screenshot(link: str, ready: str, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = browser(p)
        page = b.new_page(viewport={"width": 1280, "height": 860})
        page.goto(link)
        page.wait_for_selector(ready)
        page.screenshot(path=str(out), full_page=True)
        b.close()
    print(f"screenshot: {out}")


def view_screenshots(link: str, out: Path) -> None:
    """The viewer's top (curves, timeline, the last iteration's samples) and the comparison of the
    first and the last iteration's answers to one prompt (OUT with a _compare suffix)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = browser(p)
        page = b.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(link)
        page.wait_for_selector("#samples tr[data-id]")
        page.locator("#timeline button[data-iteration]").last.click()
        page.screenshot(path=str(out))
        compare = out.with_name(f"{out.stem}_compare{out.suffix}")
        top, bottom = page.locator(".page > h2").last.bounding_box(), page.locator(".compare").bounding_box()
        page.screenshot(path=str(compare), full_page=True, clip={
            "x": 0, "y": top["y"] - 8, "width": 1280, "height": bottom["y"] + bottom["height"] - top["y"] + 16})
        b.close()
    print(f"screenshots: {out} {compare}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    lab = sub.add_parser("label", help="alice labels through the API, bob in the browser")
    lab.add_argument("log", help="the output of `rlhf-ray annotate serve` (its links)")
    lab.add_argument("--shots", type=Path, help="folder for screenshots of the labelling and stats pages")
    lab.set_defaults(fn=label)
    view = sub.add_parser("view", help="screenshot of the run viewer")
    view.add_argument("log", help="the output of `rlhf-ray view` (its link)")
    view.add_argument("--out", type=Path, required=True)
    view.set_defaults(fn=lambda a: view_screenshots(links(a.log, "run viewer")["run viewer"], a.out))
    args = parser.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
