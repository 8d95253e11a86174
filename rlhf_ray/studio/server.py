"""The studio's HTTP server: standard library ``ThreadingHTTPServer``, JSON API, static pages.

Pages (``/`` labelling, ``/stats``, ``/view``) are static shells; everything they show comes from
the JSON API and is put on the page as text (``textContent``), never as markup, and a
Content-Security-Policy allowing only the studio's own scripts backs that up.

Auth: every ``/api/`` call carries a token in the ``X-Studio-Token`` header (the pages take it
from the ``?token=`` of their link). Annotator tokens open the labelling API; the admin token
(made at each server start, printed by ``serve``/``view``, never stored) opens the stats and
run-viewer API. A
missing or unknown token gets 401 before any body is read. Request bodies over ``max_body`` bytes
(or with a malformed length) are refused unread; idle connections time out and at most
``StudioServer.max_threads`` are served at once. Errors reach the client as a message, never as
exception text. The server binds loopback addresses only unless ``allow_remote=True``.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import secrets
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

from rlhf_ray.studio.db import SHOWN_CHOICES, Conflict, Store

log = logging.getLogger(__name__)
DEFAULT_CRITERIA = ("helpfulness", "harmlessness", "honesty")
MAX_BODY = 64 * 1024
STATIC = {"studio.css": "text/css", "annotate.js": "text/javascript", "stats.js": "text/javascript",
          "view.js": "text/javascript", "common.js": "text/javascript"}
PAGES = {"/": "annotate.html", "/annotate": "annotate.html", "/stats": "stats.html", "/view": "view.html"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class StudioApp:
    """What the server serves: an annotation store and/or a run directory."""

    store: Store | None = None
    run_dir: str | None = None
    criteria: tuple[str, ...] = DEFAULT_CRITERIA
    guidelines: str = ""
    max_body: int = MAX_BODY
    admin_token: str = field(default="")

    def __post_init__(self):
        if not self.admin_token:  # one per server start, kept in memory only
            self.admin_token = secrets.token_urlsafe(18)
        self._send_lock = threading.Lock()

    # --- auth ----------------------------------------------------------------------------------
    def annotator(self, token: str | None) -> dict:
        if self.store is None:
            raise HTTPError(404, "this server has no annotation database")
        who = self.store.annotator_by_token(token)
        if who is None:
            raise HTTPError(401, "a valid annotator token is needed (the link you were given)")
        return who

    def knows(self, token: str | None) -> bool:
        """Whether ``token`` opens any part of the API (checked before a request body is read)."""
        if not token:
            return False
        if secrets.compare_digest(token, self.admin_token):
            return True
        return self.store is not None and self.store.annotator_by_token(token) is not None

    def admin(self, token: str | None) -> None:
        if not token or not secrets.compare_digest(token, self.admin_token):
            raise HTTPError(401, "a valid admin token is needed (printed when the server started)")

    # --- the API -------------------------------------------------------------------------------
    def handle(self, method: str, path: str, token: str | None, body: dict | None) -> dict:
        route = (method, path)
        if route == ("GET", "/api/me"):
            who = self.annotator(token)
            return {"name": who["name"], "criteria": list(self.criteria), "choices": list(SHOWN_CHOICES),
                    "has_guidelines": bool(self.guidelines), "progress": self.store.progress(who)}
        if route == ("GET", "/api/next"):
            who = self.annotator(token)
            return {"item": self.store.current(who), "progress": self.store.progress(who)}
        if route == ("POST", "/api/judge"):
            who = self.annotator(token)
            body = body or {}
            item_id = body.get("item_id")
            if not _is_whole(item_id):
                raise HTTPError(400, "item_id must be a whole number")
            choice = body.get("choice")
            if choice not in SHOWN_CHOICES:
                raise HTTPError(400, f"choice must be one of {', '.join(SHOWN_CHOICES)}")
            ratings = body.get("ratings") or {}
            if not isinstance(ratings, dict) or any(c not in self.criteria or not isinstance(v, dict)
                                                    for c, v in ratings.items()):
                raise HTTPError(400, f"ratings must map criteria ({', '.join(self.criteria)}) to {{A, B}} scores")
            for v in ratings.values():
                if any(k not in ("A", "B") or not (_is_whole(x) and 1 <= x <= 5) for k, x in v.items()):
                    raise HTTPError(400, "ratings are whole numbers from 1 to 5 for A and B")
            comment = body.get("comment") or ""
            if not isinstance(comment, str) or len(comment) > 10_000:
                raise HTTPError(400, "comment must be text of at most 10000 characters")
            try:
                jid = self.store.judge(who, item_id, choice, ratings, comment)
            except Conflict as e:
                raise HTTPError(409, str(e)) from None
            return {"judgement_id": jid, "progress": self.store.progress(who)}
        if route == ("POST", "/api/undo"):
            who = self.annotator(token)
            return {"undone_item": self.store.undo(who), "progress": self.store.progress(who)}
        if route == ("GET", "/api/guidelines"):
            if self.store is None or self.store.annotator_by_token(token) is None:
                self.admin(token)
            return {"text": self.guidelines}
        if route == ("GET", "/api/stats"):
            self.admin(token)
            if self.store is None:
                raise HTTPError(404, "this server has no annotation database")
            from rlhf_ray.studio.stats import compute_stats

            return compute_stats(self.store)
        if path.startswith("/api/run/"):
            self.admin(token)
            if self.run_dir is None:
                raise HTTPError(404, "this server shows no run directory")
            from rlhf_ray.studio import runview

            if route == ("GET", "/api/run/metrics"):
                return {"run_dir": self.run_dir, "metrics": runview.read_metrics(self.run_dir)}
            if route == ("GET", "/api/run/samples"):
                return {"run_dir": self.run_dir, "samples": runview.read_samples(self.run_dir),
                        "can_send": self.store is not None}
            if route == ("POST", "/api/run/send"):
                return self.send_samples((body or {}).get("ids"))
        raise HTTPError(404, f"no such API: {method} {path}")

    def send_samples(self, ids) -> dict:
        """Chosen run samples -> items of the annotation database (see ``runview.samples_to_pairs``)."""
        from rlhf_ray.studio import runview

        if self.store is None:
            raise HTTPError(409, "start the viewer with --db to send samples to an annotation set")
        if not isinstance(ids, list) or not ids or not all(_is_whole(i) for i in ids):
            raise HTTPError(400, "ids must be a non-empty list of sample ids")
        samples = {s["id"]: s for s in runview.read_samples(self.run_dir)}
        missing = [i for i in ids if i not in samples]
        if missing:
            raise HTTPError(400, f"no samples with ids {missing[:5]}")
        pairs, alone = runview.samples_to_pairs([samples[i] for i in ids], self.run_dir)
        with self._send_lock:
            added = self.store.add_items(pairs) if pairs else 0
        return {"pairs": len(pairs), "added": added, "left_alone": alone}


def _is_whole(value) -> bool:
    """A JSON whole number: 3, not 3.0, 1.9, true or "3" (Python counts bools as ints)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _is_loopback(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


class _Handler(BaseHTTPRequestHandler):
    server_version = "rlhf-ray-studio"
    app: StudioApp  # set on the subclass made per server
    quiet = True
    timeout = 30  # seconds a connection may sit idle (a slow or stalled client holds no thread for long)

    def log_message(self, format, *args):
        if not self.quiet:
            super().log_message(format, *args)

    def _send(self, status: int, payload: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj, ensure_ascii=False).encode(), "application/json; charset=utf-8")

    def _token(self) -> str | None:
        token = self.headers.get("X-Studio-Token")
        auth = self.headers.get("Authorization", "")
        if not token and auth.startswith("Bearer "):
            token = auth[7:].strip()
        return token or None

    def _body(self) -> dict | None:
        length = self.headers.get("Content-Length")
        if length is None:
            raise HTTPError(411, "a Content-Length header is needed")
        if not length.isdigit():  # also refuses "-1", which would read to the end of the stream
            self.close_connection = True
            raise HTTPError(400, "bad Content-Length")
        n = int(length)
        if n > self.app.max_body:
            self.close_connection = True  # the unread body must not be parsed as the next request
            raise HTTPError(413, f"request body over {self.app.max_body} bytes")
        raw = self.rfile.read(n) if n else b""
        if not raw:
            return None
        try:
            body = json.loads(raw, parse_constant=_no_constant)  # no NaN or Infinity
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise HTTPError(400, "the body must be JSON") from None
        if not isinstance(body, dict):
            raise HTTPError(400, "the body must be a JSON object")
        return body

    def _dispatch(self, method: str) -> None:
        path = urlsplit(self.path).path
        try:
            if path.startswith("/api/"):
                token = self._token()
                if not self.app.knows(token):  # before reading a byte of the body
                    self.close_connection = True
                    raise HTTPError(401, "a valid token is needed (the link you were given)")
                body = self._body() if method == "POST" else None
                self._json(200, self.app.handle(method, path, token, body))
            elif method in ("GET", "HEAD") and path in PAGES:
                self._static(PAGES[path], "text/html; charset=utf-8")
            elif method in ("GET", "HEAD") and path.startswith("/static/") and path[8:] in STATIC:
                self._static(path[8:], STATIC[path[8:]] + "; charset=utf-8")
            else:
                raise HTTPError(404, "not found")
        except HTTPError as e:
            self._json(e.status, {"error": e.message})
        except Exception:
            log.exception("studio: %s %s failed", method, path)
            self._json(500, {"error": "internal error (see the server's log)"})

    def _static(self, name: str, ctype: str) -> None:
        self._send(200, resources.files("rlhf_ray.studio").joinpath("static", name).read_bytes(), ctype)

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")


class StudioServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64
    max_threads = 32  # connections served at once; more are answered 503 and closed

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(self.max_threads)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def make_server(app: StudioApp, host: str = "127.0.0.1", port: int = 8000, allow_remote: bool = False,
                quiet: bool = True) -> StudioServer:
    """The server, bound (``port=0``: any free port); refuses a non-loopback ``host`` unless
    ``allow_remote``."""
    _refuse_remote(host, allow_remote)
    handler = type("StudioHandler", (_Handler,), {"app": app, "quiet": quiet})
    return StudioServer((host, port), handler)


def _refuse_remote(host: str, allow_remote: bool) -> None:
    if not allow_remote and not _is_loopback(host):
        raise ValueError(f"refusing to bind {host!r}, which is not a loopback address; the studio has "
                         "no TLS and its links carry tokens. Pass --allow-remote to bind it anyway.")


def check_listen_address(host: str, port: int, allow_remote: bool) -> None:
    """What ``make_server`` would refuse, and a port out of range or taken, checked before a
    command writes anything (the server binds only later, once its database is set up)."""
    _refuse_remote(host, allow_remote)
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535 (0: any free port); got {port}")
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server itself binds
        try:
            probe.bind((host, port))
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None


def url_of(server: StudioServer, path: str = "/", token: str | None = None) -> str:
    host, port = server.server_address[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}{path}" + (f"?token={token}" if token else "")


def serve_in_thread(server: StudioServer) -> threading.Thread:
    t = threading.Thread(target=server.serve_forever, name="studio-server", daemon=True)
    t.start()
    return t


def read_guidelines(path: str | None) -> str:
    return Path(path).read_text(encoding="utf-8") if path else ""
