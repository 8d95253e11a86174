"""A bounded load test of the labelling API: N clients on loopback, each an annotator labelling
in a loop (next item -> judgement), some judgements sent twice on purpose. Used by the tests;
``python -m rlhf_ray.studio.loadtest URL TOKEN...`` runs it against a live server."""

from __future__ import annotations

import http.client
import json
import random
import sys
import threading
import time
from urllib.parse import urlsplit


def _call(conn: http.client.HTTPConnection, method: str, path: str, token: str, body=None):
    data = None if body is None else json.dumps(body).encode()
    headers = {"X-Studio-Token": token}
    if data is not None:
        headers["Content-Type"] = "application/json"
    conn.request(method, path, body=data, headers=headers)
    r = conn.getresponse()
    return r.status, json.loads(r.read() or b"{}")


def run_clients(base_url: str, tokens: list[str], per_client: int, duplicate_rate: float = 0.1,
                seed: int = 0) -> dict:
    """Each token's client makes up to ``per_client`` judgements. Returns counts: ``accepted``
    (200s to /api/judge), ``duplicates_sent`` and ``duplicates_refused`` (409s), ``errors`` (any
    other status or exception), the (annotator token, item id) of every accepted judgement,
    ``seconds`` and ``judgements_per_s``."""
    u = urlsplit(base_url)
    lock = threading.Lock()
    out = {"accepted": 0, "duplicates_sent": 0, "duplicates_refused": 0, "errors": [], "accepted_keys": []}
    choices = ["A", "B", "tie", "bad", "skip"]

    def client(k: int, token: str) -> None:
        rng = random.Random(seed * 1000 + k)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
        try:
            for _ in range(per_client):
                status, nxt = _call(conn, "GET", "/api/next", token)
                if status != 200:
                    raise RuntimeError(f"next: {status} {nxt}")
                if nxt["item"] is None:
                    break
                body = {"item_id": nxt["item"]["item_id"], "choice": rng.choice(choices)}
                status, r = _call(conn, "POST", "/api/judge", token, body)
                if status != 200:
                    raise RuntimeError(f"judge: {status} {r}")
                with lock:
                    out["accepted"] += 1
                    out["accepted_keys"].append((token, body["item_id"]))
                if rng.random() < duplicate_rate:
                    status, r = _call(conn, "POST", "/api/judge", token, body)
                    with lock:
                        out["duplicates_sent"] += 1
                        out["duplicates_refused"] += status == 409
                        if status != 409:
                            out["errors"].append(f"duplicate answered {status}")
        except Exception as e:  # noqa: BLE001 - counted, the test fails on it
            with lock:
                out["errors"].append(f"client {k}: {type(e).__name__}: {e}")
        finally:
            conn.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k, t)) for k, t in enumerate(tokens)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out["seconds"] = time.perf_counter() - start
    out["judgements_per_s"] = out["accepted"] / out["seconds"] if out["seconds"] else None
    return out


if __name__ == "__main__":
    res = run_clients(sys.argv[1], sys.argv[2:], per_client=20)
    res.pop("accepted_keys")
    print(json.dumps(res, indent=2))
