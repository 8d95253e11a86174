"""PPO across a local multi-node Ray cluster (``rlhf-ray cluster up|down``, rlhf_ray/cluster).

The cluster is its own Ray (a head with num-cpus 0, two rollout nodes, one learner node, the
KubeRay groups' custom resources), started and stopped by ``launch/cluster.py`` as subprocesses,
so ``down`` runs from another process than ``up``. As root each node lives in its own network
namespace with its own address; elsewhere all nodes share loopback (the address test skips).
The PPO driver is a subprocess on the head node (``cluster exec``), never the session's
``ray_session``; it reports where Ray put every actor (rlhf_ray.cluster.where).

One elastic run (``rollout.elastic``) serves every PPO check: while it goes on, the test adds a
rollout node, drains one (``ray drain-node``, preemption) and kills another's raylet outright.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from rlhf_ray.cluster import local, netns

REPO = Path(__file__).resolve().parent.parent
CLUSTER = [sys.executable, str(REPO / "launch" / "cluster.py")]
# The metrics a one-node run records (tests/test_ppo.py), less value_loss: this run is critic-free.
ONE_NODE_METRICS = [
    "iteration", "reward_mean", "reward_std", "kl_to_ref", "kl_coef", "entropy", "policy_loss",
    "clip_fraction", "approx_kl", "response_length_mean", "response_length_max", "logprob_gap_vllm_learner",
    "time/generate_s", "time/score_s", "time/train_s", "time/sync_s", "throughput/generate_tokens_per_s",
    "throughput/iteration_tokens_per_s", "gold_score_mean", "diversity/distinct_1",
    "flag/mode_collapse", "flag/over_optimisation", "hacking/verbosity_correlation", "hacking/format_gaming_rate",
]


# ------------------------------------------------------------------------- pure: no Ray
def test_cluster_commands_parse():
    import argparse

    from rlhf_ray.cluster import add_cluster_commands

    parser = argparse.ArgumentParser()
    add_cluster_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["cluster", "up", "--rollout-nodes", "2", "--learner-nodes", "1", "--state", "/s"])
    assert (args.cluster_action, args.rollout_nodes, args.learner_nodes, args.state) == ("up", 2, 1, "/s")
    assert parser.parse_args(["cluster", "down"]).cluster_action == "down"
    ex = parser.parse_args(["cluster", "exec", "--", "python", "-c", "1"])
    assert ex.cmd[-3:] == ["python", "-c", "1"]


def test_state_file_round_trips():
    state = local.ClusterState("abc123", "/tmp/rlc-x", "netns", "10.0.0.2:1", "http://10.0.0.2:2",
                               {"RAY_AUTH_MODE": "disabled"},
                               [local.NodeState("head", "head", "10.0.0.2", 42, "/tmp/rlc-x/head", "/l", 0, {},
                                                "rlhf-abc123-head")])
    back = local.ClusterState.from_json(state.to_json())
    assert back == state and back.exec_prefix() == ["ip", "netns", "exec", "rlhf-abc123-head"]


def test_down_without_a_cluster_says_so(tmp_path):
    r = subprocess.run([*CLUSTER, "down", "--state", str(tmp_path / "none.json")], capture_output=True, text=True,
                       check=False)
    assert r.returncode == 1 and "no cluster state" in r.stderr


# ------------------------------------------------------------------------- a real cluster
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state_path = tmp_path_factory.mktemp("cluster") / "state.json"
    why_not_netns = netns.probe()
    network = "netns" if why_not_netns is None else "loopback"
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    # A dead node is declared after 3 failed health checks 1 s apart (Ray's default: 5 x 3 s).
    fast_death = ["--env", "RAY_health_check_period_ms=1000", "--env", "RAY_health_check_failure_threshold=3"]
    try:
        r = subprocess.run([*CLUSTER, "up", "--rollout-nodes", "2", "--learner-nodes", "1", "--rollout-cpus", "1",
                            "--learner-cpus", "3", "--network", network, "--state", str(state_path), *fast_death],
                           env=env, capture_output=True, text=True, timeout=300, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        state = local.read_state(state_path)
        yield {"state": state, "state_path": state_path, "why_not_netns": why_not_netns, "env": env}
    finally:
        if state_path.exists():  # the last test downs it itself; this is for failures on the way
            local.down(state_path, log=lambda *_: None)


ITERATIONS = 7


@contextmanager
def paused(proc: subprocess.Popen):
    """The driver stands still (SIGSTOP) while the cluster changes, so the iteration after next is
    the first that must see the change, whatever phase the driver was in."""
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(proc.pid, signal.SIGCONT)


def _rows(path: Path) -> list[dict]:
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


@pytest.fixture(scope="module")
def report(cluster, tmp_path_factory):
    """A 7-iteration critic-free elastic PPO run (tests/test_ppo.py's tiny setup) driven from the
    head, during which a rollout node joins (after iteration k_add), rollout-0 drains (k_drain)
    and rollout-1's raylet is killed (k_kill, so during iteration k_kill + 1)."""
    out = tmp_path_factory.mktemp("report") / "report.json"
    run_dir = out.parent / "run"
    state_path = cluster["state_path"]
    overrides = [
        f"run_dir={run_dir}", f"ray_address={cluster['state'].gcs_address}", "model.policy=builtin:tiny",
        "model.tiny_hidden_size=64", "data.task=arithmetic", "scorers.use_task_gold_as_reward=false",
        "scorers.reward_functions=rlhf_ray.tasks.rewards:digit_fraction", "rollout.max_new_tokens=8",
        "rollout.max_model_len=64", "data.max_prompt_tokens=32", "rollout.gpu_memory_utilization=0.05", "policy.micro_batch_size=16",
        f"ppo.iterations={ITERATIONS}", "ppo.advantage_estimator=grpo", "rollout.samples_per_prompt=4",
        "ppo.prompts_per_iteration=8", "rollout.num_engines=2", "policy.num_ranks=1", "sync.parity_every=1",
        "checkpoint.save_final=false", "rollout.ray_resources={rollout: 1}", "policy.ray_resources={learner: 1}",
        "critic.ray_resources={learner: 1}", "scorers.ray_resources={learner: 1}",
        "rollout.elastic=true", "rollout.min_engines=1", "rollout.max_engines=3",
    ]
    log_path = out.parent / "driver.log"
    metrics = run_dir / "metrics.jsonl"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*CLUSTER, "exec", "--state", str(state_path), "--", sys.executable, "-m",
                                 "rlhf_ray.cluster.where", "--out", str(out), *overrides],
                                env=cluster["env"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    events: dict = {}

    def wait_rows(n: int) -> None:
        deadline = time.monotonic() + 300
        while len(_rows(metrics)) < n:
            assert proc.poll() is None, f"the driver ended early:\n{log_path.read_text()[-6000:]}"
            assert time.monotonic() < deadline, f"no iteration {n} after 300 s:\n{log_path.read_text()[-6000:]}"
            time.sleep(0.01)

    try:
        wait_rows(1)
        with paused(proc):
            events["k_add"] = len(_rows(metrics))
            added = local.add_node("rollout", 1, state_path, log=lambda *_: None)
        events["added"] = {"name": added.name, "ip": added.ip}
        wait_rows(events["k_add"] + 2)
        state = local.read_state(state_path)
        events["ids"] = local.node_ids(state)
        events["rollout_actor_nodes"] = [a["node_id"] for a in local.alive_actors(state)
                                         if a["class_name"] == "RolloutActor"]
        with paused(proc):
            events["k_drain"] = len(_rows(metrics))
            local.request_drain(state, "rollout-0", deadline_s=120)
        wait_rows(events["k_drain"] + 2)
        # Paused after row k_kill, at any point of iteration k_kill + 1 (a loaded machine may take
        # longer to pause it than the engines take to answer): the driver finds rollout-1's engine
        # gone in that iteration, while its prompts are out or, if they were answered, at its sync.
        with paused(proc):
            events["k_kill"] = len(_rows(metrics))
            local.remove_node("rollout-1", state_path, drain=False, log=lambda *_: None)
        left = time.monotonic() + 60
        while "rollout-0" in local.node_ids(state) and time.monotonic() < left:
            time.sleep(0.5)
        events["drained_node_left_by_itself"] = "rollout-0" not in local.node_ids(state)
        local.remove_node("rollout-0", state_path, log=lambda *_: None)
        assert proc.wait(timeout=400) == 0, log_path.read_text()[-6000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    data = json.loads(out.read_text())
    data.update(run_dir=run_dir, events=events, driver_log=log_path.read_text())
    return data


@pytest.mark.slow
def test_every_node_joined_with_its_group_resources(cluster):
    nodes = local.status(cluster["state_path"])["alive_nodes"]
    groups = sorted("head" if "rollout" not in n["resources"] and "learner" not in n["resources"]
                    else ("rollout" if "rollout" in n["resources"] else "learner") for n in nodes)
    assert groups == ["head", "learner", "rollout", "rollout"]
    head = next(n for n in nodes if "rollout" not in n["resources"] and "learner" not in n["resources"])
    assert head["resources"].get("CPU", 0) == 0 and head["resources"].get("GPU", 0) == 0


@pytest.mark.slow
def test_roles_land_where_their_groups_pin_them(report):
    placement, nodes = report["placement"], report["nodes"]
    assert len(placement["rollout"]) == 2 and len(placement["policy"]) == 1 and not placement["critic"]
    for role, actors in placement.items():
        for a in actors:
            # The actor's own answer and Ray's state API agree on the node, and it is a live worker node.
            assert a["node_id"] == a["state_node_id"] and a["pid"] == a["state_pid"], (role, a)
            assert a["node_id"] in nodes and nodes[a["node_id"]]["alive"] and not a["node_is_head"], (role, a)
            assert a["ip"] == nodes[a["node_id"]]["ip"], (role, a)
            want = "rollout" if role == "rollout" else "learner"
            other = "learner" if want == "rollout" else "rollout"
            assert want in a["node_resources"] and other not in a["node_resources"], (role, a)
    # One CPU per rollout node: the two engines are on the two rollout nodes.
    assert len({a["node_id"] for a in placement["rollout"]}) == 2
    # The driver runs on the head, which holds no actor.
    assert nodes[report["driver"]["node_id"]]["head"]


@pytest.mark.slow
def test_weight_sync_forms_at_the_learner_rank0_node_address(report):
    nodes, placement = report["nodes"], report["placement"]
    rank0 = placement["policy"][0]
    assert report["sync_address"] == nodes[rank0["node_id"]]["ip"]
    assert all(math.isfinite(s) and s > 0 for s in report["sync_s"])


@pytest.mark.slow
def test_nodes_have_their_own_addresses(cluster, report):
    if cluster["why_not_netns"]:
        pytest.skip(f"nodes share loopback, not one namespace each: {cluster['why_not_netns']}")
    state, nodes = cluster["state"], report["nodes"]
    ips = [n["ip"] for n in nodes.values() if n["alive"]]
    assert len(set(ips)) == 4 and not any(ip.startswith("127.") for ip in ips)
    assert sorted(ips) == sorted(n.ip for n in state.nodes)
    sync = report["sync_address"]
    assert not sync.startswith("127.")
    assert sync not in {a["ip"] for a in report["placement"]["rollout"]}  # the group crosses nodes
    assert report["driver"]["ip"] == state.head.ip


@pytest.mark.slow
def test_metrics_are_those_of_a_one_node_run(report):
    history = report["history"]
    assert [r["iteration"] for r in history] == list(range(1, ITERATIONS + 1))
    rows = _rows(Path(report["run_dir"]) / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == list(range(1, ITERATIONS + 1))
    for row in rows:
        for key in ONE_NODE_METRICS:
            assert key in row and row[key] is not None and math.isfinite(row[key]), key
        assert "value_loss" not in row
    # Parity was checked after every sync (sync.parity_every=1) and the run went on; the engines
    # sampled from the weights the learner recomputes with.
    assert max(r["logprob_gap_vllm_learner"] for r in rows) < 1e-2


@pytest.mark.slow
def test_rollout_follows_the_cluster(cluster, report):
    """Added node -> one more engine from the iteration after next; drained node -> its engine
    retires and the node leaves; killed raylet mid-iteration -> the run finishes on the rest."""
    ev, run_dir = report["events"], Path(report["run_dir"])
    engines = {r["iteration"]: r["rollout/engines"] for r in _rows(run_dir / "metrics.jsonl")}
    k_add, k_drain, k_kill = ev["k_add"], ev["k_drain"], ev["k_kill"]
    assert k_add + 2 <= k_drain and k_drain + 2 <= k_kill and k_kill + 2 <= ITERATIONS, ev
    assert all(engines[i] == 2 for i in range(1, k_add + 1)), engines
    assert engines[k_add + 2] == 3, engines  # the first iteration begun after the node joined
    # Ray's view then: three live engines, one on each rollout node, the new one included.
    new_id = ev["ids"][ev["added"]["name"]]
    assert sorted(ev["rollout_actor_nodes"]) == sorted(ev["ids"][f"rollout-{i}"] for i in (0, 1, 2)), ev
    assert new_id in ev["rollout_actor_nodes"]
    assert engines[k_drain + 2] == 2, engines  # rollout-0's engine retired at a boundary
    assert ev["drained_node_left_by_itself"], "the drained node's raylet did not exit once idle"
    assert all(engines[i] == 1 for i in range(k_kill + 2, ITERATIONS + 1)), engines
    log = report["driver_log"]
    found = (f"died during iteration {k_kill + 1}", f"died before the sync of iteration {k_kill + 1}")
    assert any(f in log for f in found) and "retired rollout engine(s)" in log, log[-4000:]
    # Where the run ended, from Ray's view: the one engine left is on the node that joined mid-run.
    (last,) = report["placement_end"]["rollout"]
    assert last["node_id"] == last["state_node_id"] == new_id
    if not cluster["why_not_netns"]:
        assert last["ip"] == ev["added"]["ip"]
    # No prompt lost or repeated: every iteration once, its 8 prompts at consecutive positions.
    prompts = _rows(run_dir / "prompts.jsonl")
    assert [p["iteration"] for p in prompts] == list(range(1, ITERATIONS + 1))
    assert [p["position"] for p in prompts] == [8 * i for i in range(ITERATIONS)]
    assert all(len(p["prompts"]) == 8 for p in prompts)
    # ... and every one of them answered (8 prompts x 4 samples), the killed iteration's too.
    for r in _rows(run_dir / "metrics.jsonl"):
        assert r["generated_tokens"] == round(r["response_length_mean"] * 32), r["iteration"]


@pytest.mark.slow
def test_down_from_another_process_leaves_nothing(cluster):
    state = local.read_state(cluster["state_path"])  # with the node added during the run
    r = subprocess.run([*CLUSTER, "down", "--state", str(cluster["state_path"])], capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not cluster["state_path"].exists()
    assert local.processes_of(state.root) == []
    # A killed node may take a moment to leave the process table on a loaded machine.
    deadline = time.monotonic() + 30
    while any(local.running(n.pid) for n in state.nodes) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(local.running(n.pid) for n in state.nodes)
    assert not os.path.exists(state.root)
    assert netns.leftovers(state.cluster_id) == []
