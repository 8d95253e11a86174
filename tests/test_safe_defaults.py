"""Safe defaults: the remote reward endpoint (timeouts, retries, a size limit, a token that never
leaks), torch.load with weights_only=True, no remote code unless asked. (The local Ray's dashboard
on loopback only: tests/test_resume.py checks the driver it starts.)"""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

import pytest
import torch

from rlhf_ray.config import dump_config, load_config
from rlhf_ray.engines.http_reward import HttpRewardClient, RewardEndpointError

TOKEN_ENV = "RLHF_RAY_TEST_REWARD_TOKEN"
PROMPTS, RESPONSES = ["1+1=", "2+3=", "9-4="], ["2", "five", "5 5"]


def _client(server, *paths: str, **kwargs) -> HttpRewardClient:
    kwargs = {"timeout_s": 5.0, "retries": 2, "backoff_s": 0.01, "token_env": TOKEN_ENV, **kwargs}
    return HttpRewardClient(tuple(server.url(p) for p in paths), **kwargs)


def test_the_reward_actor_scores_through_the_endpoint_with_the_token(reward_server, monkeypatch):
    from rlhf_ray.actors.scorers import RewardActor
    from rlhf_ray.data.batch import RolloutBatch

    monkeypatch.setenv(TOKEN_ENV, reward_server.token)
    actor = RewardActor([], "mean", [], [], "cpu", 8, http=_client(reward_server, "/score"), http_weight=2.0)
    batch = RolloutBatch.from_token_lists([[1], [1], [1]], [[2], [3], [4]], 0)
    out = actor.score(batch, PROMPTS, RESPONSES)
    assert out["reward/http"].tolist() == pytest.approx([1.0, 0.0, 2 / 3])
    assert out["score"].tolist() == pytest.approx([2.0, 0.0, 4 / 3])
    assert reward_server.seen == [("/score", f"Bearer {reward_server.token}")]


def test_a_timeout_or_a_dead_url_is_retried_and_a_refusal_is_not(reward_server, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, reward_server.token)
    # The first answer stalls for a minute: only a client that gave up at its timeout and asked
    # again has its score now, after exactly two requests (no clock read: load cannot fail this).
    assert _client(reward_server, "/slow-first", timeout_s=2.0).score(PROMPTS, RESPONSES)[0] == 1.0
    assert [p for p, _ in reward_server.seen] == ["/slow-first", "/slow-first"]
    # Retries rotate over the URLs: a failing one is followed by the next.
    assert _client(reward_server, "/down", "/score").score(PROMPTS, RESPONSES)[1] == 0.0
    with pytest.raises(RewardEndpointError, match=r"failed 3 times \(retries=2\): .*/down: HTTP 503"):
        _client(reward_server, "/down").score(PROMPTS, RESPONSES)
    monkeypatch.setenv(TOKEN_ENV, "a-wrong-token")
    reward_server.seen.clear()
    with pytest.raises(RewardEndpointError, match=r"answered HTTP 401") as refused:
        _client(reward_server, "/score").score(PROMPTS, RESPONSES)
    assert len(reward_server.seen) == 1 and "a-wrong-token" not in str(refused.value)


@pytest.mark.parametrize("path", ["/big", "/big-unsized"])
def test_an_oversized_answer_is_refused(reward_server, monkeypatch, path):
    monkeypatch.setenv(TOKEN_ENV, reward_server.token)
    with pytest.raises(RewardEndpointError, match=r"answer of \d+ bytes or more, over "
                                                  r"scorers\.http\.max_response_bytes=1000"):
        _client(reward_server, path, max_response_bytes=1000).score(PROMPTS, RESPONSES)
    assert len(reward_server.seen) == 1  # not retried: a bigger answer will not get smaller


def test_the_token_is_never_logged_or_written(reward_server, monkeypatch, tmp_path, capsys, caplog):
    from rlhf_ray.stages.common import prepare_run

    monkeypatch.setenv(TOKEN_ENV, reward_server.token)
    caplog.set_level(logging.DEBUG)
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"scorers.http.urls=[{reward_server.url()}]",
                             f"scorers.http.token_env={TOKEN_ENV}"])
    prepare_run(cfg)
    from rlhf_ray.engines.http_reward import client_for

    client = client_for(cfg.scorers.http)
    client.score(PROMPTS, RESPONSES)
    with pytest.raises(RewardEndpointError) as failed:
        HttpRewardClient((reward_server.url("/down"),), retries=0, token_env=TOKEN_ENV).score(PROMPTS, RESPONSES)
    assert reward_server.seen[0][1] == f"Bearer {reward_server.token}"  # it did travel, in the header
    out = capsys.readouterr()
    texts = [dump_config(cfg), repr(client), str(failed.value), out.out, out.err, caplog.text,
             *(p.read_text() for p in (tmp_path / "run").rglob("*") if p.is_file())]
    assert TOKEN_ENV in dump_config(cfg)  # the config holds the variable's name ...
    assert not [t for t in texts if reward_server.token in t]  # ... and the token is nowhere


class RawEndpoint:
    """A socket server on 127.0.0.1 that answers every request with the same raw bytes, however
    malformed (a stand-in for a broken endpoint; http.server would not send such answers)."""

    def __init__(self, answer: bytes):
        import socket
        import threading

        self.answer, self.requests = answer, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                self._read_request(conn)  # all of it: unread bytes at close would reset the connection
                self.requests += 1
                conn.sendall(self.answer)
                conn.shutdown(__import__("socket").SHUT_WR)
                while conn.recv(65536):  # until the client closes its side
                    pass

    @staticmethod
    def _read_request(conn) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            body += conn.recv(65536)

    def close(self):
        self.sock.close()


@pytest.mark.parametrize("answer,problem", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: lots\r\n\r\n{}", "malformed Content-Length 'lots'"),
    (b"garbage, not HTTP\r\n\r\n", "malformed HTTP answer"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"scores\": [", "answer cut short"),
])
def test_a_malformed_answer_is_retried_then_named(answer, problem):
    endpoint = RawEndpoint(answer)
    try:
        client = HttpRewardClient((f"http://127.0.0.1:{endpoint.port}/score",), timeout_s=5.0, retries=2,
                                  backoff_s=0.01)
        with pytest.raises(RewardEndpointError, match=f"failed 3 times .*{problem}"):
            client.score(PROMPTS, RESPONSES)
        assert endpoint.requests == 3
    finally:
        endpoint.close()


def test_absurdly_nested_json_is_a_named_failure():
    body = b"[" * 100_000 + b"]" * 100_000
    endpoint = RawEndpoint(b"HTTP/1.1 200 OK\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    try:
        client = HttpRewardClient((f"http://127.0.0.1:{endpoint.port}/score",), timeout_s=5.0, retries=0)
        with pytest.raises(RewardEndpointError, match="did not answer JSON with a 'scores' list"):
            client.score(PROMPTS, RESPONSES)
    finally:
        endpoint.close()


def test_torch_load_is_always_weights_only():
    """Every torch.load in the package passes weights_only=True (test_bad_input shows a checkpoint
    holding code is refused by the driver's load)."""
    root = Path(__file__).resolve().parents[1] / "rlhf_ray"
    calls = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                calls.append((f"{path.relative_to(root)}:{node.lineno}", safe))
    assert calls and [c for c, safe in calls if not safe] == []


def test_rank_rng_states_load_with_weights_only(tmp_path):
    """The learner's per-rank RNG file round-trips through torch.load(weights_only=True)."""
    import random

    from rlhf_ray.engines.deepspeed_strategy import rng_state, set_rng_state

    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), torch.rand(1).item(), __import__("numpy").random.rand())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), torch.rand(1).item(), __import__("numpy").random.rand()) == expected


def test_remote_code_runs_only_when_the_config_asks(tmp_path):
    """A model folder that ships its own modelling code: by default the code is not imported."""
    from rlhf_ray.models.loading import load_causal_lm
    from rlhf_ray.models.tiny import TinyModelSpec, build_tiny_model

    assert load_config().model.trust_remote_code is False
    folder = build_tiny_model(tmp_path / "m", TinyModelSpec.of_width(32, 1))
    marker = tmp_path / "remote-code-ran"
    (folder / "evil_modeling.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaForCausalLM\n"
        # A subclass of its own: loading registers it for the auto class, which must not touch Llama.
        "class EvilForCausalLM(LlamaForCausalLM):\n    pass\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil_modeling.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    load_causal_lm(folder)
    assert not marker.exists()
    load_causal_lm(folder, trust_remote_code=True)
    assert marker.exists()  # the same folder with the flag on does run it: the default is what protects


def test_the_local_ray_token_is_readable_by_its_owner_only(tmp_path, monkeypatch):
    """Ray writes ~/.ray/auth_token 0644; a local run creates it 0600 first, or tightens it."""
    import stat

    from rlhf_ray.stages.common import protect_ray_token

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert protect_ray_token() is None and not (tmp_path / ".ray").exists()
    monkeypatch.delenv("RAY_AUTH_MODE")
    path = protect_ray_token()
    assert path == tmp_path / ".ray" / "auth_token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = path.read_text()
    assert len(token) == 64 and int(token, 16) >= 0
    path.chmod(0o644)  # as Ray itself writes it
    assert protect_ray_token() == path and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == token  # an existing token is kept: running clusters still accept it
    monkeypatch.setenv("RAY_AUTH_TOKEN", "given")
    assert protect_ray_token() is None
