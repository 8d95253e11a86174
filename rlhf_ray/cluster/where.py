"""Where Ray actually put each role, from Ray's own view (not from the config).

``role_placement(roles)`` asks each actor where it runs (``__ray_call__``: node id, node address,
pid) and checks that against Ray's state API (``list_actors``) and node table (``ray.nodes()``).

``python -m rlhf_ray.cluster.where --out report.json [section.key=value ...]`` runs a short
PPO stage as a driver on the cluster named by ``ray_address`` and writes: the metrics history,
the placement of every role and the nodes at launch (``placement``, ``nodes``) and after the run
(``placement_end``, ``nodes_end``: elastic rollout may have moved engines), the weight-sync
address, and timed weight syncs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _where(_actor_self) -> dict:
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(),
            "pid": os.getpid()}


def nodes_view() -> dict[str, dict]:
    """node id -> {ip, name, resources, head, alive} from ``ray.nodes()``."""
    import ray

    out = {}
    for n in ray.nodes():
        res = n.get("Resources", {})
        out[n["NodeID"]] = {"ip": n["NodeManagerAddress"], "name": n.get("NodeName"), "alive": n["Alive"],
                            "head": "node:__internal_head__" in res,
                            "resources": {k: v for k, v in res.items() if not k.startswith("node:")}}
    return out


def role_placement(roles) -> dict[str, list[dict]]:
    """role -> one entry per actor: actor id, where the actor says it runs, where Ray's state API
    says it runs, and that node's address and custom resources."""
    import ray
    from ray.util.state import list_actors

    handles = {"rollout": list(roles.rollout), "policy": list(roles.policy), "critic": list(roles.critic),
               "reference": list(roles.reference), "reward": [roles.reward]}
    said = {role: ray.get([h.__ray_call__.remote(_where) for h in hs]) for role, hs in handles.items()}
    state = {a.actor_id: a for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10000, detail=True)}
    nodes = nodes_view()
    out: dict[str, list[dict]] = {}
    for role, hs in handles.items():
        out[role] = []
        for h, where in zip(hs, said[role]):
            actor_id = h._actor_id.hex()
            st = state.get(actor_id)
            node = nodes.get(where["node_id"], {})
            out[role].append({"actor_id": actor_id, **where, "state_node_id": st.node_id if st else None,
                              "state_pid": st.pid if st else None, "node_ip": node.get("ip"),
                              "node_resources": node.get("resources", {}), "node_is_head": node.get("head")})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rlhf_ray.cluster.where")
    p.add_argument("--out", required=True, help="JSON report")
    p.add_argument("--config", default=None)
    p.add_argument("--sync-repeats", type=int, default=3, help="timed weight syncs after the run")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)

    import ray

    from rlhf_ray.config import load_config
    from rlhf_ray.stages.common import init_ray
    from rlhf_ray.stages.ppo import PPOTrainer

    cfg = load_config(args.config, args.overrides)
    init_ray(cfg)
    t0 = time.perf_counter()
    trainer = PPOTrainer(cfg)
    launch_s = time.perf_counter() - t0
    placement, nodes = role_placement(trainer.roles), nodes_view()
    try:
        t0 = time.perf_counter()
        history = trainer.fit()
        fit_s = time.perf_counter() - t0
        sync_address = ray.get(trainer.roles.policy[0].node_ip.remote())
        sync_s = []
        for _ in range(args.sync_repeats):
            t0 = time.perf_counter()
            trainer._sync_weights()
            sync_s.append(time.perf_counter() - t0)
        report = {
            "history": history, "launch_s": launch_s, "fit_s": fit_s, "sync_s": sync_s,
            "sync_address": sync_address, "driver": {"node_id": ray.get_runtime_context().get_node_id(),
                                                      "ip": ray.util.get_node_ip_address()},
            "placement": placement, "nodes": nodes,
            "placement_end": role_placement(trainer.roles), "nodes_end": nodes_view(),
            "weight_bytes": trainer.roles.rollout.manifest.get("total_bytes"),
            "run_dir": str(trainer.run_dir),
        }
    finally:
        trainer.close()
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2, default=str)
    print(f"placement report written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
