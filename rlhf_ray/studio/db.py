"""The annotation store: one SQLite file in WAL mode.

Tables: ``items`` (a prompt and two responses in a fixed canonical order, ``response_1`` /
``response_2``; ``needed`` = how many annotators should see it; ``gold`` = the known better one),
``annotators`` (name, SHA-256 of the token: the token itself is shown once, never stored), ``assignments`` (an item handed to an annotator, with ``flipped`` =
whether the page showed ``response_2`` on the left, so position bias can be measured), and
``judgements``.

Every judgement is its own committed transaction (``synchronous=FULL``), so a killed server loses
nothing already answered. A partial unique index allows one live judgement per (annotator, item):
a repeated or concurrent POST for an item already judged is refused, never stored twice. Undo marks
the annotator's last judgement ``undone_at`` (kept for the record) and puts the item back in front.

Choices as the annotator sees them: ``A`` (left better), ``B`` (right better), ``tie``, ``bad``
(both bad), ``skip``. Stored as both the shown choice and the canonical one (``r1``, ``r2``, ``tie``,
``bad``, ``skip``), mapped through ``flipped``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
import sqlite3
import threading
import time
from pathlib import Path

from rlhf_ray.studio.pairs import Pair

SHOWN_CHOICES = ("A", "B", "tie", "bad", "skip")
ALL_ANNOTATORS = 1_000_000  # ``needed`` of gold items: everybody sees them

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    prompt TEXT NOT NULL,
    response_1 TEXT NOT NULL,
    response_2 TEXT NOT NULL,
    needed INTEGER NOT NULL DEFAULT 1,
    gold TEXT,
    source TEXT NOT NULL DEFAULT '',
    meta TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS annotators (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS assignments (
    id INTEGER PRIMARY KEY,
    annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    item_id INTEGER NOT NULL REFERENCES items(id),
    flipped INTEGER NOT NULL,
    shown_at REAL NOT NULL,
    UNIQUE (annotator_id, item_id)
);
CREATE INDEX IF NOT EXISTS assignments_item ON assignments(item_id);
CREATE TABLE IF NOT EXISTS judgements (
    id INTEGER PRIMARY KEY,
    annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    item_id INTEGER NOT NULL REFERENCES items(id),
    shown_choice TEXT NOT NULL,
    choice TEXT NOT NULL,
    flipped INTEGER NOT NULL,
    ratings TEXT NOT NULL DEFAULT '{}',
    comment TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    undone_at REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS one_live_judgement
    ON judgements(annotator_id, item_id) WHERE undone_at IS NULL;
"""


class Conflict(Exception):
    """The request clashes with what is stored (the item is already judged, or not assigned)."""


def item_key(prompt: str, a: str, b: str) -> str:
    """Identity of a pair regardless of the order of its two responses (re-imports add nothing)."""
    lo, hi = sorted((a, b))
    return hashlib.sha256(json.dumps([prompt, lo, hi]).encode()).hexdigest()


def _order(seed: str, item_id: int) -> str:
    """Each annotator's own item order: a hash of (annotator, item)."""
    return hashlib.sha1(f"{seed}:{item_id}".encode()).hexdigest()


def canonical(shown: str, flipped: bool) -> str:
    if shown == "A":
        return "r2" if flipped else "r1"
    if shown == "B":
        return "r1" if flipped else "r2"
    return shown


def _token_hash(token: str) -> str:
    """What the database keeps of a token (tokens are 144 random bits: a plain hash suffices)."""
    return hashlib.sha256(token.encode()).hexdigest()


def _owner_only(path: Path) -> None:
    """Creates ``path`` with mode 0600 if it is new, else tightens it: it holds who labelled what."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        path.chmod(0o600)


SQLITE_HEADER = b"SQLite format 3\0"


def _check_database_file(path: Path, create: bool) -> None:
    """Refuses, before anything is created or changed, a missing database that is not to be made
    and a file that is not SQLite (an empty file is a new database to SQLite)."""
    if not path.exists():
        if not create:
            raise FileNotFoundError(f"annotation database {path} does not exist "
                                    f"(`rlhf-ray annotate serve --db {path} --pairs ...` makes one)")
        return
    if not path.is_file():
        raise ValueError(f"annotation database {path} is not a file")
    with open(path, "rb") as f:
        head = f.read(len(SQLITE_HEADER))
    if head and head != SQLITE_HEADER:
        raise ValueError(f"{path} is not an annotation database (not an SQLite file)")


class Store:
    """Thread-safe access to one annotation database (one connection, one lock: writes are tiny)."""

    def __init__(self, path: str | Path, create: bool = True):
        """``create=False``: the database must exist (commands that only read or add to one)."""
        self.path = str(path)
        _check_database_file(Path(self.path), create)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        _owner_only(Path(self.path))  # before SQLite opens it: its -wal and -shm files take the same mode
        self.lock = threading.RLock()
        self.conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("PRAGMA foreign_keys=ON")
        self.conn.create_function("studio_order", 2, _order, deterministic=True)
        with self.lock:
            self.conn.executescript(SCHEMA)
            self._hash_stored_tokens()

    def _hash_stored_tokens(self) -> None:
        """Databases written before tokens were hashed hold them in clear text: hash them in place
        (the links already given keep working) and drop the stored admin token (each server start
        makes its own)."""
        if self.meta("token_storage") == "sha256":
            return
        with self._tx():
            for row in self.conn.execute("SELECT id, token FROM annotators").fetchall():
                self.conn.execute("UPDATE annotators SET token=? WHERE id=?", (_token_hash(row[1]), row[0]))
            self.conn.execute("DELETE FROM meta WHERE key='admin_token'")
            self.conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('token_storage', 'sha256')")

    def close(self) -> None:
        with self.lock:
            self.conn.close()

    def journal_mode(self) -> str:
        return self.conn.execute("PRAGMA journal_mode").fetchone()[0]

    # --- setup ---------------------------------------------------------------------------------
    def _tx(self):
        return _Tx(self)

    def meta(self, key: str, default: str | None = None) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    def add_items(self, pairs: list[Pair], overlap: float = 0.0, overlap_k: int = 2, seed: int = 0) -> int:
        """Adds pairs not yet stored (same prompt and responses in either order = same item).

        A share ``overlap`` of the new items (drawn with ``seed``) is to be seen by ``overlap_k``
        annotators, for agreement; gold items by every annotator; the rest by one. Returns how many
        items were new.
        """
        rng = random.Random(seed)
        now, added = time.time(), 0
        with self._tx():
            for p in pairs:
                needed = ALL_ANNOTATORS if p.gold else (overlap_k if rng.random() < overlap else 1)
                cur = self.conn.execute(
                    "INSERT OR IGNORE INTO items(key, prompt, response_1, response_2, needed, gold, source, meta,"
                    " created_at) VALUES (?,?,?,?,?,?,?,?,?)",
                    (item_key(p.prompt, p.response_1, p.response_2), p.prompt, p.response_1, p.response_2,
                     needed, p.gold, p.source, json.dumps(p.meta), now))
                added += cur.rowcount
        return added

    def add_annotator(self, name: str) -> str:
        """A new token for ``name`` (created on first use); only its hash is stored, so a name that
        exists gets a new link and its old one stops working."""
        name = name.strip()
        if not name:
            raise ValueError("an annotator needs a name")
        token = secrets.token_urlsafe(18)
        with self._tx():
            self.conn.execute("INSERT INTO annotators(name, token, created_at) VALUES (?,?,?) "
                              "ON CONFLICT(name) DO UPDATE SET token=excluded.token",
                              (name, _token_hash(token), time.time()))
        return token

    def annotators(self) -> list[dict]:
        return [dict(r) for r in self.conn.execute("SELECT id, name FROM annotators ORDER BY id")]

    def annotator_by_token(self, token: str | None) -> dict | None:
        if not token:
            return None
        with self.lock:
            row = self.conn.execute("SELECT id, name FROM annotators WHERE token=?", (_token_hash(token),)).fetchone()
        return dict(row) if row else None

    # --- labelling -----------------------------------------------------------------------------
    def current(self, annotator: dict) -> dict | None:
        """The annotator's item on screen: the item of their last undone judgement, else their
        oldest unanswered assignment, else a new one.

        A new one is the first item in the annotator's own order that they have not had and that
        fewer than ``needed`` annotators have had. Claiming happens in one write transaction, so
        two annotators never both take an item meant for one.
        """
        aid = annotator["id"]
        with self._tx():
            row = self._open_assignment(aid)
            if row is None:
                pick = self.conn.execute(
                    "SELECT i.id FROM items i WHERE NOT EXISTS (SELECT 1 FROM assignments a WHERE"
                    " a.item_id=i.id AND a.annotator_id=?) AND (SELECT COUNT(*) FROM assignments a"
                    " WHERE a.item_id=i.id) < i.needed ORDER BY studio_order(?, i.id) LIMIT 1",
                    (aid, annotator["name"])).fetchone()
                if pick is None:
                    return None
                self.conn.execute("INSERT INTO assignments(annotator_id, item_id, flipped, shown_at)"
                                  " VALUES (?,?,?,?)", (aid, pick[0], secrets.randbelow(2), time.time()))
                row = self._open_assignment(aid)
        flipped = bool(row["flipped"])
        left, right = (row["response_2"], row["response_1"]) if flipped else (row["response_1"], row["response_2"])
        return {"item_id": row["item_id"], "prompt": row["prompt"], "left": left, "right": right}

    def _open_assignment(self, aid: int):
        return self.conn.execute(
            "SELECT a.item_id, a.flipped, i.prompt, i.response_1, i.response_2 FROM assignments a"
            " JOIN items i ON i.id=a.item_id WHERE a.annotator_id=? AND NOT EXISTS (SELECT 1 FROM"
            " judgements j WHERE j.annotator_id=a.annotator_id AND j.item_id=a.item_id AND j.undone_at"
            " IS NULL) ORDER BY (SELECT MAX(u.undone_at) FROM judgements u WHERE u.annotator_id=a.annotator_id AND"
            " u.item_id=a.item_id) DESC NULLS LAST, a.id LIMIT 1", (aid,)).fetchone()

    def judge(self, annotator: dict, item_id: int, shown_choice: str, ratings: dict | None = None,
              comment: str = "") -> int:
        """Stores one judgement, committed before returning; its id. ``Conflict`` when the item is
        not assigned to this annotator or already judged by them."""
        if shown_choice not in SHOWN_CHOICES:
            raise ValueError(f"choice must be one of {', '.join(SHOWN_CHOICES)}, got {shown_choice!r}")
        aid = annotator["id"]
        with self._tx():
            a = self.conn.execute("SELECT flipped FROM assignments WHERE annotator_id=? AND item_id=?",
                                  (aid, item_id)).fetchone()
            if a is None:
                raise Conflict(f"item {item_id} is not assigned to {annotator['name']}")
            flipped = bool(a[0])
            canon_ratings = {}
            for crit, vals in (ratings or {}).items():
                vals = {k: v for k, v in dict(vals).items() if k in ("A", "B") and v is not None}
                canon_ratings[str(crit)] = {canonical(k, flipped): int(v) for k, v in vals.items()}
            try:
                cur = self.conn.execute(
                    "INSERT INTO judgements(annotator_id, item_id, shown_choice, choice, flipped, ratings,"
                    " comment, created_at) VALUES (?,?,?,?,?,?,?,?)",
                    (aid, item_id, shown_choice, canonical(shown_choice, flipped), int(flipped),
                     json.dumps(canon_ratings), comment, time.time()))
            except sqlite3.IntegrityError:
                raise Conflict(f"item {item_id} is already judged by {annotator['name']}") from None
            return cur.lastrowid

    def undo(self, annotator: dict) -> int | None:
        """Takes back the annotator's last live judgement; the item it was about, or None."""
        with self._tx():
            row = self.conn.execute("SELECT id, item_id FROM judgements WHERE annotator_id=? AND undone_at IS NULL"
                                    " ORDER BY id DESC LIMIT 1", (annotator["id"],)).fetchone()
            if row is None:
                return None
            self.conn.execute("UPDATE judgements SET undone_at=? WHERE id=?", (time.time(), row[0]))
            return row[1]

    def progress(self, annotator: dict) -> dict:
        aid = annotator["id"]
        with self.lock:
            done = self.conn.execute("SELECT COUNT(*) FROM judgements WHERE annotator_id=? AND undone_at IS NULL",
                                     (aid,)).fetchone()[0]
            open_ = self.conn.execute(
                "SELECT COUNT(*) FROM assignments a WHERE a.annotator_id=? AND NOT EXISTS (SELECT 1 FROM"
                " judgements j WHERE j.annotator_id=a.annotator_id AND j.item_id=a.item_id AND j.undone_at IS NULL)",
                (aid,)).fetchone()[0]
            free = self.conn.execute(
                "SELECT COUNT(*) FROM items i WHERE NOT EXISTS (SELECT 1 FROM assignments a WHERE a.item_id=i.id"
                " AND a.annotator_id=?) AND (SELECT COUNT(*) FROM assignments a WHERE a.item_id=i.id) < i.needed",
                (aid,)).fetchone()[0]
        return {"done": done, "left": open_ + free}

    # --- reading everything back ---------------------------------------------------------------
    def items(self) -> list[dict]:
        with self.lock:
            return [dict(r) for r in self.conn.execute("SELECT * FROM items ORDER BY id")]

    def judgements(self, include_undone: bool = False) -> list[dict]:
        where = "" if include_undone else "WHERE j.undone_at IS NULL"
        with self.lock:
            return [dict(r) for r in self.conn.execute(
                "SELECT j.*, a.name AS annotator FROM judgements j JOIN annotators a ON a.id=j.annotator_id "
                f"{where} ORDER BY j.id")]


class _Tx:
    """``with store._tx():`` one IMMEDIATE transaction under the store's lock."""

    def __init__(self, store: Store):
        self.store = store

    def __enter__(self):
        self.store.lock.acquire()
        self.store.conn.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            self.store.conn.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.store.lock.release()
        return False
