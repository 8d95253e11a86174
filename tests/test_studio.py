"""The studio without a browser: pairs, the SQLite store, the HTTP API (auth, limits, binding),
agreement statistics worked out by hand, export, kill-and-restart, and a 20-client load test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from rlhf_ray.data.formats import load_preferences
from rlhf_ray.studio.db import Conflict, Store, canonical
from rlhf_ray.studio.pairs import Pair, load_pairs
from rlhf_ray.studio.server import StudioApp, make_server, serve_in_thread, url_of
from rlhf_ray.studio.stats import compute_stats, export_preferences

REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_pairs(n: int, prefix: str = "q") -> list[Pair]:
    return [Pair(f"{prefix}{i}: what is {i}+{i}?", f"{2 * i}", f"{2 * i + 1}") for i in range(n)]


def shown_for(store: Store, who: dict, item_id: int, label: str) -> str:
    """The button an annotator must press to give canonical ``label`` on the item as shown to them."""
    flipped = store.conn.execute("SELECT flipped FROM assignments WHERE annotator_id=? AND item_id=?",
                                 (who["id"], item_id)).fetchone()[0]
    for shown in ("A", "B", "tie", "bad", "skip"):
        if canonical(shown, bool(flipped)) == label:
            return shown
    raise AssertionError(label)


def label_all(store: Store, name: str, labels: dict[int, str]) -> None:
    """Annotator ``name`` labels every item it is given with ``labels[item_id]``."""
    who = store.annotator_by_token(store.add_annotator(name))
    while (cur := store.current(who)) is not None:
        store.judge(who, cur["item_id"], shown_for(store, who, cur["item_id"], labels[cur["item_id"]]))


# --- input ----------------------------------------------------------------------------------------

def test_collect_rows_become_adjacent_or_all_pairs(tmp_path):
    src = write_jsonl(tmp_path / "collected.jsonl", [
        {"prompt": "p1", "responses": ["a", "b", "c", "a"], "scores": [1, 2, 3, 1]},  # repeated "a" dropped
        {"prompt": [{"role": "user", "content": "hi"}], "responses": ["x", " ", "y"]},  # empty answer dropped
    ])
    adj, report = load_pairs(str(src))
    assert [(p.response_1, p.response_2) for p in adj] == [("a", "b"), ("b", "c"), ("x", "y")]
    assert adj[0].meta["scores"] == [1, 2] and adj[2].prompt.startswith("User: hi")
    assert report.rows_kept == 2
    every, _ = load_pairs(str(src), pairing="all")
    assert [(p.response_1, p.response_2) for p in every][:3] == [("a", "b"), ("a", "c"), ("b", "c")]


def test_preference_dataset_is_read_through_the_data_layer(tmp_path):
    src = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "p", "chosen": "good", "rejected": "bad"},
                                                 {"prompt": "p2", "chosen": "", "rejected": "x"}])
    with pytest.raises(ValueError, match="row 2"):
        load_pairs(str(src))
    pairs, report = load_pairs(str(src), on_bad_row="skip")
    assert len(pairs) == 1 and report.n_skipped == 1 and pairs[0].gold is None


# --- the store ------------------------------------------------------------------------------------

def test_store_wal_orientation_duplicates_undo_and_per_annotator_order(tmp_path):
    store = Store(tmp_path / "a.db")
    assert store.journal_mode() == "wal"
    assert store.add_items(make_pairs(30), overlap=1.0, overlap_k=2) == 30
    assert store.add_items(make_pairs(30)) == 0  # same pairs again: nothing new
    alice = store.annotator_by_token(store.add_annotator("alice"))
    bob = store.annotator_by_token(store.add_annotator("bob"))
    first = store.current(alice)
    assert store.current(alice) == first  # the same item until it is answered
    # Every item needs two annotators here, so each one starts at the head of their own order.
    from rlhf_ray.studio.db import _order

    assert all(i["needed"] == 2 for i in store.items())
    ids = [i["id"] for i in store.items()]
    assert first["item_id"] == min(ids, key=lambda i: _order("alice", i))
    assert store.current(bob)["item_id"] == min(ids, key=lambda i: _order("bob", i))
    item = store.items()[first["item_id"] - 1]
    assert {first["left"], first["right"]} == {item["response_1"], item["response_2"]}
    store.judge(alice, first["item_id"], "A")
    with pytest.raises(Conflict):
        store.judge(alice, first["item_id"], "B")  # judged already: refused, not stored twice
    j = store.judgements()[0]
    assert j["choice"] == ("r1" if first["left"] == item["response_1"] else "r2")
    second = store.current(alice)
    assert store.undo(alice) == first["item_id"]
    assert store.current(alice)["item_id"] == first["item_id"]  # undone item comes back first
    store.judge(alice, first["item_id"], "tie")
    assert store.current(alice)["item_id"] == second["item_id"]
    assert len(store.judgements()) == 1 and len(store.judgements(include_undone=True)) == 2
    # each annotator has their own order
    orders = {}
    for name in ("carol", "dave"):
        who = store.annotator_by_token(store.add_annotator(name))
        seq = []
        for _ in range(8):
            cur = store.current(who)
            seq.append(cur["item_id"])
            store.judge(who, cur["item_id"], "skip")
        orders[name] = seq
    assert orders["carol"] != orders["dave"]


def test_items_meant_for_one_annotator_go_to_one(tmp_path):
    store = Store(tmp_path / "a.db")
    store.add_items(make_pairs(10), overlap=0.0)
    store.add_items([Pair("gold?", "right", "wrong", gold="r1")])
    seen = Counter()
    for name in ("a", "b", "c"):
        who = store.annotator_by_token(store.add_annotator(name))
        while (cur := store.current(who)) is not None:
            seen[cur["item_id"]] += 1
            store.judge(who, cur["item_id"], "A")
    gold_id = next(it["id"] for it in store.items() if it["gold"])
    assert seen.pop(gold_id) == 3  # gold items: everyone
    assert set(seen.values()) == {1} and len(seen) == 10


# --- agreement statistics, worked out by hand ------------------------------------------------------

# Ten items labelled by two annotators (canonical labels: r1 / r2 better, tie):
#   x: r1 r1 r1 r1 r1 r2 r2 r2  r2  tie
#   y: r1 r1 r1 r1 r2 r2 r2 r2  tie tie
# Observed agreement 8/10. Cohen: marginals x (r1 5, r2 4, tie 1), y (4, 4, 2);
#   p_e = (5*4 + 4*4 + 1*2)/100 = 0.38; kappa = (0.8 - 0.38)/(1 - 0.38) = 21/31.
# Krippendorff (nominal, 20 values: r1 9, r2 8, tie 3): D_o = 4 off-diagonal coincidences / 20 = 0.2;
#   D_e = (20^2 - (81 + 64 + 9)) / (20 * 19) = 246/380; alpha = 1 - 0.2 * 380/246 = 85/123.
X = ["r1"] * 5 + ["r2"] * 4 + ["tie"]
Y = ["r1"] * 4 + ["r2"] * 4 + ["tie"] * 2


def test_kappa_and_alpha_match_the_hand_computation(tmp_path):
    store = Store(tmp_path / "a.db")
    store.add_items(make_pairs(10), overlap=1.0, overlap_k=2)
    label_all(store, "x", {i + 1: lab for i, lab in enumerate(X)})
    label_all(store, "y", {i + 1: lab for i, lab in enumerate(Y)})
    s = compute_stats(store)
    (pair,) = s["pairs"]
    assert pair["items"] == 10 and pair["raw_agreement"] == pytest.approx(0.8)
    assert pair["cohen_kappa"] == pytest.approx(21 / 31)
    assert s["krippendorff_alpha"] == pytest.approx(85 / 123)
    assert s["annotators"]["x"]["majority_agreement"] == pytest.approx(0.8)  # the other one is the majority
    left = sum(j["shown_choice"] == "A" for j in store.judgements())
    decisive = sum(j["shown_choice"] in ("A", "B") for j in store.judgements())
    assert s["position_bias"]["left_rate"] == pytest.approx(left / decisive)


def test_gold_accuracy_majority_and_export(tmp_path):
    store = Store(tmp_path / "a.db")
    store.add_items(make_pairs(4), overlap=1.0, overlap_k=3)  # items 1-4, three annotators each
    store.add_items([Pair(f"g{i}", "right", f"wrong{i}", gold="r1") for i in range(3)])  # items 5-7
    # item 1: r1 r1 r2 (2/3); item 2: r2 r2 r2; item 3: tie tie r1; item 4: r1 r2 bad (no majority)
    labels = {"u": ["r1", "r2", "tie", "r1", "r1", "r1", "r2"],
              "v": ["r1", "r2", "tie", "r2", "r1", "r1", "r1"],
              "w": ["r2", "r2", "r1", "bad", "r1", "r2", "r2"]}
    for name, labs in labels.items():
        label_all(store, name, {i + 1: lab for i, lab in enumerate(labs)})
    s = compute_stats(store)
    assert s["annotators"]["u"]["gold_accuracy"] == pytest.approx(2 / 3)
    assert s["annotators"]["w"]["gold_accuracy"] == pytest.approx(1 / 3)
    # u vs the others' majority: item1 (v,w split: none), 2 r2 ok, 3 (tie/r1 split) none,
    # 4 (r2/bad) none, 5 r1 ok, 6 (r1/r2) none, 7 (r1/r2) none -> 2 of 2
    assert s["annotators"]["u"]["majority_agreement"] == 1.0 and s["annotators"]["u"]["majority_items"] == 2
    out = tmp_path / "prefs.jsonl"
    r = export_preferences(store, out, min_agreement=0.6)
    # kept: 1 (r1, 2/3), 2 (r2, 3/3), 5 (r1, 3/3), 6 (r1, 2/3), 7 (r2, 2/3); left out: 3 tie, 4 no majority
    assert r["written"] == 5 and r["left_out"] == {"tie": 1, "no majority": 1}
    pairs, _ = load_preferences(str(out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert pairs[0].chosen == "0" and rows[0]["votes"] == 3 and rows[0]["agreement"] == pytest.approx(0.6667)
    assert pairs[1].chosen == "3"  # item 2: response_2 won
    r = export_preferences(store, out, min_agreement=0.9, include_gold=False)
    assert r["written"] == 1 and r["left_out"]["below min agreement"] == 1 and r["left_out"]["gold left out"] == 3


# --- the HTTP API ---------------------------------------------------------------------------------

def request(url: str, token: str | None = None, body=None, raw: bytes | None = None):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if token:
        req.add_header("X-Studio-Token", token)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture
def live(tmp_path):
    store = Store(tmp_path / "a.db")
    store.add_items(make_pairs(5))
    token = store.add_annotator("alice")
    server = make_server(StudioApp(store=store), "127.0.0.1", 0)
    serve_in_thread(server)
    yield url_of(server, ""), token, store
    server.shutdown()
    server.server_close()


def test_api_needs_a_token_limits_bodies_and_serves_pages(live):
    base, token, store = live
    assert request(base + "/api/next")[0] == 401
    assert request(base + "/api/next", "wrong")[0] == 401
    assert request(base + "/api/judge", None, {"item_id": 1, "choice": "A"})[0] == 401
    assert request(base + "/api/stats", token)[0] == 401  # annotators are not admins
    status, nxt = request(base + "/api/next", token)
    assert status == 200 and nxt["progress"] == {"done": 0, "left": 5}
    assert request(base + "/api/judge", token, {"item_id": nxt["item"]["item_id"], "choice": "maybe"})[0] == 400
    big = {"item_id": nxt["item"]["item_id"], "choice": "A", "comment": "x" * 70_000}
    assert request(base + "/api/judge", token, big)[0] == 413
    ok = {"item_id": nxt["item"]["item_id"], "choice": "A", "ratings": {"honesty": {"A": 5, "B": 2}}}
    assert request(base + "/api/judge", token, ok)[0] == 200
    assert request(base + "/api/judge", token, ok)[0] == 409
    assert json.loads(store.judgements()[0]["ratings"])["honesty"] in ({"r1": 5, "r2": 2}, {"r2": 5, "r1": 2})
    with urllib.request.urlopen(base + "/", timeout=10) as r:
        assert "script-src 'self'" in r.headers["Content-Security-Policy"]
        assert b"annotate.js" in r.read()


def raw_exchange(base: str, head: bytes, body: bytes = b"", wait_s: float = 5.0) -> bytes:
    """Sends bytes as they are (no client-side checks) and returns what the server answers."""
    import socket
    from urllib.parse import urlsplit

    u = urlsplit(base)
    with socket.create_connection((u.hostname, u.port), timeout=wait_s) as sock:
        sock.sendall(head + body)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def test_bodies_are_read_only_for_valid_tokens_and_lengths(live):
    """A client without a token cannot make the server read (and hold) a body; a negative length
    no longer reads to the end of the stream."""
    base, token, _ = live
    # Announces 200 MB and sends 1 KiB: refused at once, unread, and the connection closed.
    answer = raw_exchange(base, b"POST /api/judge HTTP/1.1\r\nHost: x\r\nContent-Length: 209715200\r\n\r\n",
                          b"x" * 1024)
    assert answer.startswith((b"HTTP/1.0 401", b"HTTP/1.1 401")), answer[:80]
    for length in (b"-1", b"abc", b"1e3"):
        answer = raw_exchange(base, b"POST /api/judge HTTP/1.1\r\nHost: x\r\nX-Studio-Token: " + token.encode()
                              + b"\r\nContent-Length: " + length + b"\r\n\r\n", b'{"item_id": 1}')
        assert b" 400 " in answer.split(b"\r\n")[0] and b"bad Content-Length" in answer, (length, answer[:200])


@pytest.mark.parametrize("body", [
    b'{"item_id": 1.9, "choice": "A"}', b'{"item_id": true, "choice": "A"}', b'{"item_id": "1", "choice": "A"}',
    b'{"item_id": Infinity, "choice": "A"}', b'{"item_id": NaN, "choice": "A"}',
    b'{"item_id": 1, "choice": "A", "ratings": {"honesty": {"A": true, "B": 2}}}',
    b'{"item_id": 1, "choice": "A", "ratings": {"honesty": {"A": 4.5, "B": 2}}}',
    b"[" * 100_00 + b"]" * 100_00,
])
def test_values_of_the_wrong_type_are_refused(live, body):
    base, token, store = live
    status, answer = request(base + "/api/judge", token, raw=body)
    assert status == 400 and "error" in answer, (status, answer)
    assert store.judgements() == []


def test_an_internal_error_does_not_leak_its_text(live, monkeypatch, caplog):
    base, token, store = live

    def broken(who):
        raise RuntimeError("secret path /srv/db and token abc")

    monkeypatch.setattr(store, "progress", broken)
    status, answer = request(base + "/api/next", token)
    assert status == 500 and answer == {"error": "internal error (see the server's log)"}
    assert "secret path" in caplog.text  # kept for the operator, in the server's log


def test_idle_connections_time_out_and_threads_are_capped(tmp_path, monkeypatch):
    import socket

    from rlhf_ray.studio import server as studio_server

    monkeypatch.setattr(studio_server._Handler, "timeout", 3.0)
    monkeypatch.setattr(studio_server.StudioServer, "max_threads", 2)
    srv = make_server(StudioApp(store=Store(tmp_path / "a.db")), "127.0.0.1", 0)
    serve_in_thread(srv)
    host, port = srv.server_address[:2]
    try:
        # Accepted in order from the listen queue: the two idle clients take both slots first.
        idle = [socket.create_connection((host, port), timeout=30) for _ in range(2)]
        third = raw_exchange(url_of(srv, ""), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert third.startswith(b"HTTP/1.1 503"), third[:60]
        for sock in idle:  # the server hangs up on them after its idle timeout
            assert sock.recv(1) == b""
            sock.close()
        deadline = time.monotonic() + 30  # until the handler threads have given their slots back
        while True:
            after = raw_exchange(url_of(srv, ""), b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            if not after.startswith(b"HTTP/1.1 503") or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert after.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")), after[:60]
    finally:
        srv.shutdown()
        srv.server_close()


def test_the_database_is_private_and_keeps_no_token(tmp_path):
    """Mode 0600 (it holds who labelled what) and token hashes only; an older database with tokens
    in clear text is converted in place and its links keep working."""
    import sqlite3
    import stat

    db = tmp_path / "a.db"
    store = Store(db)
    token = store.add_annotator("alice")
    store.conn.execute("PRAGMA wal_checkpoint")
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    for name in os.listdir(tmp_path):
        assert token.encode() not in (tmp_path / name).read_bytes(), name
    assert store.annotator_by_token(token)["name"] == "alice" and store.annotator_by_token("nope") is None
    again = store.add_annotator("alice")  # a new link for the name: the old one stops working
    assert store.annotator_by_token(again)["name"] == "alice" and store.annotator_by_token(token) is None
    assert store.annotators() == [{"id": 1, "name": "alice"}]
    store.close()
    # A database from before: a clear-text token and a stored admin token.
    old = tmp_path / "old.db"
    conn = sqlite3.connect(old)
    conn.executescript(__import__("rlhf_ray.studio.db", fromlist=["SCHEMA"]).SCHEMA)
    conn.execute("INSERT INTO annotators(name, token, created_at) VALUES ('bob', 'plain-token', 0)")
    conn.execute("INSERT INTO meta(key, value) VALUES ('admin_token', 'plain-admin')")
    conn.commit()
    conn.close()
    old.chmod(0o644)
    converted = Store(old)
    assert converted.annotator_by_token("plain-token")["name"] == "bob"
    assert converted.meta("admin_token") is None and stat.S_IMODE(old.stat().st_mode) == 0o600
    converted.conn.execute("PRAGMA wal_checkpoint")
    assert b"plain-token" not in old.read_bytes() and b"plain-admin" not in old.read_bytes()
    assert Store(old).annotator_by_token("plain-token")["name"] == "bob"  # converted once only


def test_refuses_non_loopback_unless_asked(tmp_path):
    app = StudioApp(store=None, run_dir=str(tmp_path))
    with pytest.raises(ValueError, match="not a loopback"):
        make_server(app, "0.0.0.0", 0)
    make_server(app, "0.0.0.0", 0, allow_remote=True).server_close()


# --- kill and restart -----------------------------------------------------------------------------

def start_server(db: Path, *args: str, annotators: str = "alice") -> tuple[subprocess.Popen, str, dict]:
    """``annotate serve --db DB ARGS`` in a subprocess; returns it, its base URL and the tokens of
    the annotators it made now, by name (an annotator made before gets no new link)."""
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_ray.studio", "annotate", "serve", "--db", str(db), *args,
                             "--annotators", annotators, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    base, tokens = None, {}
    for line in proc.stdout:
        if line.startswith("listening on "):
            base = line.split()[2].rstrip("/")
        elif "/?token=" in line:
            name, link = line.strip().split(": ", 1)
            tokens[name] = link.split("token=")[1]
        elif line.strip().startswith("stats:"):
            return proc, base, tokens
    raise AssertionError(f"server did not start: rc={proc.wait()}")


def test_sigkill_loses_no_judgement_and_restart_resumes(tmp_path):
    pairs = write_jsonl(tmp_path / "c.jsonl", [{"prompt": f"p{i}", "responses": [f"a{i}", f"b{i}"]}
                                                for i in range(12)])
    db = tmp_path / "a.db"
    proc, base, tokens = start_server(db, "--pairs", str(pairs))
    token = tokens["alice"]
    judged = []
    try:
        for k in range(6):
            item = request(base + "/api/next", token)[1]["item"]
            assert request(base + "/api/judge", token, {"item_id": item["item_id"],
                                                        "choice": ["A", "B", "tie"][k % 3]})[0] == 200
            judged.append(item["item_id"])
        on_screen = request(base + "/api/next", token)[1]["item"]
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert Counter(j["item_id"] for j in Store(db).judgements()) == Counter(judged)
    proc, base, tokens = start_server(db, "--pairs", str(pairs))
    try:
        assert tokens == {}  # alice exists: her link is not shown again (only its hash is stored) ...
        _, nxt = request(base + "/api/next", token)  # ... and still works
        assert nxt["item"] == on_screen and nxt["progress"] == {"done": 6, "left": 6}
    finally:
        proc.terminate()
        proc.wait()


# --- load -----------------------------------------------------------------------------------------

def test_twenty_clients_lose_and_duplicate_nothing(tmp_path, capsys):
    from rlhf_ray.studio.loadtest import run_clients

    store = Store(tmp_path / "a.db")
    store.add_items(make_pairs(300), overlap=0.3, overlap_k=3)
    tokens = [store.add_annotator(f"annotator{k:02d}") for k in range(20)]
    server = make_server(StudioApp(store=store), "127.0.0.1", 0)
    serve_in_thread(server)
    try:
        res = run_clients(url_of(server, ""), tokens, per_client=15, duplicate_rate=0.2)
    finally:
        server.shutdown()
        server.server_close()
    assert res["errors"] == []
    stored = Store(tmp_path / "a.db").judgements()
    by_token = {t: f"annotator{k:02d}" for k, t in enumerate(tokens)}
    assert Counter((j["annotator"], j["item_id"]) for j in stored) == \
        Counter((by_token[t], i) for t, i in res["accepted_keys"])  # nothing lost, nothing doubled
    assert res["accepted"] == 300 and res["duplicates_refused"] == res["duplicates_sent"] > 0
    needed = {it["id"]: it["needed"] for it in store.items()}
    per_item = Counter(j["item_id"] for j in stored)
    assert all(n <= needed[i] for i, n in per_item.items())
    with capsys.disabled():
        print(f"\n[load] 20 clients: {res['accepted']} judgements, {res['duplicates_sent']} duplicates refused, "
              f"{res['seconds']:.2f}s, {res['judgements_per_s']:.0f} judgements/s")
