"""PPO across a local multi-node Ray cluster (``rlhf-ray cluster up|down``, rlhf_ray/cluster).

The cluster is its own Ray (a head with num-cpus 0, two rollout nodes, one learner node, the
KubeRay groups' custom resources), started and stopped by ``launch/cluster.py`` as subprocesses,
so ``down`` runs from another process than ``up``. As root each node lives in its own network
namespace with its own address; elsewhere all nodes share loopback (the address test skips).
The PPO driver is a subprocess on the head node (``cluster exec``), never the session's
``ray_session``; it reports where Ray put every actor (rlhf_ray.cluster.placement).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
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
    try:
        r = subprocess.run([*CLUSTER, "up", "--rollout-nodes", "2", "--learner-nodes", "1", "--rollout-cpus", "1",
                            "--learner-cpus", "3", "--network", network, "--state", str(state_path)],
                           env=env, capture_output=True, text=True, timeout=300, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        state = local.read_state(state_path)
        yield {"state": state, "state_path": state_path, "why_not_netns": why_not_netns, "env": env}
    finally:
        if state_path.exists():  # the last test downs it itself; this is for failures on the way
            local.down(state_path, log=lambda *_: None)


@pytest.fixture(scope="module")
def report(cluster, tmp_path_factory):
    """A 2-iteration critic-free PPO run (tests/test_ppo.py's tiny setup), driven from the head."""
    out = tmp_path_factory.mktemp("report") / "report.json"
    run_dir = out.parent / "run"
    overrides = [
        f"run_dir={run_dir}", f"ray_address={cluster['state'].gcs_address}", "model.policy=builtin:tiny",
        "model.tiny_hidden_size=64", "data.task=arithmetic", "scorers.use_task_gold_as_reward=false",
        "scorers.reward_functions=rlhf_ray.tasks.rewards:digit_fraction", "rollout.max_new_tokens=8",
        "rollout.max_model_len=64", "rollout.gpu_memory_utilization=0.05", "policy.micro_batch_size=16",
        "ppo.iterations=2", "ppo.advantage_estimator=grpo", "rollout.samples_per_prompt=4",
        "ppo.prompts_per_iteration=8", "rollout.num_engines=2", "policy.num_ranks=1", "sync.parity_every=1",
        "checkpoint.save_final=false", "rollout.ray_resources={rollout: 1}", "policy.ray_resources={learner: 1}",
        "critic.ray_resources={learner: 1}", "scorers.ray_resources={learner: 1}",
    ]
    r = subprocess.run([*CLUSTER, "exec", "--state", str(cluster["state_path"]), "--", sys.executable, "-m",
                        "rlhf_ray.cluster.placement", "--out", str(out), *overrides],
                       env=cluster["env"], cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    data = json.loads(out.read_text())
    data["run_dir"] = run_dir
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
    assert [r["iteration"] for r in history] == [1, 2]
    rows = [json.loads(line) for line in (Path(report["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    for row in rows:
        for key in ONE_NODE_METRICS:
            assert key in row and row[key] is not None and math.isfinite(row[key]), key
        assert "value_loss" not in row
    # Parity was checked after every sync (sync.parity_every=1) and the run went on; the engines
    # sampled from the weights the learner recomputes with.
    assert max(r["logprob_gap_vllm_learner"] for r in rows) < 1e-2


@pytest.mark.slow
def test_down_from_another_process_leaves_nothing(cluster):
    state = cluster["state"]
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
