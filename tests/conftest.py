"""Shared fixtures: one local Ray instance per test session, one tiny model per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests run on CPU with the real stack; keep every process lean on a 2-core machine.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from rlhf_ray.models.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama"))


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """A byte-level BPE tokenizer trained offline with a ChatML template (Qwen-like, nothing like
    the built-in character-level one)."""
    from rlhf_ray.models.tiny import build_chat_tokenizer

    return build_chat_tokenizer()


@pytest.fixture(scope="session")
def ray_session():
    """One Ray instance for the whole test session (starting Ray costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=16,  # logical slots: module-scoped runs stay up while session-scoped ones start
            include_dashboard=False,
            log_to_driver=True,
            runtime_env={"env_vars": {k: os.environ[k] for k in (
                "DS_ACCELERATOR", "VLLM_CPU_KVCACHE_SPACE", "OMP_NUM_THREADS",
                "TOKENIZERS_PARALLELISM")}},
        )
    yield ray
    ray.shutdown()


class RewardServer:
    """A real HTTP reward endpoint on 127.0.0.1, served from a thread: a response's score is its
    share of digits. ``/slow-first`` stalls its first answer by ``stall_s``; ``/big`` sends more
    bytes than a small limit (``/big-unsized`` without a Content-Length); ``/down`` answers 503.
    With ``token`` set, requests without ``Authorization: Bearer <token>`` get 401."""

    def __init__(self, token: str = "", stall_s: float = 60.0):
        import http.server
        import json
        import threading

        self.token, self.seen = token, []  # seen: (path, Authorization header) per request
        self.bodies: list[dict] = []  # each request's JSON
        self.release = threading.Event()  # ends a stall early (at close)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.seen.append((self.path, self.headers.get("Authorization")))
                server.bodies.append(body)
                if server.token and self.headers.get("Authorization") != f"Bearer {server.token}":
                    return self._send(401, b"{}")
                if self.path == "/down":
                    return self._send(503, b"{}")
                if self.path == "/slow-first" and sum(p == self.path for p, _ in server.seen) == 1:
                    server.release.wait(stall_s)
                if self.path.startswith("/big"):
                    return self._send(200, b'{"scores": [' + b"0.0, " * 1000 + b"0.0]}", self.path == "/big")
                scores = [sum(c.isdigit() for c in r) / max(1, len(r)) for r in body["responses"]]
                self._send(200, json.dumps({"scores": scores}).encode())

            def _send(self, code: int, data: bytes, sized: bool = True):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                if sized:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                self.close_connection = True

            def log_message(self, *args):  # keep test output clean
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def url(self, path: str = "/score") -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.release.set()
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def reward_server():
    server = RewardServer(token="s3cret-token-for-tests")
    yield server
    server.close()


@pytest.fixture
def hub_stand_in(monkeypatch):
    """``datasets.load_dataset`` replaced by a recorder of ``(name, subset, split)``: no hub is
    reachable here, and this stand-in is the one allowed. It returns one row holding every field
    the loaders read, or, for the split ``validation``, raises what datasets raises for a split the
    dataset lacks."""
    import datasets

    calls = []

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        if split == "validation":
            raise ValueError(f'Unknown split "{split}". Should be one of [\'train\', \'test\'].')
        return [{"question": "1+1=", "prompt": "2+2=", "response": "4", "chosen": "4", "rejected": "5"}]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


@pytest.fixture(scope="session")
def short_ppo_run(ray_session, tmp_path_factory):
    """One short real PPO run per session, shared by tests/test_ppo.py and the run viewer's browser
    test: GRPO (with GSPO's sequence-level loss) with a ZeRO-3 policy on 2 ranks, the engines' log-probs as the sampling policy's, two
    reference replicas, 2 iterations over the same 8 arithmetic prompts
    (so the viewer can compare one prompt at two iterations), every rollout in samples.jsonl, logged
    to every tracker (W&B offline, MLflow's store in the run dir: tests/test_trackers.py reads them).
    Returns the closed trainer (its ``run_dir`` stays) and the history."""
    from rlhf_ray.config import load_config
    from rlhf_ray.stages.ppo import PPOTrainer

    run_dir = tmp_path_factory.mktemp("short_ppo")
    cfg = load_config(None, [
        f"run_dir={run_dir}", "model.policy=builtin:tiny", "model.tiny_hidden_size=64",
        "data.task=arithmetic", "data.num_prompts=8", "scorers.use_task_gold_as_reward=false",
        "scorers.reward_functions=rlhf_ray.tasks.rewards:digit_fraction", "rollout.max_new_tokens=8",
        "rollout.max_model_len=64", "data.max_prompt_tokens=32", "rollout.gpu_memory_utilization=0.05", "policy.micro_batch_size=16",
        "critic.micro_batch_size=16", "ppo.iterations=2", "ppo.advantage_estimator=grpo",
        "rollout.samples_per_prompt=4", "ppo.prompts_per_iteration=8", "rollout.num_engines=1", "policy.num_ranks=2",
        "policy.zero_stage=3", "sync.parity_every=1", "sync.bucket_mb=1", "sync.transport=auto",
        "ppo.old_logprobs=rollout", "scorers.reference_replicas=2", "ppo.policy_loss=gspo", "ppo.clip_eps_high=0.28",
        "checkpoint.save_final=false",
        "logging.samples_per_iteration=32", "logging.trackers=[tensorboard,wandb,mlflow]",
    ])
    with pytest.MonkeyPatch.context() as env:
        offline_tracker_env(env, run_dir.parent / "wandb-home")
        trainer = PPOTrainer(cfg)
        try:
            history = trainer.fit()
        finally:
            trainer.close()
    return trainer, history


@pytest.fixture
def offline_trackers(monkeypatch, tmp_path_factory):
    """The trackers' environment of the tests (``offline_tracker_env``)."""
    offline_tracker_env(monkeypatch, tmp_path_factory.mktemp("wandb-home"))


def offline_tracker_env(env: pytest.MonkeyPatch, wandb_home: Path) -> None:
    """W&B offline and quiet, its caches (elsewhere in the home folder) in ``wandb_home``; MLflow
    in the run's own store whatever the environment says."""
    env.setenv("WANDB_MODE", "offline")
    env.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        env.setenv(name, str(wandb_home))
    env.delenv("MLFLOW_TRACKING_URI", raising=False)
